"""Horovod side of tests/test_overflow.py: run under `horovodrun -np 2 --gloo python this.py OUTDIR`.

Trains the overflow scenario of tests/overflow_workload.py with `commcomp.horovod.DistributedOptimizer`
(the GradScaler loop Horovod documents: `synchronize()`, then `scaler.step` under
`skip_synchronize()`) and with PQASGD on Horovod's collectives, with and without the overflow step;
each rank writes OUTDIR/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import horovod.torch as hvd
import torch
from overflow_workload import LR, build_model, train

import commcomp
from commcomp.horovod import DistributedOptimizer, HorovodCollectives

COMPRESSORS: list[tuple[str, str, dict[str, Any]]] = [
    ("hvd-gradiveq", "gradiveq", {"min_numel": 1024, "warmup_steps": 2}),
    ("hvd-qsgd-ef", "qsgd", {"bits": 2, "error_feedback": True}),
    ("hvd-fp16", "fp16", {}),
]


def main() -> None:
    hvd.init()
    torch.set_num_threads(1)
    rank = hvd.rank()
    out: dict[str, Any] = {}
    for overflow in (True, False):
        runs: dict[str, Any] = {}
        for label, compressor, options in COMPRESSORS:
            net = build_model()
            opt = DistributedOptimizer(
                torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9), net.named_parameters(), compressor, **options
            )
            params = list(net.parameters())
            runs[label] = train(rank, net, params, opt, overflow, opt.synchronize, opt.skip_synchronize)
        net = build_model()
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
        commcomp.PQASGD(net, opt, period=2, quantizer="qsgd", bits=4, collectives=HorovodCollectives("pqasgd"))
        runs["hvd-pqasgd"] = train(rank, net, list(net.parameters()), opt, overflow)
        out["overflow" if overflow else "reference"] = runs
    torch.save(out, Path(sys.argv[1]) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
