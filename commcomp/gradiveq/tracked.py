"""GradiVeQ with a tracked basis: pure tensor code for one layer (no communication).

Letters: a gradient's share h = g_n/N (plus its error-feedback residual) is cut into S slices of K
values, the matrix X_n [S, K] (`SlicePlan`); U [K, d] is the layer's basis, identical on every rank.
A compressed step is two summed exchanges:

  1. coefficients: every rank sends C_n = X_n U [S, d]; the all-reduce sums them to C = X U, where
     X = sum_n X_n is the averaged gradient's slice matrix;
  2. basis update: every rank orthonormalises P = orth(C) [S, d] (the same bits everywhere, since C
     is) and sends B_n = X_n^T P [K, d]; the all-reduce sums them to B = X^T P;
  3. decode: X_hat = P B^T = P P^T X, the averaged slices projected onto the span of the current
     step's coefficients, and B becomes the next step's basis U (one power-iteration step per
     training step, warm-started from the last: the basis turns with the gradients).

Both payloads are linear in X_n, so plain all-reduces sum them; what a step drops from X_n,
X_n - P P^T X_n = X_n - P B_n^T, is this rank's error-feedback residual, and the residuals of all
ranks sum to exactly what the averaged update missed. The bases start from a random matrix drawn from
a generator seeded by the layer's name, so every rank starts from the same U without communicating.
(This is the power step of PowerSGD, Vogels et al. 2019, on GradiVeQ's slice matrix.)
"""

from __future__ import annotations

import math
import zlib

import torch

from commcomp.gradiveq.codec import SlicePlan

__all__ = ["TrackedLayer", "matrix_plan", "orthonormalize"]


def matrix_plan(shape: tuple[int, ...] | torch.Size, min_numel: int) -> SlicePlan | None:
    """The slice plan for a tracked basis: the slices are the rows of the layer's own matrix.

    In the layout of `SlicePlan` the innermost run is the F filters of a conv weight [F, D, *spatial]
    (at one input channel and position) or a row of a Linear weight [out, in]. Slices of exactly one
    run (K = F, or K = in) make the slice matrix the layer's own matrix (transposed for a conv), whose
    low rank the power iteration finds: the [F, D*k] view PowerSGD compresses. Cutting a long row
    into chunks, or stacking short runs, would make the matrix squarer (a rank-d message (S + K) d is
    smallest when S = K), but its rows would mix unrelated pieces of the layer and lose its low rank;
    on a small classifier head that cost about two points of accuracy. A layer whose own matrix is
    too thin to send 2x smaller stays uncompressed (`TrackedLayer.worth_compressing`).
    None for layers under `min_numel` values or with fewer than 2 dimensions.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape) if shape else 1
    if len(shape) < 2 or numel < min_numel:
        return None
    conv = len(shape) >= 3
    k = shape[0] if conv else shape[1]  # the innermost run of the layout
    return SlicePlan(shape, k, numel // k, conv)


def orthonormalize(c: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning `c` [S, d] (reduced QR with a sign convention), in float32.

    Deterministic: the same input bits give the same output bits on a given device and library, so
    ranks that summed the same coefficients get the same P without communicating.
    """
    q, r = torch.linalg.qr(c.float())
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs


class TrackedLayer:
    """One layer's tracked basis U [K, d] (float32) and the maths of a compressed step."""

    def __init__(self, plan: SlicePlan, rank: int, name: str) -> None:
        self.plan = plan
        self.rank = rank  # what was asked for
        # as many components as asked, but no more than keep the two payloads at half the layer's values
        self.d = max(1, min(rank, plan.S * plan.K // (2 * (plan.S + plan.K))))
        self.seed = zlib.crc32(name.encode())  # the same on every rank and in every run
        self.basis: torch.Tensor | None = None  # [K, d] float32, created on first use

    @property
    def wire_values(self) -> int:
        """Values this layer sends per step: coefficients S*d, basis update K*d."""
        return (self.plan.S + self.plan.K) * self.d

    def worth_compressing(self) -> bool:
        """Whether the two payloads are at most half of the layer's values with at least half of
        the components asked for: a small layer gets fewer components, but a matrix too small or too
        thin for even that (a classifier head [10, 960] at rank 16 would get 4) is sent as it is."""
        return 2 * self.wire_values <= self.plan.S * self.plan.K and 2 * self.d >= self.rank

    def start_basis(self, device: torch.device) -> torch.Tensor:
        if self.basis is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.basis = torch.randn(self.plan.K, self.d, generator=gen)
        if self.basis.device != device:
            self.basis = self.basis.to(device)
        return self.basis

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Step 1: C_n = X_n U [S, d] for this rank's slices `x` [S, K] (float32).

        Written (U^T X^T)^T: the same product, but CPU BLAS runs a thin matrix times a wide one
        several times faster in this order (on a GPU the transposes are free either way)."""
        return (self.start_basis(x.device).T @ x.T).T

    @staticmethod
    def basis_update(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Step 2: B_n = X_n^T P [K, d], as (P^T X_n)^T (the fast order, as in `coefficients`)."""
        return (p.T @ x).T
