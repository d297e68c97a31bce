"""Horovod as a commcomp transport: `HorovodCollectives` (blocking, for PQASGD and GradiVeQ refits)
and `HorovodWire` (asynchronous, for the exchange engine). Global process set only."""

from __future__ import annotations

import horovod.torch as hvd
import torch

from commcomp.exchange import nbytes

__all__ = ["HorovodCollectives", "HorovodPending", "HorovodWire"]


class HorovodCollectives:
    """`Collectives` on Horovod's global process set (blocking calls, one collective each).

    Every call gets the name `<prefix>.<kind>.<n>`, n counting this object's calls, so ranks that
    issue the same calls in the same order meet on the same names (Horovod matches by name).
    """

    def __init__(self, prefix: str = "commcomp") -> None:
        self.prefix = prefix
        self.rank = hvd.rank()
        self.world_size = hvd.size()
        self.bytes_sent = 0
        self._calls = 0

    def _name(self, kind: str) -> str:
        self._calls += 1
        return f"{self.prefix}.{kind}.{self._calls}"

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += nbytes(tensor)
        return hvd.allreduce_(tensor, op=hvd.Sum, name=self._name("allreduce"))

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.bytes_sent += nbytes(tensor)
        gathered = hvd.allgather(tensor.contiguous().unsqueeze(0), name=self._name("allgather"))
        return list(gathered.unbind(0))

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.rank == src:
            self.bytes_sent += nbytes(tensor)
        return hvd.broadcast_(tensor, src, name=self._name("broadcast"))


class HorovodPending:
    """A Horovod collective in flight (the `commcomp.exchange.Pending` of `HorovodWire`)."""

    def __init__(self, handle: int, summed: bool) -> None:
        self.handle, self.summed = handle, summed

    def wait(self) -> torch.Tensor | list[torch.Tensor]:
        out = hvd.synchronize(self.handle)
        return out if self.summed else list(out.unbind(0))


class HorovodWire:
    """`commcomp.exchange.Wire` on Horovod: allreduce (op=Sum) or allgather, asynchronous, by name."""

    def start(self, flat: torch.Tensor, summed: bool, name: str) -> HorovodPending:
        if summed:
            return HorovodPending(hvd.allreduce_async_(flat, name=name, op=hvd.Sum), True)
        return HorovodPending(hvd.allgather_async(flat.unsqueeze(0), name=name), False)
