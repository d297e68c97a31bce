"""Sparsifiers: top-k (largest magnitudes, biased) and random-k (shared random coordinates).

Legend: n = values in the tensor, k = values sent, N = ranks whose payloads are decoded together.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from commcomp.quantizers.base import Payload, Quantizer
from commcomp.quantizers.checks import check_floating, check_positive_int
from commcomp.quantizers.registry import QUANTIZERS
from commcomp.quantizers.stochastic import StochasticQuantizer

__all__ = ["RandK", "TopK", "random_subset", "top_indices"]

SAMPLE = 4096  # values sampled to estimate top-k's threshold
MARGIN = 1.5  # the sampled threshold aims at MARGIN * k candidates, so it rarely undershoots k


def top_indices(magnitudes: torch.Tensor, k: int, sampled: bool | None = None) -> torch.Tensor:
    """Indices of the k largest of `magnitudes` (1-D), exactly those that `torch.topk` keeps up to ties.

    Cheap selection on a CPU: a threshold t is read off an evenly strided sample (the value above
    which about MARGIN * k of n lie); one comparison finds the c candidates >= t, and an exact topk
    runs on those c values only. If c >= k, every one of the k largest is a candidate, so the result
    is exact; if the sample was unlucky (c < k), it falls back to an exact topk over all n values.
    Elsewhere (`sampled` None: on any device but a CPU) the plain topk: a GPU selects in one pass
    without a host sync, where the candidates' count (`torch.nonzero`, `c < k`) needs one.
    """
    n = magnitudes.numel()
    if k >= n:
        return torch.arange(n, device=magnitudes.device)
    if sampled is None:
        sampled = magnitudes.device.type == "cpu"
    if not sampled or n <= 4 * SAMPLE or k * MARGIN * 4 >= n:  # small or dense: the plain topk is as cheap
        return magnitudes.topk(k, sorted=False).indices
    sample = magnitudes[:: n // SAMPLE]
    rank = min(sample.numel(), max(1, math.ceil(sample.numel() * k * MARGIN / n)))
    threshold = sample.kthvalue(sample.numel() - rank + 1).values
    candidates = torch.nonzero(magnitudes >= threshold).view(-1)
    if candidates.numel() < k:
        return magnitudes.topk(k, sorted=False).indices
    return candidates[magnitudes[candidates].topk(k, sorted=False).indices]


def random_subset(n: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """k distinct coordinates of n, uniformly at random, in O(k log k) (not O(n) like randperm).

    Draws with replacement until at least k distinct values were seen, then keeps a random k of
    them: by symmetry the distinct values form a uniformly random subset, and so do k of them.
    """
    if 2 * k >= n:
        return torch.randperm(n, generator=generator, device=device)[:k]
    draws = torch.empty(0, dtype=torch.int64, device=device)
    while draws.numel() < k:
        more = torch.randint(0, n, (k + k // 4 + 16,), generator=generator, device=device)
        draws = torch.unique(torch.cat([draws, more]))
    return draws[torch.randperm(draws.numel(), generator=generator, device=device)[:k]]


def _without(tensor: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A copy of `tensor` (into `out` if given) with the values at the flat `indices` set to zero."""
    if out is None:
        out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    out.copy_(tensor.detach())
    out.view(-1).index_fill_(0, indices.long(), 0)
    return out


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

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self.decode_alone(payload)

    def options(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "k": self.k}


