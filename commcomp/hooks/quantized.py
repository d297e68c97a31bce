"""A DDP hook that sends every gradient through a quantizer from `commcomp.quantizers`.

Three ways through the network, chosen by the quantizer:

- linear (identity, fp16, bf16, random-k with a shared seed): each rank compresses g_n/N and one
  all-reduce sums the payloads, which decode to the average;
- shared grid (qsgd_ar, sign_ar): each rank compresses g_n/N on a grid that every rank agreed on
  first (a small all-reduce of per-chunk statistics, issued from the hook body like every
  collective), so one all-reduce sums the integer codes, which decode once;
- others (qsgd, topk, sign): each rank compresses g_n, the packed payload bytes of the bucket are
  all-gathered, and every rank decodes all N payloads in one vectorised pass per gradient
  (`Quantizer.decode_sum`, accumulated in float32) and averages them, so every rank applies
  bitwise the same update.

With `error_feedback=True` each rank compresses gradient + residual and keeps what was not sent.
Collectives are issued from the hook body by `commcomp.exchange`; callbacks only decode.
"""

from typing import Any

import torch
import torch.distributed as dist

from commcomp import quantizers
from commcomp.error_feedback import ErrorFeedback
from commcomp.exchange import DenseExchange, Encoded
from commcomp.flat import flatten, unflatten
from commcomp.hooks.base import HookState, exchange_hook
from commcomp.quantizers import (
    Payload,
    Quantizer,
    SharedScaleQuantizer,
    StochasticQuantizer,
    pack_payloads,
    relayout,
    unpack_batch,
)
from commcomp.quantizers.basic import Cast, Identity
from commcomp.stats import timer

__all__ = ["QuantizedExchange", "QuantizerState", "flatten_summable", "quantizer_hook", "unflatten_summable"]


