"""Byte and time accounting shared by every communication path (DDP hooks, Horovod, gossip)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["CommStats", "StepStats", "sync_device", "timer"]


def sync_device(tensor: torch.Tensor) -> None:
    """Wait for queued kernels on the tensor's device, so wall-clock timings mean something on GPUs."""
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)


class timer:
    """Wall-clock seconds of a block, synchronising the device of `tensor` on both ends."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.seconds = 0.0

    def __enter__(self) -> timer:
        sync_device(self.tensor)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync_device(self.tensor)
        self.seconds = time.perf_counter() - self._start


@dataclass
class StepStats:
    """Totals over some steps. bytes_sent: bytes of the tensors handed to collectives by this rank;
    dense_bytes: what an uncompressed all-reduce of the same gradients would have been handed."""

    steps: int = 0
    bytes_sent: int = 0
    dense_bytes: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else float("nan")

    def add(self, other: StepStats) -> None:
        self.steps += other.steps
        self.bytes_sent += other.bytes_sent
        self.dense_bytes += other.dense_bytes
        self.encode_seconds += other.encode_seconds
        self.decode_seconds += other.decode_seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compression_ratio": self.compression_ratio}


@dataclass
class CommStats:
    """`total` over all finished steps, `last` for the most recent finished step.

    Counters of the step in progress go to `current`; `end_step()` folds it into both.
    """

    total: StepStats = field(default_factory=StepStats)
    last: StepStats = field(default_factory=StepStats)
    current: StepStats = field(default_factory=StepStats)

    def sent(self, nbytes: int, dense: int = 0) -> None:
        self.current.bytes_sent += int(nbytes)
        self.current.dense_bytes += int(dense)

    def encoded(self, seconds: float) -> None:
        self.current.encode_seconds += seconds

    def decoded(self, seconds: float) -> None:
        self.current.decode_seconds += seconds

    def end_step(self) -> None:
        self.current.steps = 1
        self.last = self.current
        self.total.add(self.current)
        self.current = StepStats()

    # flat accessors, so `state.stats.bytes_sent` reads naturally
    @property
    def bytes_sent(self) -> int:
        return self.total.bytes_sent

    @property
    def dense_bytes(self) -> int:
        return self.total.dense_bytes

    @property
    def compression_ratio(self) -> float:
        return self.total.compression_ratio

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total.as_dict(), "last": self.last.as_dict()}

    def state_dict(self) -> dict[str, Any]:
        return {"total": asdict(self.total), "last": asdict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = StepStats(**state["total"])
        self.last = StepStats(**state["last"])
        self.current = StepStats()
