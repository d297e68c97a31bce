"""Flatten tensors into one buffer for a collective, and cut the result back into views.

Every path that hands several tensors to one collective (DDP buckets, Horovod, PQASGD, consensus
evaluation) packs with `flatten` and unpacks with `unflatten`, so the layout rule lives here once:
tensors are laid end to end in list order, each reshaped to 1-D.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["flatten", "unflatten"]


def flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """One 1-D tensor holding `tensors` end to end (cast to `dtype` when given); a new tensor."""
    parts = [t.reshape(-1) if dtype is None else t.reshape(-1).to(dtype) for t in tensors]
    if not parts:
        return torch.empty(0, dtype=dtype or torch.float32)
    return torch.cat(parts)


def unflatten(flat: torch.Tensor, shapes: Sequence[torch.Size | tuple[int, ...]]) -> list[torch.Tensor]:
    """Views of `flat` shaped like `shapes`, in order (the inverse of `flatten`).

    Raises ValueError if `flat` holds a different number of values than the shapes need.
    """
    if len(shapes) == 1 and flat.shape == shapes[0]:
        return [flat]  # already shaped: no split, no view
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != flat.numel():
        raise ValueError(f"cannot cut {flat.numel()} values into tensors of {sum(sizes)} values in total")
    return [piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes)]
