"""MNIST-1D on 8 ranks on a ring: compressed gossip against all-reduce SGD, measured in the same test.

One spawn of 8 gloo ranks trains, from the same initial model and on the same batches, all-reduce
SGD (DDP) and then CHOCO-SGD (4-bit QSGD), CHOCO-SGD (sign), DCD-PSGD (8-bit QSGD) and ECD-PSGD
(8-bit QSGD), and evaluates each run's consensus model (the average over ranks) on the test set.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from harness import run
from torch import nn

from benchmarks.data import CNN1D, accuracy, load_mnist1d, shard
from commcomp.gossip import ALGORITHMS, consensus_model

WORLD = 8
STEPS = 400
BATCH = 128
LR = 0.1
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("allreduce", "allreduce", {}),
    ("choco-qsgd4", "choco", {"quantizer": "qsgd", "bits": 4, "consensus_step": 0.8}),
    ("choco-sign", "choco", {"quantizer": "sign", "consensus_step": 0.4}),
    ("dcd-qsgd8", "dcd", {"quantizer": "qsgd", "bits": 8}),
    ("ecd-qsgd8", "ecd", {"quantizer": "qsgd", "bits": 8}),
]


def _new_model() -> nn.Module:
    with torch.random.fork_rng():  # identical start for every rank and run, global stream untouched
        torch.manual_seed(0)
        return CNN1D(channels=16)


def train_all(
    rank: int, world_size: int, steps: int, lr: float, methods: list[tuple[str, str, dict[str, Any]]]
) -> dict[str, Any]:
    x, y, x_test, y_test = load_mnist1d()
    xs, ys = shard(x, y, rank, world_size)
    out: dict[str, Any] = {}
    for label, name, options in methods:
        model = _new_model()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        if name == "allreduce":
            net: nn.Module = nn.parallel.DistributedDataParallel(model)
            step = opt.step
        else:
            algo = ALGORITHMS[name](model, opt, topology="ring", **options)
            net, step = model, algo.step
        gen = torch.Generator().manual_seed(1 + rank)  # the same batches for every method
        for t in range(steps):
            for group in opt.param_groups:  # cosine decay: the runs end settled, so they can be compared
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
            idx = torch.randint(len(xs), (BATCH,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(xs[idx]), ys[idx]).backward()
            step()
        result = {
            "consensus": accuracy(consensus_model(model), x_test, y_test),
            "local": accuracy(model, x_test, y_test),
        }
        if name != "allreduce":
            result["bytes_per_step"] = algo.stats.last.bytes_sent
            result["dense_per_step"] = algo.stats.last.dense_bytes
        out[label] = result
    return out


def test_compressed_gossip_matches_allreduce_on_mnist1d() -> None:
    res = run(train_all, WORLD, STEPS, LR, METHODS, timeout=900)
    for label, _, _ in METHODS:
        local = [r[label]["local"] for r in res]
        print(
            f"{label}: consensus {res[0][label]['consensus']:.3f}, local mean {sum(local) / WORLD:.3f}, "
            f"bytes/step {res[0][label].get('bytes_per_step')}"
        )
    baseline = res[0]["allreduce"]["consensus"]
    assert baseline > 0.7  # the comparison below means something only if training worked
    for label in ("choco-qsgd4", "choco-sign", "dcd-qsgd8"):
        assert res[0][label]["consensus"] >= baseline - 0.015, (label, res[0][label], baseline)
        assert all(r[label]["consensus"] == res[0][label]["consensus"] for r in res)  # one consensus model
    # ECD is run and reported, not held to the bar (see the README, "Decentralized training")
    assert "consensus" in res[0]["ecd-qsgd8"]
    for label in ("choco-qsgd4", "choco-sign", "dcd-qsgd8"):
        assert res[0][label]["bytes_per_step"] < res[0][label]["dense_per_step"]


if __name__ == "__main__":
    import sys
    import time

    steps, lr = int(sys.argv[1]), float(sys.argv[2])
    t0 = time.time()
    res = run(train_all, WORLD, steps, lr, METHODS, timeout=1200)
    for label, _, _ in METHODS:
        local = [r[label]["local"] for r in res]
        print(label, res[0][label], "local mean", sum(local) / len(local), "min", min(local))
    print("seconds", time.time() - t0)
