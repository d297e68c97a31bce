"""Run `gossip_workload.transport_session` over MPI; launched by tests/test_gossip.py as

    mpirun --allow-run-as-root --oversubscribe -np 4 python tests/mpi_gossip_worker.py OUT_DIR

Each rank saves its results to OUT_DIR/rank<r>.pt for comparison with the gloo run.
"""

import os
import sys

import torch
from gossip_workload import transport_session
from mpi4py import MPI

if __name__ == "__main__":
    torch.set_num_threads(1)
    rank = MPI.COMM_WORLD.Get_rank()
    torch.save(transport_session(rank, "mpi"), os.path.join(sys.argv[1], f"rank{rank}.pt"))
