"""The tracked-basis GradiVeQ step: two summed exchanges, for DDP buckets and Horovod steps alike.

A compressed step needs two all-reduces, the second (basis updates B_n = X_n^T P) computed from the
first's sum (coefficients C = X U, see `commcomp.gradiveq.tracked`). Both are issued from hook bodies
(on Horovod: from `synchronize()`), so every rank issues them in the same order. On DDP:

    hook body of bucket b:   [bucket b-1: wait for its coefficients, start its basis update]
                             bucket b: start its coefficients
                             [last bucket: wait for its coefficients, start its basis update]
    callback of bucket b's basis update: decode, keep residuals and bases, end the bucket.

Bucket b's coefficients travel while autograd computes bucket b+1's gradients; the wait for them
happens in the next hook body. Uncompressed gradients (small layers, biases) and the
NaN/Inf flags ride with the coefficients; the basis updates carry one checksum slot per rank, so
ranks whose orthonormalisation differed (another BLAS) stop with an error instead of drifting apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from commcomp.consistency import bad_ranks
from commcomp.error_feedback import ErrorFeedback
from commcomp.exchange import Encoded, Host, InFlight, Pending, TorchWire, Wire, dense_nbytes, nbytes, send
from commcomp.flat import flatten, unflatten
from commcomp.gradiveq.tracked import TrackedLayer, crc32, orthonormalize
from commcomp.overflow import poison
from commcomp.stats import timer

__all__ = ["BasisUpdates", "TrackedCoefficients", "TrackedGroup", "TrackedHost", "compensated_share", "finish_tracked"]

P = TypeVar("P", bound=Pending)


class TrackedHost(Host, Protocol):
    """What the tracked step needs of its state (`GradiVeQState` is one)."""

    memory: ErrorFeedback | None  # None: error feedback off
    wire_dtype: torch.dtype

    def tracked_layer(self, key: str, shape: torch.Size) -> TrackedLayer | None:
        """The layer's tracked basis, or None if it is sent as it is."""
        ...


@dataclass
class _Grad:
    """One gradient between the two exchanges."""

    key: str
    grad: torch.Tensor
    layer: TrackedLayer | None  # None: sent as it is
    x: torch.Tensor | None = None  # this rank's compensated slices X_n [S, K], float32
    summed: list[torch.Tensor] = field(default_factory=list)  # [values] or [coefficients]
    p: torch.Tensor | None = None  # orthonormalised summed coefficients [S, d]
    b: torch.Tensor | None = None  # this rank's basis update B_n [K, d]


def compensated_share(state: TrackedHost, key: str, layer: TrackedLayer, g: torch.Tensor) -> torch.Tensor:
    """This rank's slices X_n [S, K] of gradient `g` (named `key`): g/N plus its error-feedback
    residual, float32, a new tensor in g's memory order."""
    x = layer.plan.matrix(g.detach()).float() / state.world_size
    if state.memory is not None:
        state.memory.compensate(key, x, out=x)
    return x


class TrackedCoefficients:
    """`ExchangeCodec` of the first exchange: X_n U for compressed layers, g_n/N for the others."""

    summed = True

    def __init__(self, state: TrackedHost) -> None:
        self.state = state

    def encode(self, keys: list[str], grads: list[torch.Tensor]) -> Encoded:
        state, n = self.state, self.state.world_size
        parts: list[torch.Tensor] = []
        records: list[_Grad] = []
        for key, g in zip(keys, grads):
            layer = state.tracked_layer(key, g.shape)
            if layer is None:
                parts.append((g.detach() / n).reshape(-1).to(state.wire_dtype))
                records.append(_Grad(key, g, None))
                continue
            x = compensated_share(state, key, layer, g)
            parts.append(layer.coefficients(x).to(state.wire_dtype).reshape(-1))
            records.append(_Grad(key, g, layer, x))
        return Encoded(keys, grads, parts, records)

    def decode(self, received: list[torch.Tensor], encoded: Encoded) -> list[torch.Tensor]:
        raise NotImplementedError("the tracked step decodes through TrackedGroup")

    def commit(self, encoded: Encoded) -> None:
        raise NotImplementedError("the tracked step commits through TrackedGroup")


