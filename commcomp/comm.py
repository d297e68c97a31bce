"""The few collectives commcomp's algorithms need, behind one small interface.

Algorithms that must run on more than one transport (PQASGD, the GradiVeQ refit, Horovod) take a
`Collectives`; `TorchCollectives` implements it on a torch.distributed process group, and
`commcomp.horovod` implements it on Horovod. Every method is blocking and issues exactly one
collective, and each counts the bytes it hands over in `bytes_sent`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

__all__ = ["Collectives", "TorchCollectives"]


class Collectives(Protocol):
    rank: int
    world_size: int
    bytes_sent: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor or `tensor` itself, reduced in place)."""
        ...

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape and dtype on every rank), in rank order."""
        ...

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`tensor` of rank `src` (group rank) on every rank."""
        ...


class TorchCollectives:
    """`Collectives` on a torch.distributed process group (None: the whole world)."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.bytes_sent = 0

    def _count(self, tensor: torch.Tensor) -> None:
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._count(tensor)
        dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._count(tensor)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.process_group)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.rank == src:
            self._count(tensor)
        root = dist.get_global_rank(self.process_group, src) if self.process_group is not None else src
        dist.broadcast(tensor, root, group=self.process_group)
        return tensor
