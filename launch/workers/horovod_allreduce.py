"""Smoke test for Horovod across hosts: every rank all-reduces (sums) (rank + 1) * [0, 1, ..., n-1].

Prints `RESULT {"rank": r, "world_size": w, "sum": [...]}`; the caller checks the sum
(w (w + 1) / 2 * [0, 1, ..., n-1]). Runs under mpirun or horovodrun.
"""

from __future__ import annotations

import json
import sys

import horovod.torch as hvd
import torch


def main() -> int:
    torch.set_num_threads(1)
    hvd.init()
    x = (hvd.rank() + 1) * torch.arange(16, dtype=torch.float64)
    total = hvd.allreduce(x, op=hvd.Sum, name="smoke")
    record = {"rank": hvd.rank(), "world_size": hvd.size(), "sum": total.tolist()}
    print(f"RESULT {json.dumps(record)}", flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