class TrackedGroup:
    """Gradients whose coefficients are in flight (`items`, sent with `TrackedCoefficients`)."""

    def __init__(self, state: TrackedHost, items: list[InFlight[Any]], like: torch.Tensor, index: int = 0) -> None:
        self.state, self.items, self.like, self.index = state, items, like, index
        self.grads: list[_Grad] = [rec for item in items for rec in item.encoded.context]
        self.skipped = False  # a rank flagged NaN/Inf: every rank skips the step alike

    def start_basis_update(self, wire: Wire[P], name: str = "") -> P:
        """Wait for the coefficients, check the flags (raising on every rank if a rank had NaN/Inf),
        orthonormalise, start the basis update."""
        state, n = self.state, self.state.world_size
        received = [item.pending.wait() for item in self.items]
        with timer(self.like) as enc:
            flags = torch.zeros(n, dtype=torch.float32, device=self.like.device)
            for item, out in zip(self.items, received):
                assert isinstance(out, torch.Tensor)
                flags += out[-n:].float()
                pieces = iter(unflatten(out[:-n], item.sent_parts))
                for rec in item.encoded.context:
                    rec.summed = [next(pieces)]
            self.skipped = bool(bad_ranks(flags))
            if self.skipped:  # every rank sees the same flags: all send only the checksums below
                state.skip_step(flags, self.index)  # raises on every rank with nonfinite="raise"
            updates: list[torch.Tensor] = []
            for rec in self.grads:
                if rec.layer is not None and rec.x is not None and not self.skipped:
                    rec.p = orthonormalize(rec.summed[0].view(rec.layer.plan.S, rec.layer.d))
                    rec.b = TrackedLayer.basis_update(rec.x, rec.p)
                    updates.append(rec.b.to(state.wire_dtype))
            checks = torch.zeros(n, _CHECK_BYTES, dtype=state.wire_dtype, device=self.like.device)
            checks[state.rank] = _checksum([rec.p for rec in self.grads if rec.p is not None], self.like.device)
            flat = flatten([*updates, checks])
        state.stats.encoded(enc)
        state.stats.sent(nbytes(flat), kind="allreduce", world_size=n)
        return wire.start(flat, True, name)

    def complete(self, received: torch.Tensor) -> None:
        """Decode the averaged gradients into place; keep residuals and the next bases."""
        state, n = self.state, self.state.world_size
        if self.skipped:  # an overflow step: NaN gradients on every rank, the bases and residuals stay
            poison([rec.grad for rec in self.grads])
            return
        checks = received[-n * _CHECK_BYTES :].view(n, _CHECK_BYTES)
        odd = [r for r in range(n) if not torch.equal(checks[r], checks[state.rank])]
        if odd:
            raise RuntimeError(
                f"GradiVeQ: ranks {odd} orthonormalised the same coefficients to other bases than rank "
                f"{state.rank}; every rank must run the same torch build and linear-algebra library"
            )
        with timer(self.like) as dec:
            shapes = [rec.b.shape for rec in self.grads if rec.b is not None]
            updates = iter(unflatten(received[: -n * _CHECK_BYTES], shapes))
            keep: list[tuple[_Grad, torch.Tensor]] = []
            for rec in self.grads:
                if rec.layer is None:
                    rec.grad.copy_(rec.summed[0].view_as(rec.grad))
                    continue
                assert rec.p is not None and rec.b is not None and rec.x is not None
                b = next(updates).float()
                # step 3, P B^T; B is the next basis if the step ends cleanly
                rec.layer.plan.write_outer(rec.grad, rec.p, b)
                keep.append((rec, b))
        state.stats.decoded(dec)

        def commit() -> None:  # at the step's end, unless another bucket of the step overflowed
            for rec, b in keep:
                assert rec.layer is not None and rec.p is not None and rec.b is not None and rec.x is not None
                rec.layer.basis = b.clone()
                if state.memory is not None:  # what this rank's share lost: X_n - P P^T X_n
                    state.memory.set(rec.key, rec.layer.plan.outer(rec.p, rec.b, base=rec.x))

        state.commit_at_step_end(commit)


_CHECK_BYTES = 4  # a CRC-32, one byte per slot: exact in every wire dtype


def _checksum(ps: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The CRC-32 of the orthonormalised coefficients' bytes, as 4 byte values (equal bits give
    equal checksums); one copy to the host per group."""
    return torch.tensor(list(crc32(ps).to_bytes(4, "little")), dtype=torch.float32, device=device)


def finish_tracked(state: TrackedHost, items: list[InFlight[Any]], wire: Wire[Any], name: str) -> None:
    """Both exchanges' second half for a whole step at once (Horovod's `synchronize()`): wait for the
    coefficients, start and wait for the basis update, decode; the step's group ends either way."""
    try:
        group = TrackedGroup(state, items, items[0].encoded.grads[0])
        received = group.start_basis_update(wire, name).wait()
        assert isinstance(received, torch.Tensor)
        group.complete(received)
    finally:
        state.end_bucket()


class BasisUpdates:
    """The DDP side of the tracked step: the bucket whose coefficients are in flight and whose basis
    update is still to start (see `commcomp.gradiveq.pipeline`).

    `send` starts a bucket's coefficients (after starting the waiting bucket's basis update);
    `flush` starts the waiting bucket's basis update. Both are called from hook bodies: `flush` at
    the top of every later hook call and after the step's last bucket, so no bucket waits past the
    step. The host owns the step (`begin_bucket` before `send`, `end_bucket` when decoded).
    """

    def __init__(self) -> None:
        self.waiting: tuple[TrackedGroup, torch.futures.Future[torch.Tensor], torch.Tensor] | None = None

    def send(
        self,
        host: TrackedHost,
        wire: TorchWire,
        keys: list[str],
        grads: list[torch.Tensor],
        like: torch.Tensor,
        index: int,
    ) -> torch.futures.Future[torch.Tensor]:
        """Start the coefficients of the gradients `grads` (named `keys`) of bucket `index` (buffer
        `like`); the returned future completes with `like` once they are decoded."""
        self.flush(host, wire)
        item = send(
            host, TrackedCoefficients(host), keys, grads, wire, like=like, dense_bytes=dense_nbytes(grads, like)
        )
        result: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self.waiting = (TrackedGroup(host, [item], like, index), result, like)
        return result

    def flush(self, host: TrackedHost, wire: TorchWire) -> None:
        """Wait for the waiting bucket's coefficients and start its basis update; its callback decodes."""
        if self.waiting is None:
            return
        group, result, buf = self.waiting
        self.waiting = None
        try:
            pending = group.start_basis_update(wire)
        except BaseException:
            host.end_bucket()
            raise

        def done(fut: torch.futures.Future[Any]) -> None:
            error: BaseException | None = None
            try:
                group.complete(fut.value()[0])
            except BaseException as e:  # handed to DDP through the bucket's future
                error = e
            finally:
                host.end_bucket()  # before the future completes: DDP may return from backward at once
            if error is None:
                result.set_result(buf)
            else:
                result.set_exception(error)  # type: ignore[arg-type]  # torch's stub says Tensor

        pending.future.then(done)
