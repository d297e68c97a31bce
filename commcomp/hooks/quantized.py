"""A DDP hook that sends every gradient through a quantizer from `commcomp.quantizers`.

Linear quantizers (identity, fp16, bf16, random-k with a shared seed): each rank compresses g_n/N and
one all-reduce sums the payloads, which decode to the average. Other quantizers (qsgd, topk, sign):
each rank compresses g_n, the packed payload bytes of the whole bucket are all-gathered, and every
rank decodes all N payloads and averages them, so every rank applies the same update.
With `error_feedback=True` each rank compresses gradient + residual and keeps what was not sent.
One collective per bucket, issued from the hook body by `commcomp.exchange`; callbacks only decode.
"""

from typing import Any

import torch
import torch.distributed as dist

from commcomp import quantizers
from commcomp.error_feedback import ErrorFeedback
from commcomp.exchange import Encoded
from commcomp.flat import flatten, unflatten
from commcomp.hooks.base import HookState, exchange_hook
from commcomp.quantizers import Payload, Quantizer, StochasticQuantizer, pack_payloads, unpack_payloads

__all__ = ["QuantizedExchange", "QuantizerState", "flatten_summable", "quantizer_hook", "unflatten_summable"]


class QuantizerState(HookState):
    """State of `quantizer_hook`.

    Args:
        process_group: the group (None: the whole world).
        quantizer: a registered name (see `commcomp.quantizers.names()`) or a Quantizer instance.
        error_feedback: keep per-parameter residuals (recommended for biased quantizers: topk, sign).
        check_finite: look for NaN/Inf in the gradients (a flag per rank rides along).
        nonfinite: "propagate" (default: a NaN/Inf on any rank makes every rank's gradients NaN, so a
            GradScaler skips the step everywhere, and the step leaves this state untouched) or "raise"
            (`NonFiniteGradientError` on every rank); see `commcomp.overflow`.
        **quantizer_options: passed to the quantizer (e.g. bits=4 for qsgd).
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        quantizer: str | Quantizer = "identity",
        error_feedback: bool = False,
        check_finite: bool = True,
        nonfinite: str = "propagate",
        **quantizer_options: Any,
    ) -> None:
        super().__init__(process_group, check_finite, nonfinite)
        self.quantizer = quantizers.get(quantizer, **quantizer_options)
        self.memory = ErrorFeedback() if error_feedback else None

    @property
    def residuals_summed(self) -> bool:
        """Error-feedback residuals are shares of a summed payload (g/N: linear quantizers), not
        parts of a gradient that is averaged after decoding (see `commcomp.elastic`)."""
        return self.quantizer.linear

    def exchange_codec(self, params: list[tuple[str, torch.Size]], like: torch.Tensor) -> "QuantizedExchange":
        return QuantizedExchange(self)

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


class QuantizedExchange:
    """`ExchangeCodec` of a `QuantizerState`: payloads summed (linear) or packed bytes all-gathered.

    The encoding's context is this rank's payloads (the layout of every rank's) and the residuals.
    """

    def __init__(self, state: QuantizerState) -> None:
        self.state = state

    @property
    def summed(self) -> bool:
        return self.state.quantizer.linear

    def encode(self, keys: list[str], grads: list[torch.Tensor]) -> Encoded:
        encoded = [self.state.encode(key, g) for key, g in zip(keys, grads)]
        payloads = [payload for payload, _ in encoded]
        if self.summed:
            parts = [t.reshape(-1) for p in payloads for t in p.tensors]
        else:
            parts = [pack_payloads(payloads).to(grads[0].device)]
        return Encoded(keys, grads, parts, encoded)

    def decode(self, received: list[torch.Tensor], encoded: Encoded) -> list[torch.Tensor]:
        """Decode the summed payloads, or decode every rank's and average them."""
        q, n = self.state.quantizer, self.state.world_size
        templates = [payload for payload, _ in encoded.context]
        if self.summed:
            return [q.decompress(p) for p in _relayout(received, templates)]
        per_rank = [unpack_payloads(t, templates) for t in received]
        return [torch.stack([q.decompress(ps[i]) for ps in per_rank]).sum(0).div_(n) for i in range(len(templates))]

    def commit(self, encoded: Encoded) -> None:
        memory = self.state.memory
        if memory is not None:
            for key, (_, residual) in zip(encoded.keys, encoded.context):
                if residual is not None:
                    memory.set(key, residual)


def _relayout(tensors: list[torch.Tensor], templates: list[Payload]) -> list[Payload]:
    """Payloads laid out like `templates`, holding `tensors` (one per template tensor, in order)."""
    out, pieces = [], iter(tensors)
    for tpl in templates:
        out.append(Payload([next(pieces).view(t.shape) for t in tpl.tensors], tpl.shape, tpl.dtype, dict(tpl.meta)))
    return out


def quantizer_hook(state: QuantizerState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook; use with `model.register_comm_hook(state, quantizer_hook)`."""
    return exchange_hook(state, bucket)


def flatten_summable(payloads: list[Payload], flags: torch.Tensor) -> torch.Tensor:
    """Linear payloads' tensors and `flags`, flat in the payloads' one dtype (to be summed)."""
    dtypes = {t.dtype for p in payloads for t in p.tensors}
    if len(dtypes) > 1:
        raise TypeError(f"a linear quantizer's payload tensors must share one dtype, got {sorted(map(str, dtypes))}")
    wire = dtypes.pop() if dtypes else flags.dtype
    return flatten([*(t for p in payloads for t in p.tensors), flags], wire)


def unflatten_summable(flat: torch.Tensor, templates: list[Payload]) -> list[Payload]:
    """Inverse of `flatten_summable` (without the flags): payloads laid out like `templates`."""
    return _relayout(unflatten(flat, [t.shape for p in templates for t in p.tensors]), templates)
