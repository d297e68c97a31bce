"""Training comparison worker for the Horovod rows; runs under mpirun (or horovodrun) on every host.

    mpirun -np 4 python benchmarks/train_horovod.py --steps 4 --out horovod.json

Horovod fp32, Horovod fp16 and commcomp's compressors on Horovod (benchmarks/methods_horovod.py),
on the communication-heavy MLP by default, with the same loop, data and records as train.py. Horovod
does the gradient traffic; torch.distributed (gloo, started from the same launcher environment)
only lines the ranks up between steps and methods. `benchmarks/run.py` merges these rows into its
table.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import horovod.torch as hvd

from benchmarks import methods_horovod, train  # noqa: F401  (methods_horovod adds the hvd-* methods)

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    hvd.init()
    train.main(argv, methods="hvd-fp32,hvd-fp16,hvd-gradiveq", workloads="mlp")


if __name__ == "__main__":
    main()
