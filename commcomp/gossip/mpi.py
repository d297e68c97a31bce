"""`Transport` over MPI (mpi4py): a distributed-graph communicator and neighbourhood collectives.

Built from the topology with `Create_dist_graph_adjacent` (sources = destinations = the rank's
neighbours, no reordering), so one `Neighbor_allgather` moves the payload sizes and one
`Neighbor_allgatherv` the payloads themselves. Launch with `mpirun -np N python train.py`
(as root add `--allow-run-as-root`; with more ranks than cores `--oversubscribe`). Buffers go
through host memory; with a CUDA-aware MPI the copies could be skipped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from commcomp.gossip.transport import _check_data, check_sizes
from commcomp.topologies import Topology

__all__ = ["MPITransport"]


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError("transport='mpi' needs mpi4py (pip install mpi4py, with an MPI library installed)") from err
    return MPI


class MPITransport:
    """`Transport` on an MPI communicator (default: COMM_WORLD).

    Args:
        topology: a Topology whose size equals the communicator's size.
        comm: an mpi4py intracommunicator (None: MPI.COMM_WORLD).
    """

    def __init__(self, topology: Topology, comm: Any = None) -> None:
        mpi = _mpi()
        self._MPI = mpi
        self.comm = mpi.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        if topology.size != self.world_size:
            raise ValueError(f"the topology has {topology.size} ranks but the MPI communicator has {self.world_size}")
        self.topology = topology
        self.peers = topology.neighbors(self.rank)
        self.graph = self.comm.Create_dist_graph_adjacent(self.peers, self.peers, reorder=False)
        self.bytes_sent = 0

    def exchange(self, data: torch.Tensor) -> list[torch.Tensor]:
        _check_data(data)
        host = data.detach().contiguous().cpu().numpy()
        sizes = np.empty(len(self.peers), dtype=np.int64)
        self.graph.Neighbor_allgather(np.array([host.size], dtype=np.int64), sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        recv = np.empty(int(sizes.sum()), dtype=np.uint8)
        self.graph.Neighbor_allgatherv(host, [recv, (sizes, offsets), self._MPI.BYTE])
        self.bytes_sent += len(self.peers) * (8 + host.size)
        check_sizes(self.rank, host.size, self.peers, sizes.tolist())
        whole = torch.from_numpy(recv).to(data.device)
        # separate copies: each starts at offset 0, so payload tensors can be viewed as wider dtypes
        return [whole[o : o + s].clone() for o, s in zip(offsets.tolist(), sizes.tolist())]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.detach().contiguous().cpu()
        self.bytes_sent += host.numel() * host.element_size()
        wide = host.float() if host.dtype == torch.bfloat16 else host  # numpy has no bfloat16
        out = np.empty_like(wide.numpy())
        self.comm.Allreduce(wide.numpy(), out, op=self._MPI.SUM)
        tensor.copy_(torch.from_numpy(out))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        host = tensor.detach().contiguous().cpu()
        buf = host.reshape(-1).view(torch.uint8).numpy()  # as bytes: any dtype, bfloat16 included
        self.comm.Bcast(buf, root=src)
        if self.rank == src:
            self.bytes_sent += host.numel() * host.element_size()
        tensor.copy_(host)
        return tensor
