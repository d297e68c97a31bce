"""The plain training loop of the convergence tests: SGD steps on random batches of one rank's shard,
learning rate cosine-annealed to 0, the batches drawn from a generator seeded by the rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def train_cosine(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, rank: int, steps: int, batch: int
) -> None:
    """`steps` steps of `opt` on `model` (a DDP wrapper or a plain module) over batches of `x`, `y`."""
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(1 + rank)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        schedule.step()
