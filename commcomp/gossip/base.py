"""What every gossip algorithm shares: parameters, transport, quantizer, step order, checkpointing.

The step, for every algorithm (call `algo.step()` where you would call `optimizer.step()`):

1. `begin()`: remember the parameters x_i (when the algorithm needs them).
2. `optimizer.step()`: the optimizer computes its local update at x_i. Its effect
   Delta_i = x_after - x_i is "-gamma * g_i" of the papers (or its momentum/Adam equivalent).
3. `finish()`: the algorithm decides where Delta_i is applied, compresses, exchanges with the
   neighbours and writes the new x_i into the parameters.

The DDP route runs `begin` and `finish` from optimizer pre/post step hooks, so both routes compute
the same thing. Every rank must call `step()` the same number of times (each one exchanges).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from commcomp import quantizers
from commcomp.consistency import check_saved_options, verify_options_with_root, world_size_error
from commcomp.gossip.connect import make_transport
from commcomp.gossip.transport import Transport
from commcomp.overflow import GradientWatch, check_nonfinite, gradients_nonfinite
from commcomp.quantizers import Payload, Quantizer, pack_payloads, unpack_payloads
from commcomp.stats import CommStats, timer
from commcomp.topologies import Topology

__all__ = ["GossipAlgorithm"]

Tensors = list[torch.Tensor]


class GossipAlgorithm(ABC):
    """Base of the decentralized optimizers (D-PSGD, DCD-PSGD, ECD-PSGD, CHOCO-SGD).

    Args:
        model: the local model (its trainable parameters are gossiped; buffers are not).
        optimizer: any torch optimizer over those parameters; it makes the local update.
        topology: a name from `commcomp.topologies.names()` or a Topology (default "ring").
        quantizer: a name from `commcomp.quantizers.names()` or a Quantizer; compresses what is sent.
        transport: None or "torch" (torch.distributed point-to-point), "mpi" (mpi4py), or a Transport.
        process_group: the torch.distributed group (None: the whole world).
        topology_options: passed to the topology (e.g. {"shape": (2, 4)} for a torus).
        sync_initial: broadcast rank 0's parameters first (the theory assumes equal starts).
        nonfinite: "propagate" (default) or "raise": what a NaN/Inf gradient on any rank does (see
            `commcomp.overflow`). After each backward pass the ranks share one flag each (a small
            all-reduce); with "propagate" every rank's gradients then become NaN, so
            `torch.amp.GradScaler` skips that step everywhere (`scaler.step(algo)` works: the
            algorithm has the optimizer's `param_groups`), and `step()` itself skips a step whose
            gradients are non-finite, leaving the parameters and the gossip state as they were.
        **quantizer_options: passed to the quantizer (e.g. bits=4 for qsgd).
    """

    name = "gossip"
    needs_previous = True  # finish() needs the parameters from before optimizer.step()

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        topology: str | Topology | None = None,
        quantizer: str | Quantizer = "identity",
        transport: str | Transport | None = None,
        process_group: dist.ProcessGroup | None = None,
        topology_options: dict[str, Any] | None = None,
        sync_initial: bool = True,
        nonfinite: str = "propagate",
        **quantizer_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # --- configuration ---
        self.model = model
        self.optimizer = optimizer
        self.sync_initial = bool(sync_initial)
        self.nonfinite_policy = check_nonfinite(nonfinite)
        self.quantizer = quantizers.get(quantizer, **quantizer_options)
        self.check_quantizer()  # before any collective: a refusal is raised on every rank alike
        self.transport = make_transport(transport, topology, topology_options, process_group)
        self.topology = self.transport.topology
        self.rank = self.transport.rank
        self.peers = self.topology.neighbors(self.rank)
        self.self_weight = self.topology.weight(self.rank, self.rank)
        self.peer_weights = [self.topology.weight(self.rank, j) for j in self.peers]
        if hasattr(self.quantizer, "set_rank"):  # per-rank random streams follow the transport's rank
            self.quantizer.set_rank(self.rank)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to gossip")
        bad = [n for n, p in named if not p.is_floating_point()]
        if bad:
            raise TypeError(f"gossip needs floating-point parameters; not floating: {bad}")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dense_bytes = sum(p.numel() * p.element_size() for p in self.params)
        # --- internal state ---
        self.steps = 0  # finished steps
        self._previous: Tensors | None = None
        # --- statistics ---
        self.stats = CommStats()
        # setup traffic lands in step 1's count
        with self._counted("allreduce"):  # the options check: a digest broadcast and a flag sum
            self._verify_options()
        if sync_initial:
            with torch.no_grad(), self._counted("broadcast"):
                for p in self.params:
                    self.transport.broadcast(p.data, 0)
        with self._counted("p2p"):  # DCD and ECD exchange their models once
            self.buffers: dict[str, Tensors] = self.init_buffers()
        self.watch: GradientWatch | None = GradientWatch(
            self.params, self.transport, self.nonfinite_policy, type(self).__name__, self.stats
        )

    # ----- the algorithm -----
    @abstractmethod
    def init_buffers(self) -> dict[str, Tensors]:
        """The algorithm's per-parameter state (replica sums, public copies), after the broadcast."""

    @abstractmethod
    def resized_buffers(self, params: Tensors, averaged: dict[str, Tensors]) -> dict[str, Tensors]:
        """The buffers after a change of world size (`commcomp.elastic.load`): every rank's parameters
        are `params` (the old ranks' average) and `averaged` holds the old ranks' average of each buffer."""

    @abstractmethod
    def update(self, previous: Tensors, current: Tensors) -> Tensors:
        """New parameters from x_i (`previous`; empty if `needs_previous` is False) and the optimizer's
        result (`current`)."""

    def check_quantizer(self) -> None:  # noqa: B027  (a hook with a default, not an abstract method)
        """Raise ValueError if the algorithm cannot work with `self.quantizer` (default: any works)."""

    def options(self) -> dict[str, Any]:
        """Options that must agree on every rank."""
        return {
            "algorithm": self.name,
            "topology": self.topology.name,
            "world_size": self.topology.size,
            "quantizer": self.quantizer.name,
            "quantizer_options": self.quantizer.options(),
            "shapes": [list(p.shape) for p in self.params],
            "sync_initial": self.sync_initial,  # checked before the broadcast, so a mismatch cannot hang
            "nonfinite": self.nonfinite_policy,
        }

    # ----- the step -----
    def begin(self) -> None:
        """Remember x_i before the optimizer's update (called before `optimizer.step()`)."""
        if self.needs_previous:
            self._previous = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def finish(self) -> None:
        """Gossip after the optimizer's update (called after `optimizer.step()`)."""
        if self.needs_previous and self._previous is None:
            raise RuntimeError(f"{type(self).__name__}.finish() called without begin() before optimizer.step()")
        new = self.update(self._previous or [], [p.detach() for p in self.params])
        for p, x in zip(self.params, new):
            p.copy_(x)
        self._previous = None
        self.steps += 1
        self.stats.end_step()

    def step(self, closure: Any = None) -> Any:
        """`optimizer.step(closure)` followed by the gossip exchange; returns the closure's loss.

        A step whose gradients hold NaN/Inf (on every rank alike, after the gradient watch) is
        skipped: no optimizer step, no exchange, nothing counted.
        """
        if closure is None and gradients_nonfinite(self.params):
            return None
        self.begin()
        loss = self.optimizer.step(closure)
        self.finish()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def close(self) -> None:
        """Remove the gradient watch (its autograd hook): overflows are then no longer shared."""
        if self.watch is not None:
            self.watch.remove()
            self.watch = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, so `torch.amp.GradScaler.step(algo)` can unscale them."""
        return self.optimizer.param_groups

    # ----- sending -----
    def exchange(self, tensors: Tensors) -> tuple[Tensors, list[Tensors]]:
        """Compress `tensors`, send them to every neighbour; return (what the neighbours decode from
        this rank's message, [each neighbour's decoded tensors] in `self.peers` order)."""
        q = self.quantizer
        with timer(tensors[0]) as enc:
            payloads = [q.compress(t) for t in tensors]
            flat = pack_payloads(payloads)
        with self._counted("p2p", self.dense_bytes):
            received = self.transport.exchange(flat)
        with timer(tensors[0]) as dec:
            own = [q.decompress(p) for p in payloads]
            theirs = [self._decode(buf, payloads) for buf in received]
        self.stats.encoded(enc.seconds)
        self.stats.decoded(dec.seconds)
        return own, theirs

    @contextlib.contextmanager
    def _counted(self, kind: str, dense: int = 0) -> Iterator[None]:
        """Count the bytes the transport handed over inside the block as one collective `kind`."""
        before = self.transport.bytes_sent
        yield
        self.stats.sent(self.transport.bytes_sent - before, dense, kind=kind, world_size=self.topology.size)

    def exchange_exact(self, tensors: Sequence[torch.Tensor]) -> list[Tensors]:
        """Send `tensors` uncompressed (used once to initialise replicas); return the neighbours'."""
        payloads = [Payload([t.detach().reshape(-1).clone()], t.shape, t.dtype) for t in tensors]
        received = self.transport.exchange(pack_payloads(payloads))
        return [[p.tensors[0].view(p.shape).clone() for p in unpack_payloads(buf, payloads)] for buf in received]

    def _decode(self, buf: torch.Tensor, templates: list[Payload]) -> Tensors:
        return [self.quantizer.decompress(p) for p in unpack_payloads(buf, templates)]

    def weighted(self, own: Tensors | None, theirs: list[Tensors]) -> Tensors:
        """Per parameter: sum_{j in N(i)} w_ij theirs_j, plus w_ii own when `own` is given."""
        out = []
        for k, p in enumerate(self.params):
            acc = torch.zeros_like(p) if own is None else own[k].to(p.dtype) * self.self_weight
            for w, msg in zip(self.peer_weights, theirs):
                acc.add_(msg[k].to(p.dtype), alpha=w)
            out.append(acc)
        return out

    # ----- checks -----
    def _verify_options(self) -> None:
        """Raise on every rank if any rank's options differ from rank 0's (two small collectives)."""
        verify_options_with_root(type(self).__name__, self.options(), self.transport, self.params[0].device)

    # ----- evaluation -----
    def consensus_model(self) -> nn.Module:
        """A copy of the model holding the average of all ranks' models (training is not touched)."""
        from commcomp.gossip.consensus import consensus_model

        return consensus_model(self.model, self.transport)

    # ----- checkpointing -----
    def state_dict(self) -> dict[str, Any]:
        """Everything the algorithm needs to resume exactly (save the model and optimizer as well)."""
        return {
            "options": self.options(),
            "steps": self.steps,
            "buffers": {k: dict(zip(self.names, (t.detach().clone() for t in v))) for k, v in self.buffers.items()},
            "quantizer": self.quantizer.state_dict(),
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_world = state["options"].get("world_size")
        if saved_world != self.topology.size:
            raise world_size_error(type(self).__name__, saved_world, self.topology.size)
        check_saved_options(type(self).__name__, state["options"], self.options())
        for key, tensors in self.buffers.items():
            saved = state["buffers"][key]
            for name, t in zip(self.names, tensors):
                t.copy_(saved[name])
        self.steps = int(state["steps"])
        self.quantizer.load_state_dict(state["quantizer"])
        self.stats.load_state_dict(state["stats"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(topology={self.topology.name}, quantizer={self.quantizer!r}, rank={self.rank})"
