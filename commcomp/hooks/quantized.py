"""A DDP hook that sends every gradient through a quantizer from `commcomp.quantizers`.

Linear quantizers (identity, fp16, bf16, random-k with a shared seed): each rank compresses g_n/N and
one all-reduce sums the payloads, which decode to the average. Other quantizers (qsgd, topk, sign):
each rank compresses g_n, the packed payload bytes of the whole bucket are all-gathered, and every
rank decodes all N payloads and averages them, so every rank applies the same update.
With `error_feedback=True` each rank compresses gradient + residual and keeps what was not sent.
One collective per bucket, issued from the hook body; callbacks only decode.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from commcomp import quantizers
from commcomp.error_feedback import ErrorFeedback
from commcomp.hooks.base import HookState
from commcomp.quantizers import Payload, Quantizer, StochasticQuantizer, pack_payloads, unpack_payloads
from commcomp.stats import timer

__all__ = ["QuantizerState", "flatten_summable", "quantizer_hook", "send_quantized", "unflatten_summable"]


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

    # ----- one gradient's way through a collective (shared with commcomp.horovod) -----
    def encode(self, key: str, grad: torch.Tensor) -> tuple[Payload, torch.Tensor | None]:
        """This rank's payload for one gradient (g/N if the quantizer is linear, else g; plus the
        residual with error feedback) and the residual to keep once the step decodes cleanly."""
        q = self.quantizer
        h = grad / self.world_size if q.linear else grad
        if self.memory is not None:
            h = self.memory.compensate(key, h)
        if isinstance(q, StochasticQuantizer):
            q.set_stream(key)  # random numbers per parameter: independent of DDP's bucket layout
        payload = q.compress(h)
        residual = self.memory.residual_of(h, q.decompress(payload)) if self.memory is not None else None
        return payload, residual

    def pack(self, payloads: list[Payload], flags: torch.Tensor) -> torch.Tensor:
        """The one tensor handed to the collective: summable payloads + every rank's flag slot
        (linear), or the payloads' bytes + this rank's flag byte (all-gathered)."""
        if self.quantizer.linear:
            return flatten_summable(payloads, flags)
        return torch.cat([pack_payloads(payloads), (flags[self.rank : self.rank + 1] > 0).to(torch.uint8)])

    def received_flags(self, received: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Per-rank NaN/Inf flags from the summed tensor (linear) or the N gathered tensors."""
        if isinstance(received, torch.Tensor):
            return received[-self.world_size :]
        return torch.stack([t[-1] for t in received])

    def decode_received(
        self, received: torch.Tensor | list[torch.Tensor], templates: list[Payload]
    ) -> list[torch.Tensor]:
        """The averaged tensors: decode the summed payloads, or decode every rank's and average."""
        q, n = self.quantizer, self.world_size
        if isinstance(received, torch.Tensor):
            return [q.decompress(p) for p in unflatten_summable(received[:-n], templates)]
        per_rank = [unpack_payloads(t[:-1], templates) for t in received]
        return [torch.stack([q.decompress(ps[i]) for ps in per_rank]).sum(0).div_(n) for i in range(len(templates))]

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
    keys = [state.param_key(p) for p in bucket.parameters()]
    return send_quantized(state, state, bucket, keys)


def send_quantized(
    state: QuantizerState,
    host: HookState,
    bucket: dist.GradBucket,
    keys: list[str],
    after: Callable[[], None] | None = None,
) -> torch.futures.Future[torch.Tensor]:
    """Send one bucket through `state`'s quantizer: one all-reduce (linear) or all-gather, issued
    here; the callback decodes the average into the bucket, keeps residuals, then calls `after`.
    `host` is the hook state that owns the step: its stats and bucket bookkeeping are used."""
    buf, n, index, q = bucket.buffer(), state.world_size, bucket.index(), state.quantizer
    grads = bucket.gradients()
    with timer(buf) as enc:
        encoded = [state.encode(key, g) for key, g in zip(keys, grads)]
        payloads = [payload for payload, _ in encoded]
        flat = state.pack(payloads, host.finite_flags(grads, buf))
    host.stats.encoded(enc.seconds)
    host.stats.sent(flat.numel() * flat.element_size(), buf.numel() * buf.element_size())
    group = state.process_group
    if q.linear:
        fut = dist.all_reduce(flat, group=group, async_op=True).get_future()
    else:
        gathered = [torch.empty_like(flat) for _ in range(n)]
        fut = dist.all_gather(gathered, flat, group=group, async_op=True).get_future()

    def decode(fut: torch.futures.Future[Any]) -> torch.Tensor:
        try:
            with timer(buf) as dec:
                received = fut.value()[0] if q.linear else gathered
                host.raise_if_nonfinite(state.received_flags(received), index)
                for g, d in zip(grads, state.decode_received(received, payloads)):
                    g.copy_(d.view_as(g))
            host.stats.decoded(dec.seconds)
            if state.memory is not None:
                for key, (_, residual) in zip(keys, encoded):
                    if residual is not None:
                        state.memory.set(key, residual)
            if after is not None:
                after()
            return buf
        finally:
            host.end_bucket()

    return fut.then(decode)


def flatten_summable(payloads: list[Payload], flags: torch.Tensor) -> torch.Tensor:
    """Linear payloads' tensors and `flags`, flat in the payloads' one dtype (to be summed)."""
    dtypes = {t.dtype for p in payloads for t in p.tensors}
    if len(dtypes) > 1:
        raise TypeError(f"a linear quantizer's payload tensors must share one dtype, got {sorted(map(str, dtypes))}")
    wire = dtypes.pop() if dtypes else flags.dtype
    return torch.cat([*(t.reshape(-1) for p in payloads for t in p.tensors), flags.to(wire)])


def unflatten_summable(flat: torch.Tensor, templates: list[Payload]) -> list[Payload]:
    """Inverse of `flatten_summable` (without the flags): payloads laid out like `templates`."""
    out, offset = [], 0
    for tpl in templates:
        tensors = []
        for t in tpl.tensors:
            tensors.append(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        out.append(Payload(tensors, tpl.shape, tpl.dtype, dict(tpl.meta)))
    return out