class QuantizerState(HookState):
    """State of `quantizer_hook`.

    Args:
        process_group: the group (None: the whole world).
        quantizer: a registered name (see `commcomp.quantizers.names()`) or a Quantizer instance.
        error_feedback: keep per-parameter residuals (recommended for biased quantizers: topk, sign);
            refused for quantizers whose error compounds (`quantizers.check_error_feedback`).
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
        if error_feedback:
            quantizers.check_error_feedback(self.quantizer, f"{type(self).__name__} with error_feedback=True")
        self.memory = ErrorFeedback() if error_feedback else None
        self._ranked = False  # the quantizer knows this rank (set before its first compress)
        # buffers reused from step to step with error feedback (a fresh gradient-sized tensor costs
        # page faults): the compensated input, and the spare residual that the next one is written to
        self._inputs: dict[str, torch.Tensor] = {}
        self._spares: dict[str, torch.Tensor] = {}
        self._gathered: dict[str, torch.Tensor] = {}  # all-gathered bytes per group
        self._dense: DenseExchange | None = None  # the plain average's codec, made at the first bucket

    @property
    def residuals_summed(self) -> bool:
        """Error-feedback residuals are shares of a summed payload (g/N: linear quantizers), not
        parts of a gradient that is averaged after decoding (see `commcomp.elastic`)."""
        return self.quantizer.linear

    def exchange_codec(
        self, params: list[tuple[str, torch.Size]], like: torch.Tensor
    ) -> "QuantizedExchange | DenseExchange":
        """The plain average (`DenseExchange`) for identity, fp16 and bf16 without error feedback;
        else the quantizer's own exchange."""
        q = self.quantizer
        if self.memory is not None or not isinstance(q, (Identity, Cast)):
            return QuantizedExchange(self)
        if self._dense is None:  # made once: it holds nothing of a step
            self._dense = DenseExchange(self.world_size, q.wire_dtype if isinstance(q, Cast) else None)
        return self._dense

    def volatile(self) -> list[Any]:
        """The quantizer, if it draws random numbers (the generic search, without the search)."""
        return [self.quantizer] if isinstance(self.quantizer, StochasticQuantizer) else []

    def prepare(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        """What this rank compresses for one gradient: g/N (summed quantizers) or g, plus the
        residual with error feedback. The gradient itself is not copied when nothing is added."""
        q = self.quantizer
        if not self._ranked:
            set_rank = getattr(q, "set_rank", None)
            if set_rank is not None:  # per-rank random streams: quantizers never ask torch.distributed
                set_rank(self.rank)
            self._ranked = True
        h = grad / self.world_size if q.linear else grad
        if self.memory is not None:
            h = self.memory.compensate(key, h, out=_reusable(self._inputs, key, h.shape, h))
        if isinstance(q, StochasticQuantizer):
            q.set_stream(key)  # random numbers per parameter: independent of DDP's bucket layout
        return h

    def encode(self, key: str, grad: torch.Tensor) -> tuple[Payload, torch.Tensor | None]:
        """This rank's payload for one gradient and the residual to keep once the step decodes
        cleanly (quantizers without agreement; see `QuantizedExchange.encode` for the others)."""
        h = self.prepare(key, grad)
        return self._with_residual(key, h, self.quantizer.compress(h))

    def _with_residual(self, key: str, h: torch.Tensor, payload: Payload) -> tuple[Payload, torch.Tensor | None]:
        if self.memory is None:
            return payload, None
        # h - decompress(payload), cheap for sparsifiers and sign, into the spare (the kept residual
        # stays as it is until the step decodes cleanly on every rank)
        return payload, self.quantizer.error(h, payload, out=_reusable(self._spares, key, h.shape, h))

    def gathered_buffer(self, key: str, ranks: int, row: torch.Tensor) -> torch.Tensor:
        """A [ranks, len(row)] buffer for the all-gathered bytes of the group named `key`, kept
        from step to step (one per group, so groups decoding at the same time never share one)."""
        return _reusable(self._gathered, key, (ranks, row.numel()), row)

    def keep_residual(self, key: str, residual: torch.Tensor) -> None:
        """Commit `residual` for `key`; the one it replaces becomes the spare for the next step."""
        if self.memory is not None:
            old = self.memory.residuals.get(key)
            self.memory.set(key, residual)
            if self._spares.get(key) is residual:  # never write the next residual over this one
                del self._spares[key]
            if old is not None and old is not residual:
                self._spares[key] = old

    def agree(self, stats: torch.Tensor, op: str) -> torch.Tensor:
        """Combine every rank's per-chunk statistics (`op`: "max" or "sum") with one blocking
        all-reduce, issued from the hook body; its bytes are counted as sent, and the time it blocks
        as waiting, not encoding (it queues behind the previous buckets' collectives)."""
        self.stats.sent(stats.numel() * stats.element_size(), kind="allreduce", world_size=self.world_size)
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        with timer(stats) as wait:
            dist.all_reduce(stats, op=reduce_op, group=self.process_group)
        self.stats.waited(wait.seconds)
        return stats

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "quantizer": self.quantizer.name,
            "quantizer_options": self.quantizer.options(),
            "error_feedback": self.memory is not None,
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_dense": None}  # made again for the group it is unpickled into

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "quantizer": self.quantizer.state_dict(),
            "residuals": None if self.memory is None else self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.quantizer.load_state_dict(state["quantizer"])
        self._ranked = True  # the saved generators already follow this rank
        if self.memory is not None and state.get("residuals") is not None:
            self.memory.load_state_dict(state["residuals"])


class QuantizedExchange:
    """`ExchangeCodec` of a `QuantizerState`: payloads summed (linear, shared grid) or packed bytes
    all-gathered. The encoding's context is this rank's payloads (the layout of every rank's) and
    the residuals."""

    def __init__(self, state: QuantizerState) -> None:
        self.state = state

    @property
    def summed(self) -> bool:
        return self.state.quantizer.linear

    def encode(self, keys: list[str], grads: list[torch.Tensor]) -> Encoded:
        state, q = self.state, self.state.quantizer
        if isinstance(q, SharedScaleQuantizer):
            encoded = self._encode_shared(q, keys, grads)
        else:
            encoded = [state.encode(key, g) for key, g in zip(keys, grads)]
        payloads = [payload for payload, _ in encoded]
        if self.summed:
            parts = [t for p in payloads for t in p.tensors]  # `flatten` lays them end to end
        else:
            parts = [pack_payloads(payloads).to(grads[0].device)]
        return Encoded(keys, grads, parts, encoded)

    def _encode_shared(
        self, q: SharedScaleQuantizer, keys: list[str], grads: list[torch.Tensor]
    ) -> list[tuple[Payload, torch.Tensor | None]]:
        """Agree on the grid of every gradient of the group at once (one small all-reduce), then
        compress each on it."""
        state = self.state
        inputs = [state.prepare(key, g) for key, g in zip(keys, grads)]
        local = [q.local_stats(h) for h in inputs]
        agreed = state.agree(flatten(local, torch.float32), q.agree_op) if local else torch.empty(0)
        pieces = unflatten(agreed, [s.shape for s in local])
        out = []
        for key, h, piece in zip(keys, inputs, pieces):
            q.set_stream(key)
            out.append(state._with_residual(key, h, q.compress_shared(h, piece, state.world_size)))
        return out

    def decode(self, received: list[torch.Tensor], encoded: Encoded) -> list[torch.Tensor]:
        """Decode the summed payloads once, or every rank's payloads in one pass and average them."""
        q, n = self.state.quantizer, self.state.world_size
        templates = [payload for payload, _ in encoded.context]
        if self.summed:
            payloads = relayout(received, templates)
            if not isinstance(q, SharedScaleQuantizer):
                return [q.decompress(p) for p in payloads]
            return [q.decode_sum(p.batched(), _float32_view(g)) for g, p in zip(encoded.grads, payloads)]
        # every rank's bytes as one [N, bytes] tensor, in a buffer reused per group (named by its first key)
        rows = self.state.gathered_buffer(encoded.keys[0], len(received), received[0])
        batches = unpack_batch(torch.stack(received, out=rows), templates)
        return [q.decode_sum(b, _float32_view(g)).div_(n) for g, b in zip(encoded.grads, batches)]

    def commit(self, encoded: Encoded) -> None:
        for key, (_, residual) in zip(encoded.keys, encoded.context):
            if residual is not None:
                self.state.keep_residual(key, residual)


def _reusable(
    buffers: dict[str, torch.Tensor], key: str, shape: tuple[int, ...] | torch.Size, like: torch.Tensor
) -> torch.Tensor:
    """The contiguous buffer kept under `key` if it has `shape` and `like`'s dtype and device, else a
    new one, kept in its place."""
    buf = buffers.get(key)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def _float32_view(grad: torch.Tensor) -> torch.Tensor:
    """Where to decode a gradient: the gradient itself when it is contiguous float32 (then the
    engine's copy into it is a no-op), else a float32 buffer."""
    if grad.dtype == torch.float32 and grad.is_contiguous():
        return grad.view(-1)
    return torch.empty(grad.numel(), device=grad.device)


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
    return relayout(unflatten(flat, [t.shape for p in templates for t in p.tensors]), templates)
