"""Smoke test for mpirun across hosts: every rank all-reduces (rank + 1) * [0, 1, ..., n-1] with mpi4py.

    mpirun ... python launch/workers/mpi_allreduce.py [MBYTES]

Prints `RESULT {"rank": r, "world_size": w, "sum": [...], "addr": a}`; the caller checks the sum
(w (w + 1) / 2 * [0, 1, ..., n-1]) and that the ranks ran on different hosts. With MBYTES, the
time to send that many MiB from rank 0 to the last rank is added to the last rank's record
("send_seconds").
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from launch.netcheck import local_addr


def main() -> int:
    mbytes = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x = (rank + 1) * np.arange(16, dtype=np.float64)
    total = np.empty_like(x)
    comm.Allreduce(x, total, op=MPI.SUM)
    addr = local_addr(os.environ.get("MASTER_ADDR", "127.0.0.1"))  # which host this rank is on
    record = {"rank": rank, "world_size": size, "sum": total.tolist(), "addr": addr}
    if mbytes > 0 and size > 1:  # time rank 0 -> last rank, as in launch/workers/allreduce.py
        payload = np.zeros(int(mbytes * (1 << 20)), dtype=np.uint8)
        comm.Barrier()
        start = time.perf_counter()
        if rank == 0:
            comm.Send(payload, dest=size - 1)
        elif rank == size - 1:
            comm.Recv(payload, source=0)
            record["send_seconds"] = time.perf_counter() - start
    print(f"RESULT {json.dumps(record)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
