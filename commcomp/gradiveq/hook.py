"""The GradiVeQ DDP communication hook.

Per bucket and step, by the schedule (`commcomp.gradiveq.Schedule`):
  1. warm-up / sampling steps: all-reduce the gradients as they are (divided by N first); on
     sampling steps every rank adds the averaged gradients' slices to its PCA statistics;
  2. first compressed step of a cycle: rank `src_rank` fits each layer's basis in float64 and
     broadcasts (d, U, mu); every rank then all-gathers a checksum and refuses to go on if any
     rank's copy differs;
  3. compressed steps: every rank sends U^T (g_n/N - mu/N) per slice; one all-reduce sums the
     coefficients (with the uncompressed leftovers and small layers riding in the same buffer);
     every rank decodes U c + mu.
All collectives are issued from the hook body, in bucket order (the refit by `exchange_codec`, the
all-reduce by `commcomp.exchange`); callbacks only decode. `GradiVeQExchange` is the per-step codec
the exchange engine runs, for DDP buckets and Horovod tensors alike.
Paper: https://arxiv.org/abs/1811.03617
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from commcomp.error_feedback import ErrorFeedback
from commcomp.exchange import Encoded, ExchangeCodec
from commcomp.gradiveq.codec import LayerCodec, plan_slices
from commcomp.gradiveq.refit import refit_bases
from commcomp.gradiveq.schedule import Schedule
from commcomp.hooks.base import HookState, exchange_hook, register_simple_method
from commcomp.hooks.quantized import QuantizedExchange, QuantizerState
from commcomp.quantizers import Quantizer
from commcomp.stats import timer

__all__ = ["GradiVeQExchange", "GradiVeQState", "Share", "gradiveq_hook"]


@dataclass
class Share:
    """One gradient's part of a summed buffer: the tensors to sum ([coefficients, leftover values]
    when compressed, [values] when dense), how to decode their sum (codec None: sent as it is), and
    the error-feedback residual to keep once the step decodes cleanly."""

    parts: list[torch.Tensor]
    codec: LayerCodec | None
    num_coeffs: int  # how many coefficient values (0 when dense)
    num_plain: int  # how many values are sent as they are
    residual: torch.Tensor | None

    @property
    def numel(self) -> int:
        return self.num_coeffs + self.num_plain


class GradiVeQState(HookState):
    """State of the GradiVeQ hook.

    Args:
        process_group: the group to reduce over (None: the whole world).
        energy_threshold: lambda; each layer keeps the fewest principal components holding at least
            1 - lambda of its sampled gradients' variance (0 keeps all K: lossless but no savings).
        warmup_steps, sample_steps, compress_steps: the schedule. Defaults suit short runs
            (hundreds to thousands of steps); the paper used 2500 / 100 / 400 with lambda 0.01
            (`GradiVeQState.paper()`).
        slice_length: target K; the real K is a multiple of the layer's F*D (conv) or row length
            (Linear) near it. max_slice_length caps K (the PCA is K x K).
        min_numel: parameters with fewer values (biases, norms, tiny layers) go uncompressed.
        max_components: cap on d per layer (None: only the energy threshold decides).
        fit_slices: at most this many slices per sampled gradient enter the PCA statistics.
        error_feedback: add what a compressed step dropped to the next step's gradient (off, as in
            the paper). What a fixed basis drops lies outside it and is never sent by a compressed
            step, so the next uncompressed step carries the whole residual and clears it.
        sample_quantizer, sample_quantizer_options: send the sampling steps through this quantizer
            (the paper sends them as 4-bit QSGD: `sample_quantizer="qsgd",
            sample_quantizer_options={"bits": 4}`); the PCA then fits on the decoded averages.
            None (default): sampling steps are all-reduced uncompressed.
        src_rank: the rank (in the group) whose fit is broadcast.
        check_finite: look for NaN/Inf in the gradients (a flag per rank rides along).
        nonfinite: "propagate" (default: a NaN/Inf on any rank makes every rank's gradients NaN, so a
            GradScaler skips the step everywhere, and the step leaves this state untouched) or "raise"
            (`NonFiniteGradientError` on every rank); see `commcomp.overflow`.

    Tuning: lower energy_threshold (0.001) or raise max_components when accuracy lags; raise
    sample_steps when the loss is still changing fast; a shorter compress_steps refits more often.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        energy_threshold: float = 0.01,
        warmup_steps: int = 50,
        sample_steps: int = 20,
        compress_steps: int = 100,
        slice_length: int = 256,
        max_slice_length: int = 256,
        min_numel: int = 1024,
        max_components: int | None = None,
        fit_slices: int = 64,
        error_feedback: bool = False,
        sample_quantizer: str | Quantizer | None = None,
        sample_quantizer_options: dict[str, Any] | None = None,
        src_rank: int = 0,
        check_finite: bool = True,
        nonfinite: str = "propagate",
    ) -> None:
        super().__init__(process_group, check_finite, nonfinite)
        if not 0.0 <= energy_threshold < 1.0:
            raise ValueError(f"energy_threshold must be in [0, 1), got {energy_threshold}")
        if slice_length < 1 or max_slice_length < slice_length:
            raise ValueError(f"need 1 <= slice_length <= max_slice_length, got {slice_length} and {max_slice_length}")
        if max_components is not None and max_components < 1:
            raise ValueError(f"max_components must be >= 1 or None, got {max_components}")
        if fit_slices < 1 or min_numel < 1:
            raise ValueError(f"fit_slices and min_numel must be >= 1, got {fit_slices} and {min_numel}")
        # --- hyperparameters ---
        self.energy_threshold = energy_threshold
        self.schedule = Schedule(warmup_steps, sample_steps, compress_steps)
        self.slice_length = slice_length
        self.max_slice_length = max_slice_length
        self.min_numel = min_numel
        self.max_components = max_components
        self.fit_slices = fit_slices
        self.src_rank = src_rank
        # --- internal state ---
        self.codecs: dict[str, LayerCodec | None] = {}  # None: sent uncompressed
        self.memory = ErrorFeedback() if error_feedback else None
        self._loaded_codecs: dict[str, Any] = {}
        # the quantizer sampling steps are sent through (None: sent uncompressed)
        self.sampling: QuantizerState | None = (
            None
            if sample_quantizer is None
            else QuantizerState(
                process_group,
                quantizer=sample_quantizer,
                check_finite=check_finite,
                nonfinite=nonfinite,
                **(sample_quantizer_options or {}),
            )
        )

    @classmethod
    def paper(cls, process_group: dist.ProcessGroup | None = None, **overrides: Any) -> "GradiVeQState":
        """The paper's schedule: 2,500 warm-up steps, cycles of 100 sampled + 400 compressed, lambda 0.01."""
        settings: dict[str, Any] = dict(energy_threshold=0.01, warmup_steps=2500, sample_steps=100, compress_steps=400)
        return cls(process_group, **{**settings, **overrides})

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "energy_threshold": self.energy_threshold,
            "schedule": [self.schedule.warmup, self.schedule.sample, self.schedule.compress],
            "slices": [self.slice_length, self.max_slice_length, self.min_numel, self.fit_slices],
            "max_components": self.max_components,
            "error_feedback": self.memory is not None,
            "src_rank": self.src_rank,
            "sample_quantizer": None if self.sampling is None else self.sampling.options(),
        }

    def codec(self, key: str, shape: torch.Size) -> LayerCodec | None:
        if key not in self.codecs:
            plan = plan_slices(shape, self.slice_length, self.max_slice_length, self.min_numel)
            codec = None if plan is None else LayerCodec(plan, self.fit_slices)
            if codec is not None and key in self._loaded_codecs:
                codec.load_state_dict(self._loaded_codecs.pop(key))
            self.codecs[key] = codec
        return self.codecs[key]

    # ----- the exchange (DDP buckets and Horovod steps alike) -----
    def exchange_codec(self, params: list[tuple[str, torch.Size]], like: torch.Tensor) -> ExchangeCodec:
        """This step's codec for `params`; on the first compressed step of a cycle, refit their bases
        first (blocking collectives, issued here in the hook body)."""
        codecs = [self.codec(key, shape) for key, shape in params]
        phase = self.schedule.phase(self.step)
        if phase == "compress" and self.schedule.refit(self.step):
            self.refit([c for c in codecs if c is not None], like)
        if phase == "sample" and self.sampling is not None:  # the paper's quantized sampling steps
            return GradiVeQExchange(self, phase, QuantizedExchange(self.sampling))
        return GradiVeQExchange(self, phase)

    def refit(self, codecs: list[LayerCodec], like: torch.Tensor) -> None:
        """Step 2: fit on `src_rank`, broadcast, check (blocking collectives on `self.collectives()`)."""
        with timer(like) as fit_time:
            comm = self.collectives()
            refit_bases(codecs, comm, self.src_rank, self, like.device)
        self.stats.sent(comm.bytes_sent, kind="broadcast", world_size=self.world_size)  # mostly the bases
        self.stats.encoded(fit_time.seconds)

    def encode(self, key: str, grad: torch.Tensor, phase: str) -> Share:
        """This rank's summable share of one gradient: U^T (g_n/N - mu/N) per slice plus the leftover
        values on compressed steps (with error feedback if on), g_n/N otherwise."""
        n = self.world_size
        h = grad / n
        codec = self.codecs.get(key)
        if phase == "compress" and codec is not None and codec.basis is not None:
            if self.memory is not None:
                h = self.memory.compensate(key, h)
            coeffs, rest = codec.compress(h, n)
            residual = None
            if self.memory is not None:
                residual = self.memory.residual_of(h, codec.decompress(coeffs, rest, n))
            return Share([coeffs.reshape(-1), rest], codec, coeffs.numel(), rest.numel(), residual)
        if self.memory is not None and key in self.memory.residuals:
            # an uncompressed step carries everything error feedback still owes, and clears it: a fixed
            # basis never sends the residual (it lies outside the basis), so without this flush it
            # would only grow until the next refit
            h = self.memory.compensate(key, h)
            return Share([h.reshape(-1)], None, 0, h.numel(), torch.zeros_like(h))
        return Share([h.reshape(-1)], None, 0, h.numel(), None)

    def decode(self, share: Share, summed: list[torch.Tensor]) -> torch.Tensor:
        """The summed parts of a share -> the averaged gradient (flat when the share was dense)."""
        if share.codec is None:
            return summed[0]
        coeffs, plain = summed
        return share.codec.decompress(coeffs.view(-1, share.codec.d), plain)

    def commit(self, keys: list[str], grads: list[torch.Tensor], shares: list[Share], phase: str) -> None:
        """After a clean decode: on sampling steps feed the averaged gradients to the PCA statistics;
        keep the error-feedback residuals of compressed gradients."""
        if phase == "sample":
            with timer(grads[0]) as obs:
                for key, g in zip(keys, grads):
                    codec = self.codecs.get(key)
                    if codec is not None:
                        codec.observe(g)
            self.stats.encoded(obs.seconds)
        if self.memory is not None:
            for key, share in zip(keys, shares):
                if share.residual is not None:
                    self.memory.set(key, share.residual)

    def state_dict(self) -> dict[str, Any]:
        codecs = {k: c.state_dict() for k, c in self.codecs.items() if c is not None}
        return {
            **super().state_dict(),
            "codecs": {**self._loaded_codecs, **codecs},
            "residuals": None if self.memory is None else self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.codecs = {}
        self._loaded_codecs = dict(state["codecs"])  # applied when each parameter is next seen
        if self.memory is not None and state.get("residuals") is not None:
            self.memory.load_state_dict(state["residuals"])


class GradiVeQExchange:
    """`ExchangeCodec` of one GradiVeQ step in phase `phase`: every gradient's `Share` summed in one
    all-reduce, or, on sampling steps with a sample quantizer, the gradients sent through `sampling`.
    Committing feeds the PCA on sampling steps and keeps error-feedback residuals."""

    def __init__(self, state: GradiVeQState, phase: str, sampling: QuantizedExchange | None = None) -> None:
        self.state, self.phase, self.sampling = state, phase, sampling

    @property
    def summed(self) -> bool:
        return True if self.sampling is None else self.sampling.summed

    def encode(self, keys: list[str], grads: list[torch.Tensor]) -> Encoded:
        if self.sampling is not None:
            return self.sampling.encode(keys, grads)
        shares = [self.state.encode(key, g, self.phase) for key, g in zip(keys, grads)]
        return Encoded(keys, grads, [part for s in shares for part in s.parts], shares)

    def decode(self, received: list[torch.Tensor], encoded: Encoded) -> list[torch.Tensor]:
        if self.sampling is not None:
            return self.sampling.decode(received, encoded)
        out, pieces = [], iter(received)
        for share in encoded.context:
            out.append(self.state.decode(share, [next(pieces) for _ in share.parts]))
        return out

    def commit(self, encoded: Encoded) -> None:
        if self.sampling is not None:
            self.sampling.commit(encoded)
            self.state.commit(encoded.keys, encoded.grads, [], self.phase)
        else:
            self.state.commit(encoded.keys, encoded.grads, encoded.context, self.phase)


def gradiveq_hook(state: GradiVeQState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running GradiVeQ; use with `model.register_comm_hook(state, gradiveq_hook)`."""
    return exchange_hook(state, bucket)


register_simple_method("gradiveq", GradiVeQState, gradiveq_hook)
