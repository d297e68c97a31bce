"""A communication topology: who talks to whom, and with which mixing weights.

Pure data, no processes: a `Topology` holds the neighbour lists of an undirected graph on ranks
0..n-1 and a mixing matrix W (n x n, float64). Every topology is validated on construction: the
graph must be symmetric and connected, W must be symmetric, non-negative, have rows summing to 1
(so it is doubly stochastic) and be zero off the graph's edges. Errors say which rule failed.

Two spectral quantities, kept apart because the papers use the same letter for different things:

- `spectral_gap()` = 1 - |lambda_2|, with lambda_2 the second largest eigenvalue of W (the eigengap
  that CHOCO-SGD's analysis uses; CHOCO calls it delta in the ICML paper, rho in some code).
- `tang_rho()` = max(|lambda_2|, |lambda_n|) (Tang et al.'s rho); `1 - tang_rho()` is their gap.
  It also counts the most negative eigenvalue, so it can be smaller than `spectral_gap()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Topology", "metropolis_hastings"]

_TOL = 1e-9


def metropolis_hastings(neighbors: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mixing weights w_ij = 1 / (1 + max(deg i, deg j)) on edges, the rest of each row on the diagonal.

    On a regular graph of degree d this is the uniform 1/(d+1) (ring 1/3, torus 1/5, complete 1/n).
    """
    n = len(neighbors)
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, peers in enumerate(neighbors):
        for j in peers:
            w[i, j] = 1.0 / (1 + max(len(neighbors[i]), len(neighbors[j])))
    w += torch.diag(1.0 - w.sum(1))
    return w


class Topology:
    """An undirected graph on `n` ranks with a mixing matrix.

    Args:
        name: a label for messages and reprs (e.g. "ring").
        neighbors: neighbors[i] lists the ranks i exchanges with (not i itself, no repeats).
        weights: the mixing matrix (n x n); None means Metropolis-Hastings weights.
    """

    def __init__(self, name: str, neighbors: Sequence[Sequence[int]], weights: torch.Tensor | None = None) -> None:
        self.name = name
        self._neighbors = _check_graph(neighbors)
        self.size = len(self._neighbors)
        w = metropolis_hastings(self._neighbors) if weights is None else _as_matrix(weights, self.size)
        _check_weights(w, self._neighbors)
        self._weights = w

    def neighbors(self, rank: int) -> list[int]:
        """The ranks `rank` exchanges with, in increasing order (never `rank` itself)."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside this {self.size}-rank {self.name} topology")
        return list(self._neighbors[rank])

    def weight(self, i: int, j: int) -> float:
        """W[i, j]."""
        return float(self._weights[i, j])

    def mixing_matrix(self) -> torch.Tensor:
        """W as an n x n float64 tensor (a copy): symmetric, doubly stochastic."""
        return self._weights.clone()

    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of W, largest first (the first is 1)."""
        return torch.linalg.eigvalsh(self._weights).flip(0)

    def spectral_gap(self) -> float:
        """1 - |lambda_2(W)|: CHOCO-SGD's eigengap (1 for a single rank)."""
        ev = self.eigenvalues()
        return 1.0 if self.size == 1 else 1.0 - abs(float(ev[1]))

    def tang_rho(self) -> float:
        """Tang et al.'s rho = max(|lambda_2|, |lambda_n|) (0 for a single rank)."""
        ev = self.eigenvalues()
        return 0.0 if self.size == 1 else max(abs(float(ev[1])), abs(float(ev[-1])))

    def degree(self, rank: int) -> int:
        return len(self._neighbors[rank])

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Topology({self.name!r}, n={self.size}, spectral_gap={self.spectral_gap():.4f})"


def _check_graph(neighbors: Sequence[Sequence[int]]) -> list[list[int]]:
    n = len(neighbors)
    if n < 1:
        raise ValueError("a topology needs at least one rank")
    out: list[list[int]] = []
    for i, peers in enumerate(neighbors):
        peers = [int(j) for j in peers]
        bad = [j for j in peers if not 0 <= j < n]
        if bad:
            raise ValueError(f"rank {i} lists neighbour(s) {bad} outside 0..{n - 1}")
        if i in peers:
            raise ValueError(f"rank {i} lists itself as a neighbour (self-weights go on W's diagonal)")
        if len(set(peers)) != len(peers):
            raise ValueError(f"rank {i} lists a neighbour twice: {peers}")
        out.append(sorted(peers))
    for i, peers in enumerate(out):
        for j in peers:
            if i not in out[j]:
                raise ValueError(f"the graph is not symmetric: rank {i} lists {j} but rank {j} does not list {i}")
    seen, stack = {0}, [0]
    while stack:
        for j in out[stack.pop()]:
            if j not in seen:
                seen.add(j)
                stack.append(j)
    if len(seen) != n:
        missing = sorted(set(range(n)) - seen)
        raise ValueError(f"the graph is not connected: ranks {missing} cannot be reached from rank 0")
    return out


def _as_matrix(weights: torch.Tensor, n: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).clone()
    if w.shape != (n, n):
        raise ValueError(f"the mixing matrix must be {n} x {n}, got shape {tuple(w.shape)}")
    return w


def _check_weights(w: torch.Tensor, neighbors: list[list[int]]) -> None:
    n = len(neighbors)
    if not torch.isfinite(w).all():
        raise ValueError("the mixing matrix holds NaN or Inf")
    if (w < -_TOL).any():
        i, j = (int(v) for v in torch.nonzero(w < -_TOL)[0])
        raise ValueError(f"the mixing matrix has a negative weight W[{i},{j}] = {float(w[i, j]):g}")
    asym = (w - w.T).abs()
    if (asym > _TOL).any():
        i, j = (int(v) for v in torch.nonzero(asym > _TOL)[0])
        raise ValueError(
            f"the mixing matrix is not symmetric: W[{i},{j}] = {float(w[i, j]):g} but W[{j},{i}] = {float(w[j, i]):g}"
        )
    rows = w.sum(1)
    bad_rows = torch.nonzero((rows - 1).abs() > _TOL).flatten().tolist()
    if bad_rows:
        r = bad_rows[0]
        raise ValueError(f"the rows of the mixing matrix must sum to 1: row {r} sums to {float(rows[r]):.6g}")
    for i in range(n):
        for j in range(n):
            if i != j and j not in neighbors[i] and abs(float(w[i, j])) > _TOL:
                raise ValueError(
                    f"the mixing matrix has weight W[{i},{j}] = {float(w[i, j]):g} but {i} and {j} are not neighbours"
                )
