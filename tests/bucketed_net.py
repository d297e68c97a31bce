"""The small model of the DDP hook tests (several buckets at `bucket_cap_mb=0.004`) and of the
Horovod parity tests (tests/horovod_worker.py), its per-rank batches, its parameters as one flat
tensor, and a worker that registers a method with per-rank options and runs one backward pass."""

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp


class Net(nn.Module):
    """Conv1d and Linear layers, so that small buckets give >= 3 buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)  # 192 values: uncompressed
        self.conv2 = nn.Conv1d(16, 32, 3, padding=1)  # 1536: compressed, unit 512
        self.fc1 = nn.Linear(32 * 8, 64)  # 16384: rows of 256
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s batch of step `step`: 16 signals of 4 x 8, four classes."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 4, 8, generator=g)
    return x, (x.sum((1, 2)) > 0).long() + 2 * (x[:, 0, 0] > 0).long()


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def backward_once(rank: int, world: int, method: str, options: list[dict[str, Any]]) -> None:
    """Register `method` with `options[rank]` on the bucketed model and run one backward pass
    (options that differ between ranks must fail there, on every rank)."""
    ddp = DDP(Net(), bucket_cap_mb=0.004)
    commcomp.register(ddp, method, **options[rank])
    x, y = batch(rank, 0)
    nn.functional.cross_entropy(ddp(x), y).backward()
