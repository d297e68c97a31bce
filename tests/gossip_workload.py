"""Shared pieces of the gossip tests: a tiny deterministic model and data per rank, a plain-tensor
reference of each algorithm's update rule (full replicas, full W), and a session that runs the same
deterministic exchange on any transport (gloo through tests/harness.py, MPI through mpirun)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from commcomp import quantizers
from commcomp.gossip import ALGORITHMS, GossipAlgorithm
from commcomp.quantizers import Quantizer
from commcomp.topologies import Topology

__all__ = ["LR", "build_model", "grads_of", "make_data", "reference", "run_algorithm", "transport_session"]

LR = 0.1
Vector = list[torch.Tensor]


def build_model(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A 6-4-3 tanh MLP with weights from a generator seeded with `seed`."""
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    return model


def make_data(rank: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(16, 6, generator=gen, dtype=dtype)
    return x, torch.randn(16, 3, generator=gen, dtype=dtype) + rank  # every rank has its own optimum


def loss_of(model: nn.Module, rank: int) -> torch.Tensor:
    x, y = make_data(rank, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def grads_of(model: nn.Module, rank: int) -> Vector:
    model.zero_grad()
    loss_of(model, rank).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def run_algorithm(
    rank: int, name: str, steps: int, *, quantizer: str = "identity", init_seed: int | None = None, **options: Any
) -> dict[str, Any]:
    """Run `steps` steps of algorithm `name` with plain SGD; record parameters and buffers after each."""
    model = build_model(rank if init_seed is None else init_seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    algo: GossipAlgorithm = ALGORITHMS[name](model, opt, quantizer=quantizer, **options)
    history: dict[str, Any] = {"init": [p.detach().clone() for p in model.parameters()], "params": [], "buffers": []}
    history["half"], history["bytes"] = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, rank).backward()
        algo.begin()
        opt.step()
        history["half"].append([p.detach().clone() for p in model.parameters()])
        algo.finish()
        history["params"].append([p.detach().clone() for p in model.parameters()])
        history["buffers"].append({k: [t.clone() for t in v] for k, v in algo.buffers.items()})
        history["bytes"].append(algo.stats.last.bytes_sent)
    return history


# ----- the plain-tensor reference: every rank simulated in one process, one replica per neighbour -----


def _compressor(q: Quantizer) -> Any:
    def c(vec: Vector) -> Vector:
        return [q.decompress(q.compress(t)) for t in vec]

    return c


def reference(
    name: str, topology: Topology, inits: list[Vector], steps: int, quantizer: str = "identity", **options: Any
) -> list[list[Vector]]:
    """Parameters of every rank after every step: out[step][rank] (plain SGD with lr LR)."""
    n = topology.size
    W = topology.mixing_matrix()
    models = [build_model(0) for _ in range(n)]
    for m, init in zip(models, inits):
        with torch.no_grad():
            for p, v in zip(m.parameters(), init):
                p.copy_(v)
    qopts = {k: v for k, v in options.items() if k not in ("consensus_step", "compression_scale")}
    qs = [quantizers.get(quantizer, **qopts) for _ in range(n)]
    for r, q in enumerate(qs):
        if hasattr(q, "set_rank"):
            q.set_rank(r)
    C = [_compressor(q) for q in qs]
    x = [[p.detach().clone() for p in m.parameters()] for m in models]
    nb = [topology.neighbors(i) for i in range(n)]

    def lin(*terms: tuple[float, Vector]) -> Vector:
        return [sum(a * v[k] for a, v in terms) for k in range(len(terms[0][1]))]

    def grad(i: int) -> Vector:
        with torch.no_grad():
            for p, v in zip(models[i].parameters(), x[i]):
                p.copy_(v)
        return grads_of(models[i], i)

    # replicas[i][j]: what rank i holds for rank j
    if name == "dcd":
        replicas = [{j: [t.clone() for t in x[j]] for j in nb[i]} for i in range(n)]
    elif name == "ecd":
        replicas = [{j: [t.clone() for t in x[j]] for j in [*nb[i], i]} for i in range(n)]
    elif name == "choco":
        replicas = [{j: [torch.zeros_like(t) for t in x[j]] for j in [*nb[i], i]} for i in range(n)]
    out = []
    for t in range(1, steps + 1):
        g = [grad(i) for i in range(n)]
        if name == "dpsgd":
            sent = [C[i](x[i]) for i in range(n)]
            x = [
                lin((float(W[i, i]), x[i]), *((float(W[i, j]), sent[j]) for j in nb[i]), (-LR, g[i])) for i in range(n)
            ]
        elif name == "dcd":
            half = [
                lin((float(W[i, i]), x[i]), *((float(W[i, j]), replicas[i][j]) for j in nb[i]), (-LR, g[i]))
                for i in range(n)
            ]
            c = [C[i](lin((1.0, half[i]), (-1.0, x[i]))) for i in range(n)]
            x = [lin((1.0, x[i]), (1.0, c[i])) for i in range(n)]
            for i in range(n):
                for j in nb[i]:
                    replicas[i][j] = lin((1.0, replicas[i][j]), (1.0, c[j]))
        elif name == "ecd":
            nxt = [lin(*((float(W[i, j]), replicas[i][j]) for j in [*nb[i], i]), (-LR, g[i])) for i in range(n)]
            cz = [C[i](lin((1 - t / 2, x[i]), (t / 2, nxt[i]))) for i in range(n)]
            x = nxt
            for i in range(n):
                for j in [*nb[i], i]:
                    replicas[i][j] = lin((1 - 2 / t, replicas[i][j]), (2 / t, cz[j]))
        elif name == "choco":
            gamma = options["consensus_step"]
            # a = 1 / (1 + omega) for an unbiased quantizer with variance bound omega (CHOCO's rule)
            omega = getattr(qs[0], "omega", None)
            default = 1 / (1 + omega) if qs[0].unbiased and omega is not None else 1.0
            a = options.get("compression_scale") or default
            half = [lin((1.0, x[i]), (-LR, g[i])) for i in range(n)]
            x = [
                lin(
                    (1.0, half[i]),
                    *((gamma * float(W[i, j]), lin((1.0, replicas[i][j]), (-1.0, replicas[i][i]))) for j in nb[i]),
                )
                for i in range(n)
            ]
            q = [lin((a, C[i](lin((1.0, x[i]), (-1.0, replicas[i][i]))))) for i in range(n)]
            for i in range(n):
                for j in [*nb[i], i]:
                    replicas[i][j] = lin((1.0, replicas[i][j]), (1.0, q[j]))
        else:
            raise ValueError(name)
        out.append([[v.clone() for v in xi] for xi in x])
    return out


# ----- the same deterministic session on any transport -----


def transport_session(rank: int, transport: str) -> dict[str, Any]:
    """A raw exchange of rank-dependent bytes, then 3 steps each of CHOCO (sign) and DCD (qsgd 8-bit),
    on a ring of the world's size over `transport` ("torch" or "mpi")."""
    from commcomp.gossip import make_transport

    t = make_transport(transport, "ring", None, None)
    gen = torch.Generator().manual_seed(rank)
    raw = torch.randint(0, 256, (37,), generator=gen, dtype=torch.uint8)
    out: dict[str, Any] = {"raw": [r.clone() for r in t.exchange(raw)]}
    try:  # every rank sends a different size: an error on every rank, never a hang
        t.exchange(torch.zeros(10 + rank, dtype=torch.uint8))
        out["mismatch"] = None
    except ValueError as err:
        out["mismatch"] = str(err)
    out["after_mismatch"] = [r.clone() for r in t.exchange(raw)]  # the transport still works
    out["choco"] = run_algorithm(
        rank, "choco", 3, quantizer="sign", consensus_step=0.5, transport=transport, sync_initial=False
    )["params"]
    out["dcd"] = run_algorithm(rank, "dcd", 3, quantizer="qsgd", bits=8, transport=transport)["params"]
    return out
