"""Count the bytes PyTorch's own DDP hooks (and MoE layers) hand to collectives.

PyTorch's `fp16_compress_hook` and `powerSGD_hook` call `torch.distributed.all_reduce` through the
name `dist` in their modules. `count_collectives(module)` puts a `CountingDist` there for the
duration of a `with` block: it adds up the bytes of every tensor handed to a collective (this
rank's contribution, the same convention as commcomp's `CommStats.bytes_sent`) and then calls the
real collective, so nothing about the communication changes. No estimate from shapes is involved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["CountingDist", "count_collectives"]


def _nbytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


class CountingDist:
    """Stands in for the `torch.distributed` module: counts collective inputs, delegates the rest."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.calls = 0

    def _count(self, tensors: Any) -> None:
        self.bytes_sent += _nbytes(tensors)
        self.calls += 1

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._count(tensor)
        return dist.all_reduce(tensor, *args, **kwargs)

    def all_gather(self, tensor_list: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._count(tensor)
        return dist.all_gather(tensor_list, tensor, *args, **kwargs)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._count(input)
        return dist.all_to_all_single(output, input, *args, **kwargs)

    def broadcast(self, tensor: torch.Tensor, src: int, *args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group", args[0] if args else None)
        if dist.get_rank() == (src if group is None else dist.get_global_rank(group, src)):
            self._count(tensor)
        return dist.broadcast(tensor, src, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)


C = TypeVar("C")


@contextmanager
def count_collectives(*modules: ModuleType, counter: C | None = None) -> Iterator[C | CountingDist]:
    """Count the collectives that `modules` issue through their `dist` name inside the block.

    `counter`: the stand-in to install (default a new `CountingDist`); any object that delegates
    what it does not count to `torch.distributed`, e.g. one that also counts all_to_all.
    """
    installed: C | CountingDist = counter if counter is not None else CountingDist()
    saved = [(m, m.dist) for m in modules]
    try:
        for m in modules:
            m.dist = installed  # type: ignore[attr-defined]
        yield installed
    finally:
        for m, original in saved:
            m.dist = original  # type: ignore[attr-defined]