@QUANTIZERS.register("topk")
class TopK(_Sparsifier):
    """Sends the k largest-magnitude values and their int32 indices (biased: use error feedback).

    Payload: k values in the input's dtype + k int32 indices, so k * (itemsize + 4) bytes.
    Selection by a sampled threshold (`top_indices`): the same k values as an exact top-k.

    Args:
        ratio: fraction of values sent, in (0, 1] (default 0.01 when k is not given either).
        k: send exactly min(k, n) values instead.
    """

    name = "topk"
    linear = False
    unbiased = False
    contractive = True  # ||Q(x) - x||^2 <= (1 - k/n) ||x||^2

    def __init__(self, ratio: float | None = None, k: int | None = None) -> None:
        super().__init__(ratio, k)

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1)
        indices = top_indices(x.abs(), self.count(x.numel()))
        return Payload([x[indices], indices.to(torch.int32)], tensor.shape, tensor.dtype)

    def error(self, tensor: torch.Tensor, payload: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor with the sent values zeroed (they were sent exactly)."""
        return _without(tensor, payload.tensors[1], out)

    def decode_sum(self, batch: Payload, out: torch.Tensor) -> torch.Tensor:
        """One scatter-add of every rank's values at every rank's indices (accumulating index_put_,
        which adds in a fixed order also on CUDA, so every rank gets bitwise the same sum)."""
        values, indices = batch.tensors  # [N, k] each
        flat = (indices.reshape(-1).long(),)
        return out.zero_().index_put_(flat, values.reshape(-1).float(), accumulate=True)


@QUANTIZERS.register("randk")
class RandK(_Sparsifier, StochasticQuantizer):
    """Sends k values at random coordinates that every rank draws alike, so no indices are sent.

    The coordinates come from the quantizer's own generators seeded with `seed` (the same on every
    rank) and the stream (the parameter's name in the DDP hook), so the ranks draw the same
    coordinates as long as they compress the same shapes in the same order per stream. Because
    every rank sends the same coordinates, payloads can be summed: `linear = True` and the DDP hook
    all-reduces the values alone. Payload: k values in the input's dtype, as they are; the n/k
    scale is applied when decoding, in float32 (so half-precision values cannot overflow on the wire).

    Args:
        ratio: fraction of values sent, in (0, 1] (default 0.01 when k is not given either).
        k: send exactly min(k, n) values instead.
        seed: seed shared by every rank.
        rescale: decode the kept values times n/k, which makes the quantizer unbiased
            (E[decompress(compress(x))] = x) with variance factor omega = n/k - 1, but not
            contractive: error feedback refuses it, and CHOCO's 1 / (1 + omega) scale undoes it.
            Without it, it is biased and contractive with delta = k/n (use it with error feedback).
    """

    name = "randk"
    linear = True

    def __init__(self, ratio: float | None = None, k: int | None = None, seed: int = 0, rescale: bool = True) -> None:
        _Sparsifier.__init__(self, ratio, k)
        self.seed = int(seed)
        StochasticQuantizer.__init__(self, str(self.seed))
        self.rescale = bool(rescale)
        self.unbiased = self.scales_up = self.rescale
        self.contractive = not self.rescale
        # variance factor n/k - 1 <= 1/ratio - 1: CHOCO's 1 / (1 + omega) scale then sends the
        # unscaled (contractive) form; with a fixed k it depends on n, so none is declared
        self.omega = 1.0 / self.ratio - 1.0 if self.rescale and self.ratio is not None else None

    def indices(self, n: int, device: torch.device) -> torch.Tensor:
        """The next k of n coordinates from the shared generator (advances it)."""
        return random_subset(n, self.count(n), self.generator(device), device)

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1)
        indices = self.indices(x.numel(), x.device)
        return Payload([x[indices]], tensor.shape, tensor.dtype, {"indices": indices})

    def error(self, tensor: torch.Tensor, payload: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.rescale:
            return super().error(tensor, payload, out)
        # unscaled: the kept values decode exactly, so the error is the tensor without them
        return _without(tensor, payload.meta["indices"], out)

    def decode_sum(self, batch: Payload, out: torch.Tensor) -> torch.Tensor:
        """Every rank's values sit at the same coordinates: sum them, scale once, scatter once."""
        values, indices = batch.tensors[0].float().sum(0), batch.meta["indices"]
        if self.rescale and indices.numel():
            values.mul_(out.numel() / indices.numel())
        return out.zero_().index_put_((indices,), values)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "seed": self.seed, "rescale": self.rescale}
