"""A DDP hook that sends every gradient through a quantizer from `commcomp.quantizers`.

Linear quantizers (identity, fp16, bf16, random-k with a shared seed): each rank compresses g_n/N and
one all-reduce sums the payloads, which decode to the average. Other quantizers (qsgd, topk, sign):
each rank compresses g_n, the packed payload bytes of the whole bucket are all-gathered, and every
rank decodes all N payloads and averages them, so every rank applies the same update.
With `error_feedback=True` each rank compresses gradient + residual and keeps what was not sent.
One collective per bucket, issued from the hook body; callbacks only decode.
"""

from typing import Any

import torch
import torch.distributed as dist

from commcomp import quantizers
from commcomp.error_feedback import ErrorFeedback
from commcomp.hooks.base import HookState
from commcomp.quantizers import Payload, Quantizer, pack_payloads, unpack_payloads
from commcomp.stats import timer

__all__ = ["QuantizerState", "quantizer_hook"]


class QuantizerState(HookState):
    """State of `quantizer_hook`.

    Args:
        process_group: the group (None: the whole world).
        quantizer: a registered name (see `commcomp.quantizers.names()`) or a Quantizer instance.
        error_feedback: keep per-parameter residuals (recommended for biased quantizers: topk, sign).
        check_finite: refuse NaN/Inf gradients, raising on every rank.
        **quantizer_options: passed to the quantizer (e.g. bits=4 for qsgd).
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        quantizer: str | Quantizer = "identity",
        error_feedback: bool = False,
        check_finite: bool = True,
        **quantizer_options: Any,
    ) -> None:
        super().__init__(process_group, check_finite)
        self.quantizer = quantizers.get(quantizer, **quantizer_options)
        self.memory = ErrorFeedback() if error_feedback else None

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "quantizer": self.quantizer.name,
            "quantizer_options": self.quantizer.options(),
            "error_feedback": self.memory is not None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "quantizer": self.quantizer.state_dict(),
            "residuals": None if self.memory is None else self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.quantizer.load_state_dict(state["quantizer"])
        if self.memory is not None and state.get("residuals") is not None:
            self.memory.load_state_dict(state["residuals"])


def quantizer_hook(state: QuantizerState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook; use with `model.register_comm_hook(state, quantizer_hook)`."""
    state.begin_bucket(bucket)
    buf, n, index, q = bucket.buffer(), state.world_size, bucket.index(), state.quantizer
    grads = bucket.gradients()
    keys = [state.param_key(p) for p in bucket.parameters()]
    with timer(buf) as enc:
        payloads: list[Payload] = []
        new_residuals: dict[str, torch.Tensor] = {}
        for key, g in zip(keys, grads):
            h = g / n if q.linear else g
            if state.memory is not None:
                h = state.memory.compensate(key, h)
            payload = q.compress(h)
            if state.memory is not None:
                new_residuals[key] = state.memory.residual_of(h, q.decompress(payload))
            payloads.append(payload)
        flags = state.finite_flags(grads, buf)
        if q.linear:
            flat = _flatten_summable(payloads, flags)
        else:
            flat = torch.cat(
                [pack_payloads(payloads), (flags[state.rank : state.rank + 1] > 0).to(torch.uint8)]
            )
    state.stats.encoded(enc.seconds)
    dense = buf.numel() * buf.element_size()
    group = state.process_group
    if q.linear:
        state.stats.sent(flat.numel() * flat.element_size(), dense)
        fut = dist.all_reduce(flat, group=group, async_op=True).get_future()
    else:
        gathered = [torch.empty_like(flat) for _ in range(n)]
        state.stats.sent(flat.numel() * flat.element_size(), dense)
        fut = dist.all_gather(gathered, flat, group=group, async_op=True).get_future()

    def decode(fut: torch.futures.Future[Any]) -> torch.Tensor:
        try:
            with timer(buf) as dec:
                if q.linear:
                    out = fut.value()[0]
                    state.raise_if_nonfinite(out[-n:], index)
                    decoded = [q.decompress(p) for p in _unflatten_summable(out[:-n], payloads)]
                else:
                    state.raise_if_nonfinite(torch.stack([t[-1] for t in gathered]), index)
                    per_rank = [unpack_payloads(t[:-1], payloads) for t in gathered]
                    decoded = [
                        torch.stack([q.decompress(ps[i]) for ps in per_rank]).sum(0).div_(n)
                        for i in range(len(payloads))
                    ]
                for g, d in zip(grads, decoded):
                    g.copy_(d.view_as(g))
            state.stats.decoded(dec.seconds)
            if state.memory is not None:
                for key, r in new_residuals.items():
                    state.memory.set(key, r)
            return buf
        finally:
            state.end_bucket()

    return fut.then(decode)


def _flatten_summable(payloads: list[Payload], flags: torch.Tensor) -> torch.Tensor:
    dtypes = {t.dtype for p in payloads for t in p.tensors}
    if len(dtypes) > 1:
        raise TypeError(
            f"a linear quantizer's payload tensors must share one dtype, got {sorted(map(str, dtypes))}"
        )
    wire = dtypes.pop() if dtypes else flags.dtype
    return torch.cat([*(t.reshape(-1) for p in payloads for t in p.tensors), flags.to(wire)])


def _unflatten_summable(flat: torch.Tensor, templates: list[Payload]) -> list[Payload]:
    out, offset = [], 0
    for tpl in templates:
        tensors = []
        for t in tpl.tensors:
            tensors.append(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        out.append(Payload(tensors, tpl.shape, tpl.dtype, dict(tpl.meta)))
    return out
