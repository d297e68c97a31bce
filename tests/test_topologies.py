"""Topologies are pure data: check neighbours, mixing matrices and spectral gaps without processes."""

from __future__ import annotations

import math

import pytest
import torch

from commcomp import topologies
from commcomp.topologies import Topology


def _check_doubly_stochastic(topo: Topology) -> None:
    W = topo.mixing_matrix()
    n = topo.size
    assert W.shape == (n, n)
    assert torch.allclose(W, W.T, atol=1e-12)
    assert torch.allclose(W.sum(0), torch.ones(n, dtype=W.dtype), atol=1e-12)
    assert torch.allclose(W.sum(1), torch.ones(n, dtype=W.dtype), atol=1e-12)
    assert (W >= 0).all()
    for i in range(n):
        peers = topo.neighbors(i)
        assert i not in peers
        for j in range(n):
            if j != i:
                assert (W[i, j] > 0) == (j in peers)
                assert (i in topo.neighbors(j)) == (j in peers)


@pytest.mark.parametrize("name", ["ring", "torus", "exponential", "complete"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 12, 16])
def test_standard_topologies_are_valid(name: str, n: int) -> None:
    topo = topologies.get(name, n)
    _check_doubly_stochastic(topo)
    ev = torch.linalg.eigvalsh(topo.mixing_matrix()).flip(0)
    assert abs(float(ev[0]) - 1) < 1e-9
    if n > 1:
        assert topo.spectral_gap() == pytest.approx(1 - abs(float(ev[1])))
        assert topo.tang_rho() == pytest.approx(max(abs(float(ev[1])), abs(float(ev[-1]))))
        assert 0 < topo.spectral_gap() <= 1  # connected


def test_gaps_from_the_papers() -> None:
    assert topologies.get("ring", 4).spectral_gap() == pytest.approx(0.67, abs=0.005)
    assert topologies.get("torus", 16).spectral_gap() == pytest.approx(0.4, abs=1e-9)
    for n in (5, 8, 16):  # closed form of a circulant ring with weights 1/3
        assert topologies.ring(n).spectral_gap() == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3)
    assert topologies.complete(6).spectral_gap() == pytest.approx(1.0)


def test_uniform_weights_where_the_papers_use_them() -> None:
    assert topologies.ring(8).weight(0, 1) == pytest.approx(1 / 3)
    assert topologies.ring(8).weight(0, 0) == pytest.approx(1 / 3)
    assert topologies.ring(2).mixing_matrix().tolist() == [[0.5, 0.5], [0.5, 0.5]]
    torus = topologies.torus(16)
    assert all(torus.degree(r) == 4 for r in range(16))
    assert torus.weight(5, 5) == pytest.approx(1 / 5)
    assert torus.weight(5, 6) == pytest.approx(1 / 5)
    assert topologies.complete(5).weight(1, 3) == pytest.approx(1 / 5)


def test_torus_shapes() -> None:
    t = topologies.torus(12)
    assert t.name == "torus3x4"
    assert t.neighbors(5) == sorted({1, 9, 4, 6})  # row 1, col 1 of a 3 x 4 grid
    t = topologies.torus(8, shape=(2, 4))
    assert t.neighbors(0) == [1, 3, 4]  # up and down reach the same rank on a side of length 2
    assert topologies.torus(7).neighbors(0) == topologies.ring(7).neighbors(0)  # prime: 1 x 7
    with pytest.raises(ValueError, match="does not hold 12 ranks"):
        topologies.torus(12, shape=(5, 3))


def test_exponential_is_symmetric_powers_of_two() -> None:
    t = topologies.exponential(16)
    assert t.neighbors(0) == sorted({1, 2, 4, 8, 15, 14, 12})
    assert t.spectral_gap() > topologies.ring(16).spectral_gap()


def test_metropolis_hastings_on_an_irregular_graph() -> None:
    star = topologies.custom(4, [[1, 2, 3], [0], [0], [0]])
    _check_doubly_stochastic(star)
    assert star.weight(0, 1) == pytest.approx(1 / 4)  # 1 / (1 + max(3, 1))
    assert star.weight(1, 1) == pytest.approx(3 / 4)


def test_custom_graph_errors_say_which_rule() -> None:
    with pytest.raises(ValueError, match="not symmetric: rank 0 lists 1"):
        topologies.custom(3, [[1], [2], [1]])
    with pytest.raises(ValueError, match="not connected"):
        topologies.custom(4, [[1], [0], [3], [2]])
    with pytest.raises(ValueError, match="lists itself"):
        topologies.custom(2, [[0, 1], [0]])
    with pytest.raises(ValueError, match="outside"):
        topologies.custom(2, [[5], [0]])
    ok = [[1], [0, 2], [1]]
    bad_rows = torch.tensor([[0.5, 0.5, 0], [0.5, 0.4, 0.1], [0, 0.1, 0.8]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"row 2 sums to 0\.9"):
        topologies.custom(3, ok, weights=bad_rows)
    asym = torch.tensor([[0.5, 0.5, 0], [0.4, 0.4, 0.2], [0, 0.2, 0.8]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not symmetric: W"):
        topologies.custom(3, ok, weights=asym)
    off_edge = torch.tensor([[0.5, 0.4, 0.1], [0.4, 0.4, 0.2], [0.1, 0.2, 0.7]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not neighbours"):
        topologies.custom(3, ok, weights=off_edge)
    good = torch.tensor([[0.5, 0.5, 0], [0.5, 0.25, 0.25], [0, 0.25, 0.75]], dtype=torch.float64)
    assert topologies.custom(3, ok, weights=good).weight(1, 2) == 0.25


def test_registry_and_sizes() -> None:
    with pytest.raises(ValueError, match="valid names: complete, custom, exponential, ring, torus"):
        topologies.get("rnig", 4)
    with pytest.raises(ValueError, match="positive integer"):
        topologies.ring(0)
    with pytest.raises(ValueError, match="has 4 ranks but the process group has 8"):
        topologies.get(topologies.ring(4), 8)
    with pytest.raises(ValueError, match="outside this 4-rank ring"):
        topologies.ring(4).neighbors(4)


def test_tang_rho_and_choco_gap_differ_when_an_eigenvalue_is_near_minus_one() -> None:
    # a 4-cycle with edge weight 0.45: W = 0.1 I + 0.45 A has eigenvalues 1, 0.1, 0.1, -0.8
    cycle = [[(i - 1) % 4, (i + 1) % 4] for i in range(4)]
    adjacency = torch.zeros(4, 4, dtype=torch.float64)
    for i, peers in enumerate(cycle):
        adjacency[i, peers] = 1
    t = topologies.custom(4, cycle, weights=0.1 * torch.eye(4, dtype=torch.float64) + 0.45 * adjacency)
    assert t.spectral_gap() == pytest.approx(0.9)  # CHOCO: 1 - |lambda_2|
    assert t.tang_rho() == pytest.approx(0.8)  # Tang: max(|lambda_2|, |lambda_n|)
