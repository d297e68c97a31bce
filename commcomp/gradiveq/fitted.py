"""GradiVeQ with a fitted basis (the paper's schedule): one summed exchange per step.

Per step, by the schedule (`commcomp.gradiveq.Schedule`):
  1. warm-up / sampling steps: the gradients are all-reduced as they are (divided by N first); on
     sampling steps every rank adds the averaged gradients' slices to its PCA statistics;
  2. first compressed step of a cycle: rank `src_rank` fits each layer's basis in float64 and
     broadcasts (d, U, mu); every rank checks it received the same bits (`refit_bases`);
  3. compressed steps: every rank sends U^T (g_n/N - mu/N) per slice; the all-reduce sums the
     coefficients (uncompressed leftovers and small layers ride in the same buffer); every rank
     decodes U c + mu.
`FittedExchange` is this step's codec for the exchange engine (DDP buckets and Horovod steps alike).
The tracked basis's warm-up steps use it too (phase "warmup": everything sent as it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from commcomp.comm import Collectives
from commcomp.exchange import Encoded, ExchangeCodec, Host
from commcomp.gradiveq.codec import LayerCodec
from commcomp.gradiveq.refit import refit_bases
from commcomp.stats import timer

__all__ = ["FittedExchange", "FittedHost", "FittedOptions", "Share", "refit"]


@dataclass(frozen=True)
class FittedOptions:
    """The fitted basis's options (see `GradiVeQState`)."""

    energy_threshold: float = 0.01  # lambda: keep the fewest components holding 1 - lambda of the variance
    sample_steps: int = 20  # uncompressed steps per cycle whose averaged gradients feed the PCA
    compress_steps: int = 100  # compressed steps per cycle (a refit at the start of each cycle)
    slice_length: int = 256  # target K
    max_slice_length: int = 256  # cap on K (the PCA is K x K)
    max_components: int | None = None  # cap on d per layer
    fit_slices: int = 64  # slices per sampled gradient entering the PCA
    sample_quantizer: Any = None  # send sampling steps through this quantizer (name or instance)
    sample_quantizer_options: dict[str, Any] | None = None
    src_rank: int = 0  # the rank whose fit is broadcast

    def __post_init__(self) -> None:
        if not 0.0 <= self.energy_threshold < 1.0:
            raise ValueError(f"energy_threshold must be in [0, 1), got {self.energy_threshold}")
        if self.slice_length < 1 or self.max_slice_length < self.slice_length:
            raise ValueError(
                f"need 1 <= slice_length <= max_slice_length, got {self.slice_length} and {self.max_slice_length}"
            )
        if self.max_components is not None and self.max_components < 1:
            raise ValueError(f"max_components must be >= 1 or None, got {self.max_components}")
        if self.fit_slices < 1:
            raise ValueError(f"fit_slices must be >= 1, got {self.fit_slices}")


@dataclass
class Share:
    """One gradient's part of a summed buffer: the tensors to sum ([coefficients, leftover values]
    when compressed, [values] when dense) and how to decode their sum (codec None: as it is)."""

    parts: list[torch.Tensor]
    codec: LayerCodec | None


class FittedHost(Host, Protocol):
    """What the fitted basis needs of its state (`GradiVeQState` is one)."""

    fitted: FittedOptions | None  # None: a tracked-basis state
    codecs: dict[str, LayerCodec | None]  # per-layer PCA state (None: sent uncompressed)

    def collectives(self) -> Collectives:
        """The transport of the blocking refit collectives."""
        ...


def refit(state: FittedHost, codecs: list[LayerCodec], like: torch.Tensor) -> None:
    """Step 2: fit on `src_rank`, broadcast, check (blocking collectives on `state.collectives()`)."""
    assert state.fitted is not None, "refit() of a tracked-basis state"
    with timer(like) as fit_time:
        comm = state.collectives()
        refit_bases(codecs, comm, state.fitted.src_rank, state.fitted, like.device)
    state.stats.sent(comm.bytes_sent, kind="broadcast", world_size=comm.world_size)  # mostly the bases
    state.stats.encoded(fit_time)


class FittedExchange:
    """`ExchangeCodec` of one fitted-basis step in phase `phase` ("warmup", "sample", "compress"):
    every gradient's `Share` summed in one all-reduce or, on sampling steps with a sample quantizer,
    the gradients sent through `sampling`. Committing feeds the PCA on sampling steps."""

    def __init__(self, state: FittedHost, phase: str, sampling: ExchangeCodec | None = None) -> None:
        self.state, self.phase, self.sampling = state, phase, sampling

    @property
    def summed(self) -> bool:
        return True if self.sampling is None else self.sampling.summed

    def share(self, key: str, grad: torch.Tensor) -> Share:
        """This rank's summable share of one gradient: U^T (g_n/N - mu/N) per slice plus the leftover
        values on compressed steps, g_n/N otherwise."""
        n = self.state.world_size
        h = grad / n
        codec = self.state.codecs.get(key)
        if self.phase == "compress" and codec is not None and codec.basis is not None:
            coeffs, rest = codec.compress(h, n)
            return Share([coeffs.reshape(-1), rest], codec)
        return Share([h.reshape(-1)], None)

    def encode(self, keys: list[str], grads: list[torch.Tensor]) -> Encoded:
        if self.sampling is not None:
            return self.sampling.encode(keys, grads)
        shares = [self.share(key, g) for key, g in zip(keys, grads)]
        return Encoded(keys, grads, [part for s in shares for part in s.parts], shares)

    def decode(self, received: list[torch.Tensor], encoded: Encoded) -> list[torch.Tensor]:
        if self.sampling is not None:
            return self.sampling.decode(received, encoded)
        out, pieces = [], iter(received)
        for share in encoded.context:
            if share.codec is None:
                out.append(next(pieces))
            else:
                coeffs, plain = next(pieces), next(pieces)
                out.append(share.codec.decompress(coeffs.view(-1, share.codec.d), plain))
        return out

    def commit(self, encoded: Encoded) -> None:
        """After a clean decode: on sampling steps, feed the averaged gradients to the PCA statistics."""
        if self.sampling is not None:
            self.sampling.commit(encoded)
        if self.phase != "sample":
            return
        with timer(encoded.grads[0]) as obs:
            for key, g in zip(encoded.keys, encoded.grads):
                codec = self.state.codecs.get(key)
                if codec is not None:
                    codec.observe(g)
        self.state.stats.encoded(obs)
