"""What real DDP training loops do, with every commcomp DDP method: gradient accumulation under
`no_sync()`, `find_unused_parameters=True`, and bf16 models. Real gloo ranks, each method held
against a reference run that differs only in the feature under test.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp

WORLD = 2
STEPS = 4
GRADIVEQ = {"min_numel": 1024, "warmup_steps": 1}
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("gradiveq", "gradiveq", GRADIVEQ),
    ("qsgd", "qsgd", {"bits": 4}),
    ("topk-ef", "topk", {"ratio": 0.1, "error_feedback": True}),
    ("sign-ef", "sign", {"error_feedback": True}),
    ("fp16", "fp16", {}),
    ("identity", "identity", {}),
]


class Net(nn.Module):
    """An MLP with a side branch that rank 0 uses and the other ranks do not (or use times 0)."""

    def __init__(self, side: str = "none", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
        self.side = nn.Linear(16, 4) if side != "none" else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.to(dtype)
        self.side_mode = side  # "none": no branch; "rank0": used by rank 0 only; "zero": x0 on other ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        rank = torch.distributed.get_rank()
        if self.side is not None and self.side_mode == "rank0" and rank == 0:
            out = out + self.side(x)
        elif self.side is not None and self.side_mode == "zero":
            out = out + self.side(x) * (1.0 if rank == 0 else 0.0)
        return out


def batch(rank: int, step: int, micro: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    return torch.randn(8, 16, generator=gen).to(dtype), torch.randn(8, 4, generator=gen).to(dtype)


def train(
    rank: int, method: str, options: dict[str, Any], *, micro: int = 1, fused: bool = False,
    find_unused: bool = False, side: str = "none", dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:  # fmt: skip
    """STEPS steps of `micro` micro-batches: under no_sync() (fused=False) or as one summed loss."""
    net = Net(side, dtype)
    ddp = DDP(net, find_unused_parameters=find_unused)
    state = commcomp.register(ddp, method, **options)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for step in range(STEPS):
        opt.zero_grad()
        if fused:
            total = sum(F.mse_loss(ddp(x), y) for x, y in (batch(rank, step, m, dtype) for m in range(micro)))
            total.backward()  # type: ignore[union-attr]
        else:
            for m in range(micro):
                x, y = batch(rank, step, m, dtype)
                if m < micro - 1:
                    with ddp.no_sync():
                        F.mse_loss(ddp(x), y).backward()
                else:
                    F.mse_loss(ddp(x), y).backward()
        opt.step()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    return {"params": params, "hook_steps": state.step, "dtypes": {p.dtype for p in net.parameters()}}


def everything(rank: int, world: int) -> dict[str, Any]:
    del world
    out: dict[str, Any] = {}
    for label, method, options in METHODS:
        out[label] = {
            "no_sync": train(rank, method, options, micro=2),
            "fused": train(rank, method, options, micro=2, fused=True),
            "unused": train(rank, method, options, find_unused=True, side="rank0"),
            "zero_side": train(rank, method, options, side="zero"),
            "bf16": train(rank, method, options, dtype=torch.bfloat16),
            "fp32": train(rank, method, options),
        }
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run(everything, WORLD, timeout=600)


LABELS = [label for label, _, _ in METHODS]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("label", LABELS)
def test_no_sync_accumulation_equals_one_backward_of_the_summed_loss(results: list[dict[str, Any]], label: str) -> None:
    for r in results:
        got, want = r[label]["no_sync"], r[label]["fused"]
        assert got["hook_steps"] == STEPS  # the hook ran once per optimizer step, not per micro-batch
        _close(got["params"], want["params"], 1e-5)
    _close(results[0][label]["no_sync"]["params"], results[1][label]["no_sync"]["params"], 0.0)


@pytest.mark.parametrize("label", LABELS)
def test_find_unused_parameters_equals_a_zero_gradient_branch(results: list[dict[str, Any]], label: str) -> None:
    for r in results:
        got, want = r[label]["unused"], r[label]["zero_side"]
        assert got["hook_steps"] == STEPS
        _close(got["params"], want["params"], 1e-6)
    _close(results[0][label]["unused"]["params"], results[1][label]["unused"]["params"], 0.0)


@pytest.mark.parametrize("label", LABELS)
def test_bf16_model_trains_like_fp32(results: list[dict[str, Any]], label: str) -> None:
    for r in results:
        got, want = r[label]["bf16"], r[label]["fp32"]
        assert got["dtypes"] == {torch.bfloat16} and got["hook_steps"] == STEPS
        assert all(bool(torch.isfinite(p.float()).all()) for p in got["params"].values())
        moved = sum(float((got["params"][n].float() - want["params"][n]).abs().max()) for n in got["params"])
        drift = sum(float((want["params"][n] - Net().state_dict()[n]).abs().max()) for n in want["params"])
        assert moved < 0.25 * drift  # bf16 follows the fp32 run's trajectory up to rounding
    _close(results[0][label]["bf16"]["params"], results[1][label]["bf16"]["params"], 0.0)
