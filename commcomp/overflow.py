"""Overflow steps: a NaN/Inf gradient on one rank becomes a skipped step on every rank.

Under mixed precision an overflowing step is routine: `torch.amp.GradScaler` finds NaN/Inf in the
gradients, skips `optimizer.step()` and lowers its scale. With plain DDP that works on every rank at
once, because the all-reduce spreads one rank's inf to everyone's gradients. commcomp keeps that
contract wherever it communicates (option `nonfinite`):

- "propagate" (default): if any rank's gradients hold NaN/Inf, every rank's gradients become
  non-finite, so the scaler (or the user's own check) skips the same step everywhere, and the
  step leaves no trace in commcomp's state: no error-feedback residual, no statistics, no random
  stream advanced, no step counted.
- "raise": every rank raises `NonFiniteGradientError` instead (nothing is applied either).

The DDP hooks and the Horovod optimizer carry the flag inside their own collectives. PQASGD and the
gossip optimizers send nothing during the backward pass, so they add one small all-reduce per
backward pass (`GradientWatch`, one float per rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from commcomp.consistency import bad_ranks, flag_slots, has_nonfinite, nonfinite_flag
from commcomp.stats import CommStats

__all__ = [
    "NONFINITE",
    "GradientWatch",
    "NonFiniteGradientError",
    "check_nonfinite",
    "gradients_nonfinite",
    "poison",
]

NONFINITE = ("propagate", "raise")


class NonFiniteGradientError(FloatingPointError):
    """Some rank's gradients contain NaN or Inf; raised on every rank (policy "raise")."""


class Summing(Protocol):
    """What `GradientWatch` needs: a gossip `Transport` or a `commcomp.comm.Collectives` has it."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


def check_nonfinite(value: str) -> str:
    """Validate the `nonfinite` option."""
    if value not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {value!r}")
    return value


@torch.no_grad()
def poison(tensors: Sequence[torch.Tensor], where: torch.Tensor | None = None) -> None:
    """Fill `tensors` with NaN in place (how a skipped step's gradients reach the optimizer); with
    `where` (a 0-dim bool tensor, not read on the host), only if it is true."""
    for t in tensors:
        if where is None:
            t.fill_(float("nan"))
        else:
            t.masked_fill_(where, float("nan"))


class GradientWatch:
    """After each backward pass that reaches `params`, share every rank's NaN/Inf flag (one
    all-reduce of `world_size` floats on `comm`) and act on it with the `nonfinite` policy.

    Runs from an autograd hook (`torch.autograd.graph.register_multi_grad_hook`) once every
    gradient of the pass is computed. "propagate" fills every parameter's `.grad` with NaN (the
    last gradient still being accumulated lands on a NaN `.grad`, so it is NaN too); "raise"
    raises `NonFiniteGradientError` out of `backward()` on every rank. Every rank must run the
    same number of backward passes that reach the parameters (as with DDP).
    """

    def __init__(
        self, params: Sequence[torch.Tensor], comm: Summing, nonfinite: str, owner: str, stats: CommStats
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.comm = comm
        self.nonfinite = check_nonfinite(nonfinite)
        self.owner = owner
        self.stats = stats  # the flags' bytes are counted here
        self._handle = torch.autograd.graph.register_multi_grad_hook(self.params, self._after_backward)

    def _after_backward(self, grads: Sequence[torch.Tensor | None]) -> None:
        mine = nonfinite_flag([g for g in grads if g is not None])  # written into the slots, not read
        device = self.params[0].device
        flags = flag_slots(mine, self.comm.rank, self.comm.world_size, torch.float32, device)
        self.stats.sent(flags.numel() * flags.element_size(), kind="allreduce", world_size=self.comm.world_size)
        bad = bad_ranks(self.comm.all_reduce_sum(flags))
        if not bad:
            return
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(f"{self.owner}: NaN or Inf in the gradients of rank(s) {bad}")
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.full_like(p, float("nan"))
                else:
                    p.grad.fill_(float("nan"))

    def remove(self) -> None:
        self._handle.remove()


def gradients_nonfinite(params: Sequence[torch.Tensor]) -> bool:
    """True if any parameter's `.grad` holds NaN/Inf (after a `GradientWatch`: the same on every rank)."""
    return has_nonfinite([p.grad for p in params if p.grad is not None])
