"""Neighbour exchange for gossip: send one byte buffer to every neighbour, receive one from each.

`Transport` is the interface the gossip algorithms use; `TorchTransport` implements it with
torch.distributed point-to-point messages, `commcomp.gossip.mpi.MPITransport` with an MPI
distributed-graph communicator. Each exchange runs in two rounds: first every rank sends its
payload size (one int64) to each neighbour, then the payloads, received into buffers of the
announced sizes. A neighbour whose size differs from this rank's raises ValueError on both ranks
after the round completes, so a layout mismatch is an error and never a hang on half-sent data.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from commcomp.comm import TorchCollectives
from commcomp.topologies import Topology

__all__ = ["TorchTransport", "Transport", "check_sizes"]


class Transport(Protocol):
    """What a gossip algorithm needs from the network.

    rank, world_size: of this process in the group; topology: the graph exchanged over;
    bytes_sent: bytes of every buffer this rank has handed to the network (each neighbour's copy counts).
    """

    rank: int
    world_size: int
    topology: Topology

    @property
    def bytes_sent(self) -> int: ...

    def exchange(self, data: torch.Tensor) -> list[torch.Tensor]:
        """Send the 1-D uint8 `data` to every neighbour; return what each sent, in
        `topology.neighbors(rank)` order. Raises ValueError if a neighbour's size differs."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over all ranks, in place (used for evaluation and checks, not gossip)."""
        ...

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`tensor` of rank `src` on every rank, in place."""
        ...


def check_sizes(rank: int, mine: int, peers: list[int], sizes: list[int]) -> None:
    """Raise ValueError naming every neighbour whose payload size differs from this rank's."""
    bad = [(p, s) for p, s in zip(peers, sizes) if s != mine]
    if bad:
        detail = ", ".join(f"rank {p} sent {s} bytes" for p, s in bad)
        raise ValueError(
            f"gossip payload size mismatch on rank {rank}: this rank sends {mine} bytes but {detail}; "
            "every rank must use the same model shapes, quantizer and options"
        )


def _check_data(data: torch.Tensor) -> None:
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError("exchange() expects a 1-D uint8 tensor (use commcomp.quantizers.pack_payloads)")


class TorchTransport:
    """`Transport` over torch.distributed isend/irecv with each neighbour (gloo, NCCL, ...).

    Args:
        topology: a Topology whose size equals the group's size.
        process_group: the group (None: the whole world); neighbours are group ranks.
    """

    def __init__(self, topology: Topology, process_group: dist.ProcessGroup | None = None) -> None:
        self.collectives = TorchCollectives(process_group)
        self.process_group = process_group
        self.rank = self.collectives.rank
        self.world_size = self.collectives.world_size
        if topology.size != self.world_size:
            raise ValueError(f"the topology has {topology.size} ranks but the process group has {self.world_size}")
        self.topology = topology
        self.peers = topology.neighbors(self.rank)
        self._global = [p if process_group is None else dist.get_global_rank(process_group, p) for p in self.peers]
        self._p2p_bytes = 0

    @property
    def bytes_sent(self) -> int:
        return self._p2p_bytes + self.collectives.bytes_sent

    def _swap(self, send: torch.Tensor, recv: list[torch.Tensor]) -> None:
        """Post one send of `send` and one receive per neighbour, then wait for all of them."""
        if not self.peers:
            return
        ops = []
        for peer, buf in zip(self._global, recv):
            ops.append(dist.P2POp(dist.isend, send, peer, self.process_group))
            ops.append(dist.P2POp(dist.irecv, buf, peer, self.process_group))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        self._p2p_bytes += len(self.peers) * send.numel() * send.element_size()

    def exchange(self, data: torch.Tensor) -> list[torch.Tensor]:
        _check_data(data)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=data.device)
        sizes = [torch.empty_like(size) for _ in self.peers]
        self._swap(size, sizes)
        announced = [int(s.item()) for s in sizes]
        out = [torch.empty(s, dtype=torch.uint8, device=data.device) for s in announced]
        self._swap(data.contiguous(), out)
        check_sizes(self.rank, data.numel(), self.peers, announced)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.collectives.all_reduce_sum(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return self.collectives.broadcast(tensor, src)
