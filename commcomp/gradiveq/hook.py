"""The GradiVeQ DDP communication hook and its state.

Two ways to get the basis each layer's slices are projected onto (`basis=`):

- "tracked" (default): the bases follow the gradients. Every step after `warmup_steps` is
  compressed with one summed exchange per bucket (`exchanges=1`, the default): each layer's slice
  matrix X_n seen from both sides, X_n U and X_n^T P, decoded as X minus what lies outside both
  bases, whose sums give the next bases (`commcomp.gradiveq.tracked`, `commcomp.gradiveq.single`).
  `exchanges=2` is PowerSGD's power step instead: the coefficients X_n U, then the basis update
  X_n^T P with P the orthonormalised summed coefficients (`commcomp.gradiveq.pipeline`), one more
  round trip per step. Error feedback is on: what a step drops is added to the next step's gradient,
  and since the bases turn towards what the gradients (residual included) hold, the residual is
  delivered within a few steps.
- "fitted": the paper's schedule. Warm-up and sampling steps are all-reduced as they are and feed
  PCA statistics; rank `src_rank` fits each layer's basis, broadcasts it, and it stays fixed for
  `compress_steps` steps (`commcomp.gradiveq.fitted`). `GradiVeQState.paper()` is the paper's own
  setting.

All collectives are issued from hook bodies, in bucket order; callbacks only decode.
Paper: https://arxiv.org/abs/1811.03617
"""

from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from commcomp.error_feedback import ErrorFeedback
from commcomp.exchange import ExchangeCodec, TorchWire
from commcomp.gradiveq.codec import LayerCodec, plan_slices
from commcomp.gradiveq.fitted import FittedExchange, FittedOptions, refit
from commcomp.gradiveq.pipeline import BasisUpdates, TrackedCoefficients
from commcomp.gradiveq.schedule import Schedule
from commcomp.gradiveq.single import SingleExchange
from commcomp.gradiveq.tracked import TrackedLayer, matrix_plan
from commcomp.hooks.base import HookState, exchange_hook, register_simple_method
from commcomp.hooks.quantized import QuantizerState
from commcomp.quantizers import Quantizer

__all__ = ["GradiVeQState", "gradiveq_hook"]

WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class GradiVeQState(HookState):
    """State of the GradiVeQ hook.

    Args:
        process_group: the group to reduce over (None: the whole world).
        basis: "tracked" (default: the basis turns with the gradients every step) or "fitted" (the
            paper's PCA fits on sampled steps, fixed in between).
        rank: tracked basis only: components d per layer (default 16: in bfloat16, the bytes of
            PowerSGD's rank 8 in float32). Each compressed layer sends (S + K) * d values per step
            instead of S * K; a smaller layer gets fewer components, so that it is still sent at least
            2x smaller, and one that would get fewer than rank/2 goes uncompressed.
        exchanges: tracked basis only: 1 (default: one all-reduce per bucket and step) or 2 (the
            power step: a P fitted to this step's gradients, at the cost of a second all-reduce that
            waits for the first; see `commcomp.gradiveq.tracked`).
        wire_dtype: tracked basis only: "bf16" (default; float32's range, half its bytes), "fp32" or
            "fp16" (may overflow on large gradients). The maths runs in float32 either way.
        warmup_steps: steps all-reduced uncompressed first (tracked: 0, fitted: 50).
        min_numel: parameters with fewer values (biases, norms, tiny layers) go uncompressed.
        error_feedback: add what a compressed step dropped to the next step's gradient (tracked:
            on by default; fitted: refused, because a fixed basis can never send what it drops).
        energy_threshold, sample_steps, compress_steps, slice_length, max_slice_length,
        max_components, fit_slices, sample_quantizer, sample_quantizer_options, src_rank: the
            fitted basis's options (see `commcomp.gradiveq.fitted`); giving one with the tracked
            basis raises.
        check_finite: look for NaN/Inf in the gradients (a flag per rank rides along).
        nonfinite: "propagate" (default: a NaN/Inf on any rank makes every rank's gradients NaN, so a
            GradScaler skips the step everywhere, and the step leaves this state untouched) or "raise"
            (`NonFiniteGradientError` on every rank); see `commcomp.overflow`.

    Tuning (tracked): raise `rank` (32) when accuracy lags fp32; lower it (8, 4) when bytes matter
    most; a few warm-up steps help when the first steps' gradients are very large.
    """

    default_wire_dtype = "bf16"  # where the collective library sums bfloat16 (gloo, NCCL)

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        basis: str = "tracked",
        rank: int | None = None,
        exchanges: int | None = None,
        wire_dtype: str | None = None,
        warmup_steps: int | None = None,
        min_numel: int = 1024,
        error_feedback: bool | None = None,
        energy_threshold: float | None = None,
        sample_steps: int | None = None,
        compress_steps: int | None = None,
        slice_length: int | None = None,
        max_slice_length: int | None = None,
        max_components: int | None = None,
        fit_slices: int | None = None,
        sample_quantizer: str | Quantizer | None = None,
        sample_quantizer_options: dict[str, Any] | None = None,
        src_rank: int | None = None,
        check_finite: bool = True,
        nonfinite: str = "propagate",
    ) -> None:
        super().__init__(process_group, check_finite, nonfinite)
        fitted: dict[str, Any] = dict(
            energy_threshold=energy_threshold,
            sample_steps=sample_steps,
            compress_steps=compress_steps,
            slice_length=slice_length,
            max_slice_length=max_slice_length,
            max_components=max_components,
            fit_slices=fit_slices,
            sample_quantizer=sample_quantizer,
            sample_quantizer_options=sample_quantizer_options,
            src_rank=src_rank,
        )
        given = {name: value for name, value in fitted.items() if value is not None}
        if min_numel < 1:
            raise ValueError(f"min_numel must be >= 1, got {min_numel}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if basis == "tracked":
            if given:
                raise ValueError(f"GradiVeQ option(s) {sorted(given)} apply to basis='fitted' only, not 'tracked'")
            if rank is not None and rank < 1:
                raise ValueError(f"rank must be >= 1, got {rank}")
            if exchanges not in (None, 1, 2):
                raise ValueError(f"exchanges must be 1 or 2, got {exchanges!r}")
            if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
                raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        elif basis == "fitted":
            if rank is not None or exchanges is not None or wire_dtype is not None:
                raise ValueError("GradiVeQ options rank, exchanges and wire_dtype apply to basis='tracked' only")
            if error_feedback:
                raise ValueError(
                    "GradiVeQ error_feedback needs basis='tracked': a fitted basis stays fixed between refits, so "
                    "what it drops lies outside it and could only be sent all at once, as one huge step"
                )
        else:
            raise ValueError(f"basis must be 'tracked' or 'fitted', got {basis!r}")
        tracked = basis == "tracked"
        # --- hyperparameters ---
        self.basis = basis
        self.rank_per_layer = rank or 16
        self.exchanges = exchanges or 1
        self.wire_dtype = WIRE_DTYPES[wire_dtype or self.default_wire_dtype]
        self.warmup_steps = warmup_steps if warmup_steps is not None else (0 if tracked else 50)
        self.min_numel = min_numel
        self.fitted = None if tracked else FittedOptions(**given)
        # --- internal state ---
        self.memory = ErrorFeedback() if tracked and error_feedback is not False else None
        self.layers: dict[str, TrackedLayer | None] = {}  # tracked bases (None: sent uncompressed)
        self.codecs: dict[str, LayerCodec | None] = {}  # fitted PCA state (None: sent uncompressed)
        self._loaded: dict[str, Any] = {}  # per-layer state loaded before the layer was seen
        self.updates = BasisUpdates()  # DDP: the bucket waiting for its basis update
        self.schedule: Schedule | None = None
        self.sampling: QuantizerState | None = None  # the quantizer fitted sampling steps go through
        if self.fitted is not None:
            self.schedule = Schedule(self.warmup_steps, self.fitted.sample_steps, self.fitted.compress_steps)
            if self.fitted.sample_quantizer is not None:
                self.sampling = QuantizerState(
                    process_group,
                    quantizer=self.fitted.sample_quantizer,
                    check_finite=check_finite,
                    nonfinite=nonfinite,
                    **(self.fitted.sample_quantizer_options or {}),
                )

    @classmethod
    def paper(cls, process_group: dist.ProcessGroup | None = None, **overrides: Any) -> "GradiVeQState":
        """The paper's setting: fitted basis, 2,500 warm-up steps, cycles of 100 sampled + 400 compressed,
        lambda 0.01."""
        settings: dict[str, Any] = dict(
            basis="fitted", energy_threshold=0.01, warmup_steps=2500, sample_steps=100, compress_steps=400
        )
        return cls(process_group, **{**settings, **overrides})

    def options(self) -> dict[str, Any]:
        fitted = None if self.fitted is None else asdict(self.fitted)
        if fitted is not None and self.sampling is not None:
            fitted["sample_quantizer"] = self.sampling.options()
        return {
            **super().options(),
            "basis": self.basis,
            "rank": self.rank_per_layer,
            "exchanges": self.exchanges,
            "wire_dtype": str(self.wire_dtype),
            "warmup_steps": self.warmup_steps,
            "min_numel": self.min_numel,
            "error_feedback": self.memory is not None,
            "fitted": fitted,
        }

    # ----- per-layer state, created when a parameter is first seen -----
    def tracked_layer(self, key: str, shape: torch.Size) -> TrackedLayer | None:
        if key not in self.layers:
            plan = matrix_plan(shape, self.min_numel)
            layer = None if plan is None else TrackedLayer(plan, self.rank_per_layer, key)
            if layer is not None and not layer.worth_compressing():
                layer = None
            if layer is not None and key in self._loaded:
                layer.load_state_dict(self._loaded.pop(key))
            self.layers[key] = layer
        return self.layers[key]

    def codec(self, key: str, shape: torch.Size) -> LayerCodec | None:
        if key not in self.codecs:
            f = self.fitted
            assert f is not None, "fitted-basis state used with basis='tracked'"
            plan = plan_slices(shape, f.slice_length, f.max_slice_length, self.min_numel)
            codec = None if plan is None else LayerCodec(plan, f.fit_slices)
            if codec is not None and key in self._loaded:
                codec.load_state_dict(self._loaded.pop(key))
            self.codecs[key] = codec
        return self.codecs[key]

    def compressing(self) -> bool:
        """Whether this step is a tracked compressed step (else: the one-exchange path)."""
        return self.basis == "tracked" and self.step >= self.warmup_steps

    # ----- the engine's codec: the fitted basis, warm-up steps, and the tracked basis on Horovod -----
    def exchange_codec(self, params: list[tuple[str, torch.Size]], like: torch.Tensor) -> ExchangeCodec:
        """This step's codec for `params`; on the first compressed step of a fitted cycle, refit the
        bases first (blocking collectives, issued here in the hook body)."""
        if self.schedule is None:  # tracked basis: a warm-up step, one exchange, or the first of two (Horovod)
            if not self.compressing():
                return FittedExchange(self, "warmup")
            return SingleExchange(self) if self.exchanges == 1 else TrackedCoefficients(self)
        codecs = [self.codec(key, shape) for key, shape in params]
        phase = self.schedule.phase(self.step)
        if phase == "compress" and self.schedule.refit(self.step):
            refit(self, [c for c in codecs if c is not None], like)
        if phase == "sample" and self.sampling is not None:  # the paper's quantized sampling steps
            return FittedExchange(self, phase, self.sampling.exchange_codec(params, like))
        return FittedExchange(self, phase)

    # ----- checkpointing -----
    def state_dict(self) -> dict[str, Any]:
        layers = {k: t.state_dict() for k, t in self.layers.items() if t is not None and t.basis is not None}
        codecs = {k: c.state_dict() for k, c in self.codecs.items() if c is not None}
        return {
            **super().state_dict(),
            "layers": {**self._loaded, **layers, **codecs},
            "residuals": None if self.memory is None else self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.layers, self.codecs = {}, {}
        self._loaded = dict(state["layers"])  # applied when each parameter is next seen
        if self.memory is not None and state.get("residuals") is not None:
            self.memory.load_state_dict(state["residuals"])


def gradiveq_hook(state: GradiVeQState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running GradiVeQ; use with `model.register_comm_hook(state, gradiveq_hook)`."""
    if not state.compressing() or state.exchanges == 1:
        return exchange_hook(state, bucket)
    state.begin_bucket(bucket)
    wire = TorchWire(state.process_group)
    keys = [state.param_key(p) for p in bucket.parameters()]
    result = state.updates.send(state, wire, keys, bucket.gradients(), bucket.buffer(), bucket.index())
    if bucket.is_last():
        state.updates.flush(state, wire)
    return result


register_simple_method("gradiveq", GradiVeQState, gradiveq_hook)
