"""The training benchmark's workloads: a model, its data and its optimizer settings.

cnn: MNIST-1D (generated offline) with a widened 1-D CNN, so that the gradient (~1.6 MB at the
     default width 256) makes 100 Mbit/s links the bottleneck; trained to measure accuracy and time
     to a target accuracy.
mlp: the communication-heavy 784-2048-2048-10 MLP (5.8M parameters, 23 MB of gradients) on MNIST-1D
     signals stretched to 784 values; run for a few steps to measure step time and throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from commcomp.data import CNN1D, MLP, load_mnist1d

__all__ = ["WORKLOADS", "Workload", "get_workload"]


@dataclass(frozen=True)
class Workload:
    """What to train. `width` is the CNN's channel count or the MLP's hidden width."""

    name: str
    width: int
    batch_size: int  # per rank
    lr: float
    momentum: float
    eval_every: int  # steps between test-accuracy evaluations
    default_steps: int
    method_defaults: dict[str, Any] = field(default_factory=dict)  # e.g. GradiVeQ's schedule for this length

    def model(self) -> nn.Module:
        if self.name == "cnn":
            return CNN1D(channels=self.width)
        return MLP(784, (self.width, self.width), 10)

    def data(self) -> tuple[torch.Tensor, ...]:
        """(x_train, y_train, x_test, y_test), the same on every rank."""
        x, y, xt, yt = load_mnist1d()
        if self.name == "mlp":
            x, xt = _stretch(x, 784), _stretch(xt, 784)
        return x, y, xt, yt


def _stretch(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.interpolate(x.unsqueeze(1), size=length, mode="linear", align_corners=False).squeeze(1)


# Short runs need short schedules: GradiVeQ's paper schedule (2500 warm-up steps) and PyTorch's
# default PowerSGD start (1000) would never compress here.
WORKLOADS = {
    "cnn": Workload(
        "cnn",
        width=256,
        batch_size=32,
        lr=0.1,
        momentum=0.9,
        eval_every=10,
        default_steps=80,
        method_defaults={
            "gradiveq_warmup_steps": 10,
            "gradiveq_sample_steps": 10,
            "gradiveq_compress_steps": 1000,
            "powersgd_start": 10,
        },
    ),
    "mlp": Workload(
        "mlp",
        width=2048,
        batch_size=32,
        lr=0.01,
        momentum=0.9,
        eval_every=0,
        default_steps=4,
        method_defaults={
            "gradiveq_warmup_steps": 0,
            "gradiveq_sample_steps": 1,
            "gradiveq_compress_steps": 1000,
            "powersgd_start": 2,
        },
    ),
}


def get_workload(name: str, width: int | None = None) -> Workload:
    """The workload `name`, optionally with another width."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid names: {', '.join(WORKLOADS)}")
    w = WORKLOADS[name]
    if width is None:
        return w
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return replace(w, width=width)
