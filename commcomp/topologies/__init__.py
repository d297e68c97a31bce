"""Communication topologies for decentralized training: pure data, testable without processes.

topo = commcomp.topologies.get("torus", 16)
topo.neighbors(5), topo.mixing_matrix(), topo.spectral_gap()
"""

from commcomp.topologies.base import Topology, metropolis_hastings
from commcomp.topologies.graphs import TOPOLOGIES, complete, custom, exponential, get, names, ring, torus

__all__ = [
    "TOPOLOGIES",
    "Topology",
    "complete",
    "custom",
    "exponential",
    "get",
    "metropolis_hastings",
    "names",
    "ring",
    "torus",
]
