"""The GradiVeQ DDP communication hook.

Per bucket and step, by the schedule (commcomp.gradiveq.Schedule):
  1. warm-up / sampling steps: all-reduce the gradients as they are (divided by N first); on
     sampling steps every rank adds the averaged gradients' slices to its PCA statistics;
  2. first compressed step of a cycle: rank `src_rank` fits each layer's basis in float64 and
     broadcasts (d, U, mu); every rank then all-gathers a checksum and refuses to go on if any
     rank's copy differs;
  3. compressed steps: every rank sends U^T (g_n/N - mu/N) per slice; one all-reduce sums the
     coefficients (with the uncompressed leftovers and small layers riding in the same buffer);
     every rank decodes U c + mu.
All collectives are issued from the hook body, in bucket order; callbacks only decode.
Paper: https://arxiv.org/abs/1811.03617
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from commcomp.error_feedback import ErrorFeedback
from commcomp.gradiveq import LayerCodec, Schedule, plan_slices, refit_bases
from commcomp.hooks.base import HookState, register_simple_method
from commcomp.hooks.quantized import QuantizerState, send_quantized
from commcomp.quantizers import Quantizer
from commcomp.stats import timer

__all__ = ["GradiVeQState", "Share", "gradiveq_hook"]


@dataclass
class Share:
    """One gradient's part of a summed buffer: the tensors to sum, how to decode their sum (codec
    None: sent as it is), and the error-feedback residual to keep once the step decodes cleanly."""

    parts: list[torch.Tensor]
    codec: LayerCodec | None
    coeffs: int  # coefficient values (0 when dense)
    rest: int  # values sent as they are
    residual: torch.Tensor | None

    @property
    def numel(self) -> int:
        return self.coeffs + self.rest


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
        check_finite: refuse gradients with NaN/Inf, raising on every rank.

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
    ) -> None:
        super().__init__(process_group, check_finite)
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
        self.sampler = (
            None
            if sample_quantizer is None
            else QuantizerState(
                process_group,
                quantizer=sample_quantizer,
                check_finite=check_finite,
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
            "sampler": None if self.sampler is None else self.sampler.options(),
        }

    def codec(self, key: str, shape: torch.Size) -> LayerCodec | None:
        if key not in self.codecs:
            plan = plan_slices(shape, self.slice_length, self.max_slice_length, self.min_numel)
            codec = None if plan is None else LayerCodec(plan, self.fit_slices)
            if codec is not None and key in self._loaded_codecs:
                codec.load_state_dict(self._loaded_codecs.pop(key))
            self.codecs[key] = codec
        return self.codecs[key]

    # ----- one gradient's way through a summing collective (shared with commcomp.horovod) -----
    def refit(self, codecs: list[LayerCodec], like: torch.Tensor) -> None:
        """Step 2: fit on `src_rank`, broadcast, check (blocking collectives on `self.collectives()`)."""
        with timer(like) as fit_time:
            comm = self.collectives()
            refit_bases(codecs, comm, self.src_rank, self, like.device)
        self.stats.sent(comm.bytes_sent)
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

    def decode(self, share: Share, summed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The summed share (share.numel values) -> the averaged gradient, shaped like `like`."""
        if share.codec is None:
            return summed.view_as(like)
        coeffs = summed[: share.coeffs].view(-1, share.codec.d)
        return share.codec.decompress(coeffs, summed[share.coeffs :])

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


def gradiveq_hook(state: GradiVeQState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running GradiVeQ; use with `model.register_comm_hook(state, gradiveq_hook)`."""
    state.begin_bucket(bucket)
    buf, n, index = bucket.buffer(), state.world_size, bucket.index()
    grads = bucket.gradients()
    keys = [state.param_key(p) for p in bucket.parameters()]
    codecs = [state.codec(k, g.shape) for k, g in zip(keys, grads)]
    phase = state.schedule.phase(state.step)
    if phase == "compress" and state.schedule.refit(state.step):
        state.refit([c for c in codecs if c is not None], buf)
    if phase == "sample" and state.sampler is not None:  # the paper's quantized sampling steps
        return send_quantized(state.sampler, state, bucket, keys, lambda: state.commit(keys, grads, [], phase))

    # step 3 (compressed) or step 1 (dense): build one flat buffer, all-reduce it, decode
    with timer(buf) as enc:
        shares = [state.encode(key, g, phase) for key, g in zip(keys, grads)]
        flat = torch.cat([*(part for s in shares for part in s.parts), state.finite_flags(grads, buf)])
    state.stats.encoded(enc.seconds)
    state.stats.sent(flat.numel() * flat.element_size(), dense=buf.numel() * buf.element_size())
    fut = dist.all_reduce(flat, group=state.process_group, async_op=True).get_future()

    def decode(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        try:
            out = fut.value()[0]
            state.raise_if_nonfinite(out[-n:], index)
            with timer(out) as dec:
                offset = 0
                for share, g in zip(shares, grads):
                    g.copy_(state.decode(share, out[offset : offset + share.numel], g))
                    offset += share.numel
            state.stats.decoded(dec.seconds)
            state.commit(keys, grads, shares, phase)
            return buf
        finally:
            state.end_bucket()

    return fut.then(decode)


register_simple_method("gradiveq", GradiVeQState, gradiveq_hook)
