"""The auto method's DDP hook: each bucket's gradients go through their planned candidate's exchange
(the candidate state's own `exchange_codec`, GradiVeQ's one exchange included), with the `AutoState`
owning the step (its bookkeeping, NaN/Inf policy, stats and commits).
"""

import torch
import torch.distributed as dist

from commcomp.auto.state import AutoState
from commcomp.hooks.base import register_simple_method, send_group

__all__ = ["auto_hook"]


def auto_hook(state: AutoState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook of the auto method; use through `commcomp.register(model, "auto")`.

    The bucket's gradients are grouped by their planned method (one group, unless DDP's buckets
    differ from the measured ones); each group goes through its method's exchange, in order.
    """
    state.begin_bucket(bucket)
    buf, index = bucket.buffer(), bucket.index()
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
        state.deliver_residuals(method, names, tensors)
        codec = state.methods[method].exchange_codec([(k, g.shape) for k, g in zip(names, tensors)], buf)
        futures.append(send_group(state, codec, names, tensors, buf, index))
    if bucket.is_last():
        state.after_last_bucket(buf)  # the plan, at the end of a measuring round
    if len(futures) == 1:
        return futures[0]
    return torch.futures.collect_all(futures).then(_every_group)


def _every_group(done: torch.futures.Future[list[torch.futures.Future[torch.Tensor]]]) -> torch.Tensor:
    """The bucket's buffer once every group is decoded (re-raising a group's error)."""
    buffers = [group.wait() for group in done.value()]
    return buffers[0]


register_simple_method("auto", AutoState, auto_hook)
