"""Small real workloads for tests, examples and benchmarks: MNIST-1D and two models.

MNIST-1D (Greydanus 2020) is generated locally by the `mnist1d` package (no download): 40-long 1-D
signals, 10 classes. The generated arrays are cached under COMMCOMP_CACHE (default
~/.cache/commcomp) so that many processes do not each spend seconds regenerating them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["CNN1D", "MLP", "accuracy", "cache_dir", "load_mnist1d", "shard"]


def cache_dir() -> Path:
    """Where generated data and built wheels are cached (COMMCOMP_CACHE or ~/.cache/commcomp)."""
    path = Path(os.environ.get("COMMCOMP_CACHE", Path.home() / ".cache" / "commcomp"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> tuple[torch.Tensor, ...]:
    """Return (x_train, y_train, x_test, y_test): float32 [n, 40] signals and int64 labels (80/20 split)."""
    path = cache_dir() / f"mnist1d-{num_samples}-{seed}.pt"
    if path.exists():
        return tuple(torch.load(path))
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    d = make_dataset(args)
    data = (
        torch.tensor(d["x"], dtype=torch.float32),
        torch.tensor(d["y"], dtype=torch.int64),
        torch.tensor(d["x_test"], dtype=torch.float32),
        torch.tensor(d["y_test"], dtype=torch.int64),
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # atomic: concurrent writers are fine
    os.close(fd)
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank's interleaved share of a data set (every world_size-th example)."""
    return x[rank::world_size], y[rank::world_size]


class CNN1D(nn.Module):
    """A 1-D CNN for MNIST-1D (the data set's reference architecture, width adjustable): ~94% test."""

    def __init__(self, channels: int = 32, length: int = 40, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, length)).numel()
        self.head = nn.Linear(flat, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


class MLP(nn.Module):
    """A plain MLP; `MLP(784, [2048, 2048], 10)` is the 5.8M-parameter communication-heavy model."""

    def __init__(self, inputs: int = 40, hidden: tuple[int, ...] = (256, 256), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Fraction of correct predictions, over every element of `y` (a class per example, or per
    position: logits (B, classes, T) for targets (B, T)); model put in eval mode for the call, then restored."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / max(y.numel(), 1)
