"""The mixed-precision overflow scenario shared by tests/test_overflow.py and its Horovod worker.

A small MLP trains for STEPS steps under a real `torch.amp.GradScaler` (on CPU). In the overflow
run, rank BAD_RANK's loss at step BAD_STEP is multiplied by inf, as an fp16 overflow would make it;
every rank must then skip exactly that step. The reference run leaves that step out altogether
(no forward, no backward, no exchange) and only halves the scale, as the scaler does when it skips
a step. Both runs see the same batches at the other steps, so their final parameters must be equal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BAD_RANK", "BAD_STEP", "STEPS", "batch", "build_model", "train"]

STEPS = 8
BAD_STEP = 5
BAD_RANK = 1
LR = 0.05


def build_model() -> nn.Module:
    """16-64-64-4 MLP, the same on every rank (its 64 x 64 layer is big enough for GradiVeQ's codecs)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)


def train(
    rank: int,
    net: nn.Module,
    params: list[torch.Tensor],
    optimizer: Any,
    overflow: bool,
    before_step: Callable[[], None] | None = None,
    step_context: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Train `net` for STEPS steps with `scaler.step(optimizer)`; `optimizer` is a torch optimizer or
    anything GradScaler can step (it needs `param_groups` and `step()`). `before_step` runs between
    the backward and `scaler.step`, which runs inside `step_context()` (Horovod: `synchronize()` and
    `skip_synchronize()`). Returns the final parameters, the steps the scaler skipped, and whether
    the gradients at the overflow step were non-finite on this rank."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    skipped: list[int] = []
    poisoned = None
    for step in range(STEPS):
        if step == BAD_STEP and not overflow:
            scaler.update(new_scale=scaler.get_scale() * 0.5)  # what skipping the step does to the scale
            continue
        x, y = batch(rank, step)
        loss = F.mse_loss(net(x), y)
        if overflow and step == BAD_STEP and rank == BAD_RANK:
            loss = loss * float("inf")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        if before_step is not None:
            before_step()
        if step == BAD_STEP:
            grads = [p.grad for p in params if p.grad is not None]
            poisoned = bool(grads) and any(not bool(torch.isfinite(g).all()) for g in grads)
        with step_context():
            scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale:
            skipped.append(step)
    return {"params": [p.detach().clone() for p in params], "skipped": skipped, "poisoned": poisoned}
