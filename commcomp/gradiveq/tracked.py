"""GradiVeQ with tracked bases: pure tensor code for one layer (no communication).

Letters: a gradient's share h = g_n/N (plus its error-feedback residual) is cut into S slices of K
values, the matrix X_n [S, K] (`MatrixPlan`: the layer's own matrix); X = sum_n X_n is the averaged
gradient's slice matrix.
The layer keeps bases identical on every rank: U [K, d] for the rows, and with one exchange also
P [S, d] for the columns. Both ways start from random matrices drawn from a generator seeded by the
layer's name, so every rank starts alike without communicating.

One exchange per step (the default, `exchanges=1`):

  1. every rank sends C_n = X_n U [S, d] and Q_n = X_n^T P [K, d] in one all-reduce, summed to
     C = X U and Q = X^T P;
  2. decode: X_hat = P Q^T + (C - P P^T C) U^T = X - (I - P P^T) X (I - U U^T): the averaged slices
     minus only what lies outside both bases (a rank-2d picture from (S + K) d values);
  3. the next bases are P' = orth(C) and U' = orth(Q), each half a power-iteration step on X (two
     interleaved chains, U -> P -> U and P -> U -> P), so the bases turn with the gradients.

Two exchanges per step (`exchanges=2`, the power step of PowerSGD, Vogels et al. 2019, on GradiVeQ's
slice matrix):

  1. coefficients: C_n = X_n U, summed to C = X U;
  2. basis update: every rank orthonormalises P = orth(C) (the same bits everywhere, since C is) and
     sends B_n = X_n^T P, summed to B = X^T P;
  3. decode: X_hat = P B^T = P P^T X, and B becomes the next step's U.

The second exchange waits for the first's sum: a whole extra round of network latency and a stall in
the hook body per step. One exchange projects onto bases one step old rather than onto a P fitted to
this step, but sees the layer from both sides; on the benchmark's CNN the two reach the same accuracy
per step, and one exchange takes about a third less time per step at 100 Mbit/s.

Every payload is linear in X_n, so plain all-reduces sum them; what a step drops from X_n (X_n minus
its own share of the decode) is this rank's error-feedback residual, and the residuals of all ranks
sum to exactly what the averaged update missed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

__all__ = ["MatrixPlan", "TrackedLayer", "bits_checksum", "checksum_byte", "crc32", "matrix_plan", "orthonormalize"]


@dataclass(frozen=True)
class MatrixPlan:
    """A layer's gradient seen as its own matrix X [S, K], as a view of the gradient (no copy).

    A Linear weight [out, in] is X itself (S = out, K = in); a conv weight [F, D, *spatial] is the
    transpose of its [F, D * spatial] view (S = D * spatial, K = F). The rows are whatever the layer's
    memory order makes them: the maths does not depend on their order, and the gradient is never
    permuted. Products of S x K size are computed straight in that order (`outer`, `write_outer`).
    """

    shape: tuple[int, ...]
    K: int
    S: int
    conv: bool  # X is the transpose of the gradient's [F, D * spatial] view

    def matrix(self, g: torch.Tensor) -> torch.Tensor:
        """X [S, K] as a view of `g` (a conv weight's: a transposed view)."""
        return g.reshape(self.K, self.S).T if self.conv else g.reshape(self.S, self.K)

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `matrix`: X [S, K] back in the layer's shape (a view when X is one)."""
        return (x.T if self.conv else x).reshape(self.shape)

    def outer(self, left: torch.Tensor, right: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """left @ right.T [S, K], or base - left @ right.T, laid out in the gradient's memory order
        (for a conv weight computed as the transpose of right @ left.T)."""
        if self.conv:
            if base is None:
                return (right @ left.T).T
            return torch.addmm(base.T, right, left.T, alpha=-1).T
        return left @ right.T if base is None else torch.addmm(base, left, right.T, alpha=-1)

    def write_outer(self, out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """Write left @ right.T into the gradient `out` as its matrix X (in place, no temporary
        when `out` is contiguous float32)."""
        if out.is_contiguous() and out.dtype == left.dtype:
            if self.conv:
                torch.mm(right, left.T, out=out.view(self.K, self.S))
            else:
                torch.mm(left, right.T, out=out.view(self.S, self.K))
        else:
            out.copy_(self.gradient(self.outer(left, right)))


def matrix_plan(shape: tuple[int, ...] | torch.Size, min_numel: int) -> MatrixPlan | None:
    """The plan of a tracked layer: its slices are the rows of the layer's own matrix.

    K is the F filters of a conv weight [F, D, *spatial] or the input width of a Linear weight
    [out, in]: the slice matrix is the layer's own matrix (transposed for a conv), whose low rank
    the bases find: the [F, D*k] view PowerSGD compresses. Cutting a long row into chunks, or
    stacking short rows, would make the matrix squarer (a rank-d message (S + K) d is smallest when
    S = K), but its rows would mix unrelated pieces of the layer and lose its low rank; on a small
    classifier head that cost about two points of accuracy. A layer whose own matrix is too thin to
    send 2x smaller stays uncompressed (`TrackedLayer.worth_compressing`).
    None for layers under `min_numel` values or with fewer than 2 dimensions.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape) if shape else 1
    if len(shape) < 2 or numel < min_numel:
        return None
    conv = len(shape) >= 3
    k = shape[0] if conv else shape[1]
    return MatrixPlan(shape, k, numel // k, conv)


def crc32(tensors: list[torch.Tensor]) -> int:
    """The CRC-32 of the tensors' bytes laid end to end (equal bits, equal checksums), read on the host."""
    values = torch.cat([t.detach().reshape(-1) for t in tensors]).cpu() if tensors else torch.empty(0)
    return zlib.crc32(values.numpy().tobytes())


def bits_checksum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the float32 tensors' bit patterns (as int32) mod 2^32: a 0-dim int64 tensor on
    their device (equal bits, equal checksums; a change of any one value changes it). Computed on
    the device, so a step that keeps new bases never waits for it to read them on the host."""
    total = sum(t.detach().contiguous().view(torch.int32).to(torch.int64).sum() for t in tensors)
    assert isinstance(total, torch.Tensor), "no tensors"
    return total % 2**32


def checksum_byte(checksum: torch.Tensor) -> torch.Tensor:
    """One byte of a 32-bit checksum (0-dim int64 tensor): its four bytes XORed, so a change in any
    of them shows (the low byte of a sum of bit patterns sees only the low mantissa bits: not a
    flipped sign). Exact in every wire dtype."""
    return (checksum ^ (checksum >> 8) ^ (checksum >> 16) ^ (checksum >> 24)) & 255


def orthonormalize(c: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning `c` [S, d] (reduced QR with a sign convention), in float32.

    Deterministic: the same input bits give the same output bits on a given device and library, so
    ranks that summed the same coefficients get the same P without communicating.
    """
    q, r = torch.linalg.qr(c.float())
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs


class TrackedLayer:
    """One layer's tracked bases (float32) and the maths of a compressed step, with one exchange or two."""

    def __init__(self, plan: MatrixPlan, rank: int, name: str) -> None:
        self.plan = plan
        self.rank = rank  # what was asked for
        # as many components as asked, but no more than keep the two payloads at half the layer's values
        self.d = max(1, min(rank, plan.S * plan.K // (2 * (plan.S + plan.K))))
        self.seed = zlib.crc32(name.encode())  # the same on every rank and in every run
        self.basis: torch.Tensor | None = None  # U [K, d] float32, created on first use
        self.left: torch.Tensor | None = None  # P [S, d] float32, one exchange only
        self.checksum: torch.Tensor | None = None  # `bits_checksum` of the one-exchange bases, to compare across ranks

    @property
    def wire_values(self) -> int:
        """Values this layer sends per step: S*d and K*d (C_n and Q_n; with two exchanges, the
        coefficients and the basis update)."""
        return (self.plan.S + self.plan.K) * self.d

    def worth_compressing(self) -> bool:
        """Whether the two payloads are at most half of the layer's values with at least half of
        the components asked for: a small layer gets fewer components, but a matrix too small or too
        thin for even that (a classifier head [10, 960] at rank 16 would get 4) is sent as it is."""
        return 2 * self.wire_values <= self.plan.S * self.plan.K and 2 * self.d >= self.rank

    def start_basis(self, device: torch.device) -> torch.Tensor:
        """U of the two-exchange step on `device`; random (seeded by the layer's name) on first use."""
        if self.basis is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.basis = torch.randn(self.plan.K, self.d, generator=gen)
        if self.basis.device != device:
            self.basis = self.basis.to(device)
        return self.basis

    def state_dict(self) -> dict[str, torch.Tensor]:
        saved = {"basis": self.basis, "left": self.left}
        return {k: v.cpu() for k, v in saved.items() if v is not None}

    def load_state_dict(self, saved: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Bases saved by `state_dict` (or a bare U, as checkpoints before P existed held)."""
        saved = {"basis": saved} if isinstance(saved, torch.Tensor) else saved
        self.basis, self.left = saved["basis"].clone(), None
        if "left" in saved:
            self.keep(self.basis, saved["left"].clone())

    # ----- one exchange -----
    def start_bases(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, P) of the one-exchange step on `device`, orthonormal; random (seeded by the layer's
        name) on first use. A basis loaded from a two-exchange checkpoint is orthonormalised."""
        if self.basis is None or self.left is None:
            gen = torch.Generator().manual_seed(self.seed)
            u, p = torch.randn(self.plan.K, self.d, generator=gen), torch.randn(self.plan.S, self.d, generator=gen)
            self.keep(orthonormalize(u if self.basis is None else self.basis.cpu()), orthonormalize(p))
        assert self.basis is not None and self.left is not None
        if self.basis.device != device:
            self.keep(self.basis.to(device), self.left.to(device))
        return self.basis, self.left

    def keep(self, u: torch.Tensor, p: torch.Tensor) -> None:
        """Make orthonormal `u` [K, d] and `p` [S, d] the one-exchange bases (and note their checksum)."""
        self.basis, self.left = u, p
        self.checksum = bits_checksum([u, p])

    def sides(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 1 of one exchange: (C_n = X_n U [S, d], Q_n = X_n^T P [K, d]) for this rank's slices
        `x` [S, K] (float32), in the fast order of `coefficients`."""
        u, p = self.start_bases(x.device)
        return (u.T @ x.T).T, self.basis_update(x, p)

    def factors(self, c: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L [S, 2d], R [K, 2d]) with L R^T = P Q^T + (C - P P^T C) U^T: the decode of summed (C, Q),
        or this rank's own share of it from its (C_n, Q_n)."""
        assert self.basis is not None and self.left is not None
        p = self.left
        return torch.cat([p, c - p @ (p.T @ c)], 1), torch.cat([q, self.basis], 1)

    # ----- two exchanges -----
    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Step 1 of two exchanges: C_n = X_n U [S, d] for this rank's slices `x` [S, K] (float32).

        Written (U^T X^T)^T: the same product, but CPU BLAS runs a thin matrix times a wide one
        several times faster in this order (on a GPU the transposes are free either way)."""
        return (self.start_basis(x.device).T @ x.T).T

    @staticmethod
    def basis_update(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Step 2 of two exchanges: B_n = X_n^T P [K, d], as (P^T X_n)^T (the fast order, as in `coefficients`)."""
        return (p.T @ x).T
