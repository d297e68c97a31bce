"""Connect a gossip algorithm to the network: the transport over a topology chosen by name.

`make_transport` turns the `transport`, `topology` and `topology_options` arguments of every gossip
algorithm into a `Transport`: torch.distributed point-to-point messages (`TorchTransport`), an MPI
distributed-graph communicator (`commcomp.gossip.mpi.MPITransport`, imported only when asked for,
since mpi4py is optional), or an instance the caller built.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from commcomp.gossip.transport import TorchTransport, Transport
from commcomp.topologies import Topology
from commcomp.topologies import get as get_topology

__all__ = ["make_transport"]


def make_transport(
    transport: str | Transport | None,
    topology: str | Topology | None,
    topology_options: dict[str, Any] | None,
    process_group: dist.ProcessGroup | None,
) -> Transport:
    """Build the transport: None or "torch" (torch.distributed), "mpi" (mpi4py), or an instance."""
    options = dict(topology_options or {})
    if transport is None or transport == "torch":
        topo = get_topology(topology or "ring", dist.get_world_size(process_group), **options)
        return TorchTransport(topo, process_group)
    if transport == "mpi":
        from commcomp.gossip.mpi import MPITransport, _mpi

        if process_group is not None:
            raise ValueError("process_group applies to transport='torch' only; MPI uses COMM_WORLD")
        topo = get_topology(topology or "ring", _mpi().COMM_WORLD.Get_size(), **options)
        return MPITransport(topo)
    if isinstance(transport, str):
        raise ValueError(f"unknown transport {transport!r}; valid: 'torch', 'mpi' or a Transport instance")
    if topology is not None or options:
        raise ValueError("a Transport instance carries its own topology; do not pass topology as well")
    return transport
