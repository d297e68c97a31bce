"""Wire bytes per collective kind next to bytes handed over (commcomp.stats), on 3 real gloo ranks.

A ring all-reduce sends 2(N-1)/N x its payload per rank and a ring all-gather (N-1) x, so a
compressor that all-gathers (qsgd) saves less on the wire than its handed-over ratio says; at N = 3
the wire ratio of an all-gathered payload is the handed ratio x (4/3) / 2. Checked per kind against
the byte counts of the tensors the test itself hands over (the payload sizes of the quantizer, the
MoE rows), for the DDP hooks (all-reduce and all-gather), gossip (point-to-point) and MoE (all-to-all).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp import quantizers
from commcomp.gossip import CHOCO
from commcomp.moe import MoE
from commcomp.stats import wire_factor

WORLD = 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))


def _step(model: nn.Module, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    F.mse_loss(model(torch.randn(8, 32, generator=gen)), torch.randn(8, 4, generator=gen)).backward()


def worker(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("fp16", "qsgd"):
        ddp = DDP(_net(), bucket_cap_mb=1000)  # one bucket
        state = commcomp.register(ddp, method)
        for _ in range(2):  # the first step also checks the options (an all-gather)
            _step(ddp, rank)
        grads = [p.grad for p in ddp.module.parameters()]
        q = quantizers.get(method)
        if hasattr(q, "set_rank"):
            q.set_rank(rank)
        payload = sum(q.compress(g).nbytes for g in grads)
        out[method] = {"last": state.stats.last, "payload": payload, "dense": sum(g.numel() * 4 for g in grads)}
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    algo = CHOCO(net, opt, quantizer="sign", consensus_step=0.5)
    for _ in range(2):
        opt.zero_grad()
        _step(net, rank)
        algo.step()
    out["choco"] = {"last": algo.stats.last}
    moe = MoE(8, 2 * world, gate="switch", capacity_factor=None)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(rank), requires_grad=True)  # as from a layer below
    y, aux = moe(x)
    (y.sum() + aux).backward()
    out["moe"] = {"last": moe.stats.last, "load": moe.last_load, "ids": list(moe.expert_ids)}
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run(worker, WORLD, timeout=300)


def test_every_kind_is_its_factor_times_the_bytes_handed_over(results: list[dict[str, Any]]) -> None:
    for r in results:
        for entry in r.values():
            last = entry["last"]
            for kind, (handed, wire) in last.by_kind.items():
                if kind != "alltoall":  # the all-to-all's share kept by the rank is exact, see below
                    assert wire == pytest.approx(handed * wire_factor(kind, WORLD)), kind
            assert last.bytes_sent == sum(h for h, _ in last.by_kind.values())
            assert last.wire_bytes == pytest.approx(sum(w for _, w in last.by_kind.values()))


def test_summed_and_gathered_payloads(results: list[dict[str, Any]]) -> None:
    for r in results:
        fp16, qsgd = r["fp16"], r["qsgd"]
        assert list(fp16["last"].by_kind) == ["allreduce"]  # the fp16 payload, summed
        assert fp16["last"].bytes_sent == fp16["payload"]  # no flag slots: the sum shows NaN/Inf itself
        assert list(qsgd["last"].by_kind) == ["allgather"]
        assert qsgd["last"].bytes_sent == qsgd["payload"] + 1  # packed bytes + this rank's flag byte
        for m in (fp16, qsgd):
            assert m["last"].dense_bytes == m["dense"]
            assert m["last"].dense_wire_bytes == pytest.approx(m["dense"] * 2 * (WORLD - 1) / WORLD)
        # all-gathered: the wire saves N/2 times less than the handed-over ratio claims
        handed, wire = qsgd["last"].compression_ratio, qsgd["last"].wire_compression_ratio
        assert wire == pytest.approx(handed * (2 * (WORLD - 1) / WORLD) / (WORLD - 1))
        assert fp16["last"].wire_compression_ratio == pytest.approx(fp16["last"].compression_ratio)


def test_gossip_and_moe(results: list[dict[str, Any]]) -> None:
    for r in results:
        choco = r["choco"]["last"]
        assert set(choco.by_kind) == {"p2p", "allreduce"}  # the messages, and the NaN/Inf flags
        assert choco.by_kind["p2p"][1] == choco.by_kind["p2p"][0]
    loads = [r["moe"]["load"] for r in results]
    for rank, r in enumerate(results):
        handed, wire = r["moe"]["last"].by_kind["alltoall"]
        ids = r["moe"]["ids"]
        kept_here = int(loads[rank][ids[0] : ids[-1] + 1].sum())  # rows this rank routes to its own experts
        sent_rows = int(loads[rank].sum())
        row = 8 * 4
        counts = 2 * WORLD * 8  # the (W, L) count table, int64
        # forward: T rows out, R rows back; backward: the same, reversed. The rows a rank routes to its
        # own experts (kept_here) stay on the rank in all four.
        received = sum(int(load[ids[0] : ids[-1] + 1].sum()) for load in loads)
        assert handed == counts + 2 * (sent_rows + received) * row
        assert wire == pytest.approx(counts * (WORLD - 1) / WORLD + 2 * (sent_rows + received - 2 * kept_here) * row)
