"""The standard topologies (ring, torus, exponential, complete) and custom graphs, by name.

`get("ring", n)` or `get("torus", n, shape=(4, 4))`; `names()` lists what exists. All use
Metropolis-Hastings weights, which on these regular graphs are the uniform weights of the papers:
1/3 on a ring (1/2 for n = 2), 1/5 on a torus, 1/n on the complete graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from commcomp.registry import Registry
from commcomp.topologies.base import Topology

__all__ = ["TOPOLOGIES", "complete", "custom", "exponential", "get", "names", "ring", "torus"]

TOPOLOGIES: Registry[Topology] = Registry("topology")


def _check_size(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of ranks must be a positive integer, got {n!r}")
    return n


def _undirected(n: int, offsets: Sequence[int]) -> list[list[int]]:
    """Neighbours i +- k (mod n) for each offset k, without self-loops or repeats (a circulant graph)."""
    return [sorted({(i + s * k) % n for k in offsets for s in (1, -1)} - {i}) for i in range(n)]


@TOPOLOGIES.register("ring")
def ring(n: int) -> Topology:
    """Each rank talks to rank +- 1 (mod n). Weights 1/3 (1/2 when n = 2)."""
    return Topology("ring", _undirected(_check_size(n), [1]))


@TOPOLOGIES.register("complete")
def complete(n: int) -> Topology:
    """Everyone talks to everyone, weights 1/n: gossip then equals exact averaging."""
    n = _check_size(n)
    return Topology("complete", [[j for j in range(n) if j != i] for i in range(n)])


@TOPOLOGIES.register("exponential")
def exponential(n: int) -> Topology:
    """Peers at distance 2^k (k = 0, 1, ... while 2^k < n) in both directions, fixed over time.

    The usual exponential graph (SGP, Assran et al. 2019) is directed: i sends to i + 2^k only.
    Gossip here needs a symmetric, doubly stochastic W, so each edge is used both ways (i +- 2^k):
    degree about 2 log2(n) instead of log2(n), and the gap stays large as n grows.
    """
    n = _check_size(n)
    return Topology("exponential", _undirected(n, [2**k for k in range(max(n - 1, 1).bit_length())]))


def _square_shape(n: int) -> tuple[int, int]:
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


@TOPOLOGIES.register("torus")
def torus(n: int, shape: tuple[int, int] | None = None) -> Topology:
    """A 2-D torus (grid with wrap-around): rank r = row * cols + col talks to the 4 grid neighbours.

    `shape` = (rows, cols) with rows * cols == n; by default the most square factorisation (16 -> 4 x 4,
    12 -> 3 x 4). A prime n has only the 1 x n factorisation, which is a ring. Along a side of length 2
    both directions reach the same rank and along a side of length 1 there is no neighbour, so the
    degree is below 4 on small tori; weights are then 1/(degree + 1).
    """
    n = _check_size(n)
    if shape is None:
        shape = _square_shape(n)
    rows, cols = (int(v) for v in shape)
    if rows < 1 or cols < 1 or rows * cols != n:
        raise ValueError(f"torus shape {tuple(shape)} does not hold {n} ranks (rows * cols must equal n)")
    neighbors = []
    for r in range(n):
        row, col = divmod(r, cols)
        peers = {((row + d) % rows) * cols + col for d in (1, -1)} | {row * cols + (col + d) % cols for d in (1, -1)}
        neighbors.append(sorted(peers - {r}))
    return Topology(f"torus{rows}x{cols}", neighbors)


@TOPOLOGIES.register("custom")
def custom(n: int, neighbors: Sequence[Sequence[int]], weights: torch.Tensor | None = None) -> Topology:
    """Any undirected connected graph from an adjacency list, Metropolis-Hastings weights by default.

    `weights` may give an explicit mixing matrix instead; it is checked (symmetric, non-negative, rows
    summing to 1, zero off the edges) and rejected with an error that says which rule it breaks.
    """
    n = _check_size(n)
    if len(neighbors) != n:
        raise ValueError(f"the adjacency list has {len(neighbors)} entries for {n} ranks")
    return Topology("custom", neighbors, weights)


def get(name: str | Topology, n: int, **options: Any) -> Topology:
    """The topology `name` on n ranks (a Topology instance is checked for size and returned)."""
    if isinstance(name, Topology):
        if options:
            raise ValueError("topology options cannot be given together with a Topology instance")
        if name.size != n:
            raise ValueError(f"the topology has {name.size} ranks but the process group has {n}")
        return name
    factory = TOPOLOGIES.factory(name)
    return factory(n, **options)


def names() -> list[str]:
    return TOPOLOGIES.names()
