"""The tracked-basis GradiVeQ step in one summed exchange (the default): an `ExchangeCodec` on the
engine's ordinary path (`commcomp.exchange`), so DDP buckets, Horovod steps and auto's groups all
send it like any other codec.

Each compressed layer sends C_n = X_n U and Q_n = X_n^T P (see `commcomp.gradiveq.tracked`);
uncompressed gradients (small layers, biases) ride along as g/N. A group with compressed layers also
carries one checksum slot per rank: a byte of a checksum of the bases this rank projected onto
(`commcomp.gradiveq.tracked.checksum_byte`: exact in every wire dtype, computed on the device), so
ranks whose bases differ (another BLAS) stop with an error instead of drifting apart (a difference
one byte misses is caught a step later: bases that differ once differ ever after). This rank's
residual is computed while the collective travels; decoding writes X_hat into the gradients and
computes the next bases; the step's end keeps both only if it was clean.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from commcomp.consistency import bad_ranks
from commcomp.exchange import Encoded
from commcomp.gradiveq.pipeline import TrackedHost, compensated_share
from commcomp.gradiveq.tracked import TrackedLayer, checksum_byte, orthonormalize

__all__ = ["SingleExchange"]


def _residuals(shares: list[_Share]) -> None:
    """What each compressed layer's share lost: X_n minus its own share of the decode. It needs only
    this rank's payloads, so it is computed while the collective travels."""
    for share in shares:
        if share.layer is not None and share.x is not None and share.c is not None and share.q is not None:
            left, right = share.layer.factors(share.c, share.q)
            share.residual = share.layer.plan.outer(left, right, base=share.x)


def _other_bases(odd: torch.Tensor, rank: int) -> Exception:
    """The error when the ranks set in `odd` sent another checksum of their bases than `rank`."""
    return RuntimeError(
        f"GradiVeQ: ranks {bad_ranks(odd)} projected onto other bases than rank {rank}; every rank "
        "must run the same torch build and linear-algebra library"
    )


@dataclass
class _Share:
    """One gradient of the group: this rank's compensated slices and payloads (compressed layers)."""

    key: str
    layer: TrackedLayer | None  # None: sent as it is
    x: torch.Tensor | None = None  # X_n [S, K] float32, residual included
    c: torch.Tensor | None = None  # C_n [S, d]
    q: torch.Tensor | None = None  # Q_n [K, d]
    residual: torch.Tensor | None = None  # set while the collective travels (`Encoded.later`)
    bases: tuple[torch.Tensor, torch.Tensor] | None = None  # the next (U, P), set by decode


class SingleExchange:
    """`ExchangeCodec` of the one-exchange tracked step for `state`'s layers and residuals."""

    summed = True

    def __init__(self, state: TrackedHost) -> None:
        self.state = state

    def encode(self, keys: list[str], grads: list[torch.Tensor]) -> Encoded:
        state, n, wire = self.state, self.state.world_size, self.state.wire_dtype
        parts: list[torch.Tensor] = []
        shares: list[_Share] = []
        checksum: torch.Tensor | None = None
        for key, g in zip(keys, grads):
            layer = state.tracked_layer(key, g.shape)
            if layer is None:
                parts.append((g.detach() / n).reshape(-1).to(wire))
                shares.append(_Share(key, None))
                continue
            x = compensated_share(state, key, layer, g)
            c, q = layer.sides(x)
            parts += [c.to(wire).reshape(-1), q.to(wire).reshape(-1)]
            shares.append(_Share(key, layer, x, c, q))
            assert layer.checksum is not None  # set with the bases, by `sides`
            checksum = layer.checksum if checksum is None else (checksum * 31 + layer.checksum) % 2**32
        if checksum is not None:
            checks = torch.zeros(n, dtype=wire, device=grads[0].device)
            checks[state.rank] = checksum_byte(checksum)
            parts.append(checks)
        later = None if state.memory is None else functools.partial(_residuals, shares)
        # C_n = X_n U and Q_n = X_n^T P hold a NaN or an infinity in every row a NaN or infinity of
        # X_n reaches (NaN x 0 is NaN, inf x 0 too), and a sum holds them wherever a summand did:
        # the received sum shows a non-finite gradient of any rank, as the dense exchange's does
        return Encoded(keys, grads, parts, shares, later=later, sum_shows=True)

    def decode(self, received: list[torch.Tensor], encoded: Encoded) -> list[torch.Tensor]:
        state = self.state
        shares: list[_Share] = encoded.context
        if any(share.layer is not None for share in shares):  # read when the step ends
            checks = received[-1]
            odd = checks != checks[state.rank]
            state.check_at_step_end(odd.any(), functools.partial(_other_bases, odd, state.rank))
        pieces = iter(received)
        out: list[torch.Tensor] = []
        for share, g in zip(shares, encoded.grads):
            layer = share.layer
            if layer is None:
                out.append(next(pieces))
                continue
            assert share.x is not None and share.c is not None and share.q is not None
            c = next(pieces).float().view(layer.plan.S, layer.d)
            q = next(pieces).float().view(layer.plan.K, layer.d)
            left, right = layer.factors(c, q)
            layer.plan.write_outer(g, left, right)  # decoded in place: the engine's copy is a no-op
            out.append(g)
            share.bases = (orthonormalize(q), orthonormalize(c))  # U' and P', kept if the step ends cleanly
        return out

    def commit(self, encoded: Encoded) -> None:
        """Keep the next bases P' = orth(C), U' = orth(Q) and the residuals (a clean step only)."""
        for share in encoded.context:
            if share.layer is None or share.bases is None:
                continue
            share.layer.keep(*share.bases)
            if self.state.memory is not None and share.residual is not None:
                self.state.memory.set(share.key, share.residual)
