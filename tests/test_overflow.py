"""Overflow steps under a real torch.amp.GradScaler: skipped on every rank, compressor state untouched.

For every DDP method, PQASGD and the gossip algorithms (both routes), one run has an inf loss on
one rank at one step (tests/overflow_workload.py) and a reference run leaves that step out. Every
rank must skip exactly that step, see non-finite gradients at it, and end with the reference run's
parameters bit for bit: nothing of the overflow step (error-feedback residuals, PCA statistics,
quantizer random streams, step counters, models mixed by gossip) may survive it. Horovod's
optimizer and PQASGD on Horovod are held to the same under a real `horovodrun`
(tests/overflow_horovod_worker.py). `nonfinite="raise"` raises on every rank instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run
from overflow_workload import BAD_STEP, LR, batch, build_model, train
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp.gossip import CHOCO, DCD
from commcomp.overflow import NonFiniteGradientError

WORLD = 2

FITTED = {"basis": "fitted", "min_numel": 1024, "warmup_steps": 2}
# (label, method, options) for commcomp.register
DDP_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("gradiveq", "gradiveq", {"min_numel": 1024, "warmup_steps": 2}),  # tracked basis, error feedback
    ("gradiveq-fitted-compress", "gradiveq", {**FITTED, "sample_steps": 2, "compress_steps": 2}),
    ("gradiveq-fitted-refit", "gradiveq", {**FITTED, "sample_steps": 3, "compress_steps": 2}),
    ("gradiveq-fitted-sample", "gradiveq", {**FITTED, "sample_steps": 4, "compress_steps": 2}),
    ("qsgd", "qsgd", {"bits": 4}),
    ("qsgd-ef", "qsgd", {"bits": 2, "error_feedback": True}),
    ("topk-ef", "topk", {"ratio": 0.1, "error_feedback": True}),
    ("sign-ef", "sign", {"error_feedback": True}),
    ("randk", "randk", {"ratio": 0.25}),
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("identity", "identity", {}),
    ("choco-ddp", "choco", {"quantizer": "qsgd", "bits": 4, "consensus_step": 0.5}),
]


def _ddp(rank: int, method: str, options: dict[str, Any], overflow: bool) -> dict[str, Any]:
    net = build_model()
    ddp = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    extra = {"optimizer": opt} if method == "choco" else {}
    commcomp.register(ddp, method, **extra, **options)
    return train(rank, ddp, list(net.parameters()), opt, overflow)


def _pqasgd(rank: int, overflow: bool) -> dict[str, Any]:
    net = build_model()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    commcomp.PQASGD(net, opt, period=2, quantizer="qsgd", bits=4)
    return train(rank, net, list(net.parameters()), opt, overflow)


def _gossip(rank: int, cls: type, options: dict[str, Any], overflow: bool) -> dict[str, Any]:
    net = build_model()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    algo = cls(net, opt, **options)
    return train(rank, net, list(net.parameters()), algo, overflow)  # scaler.step(algo)


def _raises(rank: int) -> dict[str, str]:
    """With nonfinite="raise", one backward with an inf loss on rank 1: the error on every rank."""

    def ddp(net: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
        model = DDP(net)
        commcomp.register(model, "qsgd", bits=4, nonfinite="raise")
        return model

    def choco_ddp(net: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
        model = DDP(net)
        commcomp.register(model, "choco", optimizer=opt, quantizer="sign", consensus_step=0.5, nonfinite="raise")
        return model

    def choco(net: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
        CHOCO(net, opt, quantizer="sign", consensus_step=0.5, nonfinite="raise")
        return net

    def pqasgd(net: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
        commcomp.PQASGD(net, opt, period=2, nonfinite="raise")
        return net

    def fp16(net: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
        model = DDP(net)
        commcomp.register(model, "fp16", nonfinite="raise")
        return model

    out = {}
    makers = {"qsgd": ddp, "choco-ddp": choco_ddp, "choco": choco, "pqasgd": pqasgd, "fp16-overflow": fp16}
    for label, make in makers.items():
        net = build_model()
        model = make(net, torch.optim.SGD(net.parameters(), lr=LR))
        x, y = batch(rank, 0)
        # fp16-overflow: finite gradients whose g/N does not fit fp16 (max 65504): what rank 1 sends is inf
        bad = 1e12 if label == "fp16-overflow" else float("inf")
        loss = F.mse_loss(model(x), y) * (bad if rank == 1 else 1.0)
        try:
            loss.backward()
            out[label] = ""
        except (NonFiniteGradientError, RuntimeError) as err:  # DDP wraps errors of hook callbacks
            out[label] = str(err)
    return out


def _sum_overflow(rank: int, policy: str) -> dict[str, Any]:
    """The fp16 hook on gradients whose g/N fits fp16 on every rank (40000) but whose sum does not
    (40000 N > 65504): the received sum is infinite."""
    del rank
    net = nn.Linear(4, 1, bias=False)
    model = DDP(net)
    state = commcomp.register(model, "fp16", nonfinite=policy)
    loss = model(torch.ones(1, 4)).sum() * (40000.0 * WORLD)  # each weight's gradient: 40000 N
    try:
        loss.backward()
    except (NonFiniteGradientError, RuntimeError) as err:  # DDP wraps errors of hook callbacks
        return {"error": str(err)}
    assert net.weight.grad is not None
    return {"grad": net.weight.grad.clone(), "skipped": state.stats.total.skipped_steps, "step": state.step}


def everything(rank: int, world: int) -> dict[str, Any]:
    del world
    out: dict[str, Any] = {"raises": _raises(rank)}
    out["sum_overflow"] = {policy: _sum_overflow(rank, policy) for policy in ("propagate", "raise")}
    for overflow in (True, False):
        runs: dict[str, Any] = {}
        for label, method, options in DDP_METHODS:
            runs[label] = _ddp(rank, method, options, overflow)
        runs["pqasgd"] = _pqasgd(rank, overflow)
        runs["choco"] = _gossip(rank, CHOCO, {"quantizer": "sign", "consensus_step": 0.5}, overflow)
        runs["dcd"] = _gossip(rank, DCD, {"quantizer": "qsgd", "bits": 8}, overflow)
        out["overflow" if overflow else "reference"] = runs
    return out


LABELS = [label for label, _, _ in DDP_METHODS] + ["pqasgd", "choco", "dcd"]


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run(everything, WORLD, timeout=600)


def _check(results: list[dict[str, Any]], label: str) -> None:
    for rank, r in enumerate(results):
        got, want = r["overflow"][label], r["reference"][label]
        assert got["poisoned"], f"{label}: rank {rank} saw finite gradients at the overflow step"
        assert got["skipped"] == [BAD_STEP], f"{label}: rank {rank} skipped {got['skipped']}"
        assert want["skipped"] == []
        for k, (a, b) in enumerate(zip(got["params"], want["params"], strict=True)):
            assert torch.equal(a, b), f"{label}: rank {rank} parameter {k} differs from the run without that step"


@pytest.mark.parametrize("label", LABELS)
def test_overflow_step_is_skipped_everywhere_and_leaves_no_trace(results: list[dict[str, Any]], label: str) -> None:
    _check(results, label)


@pytest.fixture(scope="module")
def horovod(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    outdir = tmp_path_factory.mktemp("overflow-horovod")
    bin_dir = Path(sys.executable).parent
    worker = Path(__file__).with_name("overflow_horovod_worker.py")
    command = [str(bin_dir / "horovodrun"), "-np", str(WORLD), "--gloo", sys.executable, str(worker), str(outdir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # horovodrun and every rank it started
        output, _ = proc.communicate()
        pytest.fail(f"horovodrun did not finish within 300 s:\n{output[-6000:]}")
    assert proc.returncode == 0, output[-6000:]
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("label", ["hvd-gradiveq", "hvd-qsgd-ef", "hvd-fp16", "hvd-pqasgd"])
def test_horovod_overflow_step_is_skipped_everywhere_and_leaves_no_trace(
    horovod: list[dict[str, Any]], label: str
) -> None:
    _check(horovod, label)


def test_raise_policy_raises_on_every_rank(results: list[dict[str, Any]]) -> None:
    for r in results:
        for label, message in r["raises"].items():
            assert "NaN or Inf in the gradients of rank(s) [1]" in message, (label, message)


def test_a_dense_sum_that_overflows_the_wire_dtype_is_an_overflow_step(results: list[dict[str, Any]]) -> None:
    """Every rank sent finite fp16 values, their sum is not: the dense exchange checks the received
    sum, so the step is an overflow step on every rank (the infinite sum in the gradients, skipped,
    not counted), or raises on every rank saying the sum overflowed."""
    for r in results:
        got = r["sum_overflow"]["propagate"]
        assert torch.isinf(got["grad"]).all() and got["skipped"] == 1 and got["step"] == 0, got
        assert "the sum overflowed the wire dtype" in r["sum_overflow"]["raise"]["error"]


def _host_reads(rank: int, world: int, method: str, policy: str) -> list[tuple[int, bool]]:
    """Three steps of `method` on the several-bucket model, a NaN on rank 1 at the second: every
    value read on the host (`tolist`, `item`, `bool`, `float`, `int`) inside the engine's decoding
    callback (`commcomp.exchange.finish`), as (the state's step, whether every group of the step
    had decoded: the step's end, in the last group's callback)."""
    import threading

    from bucketed_net import Net
    from bucketed_net import batch as small_batch

    import commcomp.hooks.base as hooks_base

    inside = threading.local()
    reads: list[tuple[int, bool]] = []
    state_box: list[Any] = []

    def finish(host: Any, items: Any, index: int = 0) -> None:
        inside.on = True
        try:
            real_finish(host, items, index)
        finally:
            inside.on = False

    def watched(name: str) -> Any:
        real = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any) -> Any:
            if getattr(inside, "on", False):
                state = state_box[0]
                reads.append((state.step, state._pending == 0))  # no group left: the step's end
            return real(self, *args)

        return read

    real_finish = hooks_base.finish
    names = ["tolist", "item", "__bool__", "__float__", "__int__"]
    saved = {name: getattr(torch.Tensor, name) for name in names}
    hooks_base.finish = finish
    for name in names:
        setattr(torch.Tensor, name, watched(name))
    try:
        torch.manual_seed(0)
        model = DDP(Net(), bucket_cap_mb=0.004)
        options = {"min_numel": 1024} if method == "gradiveq" else {}  # conv2 and fc1 compressed
        state_box.append(commcomp.register(model, method, nonfinite=policy, **options))
        for step in range(3):
            x, y = small_batch(rank, step)
            if step == 1 and rank == 1:
                x = x * float("nan")
            try:
                F.cross_entropy(model(x), y).backward()
            except (NonFiniteGradientError, RuntimeError):
                break
    finally:
        hooks_base.finish = real_finish
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)
    if method == "gradiveq":  # its bases' checksums were sent and checked
        assert sum(layer is not None for layer in state_box[0].layers.values()) == 2
    return reads


@pytest.mark.parametrize("method", ["bf16", "identity", "gradiveq", "qsgd", "topk", "randk"])
def test_exchanges_read_on_the_host_only_at_the_steps_end(method: str) -> None:
    """On CUDA, DDP runs a hook's callback inline as soon as NCCL queued the collective: a host read
    there waits for that bucket's all-reduce and stalls the backward pass. Under "propagate" the
    exchanges (dense, GradiVeQ's one exchange with its bases' checksums, the quantizers' flagged
    ones) read one value per step, at the step's end (in the last group's callback, when every
    collective is done); under "raise" every group reads the flags (the instrument sees them).
    Steps: 0, 1 (the NaN step, skipped: the step count stays), 1."""
    for reads in run(_host_reads, WORLD, method, "propagate", timeout=120):
        assert reads == [(0, True), (1, True), (1, True)], reads
    for reads in run(_host_reads, WORLD, method, "raise", timeout=120):
        assert any(not at_end for _, at_end in reads), reads


def _skipped_with_nan(rank: int, world: int, method: str) -> dict[str, Any]:
    """The same three steps without the instrument: steps counted, overflow steps, and whether the
    gradients of the NaN step were non-finite (the sum's NaN in them)."""
    from bucketed_net import Net
    from bucketed_net import batch as small_batch

    torch.manual_seed(0)
    net = Net()
    model = DDP(net, bucket_cap_mb=0.004)
    state = commcomp.register(model, method)
    nonfinite = []
    for step in range(3):
        x, y = small_batch(rank, step)
        if step == 1 and rank == 1:
            x = x * float("nan")
        net.zero_grad()
        F.cross_entropy(model(x), y).backward()
        nonfinite.append(any(not bool(torch.isfinite(p.grad).all()) for p in net.parameters()))
    return {"step": state.step, "skipped": state.stats.total.skipped_steps, "nonfinite": nonfinite}


def test_a_dense_sum_checked_at_the_steps_end_skips_that_step_on_every_rank() -> None:
    for got in run(_skipped_with_nan, WORLD, "bf16", timeout=120):
        assert got == {"step": 2, "skipped": 1, "nonfinite": [False, True, False]}, got
