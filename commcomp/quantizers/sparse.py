"""Sparsifiers: top-k (largest magnitudes, biased) and random-k (shared random coordinates).

Legend: n = values in the tensor, k = values sent.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from commcomp.quantizers.base import Payload, Quantizer, check_floating
from commcomp.quantizers.qsgd import StochasticQuantizer, check_positive_int
from commcomp.quantizers.registry import QUANTIZERS

__all__ = ["RandK", "TopK"]


class _Sparsifier(Quantizer):
    """Keeps k of n values: k = ceil(ratio * n) (at least 1 of a non-empty tensor) or a fixed k."""

    def __init__(self, ratio: float | None, k: int | None) -> None:
        if ratio is not None and k is not None:
            raise ValueError(f"{self.name}: give ratio or k, not both (got ratio={ratio!r}, k={k!r})")
        if k is not None:
            check_positive_int(k, f"{self.name} k")
        elif ratio is None:
            ratio = 0.01
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
            raise ValueError(f"{self.name} ratio must be in (0, 1], got {ratio!r}")
        self.ratio = None if ratio is None else float(ratio)
        self.k = k

    def count(self, n: int) -> int:
        """How many of n values are sent."""
        if n == 0:
            return 0
        if self.ratio is None:
            return min(self.k or n, n)
        return min(n, max(1, math.ceil(self.ratio * n)))

    @staticmethod
    def _scatter(values: torch.Tensor, indices: torch.Tensor, payload: Payload) -> torch.Tensor:
        out = values.new_zeros(payload.shape.numel())
        out.scatter_(0, indices.long(), values)
        return out.to(payload.dtype).view(payload.shape)

    def options(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "k": self.k}


@QUANTIZERS.register("topk")
class TopK(_Sparsifier):
    """Sends the k largest-magnitude values and their int32 indices (biased: use error feedback).

    Payload: k values in the input's dtype + k int32 indices, so k * (itemsize + 4) bytes.

    Args:
        ratio: fraction of values sent, in (0, 1] (default 0.01 when k is not given either).
        k: send exactly min(k, n) values instead.
    """

    name = "topk"
    linear = False
    unbiased = False

    def __init__(self, ratio: float | None = None, k: int | None = None) -> None:
        super().__init__(ratio, k)

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1)
        indices = x.abs().topk(self.count(x.numel()), sorted=False).indices
        return Payload([x[indices], indices.to(torch.int32)], tensor.shape, tensor.dtype)

    def decompress(self, payload: Payload) -> torch.Tensor:
        values, indices = payload.tensors
        return self._scatter(values, indices, payload)


@QUANTIZERS.register("randk")
class RandK(_Sparsifier, StochasticQuantizer):
    """Sends k values at random coordinates that every rank draws alike, so no indices are sent.

    The coordinates come from the quantizer's own generators seeded with `seed` (the same on every
    rank) and the stream (the parameter's name in the DDP hook), so the ranks draw the same
    coordinates as long as they compress the same shapes in the same order per stream. Because
    every rank sends the same coordinates, payloads can be summed: `linear = True` and the DDP hook
    all-reduces the values alone. Payload: k values in the input's dtype.

    Args:
        ratio: fraction of values sent, in (0, 1] (default 0.01 when k is not given either).
        k: send exactly min(k, n) values instead.
        seed: seed shared by every rank.
        rescale: multiply the kept values by n/k, which makes the quantizer unbiased
            (E[decompress(compress(x))] = x); without it, it is biased (use error feedback).
    """

    name = "randk"
    linear = True

    def __init__(self, ratio: float | None = None, k: int | None = None, seed: int = 0, rescale: bool = True) -> None:
        _Sparsifier.__init__(self, ratio, k)
        self.seed = int(seed)
        StochasticQuantizer.__init__(self, str(self.seed))
        self.rescale = bool(rescale)
        self.unbiased = self.rescale

    def indices(self, n: int, device: torch.device) -> torch.Tensor:
        """The next k of n coordinates from the shared generator (advances it)."""
        perm = torch.randperm(n, generator=self.generator(device), device=device)
        return perm[: self.count(n)]

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1)
        indices = self.indices(x.numel(), x.device)
        values = x[indices]
        if self.rescale and indices.numel():
            values = (values.float() * (x.numel() / indices.numel())).to(x.dtype)
        return Payload([values], tensor.shape, tensor.dtype, {"indices": indices})

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self._scatter(payload.tensors[0], payload.meta["indices"], payload)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "seed": self.seed, "rescale": self.rescale}
