"""The DDP route: `commcomp.register(ddp_model, "choco", optimizer=opt, ...)` and friends.

Registers "dpsgd", "dcd", "ecd" and "choco" as communication methods. The installed comm hook skips
DDP's global all-reduce of the gradients (each rank keeps its own; only one NaN/Inf flag per rank
is summed, so an overflow reaches every rank), and the gossip update runs from the optimizer's
step hooks: the pre-hook remembers the parameters, the post-hook exchanges and mixes.
Parameters are never modified during backward (autograd's version counters stay intact), and the
result equals the optimizer-wrapper API step for step. Hence `optimizer=` is required.
(No `from __future__ import annotations` here: DDP inspects the hook's annotations at run time.)
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from commcomp.consistency import bad_ranks, flag_slots, nonfinite_flag
from commcomp.gossip.algorithms import CHOCO, DCD, DPSGD, ECD
from commcomp.gossip.base import GossipAlgorithm
from commcomp.hooks.base import HookState, register_method
from commcomp.overflow import NonFiniteGradientError, poison

__all__ = ["GossipState", "local_gradient_hook"]


class GossipState(HookState):
    """State of a DDP model trained by gossip: holds the algorithm; its stats are the algorithm's."""

    def __init__(self, algorithm: GossipAlgorithm, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(process_group, check_finite=False)
        self.algorithm = algorithm
        self.stats = algorithm.stats
        if algorithm.watch is not None:  # the comm hook shares the flags here (DDP overwrites .grad)
            algorithm.watch.remove()
            algorithm.watch = None
        opt = algorithm.optimizer
        self._handles = [
            opt.register_step_pre_hook(lambda *_: algorithm.begin()),
            opt.register_step_post_hook(lambda *_: algorithm.finish()),
        ]

    def options(self) -> dict[str, Any]:
        return {**super().options(), **self.algorithm.options()}

    def state_dict(self) -> dict[str, Any]:
        return self.algorithm.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state)

    def consensus_model(self) -> nn.Module:
        return self.algorithm.consensus_model()

    def remove(self) -> None:
        """Detach the optimizer hooks (the DDP comm hook stays: DDP cannot unregister it)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def local_gradient_hook(state: GossipState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook that sends no gradients: every rank keeps its local gradients.

    It sums one NaN/Inf flag per rank (an all-reduce of `world_size` floats per bucket), so an
    overflow on any rank fills every rank's bucket with NaN ("propagate": GradScaler then skips
    the optimizer step, and with it the gossip, on every rank) or raises on every rank ("raise").
    """
    buf = bucket.buffer()
    flags = flag_slots(nonfinite_flag([buf]), state.rank, state.world_size, torch.float32, buf.device)
    state.stats.sent(flags.numel() * flags.element_size(), kind="allreduce", world_size=state.world_size)
    policy = state.algorithm.nonfinite_policy

    def settle(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        bad = bad_ranks(fut.value()[0])
        if bad and policy == "raise":
            raise NonFiniteGradientError(
                f"{type(state.algorithm).__name__}: NaN or Inf in the gradients of rank(s) {bad}"
            )
        if bad:
            poison([buf])
        return buf

    return dist.all_reduce(flags, group=state.process_group, async_op=True).get_future().then(settle)


def _factory(cls: type[GossipAlgorithm], method: str) -> Any:
    def factory(
        model: nn.parallel.DistributedDataParallel,
        process_group: dist.ProcessGroup | None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        **options: Any,
    ) -> tuple[GossipState, Any]:
        if optimizer is None:
            raise ValueError(
                f"method {method!r} needs optimizer=<the model's optimizer>: the gossip exchange runs "
                "right after optimizer.step()"
            )
        algorithm = cls(model.module, optimizer, process_group=process_group, **options)
        return GossipState(algorithm, process_group), local_gradient_hook

    factory.__doc__ = f"Decentralized training with {cls.__name__} (see commcomp.gossip.{cls.__name__})."
    return factory


for _cls in (DPSGD, DCD, ECD, CHOCO):
    register_method(_cls.name)(_factory(_cls, _cls.name))
