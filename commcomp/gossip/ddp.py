"""The DDP route: `commcomp.register(ddp_model, "choco", optimizer=opt, ...)` and friends.

Registers "dpsgd", "dcd", "ecd" and "choco" as communication methods. The installed comm hook skips
DDP's global all-reduce (each rank keeps its own gradients), and the gossip update runs from the
optimizer's step hooks: the pre-hook remembers the parameters, the post-hook exchanges and mixes.
Parameters are never modified during backward (autograd's version counters stay intact), and the
result equals the optimizer-wrapper API step for step. Hence `optimizer=` is required.
(No `from __future__ import annotations` here: DDP inspects the hook's annotations at run time.)
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from commcomp.gossip.algorithms import CHOCO, DCD, DPSGD, ECD
from commcomp.gossip.base import GossipAlgorithm
from commcomp.hooks.base import HookState, register_method

__all__ = ["GossipState", "local_gradient_hook"]


class GossipState(HookState):
    """State of a DDP model trained by gossip: holds the algorithm; its stats are the algorithm's."""

    def __init__(self, algorithm: GossipAlgorithm, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(process_group, check_finite=False)
        self.algorithm = algorithm
        self.stats = algorithm.stats
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
    """DDP comm hook that communicates nothing: every rank keeps its local gradients."""
    del state
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


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
