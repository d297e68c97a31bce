"""Byte and time accounting shared by every communication path (DDP hooks, Horovod, gossip, MoE).

Two byte counts, side by side:

- bytes handed over (`bytes_sent`): the bytes of the tensors this rank hands to collectives. This is
  what the code controls, but not what the network carries: an all-gather delivers every rank's
  payload to every other rank.
- wire bytes (`wire_bytes`): what this rank sends over the network, estimated per collective kind
  with the usual ring/tree algorithms (`WIRE_FACTORS`): a ring all-reduce sends 2(N-1)/N x the
  payload per rank, a ring all-gather (N-1) x, a broadcast's payload crosses N-1 links (counted on
  the root, which hands it over), point-to-point 1 x, an all-to-all the (N-1)/N that leaves the rank.

`dense_bytes` / `dense_wire_bytes` are the same two counts for an uncompressed all-reduce of the
same gradients, so `compression_ratio` (handed) and `wire_compression_ratio` (wire) compare with
plain data-parallel SGD at any N; the wire ratio is the honest one for all-gathered payloads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["KINDS", "WIRE_FACTORS", "CommStats", "StepStats", "sync_device", "timer", "wire_factor"]

# Network bytes per byte one of N ranks hands to a collective of each kind.
WIRE_FACTORS: dict[str, Callable[[int], float]] = {
    "allreduce": lambda n: 2 * (n - 1) / n,  # ring: reduce-scatter, then all-gather, (N-1)/N each
    "allgather": lambda n: n - 1,  # ring: the payload is forwarded to the N-1 others
    "broadcast": lambda n: n - 1,  # the payload crosses N-1 links of any spanning tree (counted on the root)
    "p2p": lambda n: 1,  # one copy per neighbour, already counted per neighbour
    "alltoall": lambda n: (n - 1) / n,  # the share addressed to the other ranks
}
KINDS = tuple(WIRE_FACTORS)


def wire_factor(kind: str, world_size: int) -> float:
    """Bytes on the network per byte handed to a collective of kind `kind` over `world_size` ranks."""
    factor = WIRE_FACTORS.get(kind)
    if factor is None:
        raise ValueError(f"unknown collective kind {kind!r}; valid: {', '.join(KINDS)}")
    return float(factor(world_size)) if world_size > 1 else 0.0


def sync_device(tensor: torch.Tensor) -> None:
    """Wait for queued kernels on the tensor's device, so wall-clock timings mean something on GPUs."""
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)


