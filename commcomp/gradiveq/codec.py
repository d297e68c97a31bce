"""GradiVeQ: PCA-based vector quantization of gradient slices (Yu et al., NeurIPS 2018).

Pure tensor code (no communication): slicing plans and the per-layer codec. The hook
(`commcomp.gradiveq.hook`) and the Horovod optimizer do the talking; `commcomp.gradiveq.refit`
holds the collectives that share a fitted basis.

Letters (as in the paper): K slice length, d principal components kept, S slices of one gradient,
N ranks, M values in a gradient. A gradient is laid out as a vector, cut into S = M // K slices of K
values (the M - S*K values left over are sent as they are), and each slice x is sent as the d
coefficients U^T (x - mu/N); the all-reduce sums them to U^T (x_avg - mu) and every rank decodes
U c + mu. Because the map is affine with the mean split N ways, summing compressed gradients equals
compressing the summed gradient: the coefficients ride a plain all-reduce.

Layout: a conv weight [F, D, *spatial] is permuted so that the F*D entries at one spatial position
are adjacent (`g.permute(*spatial, D, F)`), a Linear weight [out, in] keeps its rows; either way the
vector is `groups` runs of `unit` values, and K is a multiple of `unit` when unit is small enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LayerCodec", "SlicePlan", "plan_slices"]


@dataclass(frozen=True)
class SlicePlan:
    shape: tuple[int, ...]
    K: int  # slice length
    S: int  # number of whole slices
    conv: bool  # filter-interleaved layout

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_vector(self, g: torch.Tensor) -> torch.Tensor:
        """[F, D, *spatial] -> interleaved vector (conv); otherwise row-major flatten."""
        if self.conv:
            nd = g.dim()
            return g.permute(*range(2, nd), 1, 0).reshape(-1)
        return g.reshape(-1)

    def from_vector(self, v: torch.Tensor) -> torch.Tensor:
        if self.conv:
            f, d, *spatial = self.shape
            nd = len(self.shape)
            inverse = [nd - 1, nd - 2, *range(nd - 2)]
            return v.view(*spatial, d, f).permute(*inverse)
        return v.view(self.shape)

    def split(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gradient -> (slices [S, K], rest [M - S*K])."""
        v = self.to_vector(g)
        cut = self.S * self.K
        return v[:cut].view(self.S, self.K), v[cut:]

    def join(self, slices: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        return self.from_vector(torch.cat([slices.reshape(-1), rest]))


def plan_slices(
    shape: tuple[int, ...] | torch.Size, target: int = 256, max_len: int = 1024, min_numel: int = 1024
) -> SlicePlan | None:
    """How to slice a gradient of `shape`, or None if it is too small to be worth compressing.

    Conv (3+ dims): unit = F*D; Linear (2 dims): unit = in_features; other shapes: unit = 1.
    K = unit * m with m the multiple of unit closest to `target` (at least 1, at most the number of
    groups); if unit alone exceeds `max_len`, K is the largest divisor of unit <= max_len, else max_len.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape) if shape else 1
    if len(shape) < 2 or numel < min_numel:
        return None
    conv = len(shape) >= 3
    unit = shape[0] * shape[1] if conv else shape[1]
    groups = numel // unit
    if unit <= max_len:
        m = max(1, min(groups, round(target / unit), max_len // unit))
        k = unit * m
    else:
        k = next((c for c in range(max_len, max(target // 2, 1) - 1, -1) if unit % c == 0), max_len)
    if numel // k < 1:
        return None
    return SlicePlan(shape, k, numel // k, conv)


class LayerCodec:
    """Per-layer GradiVeQ state: streaming PCA statistics, the basis U [K, d], the mean mu [K]."""

    def __init__(self, plan: SlicePlan, fit_slices: int = 64) -> None:
        self.plan = plan
        self.fit_slices = fit_slices
        k = plan.K
        # streaming sums over sampled slices, float64: n, sum x, sum x x^T
        self.count = 0
        self.sum = torch.zeros(k, dtype=torch.float64)  # moved to the gradients' device on first use
        self.outer = torch.zeros(k, k, dtype=torch.float64)
        self.basis: torch.Tensor | None = None  # [K, d]
        self.mean: torch.Tensor | None = None  # [K]
        self.energy = float("nan")  # fraction of the samples' variance kept by the basis

    @property
    def d(self) -> int:
        return 0 if self.basis is None else self.basis.shape[1]

    def observe(self, avg_grad: torch.Tensor) -> None:
        """Add the slices of one averaged gradient (identical on every rank) to the statistics."""
        x, _ = self.plan.split(avg_grad.detach())
        if x.shape[0] > self.fit_slices:  # evenly spaced subset keeps the cost bounded
            idx = torch.linspace(0, x.shape[0] - 1, self.fit_slices, device=x.device).round().long()
            x = x[idx]
        x = x.to(torch.float64)
        if self.sum.device != x.device:
            self.sum, self.outer = self.sum.to(x.device), self.outer.to(x.device)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def fit(self, energy_threshold: float, max_components: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigendecompose the sample covariance; return (U [K, d], mu [K]) in float64 and reset the sums.

        d is the smallest count whose eigenvalues hold >= 1 - energy_threshold of the variance
        (all K when the threshold is 0), capped by max_components.
        """
        k = self.plan.K
        if self.count < 2:
            raise RuntimeError("GradiVeQ needs at least two sampled slices before fitting")
        mu = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        if energy_threshold <= 0:
            d = k
        else:
            total = float(evals.sum())
            if total <= 0:
                d = 1
            else:
                kept = torch.cumsum(evals, 0) / total
                d = int(torch.searchsorted(kept, torch.tensor(1.0 - energy_threshold, dtype=kept.dtype))) + 1
        d = max(1, min(d, k, max_components or k))
        u = evecs[:, :d]
        # canonical signs (largest-magnitude entry of each column positive): reproducible fits
        pivot = u.abs().argmax(0)
        u = u * torch.where(u[pivot, torch.arange(d, device=u.device)] < 0, -1.0, 1.0).to(u.dtype)
        total = float(evals.sum())
        self.energy = float(evals[:d].sum()) / total if total > 0 else 1.0
        self.reset()
        return u, mu

    def reset(self) -> None:
        """Forget the sampled statistics (after a fit, on every rank)."""
        self.count = 0
        self.sum.zero_()
        self.outer.zero_()

    def set_basis(self, basis: torch.Tensor, mean: torch.Tensor, energy: float = float("nan")) -> None:
        self.basis, self.mean, self.energy = basis, mean, energy
        self._u32 = basis.float()
        self._mu32 = mean.float()

    def _cast_basis(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.basis is None or self.mean is None:
            raise RuntimeError("GradiVeQ layer used before its basis was fitted")
        if self._u32.device != like.device:
            self._u32, self._mu32 = self._u32.to(like.device), self._mu32.to(like.device)
        return self._u32, self._mu32

    def compress(self, h: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share h (already divided by N) -> (coefficients [S, d], rest) in h's dtype."""
        u, mu = self._cast_basis(h)
        x, rest = self.plan.split(h)
        coeffs = (x.float() - mu / world_size) @ u
        return coeffs.to(h.dtype), rest

    def decompress(self, coeffs: torch.Tensor, rest: torch.Tensor, world_size: int = 1) -> torch.Tensor:
        """Coefficients summed over `world_size` ranks (or one rank's share) -> gradient of the layer's shape.

        With world_size = N this inverts one rank's share (adds mu/N); with 1 it decodes the sum.
        """
        u, mu = self._cast_basis(coeffs)
        x = coeffs.float() @ u.T + mu / world_size
        return self.plan.join(x.to(rest.dtype), rest)

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": self.sum,
            "outer": self.outer,
            "basis": self.basis,
            "mean": self.mean,
            "energy": self.energy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.sum = state["sum"].clone()
        self.outer = state["outer"].clone()
        basis, mean = state["basis"], state["mean"]
        if isinstance(basis, torch.Tensor) and isinstance(mean, torch.Tensor):
            self.set_basis(basis.clone(), mean.clone(), float(state["energy"]))
