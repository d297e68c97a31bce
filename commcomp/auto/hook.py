"""The auto method's DDP hook: each bucket's gradients go through their planned candidate's exchange,
with the `AutoState` owning the step (its bookkeeping, NaN/Inf policy, stats and commits).

GradiVeQ's two exchanges keep their DDP pipeline (`commcomp.gradiveq.pipeline.BasisUpdates`): a
GradiVeQ group's basis update starts at the top of the next hook call, whatever that bucket's
method, and after the step's last bucket.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist

from commcomp.auto.state import AutoState
from commcomp.exchange import TorchWire
from commcomp.gradiveq import GradiVeQState
from commcomp.gradiveq.tracked import TrackedLayer
from commcomp.hooks.base import register_simple_method, send_group
from commcomp.hooks.quantized import QuantizerState

__all__ = ["TrackedOnAuto", "auto_hook"]


def auto_hook(state: AutoState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook of the auto method; use through `commcomp.register(model, "auto")`.

    The bucket's gradients are grouped by their planned method (one group, unless DDP's buckets
    differ from the measured ones); each group goes through its method's exchange, in order.
    """
    state.begin_bucket(bucket)
    wire, buf, index = TorchWire(state.process_group), bucket.buffer(), bucket.index()
    gradiveq = state.methods.get("gradiveq")
    tracked = None if not isinstance(gradiveq, GradiVeQState) else TrackedOnAuto(gradiveq, state)
    if tracked is not None:
        state.updates.flush(tracked, wire)  # the previous GradiVeQ group's second exchange
    keys = tuple(state.param_key(p) for p in bucket.parameters())
    grads = bucket.gradients()
    state.observe(keys, grads, buf, index)  # probes and trials, on measuring steps
    groups: dict[str, tuple[list[str], list[torch.Tensor]]] = {}
    for key, grad in zip(keys, grads):
        names, tensors = groups.setdefault(state.method(key), ([], []))
        names.append(key)
        tensors.append(grad)
    for _ in range(len(groups) - 1):
        state.add_group()
    futures = []
    for method, (names, tensors) in groups.items():
        if method == "gradiveq":
            assert tracked is not None
            futures.append(state.updates.send(tracked, wire, names, tensors, buf, index))
        else:
            sub = state.methods[method]
            assert isinstance(sub, QuantizerState)
            codec = sub.exchange_codec([(k, g.shape) for k, g in zip(names, tensors)], buf)
            futures.append(send_group(state, codec, names, tensors, buf, index))
    if bucket.is_last():
        if tracked is not None:
            state.updates.flush(tracked, wire)
        state.after_last_bucket(buf)  # the plan, at the end of a measuring round
    if len(futures) == 1:
        return futures[0]
    return torch.futures.collect_all(futures).then(_every_group)


def _every_group(done: torch.futures.Future[list[torch.futures.Future[torch.Tensor]]]) -> torch.Tensor:
    """The bucket's buffer once every group is decoded (re-raising a group's error)."""
    buffers = [group.wait() for group in done.value()]
    return buffers[0]


class TrackedOnAuto:
    """GradiVeQ's tracked layers and residuals, with the auto state owning the step (a `TrackedHost`)."""

    def __init__(self, gradiveq: GradiVeQState, host: AutoState) -> None:
        self.gradiveq, self.host = gradiveq, host
        self.memory = gradiveq.memory
        self.wire_dtype = gradiveq.wire_dtype
        self.stats = host.stats

    @property
    def rank(self) -> int:
        return self.host.rank

    @property
    def world_size(self) -> int:
        return self.host.world_size

    def tracked_layer(self, key: str, shape: torch.Size) -> TrackedLayer | None:
        return self.gradiveq.tracked_layer(key, shape)

    def nonfinite(self, tensors: list[torch.Tensor]) -> bool:
        return self.host.nonfinite(tensors)

    def skip_step(self, flags: torch.Tensor, bucket_index: int) -> None:
        self.host.skip_step(flags, bucket_index)

    def commit_at_step_end(self, commit: Callable[[], None]) -> None:
        self.host.commit_at_step_end(commit)

    def end_bucket(self) -> None:
        self.host.end_bucket()


register_simple_method("auto", AutoState, auto_hook)
