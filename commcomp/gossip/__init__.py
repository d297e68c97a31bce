"""Decentralized training: each rank averages with its neighbours on a graph instead of all ranks.

Optimizer wrappers (call `algo.step()` where you would call `optimizer.step()`)::

    algo = commcomp.gossip.CHOCO(model, opt, topology="ring", quantizer="sign", consensus_step=0.4)

or the DDP route, one line: `commcomp.register(ddp_model, "choco", optimizer=opt, quantizer="sign",
consensus_step=0.4)`. Importing this module registers "dpsgd", "dcd", "ecd" and "choco" there.
"""

from typing import Any

import torch
from torch import nn

from commcomp.gossip import ddp as _ddp  # noqa: F401  (registers the DDP methods)
from commcomp.gossip.algorithms import CHOCO, DCD, DPSGD, ECD
from commcomp.gossip.base import GossipAlgorithm
from commcomp.gossip.connect import make_transport
from commcomp.gossip.consensus import consensus_model
from commcomp.gossip.ddp import GossipState, local_gradient_hook
from commcomp.gossip.transport import TorchTransport, Transport

__all__ = [
    "ALGORITHMS",
    "CHOCO",
    "DCD",
    "DPSGD",
    "ECD",
    "GossipAlgorithm",
    "GossipState",
    "TorchTransport",
    "Transport",
    "build",
    "consensus_model",
    "get",
    "local_gradient_hook",
    "make_transport",
]

ALGORITHMS: dict[str, type[GossipAlgorithm]] = {cls.name: cls for cls in (DPSGD, DCD, ECD, CHOCO)}


def get(name: str) -> type[GossipAlgorithm]:
    """The algorithm class registered as `name` ("dpsgd", "dcd", "ecd", "choco")."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown gossip algorithm {name!r}; valid names: {', '.join(sorted(ALGORITHMS))}") from None


def build(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> GossipAlgorithm:
    """`get(name)(model, optimizer, **options)`: e.g. build("choco", model, opt, quantizer="sign",
    consensus_step=0.4). For benchmarks: time `algo.step()`, read `algo.stats.last.bytes_sent`."""
    return get(name)(model, optimizer, **options)