class timer:
    """Seconds of a block of work on the device of `tensor` (`with timer(t) as clock:`, or
    `clock = timer(t).start()` ... `clock.stop()` where the block spans calls).

    On a CPU, wall-clock seconds. On a GPU, the time the device's current stream took from the
    block's start to its end (two CUDA events): the block itself never waits for the device, and
    `seconds` waits only for the end event, when it is first read. `CommStats.encoded` and `decoded`
    take the timer itself and read it when the step ends, so a hook's codec is timed without a
    device sync in the middle of the backward pass.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.device = tensor.device
        self._seconds = 0.0
        self._events: tuple[Any, Any] | None = None

    def start(self) -> timer:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))
            self._events = (start, end)
        else:
            self._start = time.perf_counter()
        return self

    def stop(self) -> timer:
        if self._events is not None:
            self._events[1].record(torch.cuda.current_stream(self.device))
        else:
            self._seconds = time.perf_counter() - self._start
        return self

    def __enter__(self) -> timer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def seconds(self) -> float:
        if self._events is not None:
            start, end = self._events
            end.synchronize()
            self._seconds, self._events = start.elapsed_time(end) / 1e3, None
        return self._seconds


@dataclass
class StepStats:
    """Totals over some steps (see the module docstring for handed-over and wire bytes).

    bytes_sent, wire_bytes: bytes this rank handed to collectives, and their estimated network bytes;
    dense_bytes, dense_wire_bytes: the same for an uncompressed all-reduce of the same gradients;
    by_kind: {collective kind: [bytes handed, wire bytes]}; skipped_steps: steps an overflow skipped.
    encode_seconds, decode_seconds: wall-clock time of the codec's work; wait_seconds: time blocked in a
    collective issued while encoding (a shared grid's agreement), which is network time and is kept
    out of encode_seconds.
    """

    steps: int = 0
    bytes_sent: int = 0
    dense_bytes: int = 0
    wire_bytes: float = 0.0
    dense_wire_bytes: float = 0.0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    wait_seconds: float = 0.0
    skipped_steps: int = 0
    by_kind: dict[str, list[float]] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over bytes handed over."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else float("nan")

    @property
    def wire_compression_ratio(self) -> float:
        """Dense wire bytes over wire bytes: what the network is spared, at this world size."""
        return self.dense_wire_bytes / self.wire_bytes if self.wire_bytes else float("nan")

    def add(self, other: StepStats) -> None:
        self.steps += other.steps
        self.bytes_sent += other.bytes_sent
        self.dense_bytes += other.dense_bytes
        self.wire_bytes += other.wire_bytes
        self.dense_wire_bytes += other.dense_wire_bytes
        self.encode_seconds += other.encode_seconds
        self.decode_seconds += other.decode_seconds
        self.wait_seconds += other.wait_seconds
        self.skipped_steps += other.skipped_steps
        for kind, (handed, wire) in other.by_kind.items():
            mine = self.by_kind.setdefault(kind, [0, 0.0])
            mine[0] += handed
            mine[1] += wire

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "compression_ratio": self.compression_ratio,
            "wire_compression_ratio": self.wire_compression_ratio,
        }


@dataclass
class CommStats:
    """`total` over all finished steps, `last` for the most recent finished step.

    Counters of the step in progress go to `current`; `end_step()` folds it into both.
    """

    total: StepStats = field(default_factory=StepStats)
    last: StepStats = field(default_factory=StepStats)
    current: StepStats = field(default_factory=StepStats)
    _timers: list[tuple[str, timer]] = field(default_factory=list, repr=False)  # read at `end_step`

    def sent(
        self,
        nbytes: int,
        dense: int = 0,
        *,
        kind: str,
        world_size: int,
        wire: float | None = None,
        dense_kind: str = "allreduce",
    ) -> None:
        """Count `nbytes` handed to a collective of `kind` over `world_size` ranks (`wire`: the exact
        network bytes when the caller knows them better than `wire_factor`), and `dense` bytes that
        the uncompressed alternative would have been handed to a `dense_kind` collective (for the
        gradient methods: an all-reduce of the gradients)."""
        on_wire = float(wire) if wire is not None else nbytes * wire_factor(kind, world_size)
        current = self.current
        current.bytes_sent += int(nbytes)
        current.wire_bytes += on_wire
        current.dense_bytes += int(dense)
        current.dense_wire_bytes += int(dense) * wire_factor(dense_kind, world_size)
        mine = current.by_kind.setdefault(kind, [0, 0.0])
        mine[0] += int(nbytes)
        mine[1] += on_wire

    def skipped(self) -> None:
        """The step in progress was skipped (an overflow): its bytes count, its update did not happen."""
        self.current.skipped_steps += 1

    def encoded(self, seconds: float | timer) -> None:
        """Add codec seconds (a `timer` is read when the step ends)."""
        self._add("encode_seconds", seconds)

    def decoded(self, seconds: float | timer) -> None:
        self._add("decode_seconds", seconds)

    def _add(self, name: str, seconds: float | timer) -> None:
        if isinstance(seconds, timer):
            self._timers.append((name, seconds))
        else:
            setattr(self.current, name, getattr(self.current, name) + seconds)

    def waited(self, seconds: float) -> None:
        """`seconds` of an encode were spent blocked in a collective (see `StepStats`): counted as
        waiting and taken off the encode time that the caller's timer, which includes them, adds."""
        self.current.wait_seconds += seconds
        self.current.encode_seconds -= seconds

    def end_step(self) -> None:
        for name, t in self._timers:
            setattr(self.current, name, getattr(self.current, name) + t.seconds)
        self._timers = []
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
    def wire_bytes(self) -> float:
        return self.total.wire_bytes

    @property
    def compression_ratio(self) -> float:
        return self.total.compression_ratio

    @property
    def wire_compression_ratio(self) -> float:
        return self.total.wire_compression_ratio

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total.as_dict(), "last": self.last.as_dict()}

    def state_dict(self) -> dict[str, Any]:
        return {"total": asdict(self.total), "last": asdict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = StepStats(**state["total"])
        self.last = StepStats(**state["last"])
        self.current, self._timers = StepStats(), []
