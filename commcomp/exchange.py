"""The exchange engine: one group of gradients through compress -> collective -> decompress.

Every integration runs the same sequence, written once here:

  `send` (in the hook body, or Horovod's backward hook):
     1. encode: the codec turns the gradients into the tensors to send (`Encoded.parts`);
     2. flags: this rank's NaN/Inf flag rides along in the same buffer (`commcomp.consistency`);
     3. stats: the bytes of the buffer handed over are counted (and what fp32 would have been);
     4. collective: the wire starts a summing all-reduce or an all-gather and returns at once;
        then the codec's work that needs no result (`Encoded.later`) runs while the network works.
  `finish` (in the DDP callback, or Horovod's `synchronize()`):
     5. wait for every collective of the group; under "raise", raise on every rank if any rank was
        flagged (or a sum that shows them holds NaN/Inf: `Encoded.sum_shows`);
     6. decode into the gradients; under "propagate", a flagged group's gradients become NaN on
        the device and the checks are read when the step ends (`Host.check_at_step_end`; a sum
        that shows them leaves its extremes, `Host.check_finite_at_step_end`);
     7. commit: the codec keeps what it learns only from a clean step (error-feedback residuals,
        PCA statistics), at the end of the step, once every group of the step decoded cleanly;
     8. end: the host state's bookkeeping (`HookState.end_bucket`) closes the step after its last group.

The pieces plugged in:

- `ExchangeCodec` says what is sent and how it is decoded. `summed=True`: every part is summed
  element-wise over ranks (one dtype, e.g. GradiVeQ coefficients or fp16 values; a codec may add any
  extra tensors it wants summed, it gets them back at decode in the order sent). `summed=False`: the
  parts are this rank's packed bytes (uint8), all-gathered; decode gets every rank's bytes.
- `DenseExchange` is the plain average in a wire dtype (fp32, fp16, bf16: g/N summed). It is
  element-wise, so a DDP bucket whose gradients tile its buffer (`tiles`) travels as one tensor,
  the buffer itself: one division and one copy back instead of one of each per gradient, and
  bitwise the same buffer on the wire. Where no rank writes a NaN/Inf flag (the sum shows them
  itself) it goes without flag slots, and a gradient already in the wire dtype is divided and
  summed in place, as DDP's own all-reduce does: no copy out, no copy back.
- `Wire` issues the collective: `TorchWire` on a torch.distributed group (DDP), the Horovod wire in
  `commcomp.horovod`.
- The `Host` owns the step (`commcomp.hooks.base.HookState` is one): its rank and world size, its
  NaN/Inf flag and policy (`nonfinite`, `skip_step`), the step-end commits, stats and bucket
  bookkeeping.

Ordering rule: `send` is called from hook bodies only, in the same order on every rank; `finish`
(called from callbacks) never issues a collective.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
import torch.distributed as dist

from commcomp.consistency import Flag, extremes, flag_slots, has_nonfinite
from commcomp.flat import flatten, unflatten
from commcomp.overflow import poison
from commcomp.stats import CommStats, timer

__all__ = [
    "DenseExchange",
    "Encoded",
    "ExchangeCodec",
    "Host",
    "InFlight",
    "Pending",
    "TorchWire",
    "Wire",
    "dense_nbytes",
    "finish",
    "nbytes",
    "send",
    "tiles",
]

Received = torch.Tensor | list[torch.Tensor]  # a summed buffer, or every rank's buffer in rank order


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor as handed to a collective."""
    return tensor.numel() * tensor.element_size()


def dense_nbytes(grads: list[torch.Tensor], like: torch.Tensor) -> int:
    """Bytes an uncompressed all-reduce of `grads` would hand over, in the dtype of `like` (the
    bucket's buffer): what `send`'s `dense_bytes` compares with."""
    return sum(g.numel() for g in grads) * like.element_size()


@dataclass
class Encoded:
    """One group of gradients, encoded: what to send and what decoding and committing need.

    keys, grads: the gradients' stable names and the tensors decoding writes into.
    parts: the tensors to send (summed: one dtype; gathered: uint8 bytes).
    context: the codec's own record (GradiVeQ's shares, a quantizer's payload templates, residuals).
    """

    keys: list[str]
    grads: list[torch.Tensor]
    parts: list[torch.Tensor]
    context: Any = None
    # a summed codec may lay the parts end to end into one buffer (the dense exchange's g/N, in the
    # gradient itself when it can): sent as it is when no rank writes a flag, else copied next to
    # the flag slots
    flat: torch.Tensor | None = None
    # work on this rank's own data that the decode does not wait for (an error-feedback residual):
    # the engine runs it once the collective is on its way, while the network works
    later: Callable[[], None] | None = None
    # what the NaN/Inf check reads instead of the gradients, when the codec's output holds a NaN or
    # an infinity wherever they do (and also where the wire dtype overflowed): the dense exchange's
    # g/N, just written and at most half the bytes of fp32 gradients
    checked: list[torch.Tensor] | None = None
    # the received sum holds a NaN or an infinity wherever any rank's parts did, and wherever the
    # sum overflowed the wire dtype, and the parts hold one wherever the gradients did (the dense
    # exchange; GradiVeQ's one exchange, whose products carry them through). The check
    # then reads the sum, after the collective, and every rank reads the same one: under
    # "propagate" no rank checks its parts before sending (nothing delays the collective's start);
    # under "raise" they still do, for the flags that name the ranks
    sum_shows: bool = False


class ExchangeCodec(Protocol):
    """A compressor as the engine sees it (see the module docstring)."""

    @property
    def summed(self) -> bool:
        """True: the parts are summed by an all-reduce; False: this rank's bytes are all-gathered."""
        ...

    def encode(self, keys: list[str], grads: list[torch.Tensor]) -> Encoded: ...

    def decode(self, received: list[torch.Tensor], encoded: Encoded) -> list[torch.Tensor]:
        """The averaged gradients (any shape with the gradients' numel), from the summed parts in
        the order sent (summed) or from every rank's payload bytes in rank order (gathered)."""
        ...

    def commit(self, encoded: Encoded) -> None:
        """Called once the group decoded cleanly on every rank."""
        ...


class DenseExchange:
    """`ExchangeCodec` of the plain average: every rank sends g/N in `wire_dtype` (None: the
    gradients' own), the all-reduce sums it, and decoding casts the sum back into the gradients.
    Nothing is learned, so nothing is committed."""

    summed = True

    def __init__(self, world_size: int, wire_dtype: torch.dtype | None = None) -> None:
        self.world_size, self.wire_dtype = world_size, wire_dtype

    def encode(self, keys: list[str], grads: list[torch.Tensor]) -> Encoded:
        dtypes = {self.wire_dtype or g.dtype for g in grads}
        if len(dtypes) != 1:  # none, or several: the engine sends nothing, or refuses
            return Encoded(keys, grads, [g.reshape(-1) / self.world_size for g in grads])
        dtype = dtypes.pop()
        if len(grads) == 1 and grads[0].dtype == dtype and grads[0].is_contiguous():
            values = grads[0].view(-1).div_(self.world_size)  # decoding overwrites it with the average
            return Encoded(keys, grads, [values], flat=values, checked=[values], sum_shows=True)
        sizes = [g.numel() for g in grads]
        values = torch.empty(sum(sizes), dtype=dtype, device=grads[0].device)
        parts = list(values.split(sizes))
        for g, part in zip(grads, parts):
            if g.dtype == dtype:
                torch.div(g.reshape(-1), self.world_size, out=part)  # g/N in one pass
            else:
                # g/N in the gradient's dtype, then rounded to the wire dtype: bitwise what
                # torch.div(g, N, out=part) gives (it divides in the inputs' dtype too), and in the
                # hook about a fifth faster (the cnn's bucket into bf16: ~150 against ~190 us);
                # decoding overwrites the gradient
                part.view(g.shape).copy_(g.div_(self.world_size))
        return Encoded(keys, grads, parts, flat=values, checked=[values], sum_shows=True)

    def decode(self, received: list[torch.Tensor], encoded: Encoded) -> list[torch.Tensor]:
        return received  # the engine's copy into the gradients casts back

    def commit(self, encoded: Encoded) -> None:
        pass


def tiles(grads: list[torch.Tensor], buffer: torch.Tensor) -> bool:
    """True if `grads` are `buffer`'s contents laid end to end (a DDP bucket's gradient views), so
    that an element-wise codec may send the buffer as one tensor."""
    offset, base, size = 0, buffer.data_ptr(), buffer.element_size()
    for g in grads:
        if g.dtype != buffer.dtype or not g.is_contiguous() or g.data_ptr() != base + offset * size:
            return False
        offset += g.numel()
    return offset == buffer.numel()


class Host(Protocol):
    """The state that owns the step (a `HookState`): identity, NaN/Inf policy, stats, bookkeeping."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    stats: CommStats
    check_finite: bool
    nonfinite_policy: str  # "propagate" or "raise" (`commcomp.overflow`)

    def nonfinite(self, tensors: list[torch.Tensor]) -> Flag:
        """This rank's flag: true if checking is on and any tensor holds NaN/Inf (a 0-dim bool tensor
        is written into the buffer as it is, without a read on the host)."""
        ...

    def skip_step(self, flags: torch.Tensor, bucket_index: int) -> None:
        """Some rank was flagged, or a dense sum held NaN/Inf (every rank received the same flags
        and sums): the step leaves the state untouched (or every rank raises, by policy)."""
        ...

    def commit_at_step_end(self, commit: Callable[[], None]) -> None:
        """Run `commit` when the step ends cleanly."""
        ...

    def check_at_step_end(self, bad: torch.Tensor, error: Callable[[], Exception] | None = None) -> None:
        """Skip the step if `bad` (a 0-dim bool tensor, left on its device until the step ends) is
        true, and then raise `error()` if given."""
        ...

    def check_finite_at_step_end(self, values: list[torch.Tensor]) -> None:
        """Skip the step if any of `values` (0-dim floating tensors: `consistency.extremes`) is NaN
        or Inf, read when the step ends."""
        ...

    def end_bucket(self) -> None:
        """One group of the step has finished (the step ends after its last group)."""
        ...


class Pending(Protocol):
    def wait(self) -> Received:
        """The collective's result (blocking if it is not finished)."""
        ...


P = TypeVar("P", bound=Pending, covariant=True)


class Wire(Protocol[P]):
    def start(self, flat: torch.Tensor, summed: bool, name: str) -> P:
        """Start a summing all-reduce (`summed`) or an all-gather of `flat`; return at once."""
        ...


@dataclass
class TorchPending:
    """A torch.distributed collective in flight; `future` is what a DDP hook chains on."""

    future: torch.futures.Future[Any]
    gathered: list[torch.Tensor] | None = None

    def wait(self) -> Received:
        self.future.wait()
        return self.future.value()[0] if self.gathered is None else self.gathered


class TorchWire:
    """`Wire` on a torch.distributed process group (None: the whole world), asynchronous."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group

    def start(self, flat: torch.Tensor, summed: bool, name: str) -> TorchPending:
        del name  # torch.distributed matches collectives by order, not by name
        if summed:
            return TorchPending(dist.all_reduce(flat, group=self.process_group, async_op=True).get_future())
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(self.process_group))]
        work = dist.all_gather(gathered, flat, group=self.process_group, async_op=True)
        return TorchPending(work.get_future(), gathered)


@dataclass
class InFlight(Generic[P]):
    """One group on its way: its codec, its encoding, and the collective's handle."""

    codec: ExchangeCodec
    encoded: Encoded
    pending: P
    sent_parts: list[torch.Size]  # shapes of the parts, to cut the summed buffer back into them
    check_sum: bool = False  # the received sum is checked for NaN/Inf (`Encoded.sum_shows`)
    flagged: bool = True  # the ranks wrote their NaN/Inf flags (else the slots are zeros: not read)
    slots: bool = True  # the buffer ends with the flag slots (else it holds the values alone)


def send(
    host: Host,
    codec: ExchangeCodec,
    keys: list[str],
    grads: list[torch.Tensor],
    wire: Wire[P],
    *,
    like: torch.Tensor,
    dense_bytes: int,
    name: str = "",
) -> InFlight[P]:
    """Steps 1-4: encode, append the NaN/Inf flag, count the bytes, start the collective.

    `like` gives the device (and, for an empty summed encoding, the dtype) of the buffer;
    `dense_bytes` is what an uncompressed fp32/fp16 all-reduce of the same gradients would hand over.
    """
    with timer(like) as enc:
        encoded = codec.encode(keys, grads)
        check_sum = encoded.sum_shows and host.check_finite
        if check_sum and host.nonfinite_policy != "raise":
            bad: Flag = None
        else:
            bad = host.nonfinite(grads if encoded.checked is None else encoded.checked)
        if codec.summed:
            dtypes = {p.dtype for p in encoded.parts}
            if len(dtypes) > 1:
                raise TypeError(f"summed parts must share one dtype, got {sorted(map(str, dtypes))}")
            wire_dtype = dtypes.pop() if dtypes else like.dtype
        slots = encoded.flat is None or bad is not None  # else no rank writes a flag: the laid-out parts go as they are
        if encoded.flat is not None and not slots:
            flat = encoded.flat
        elif codec.summed:
            flat = flatten([*encoded.parts, flag_slots(bad, host.rank, host.world_size, wire_dtype, like.device)])
        else:
            flat = flatten([*encoded.parts, flag_slots(bad, 0, 1, torch.uint8, like.device)])
    host.stats.encoded(enc)
    kind = "allreduce" if codec.summed else "allgather"
    host.stats.sent(nbytes(flat), dense=dense_bytes, kind=kind, world_size=host.world_size)
    pending = wire.start(flat, codec.summed, name)
    if encoded.later is not None:
        with timer(like) as more:
            encoded.later()
        host.stats.encoded(more)
    return InFlight(codec, encoded, pending, [p.shape for p in encoded.parts], check_sum, bad is not None, slots)


def _split(
    item: InFlight[Any], received: Received, world_size: int
) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
    """(what the codec decodes, per-rank flags (None: the buffer holds no flag slots), what a NaN/Inf
    check of the sum reads) of one received buffer. The check reads a summed buffer's values in one
    piece: a reduction per part would launch a few operations per tensor of the group (GradiVeQ
    sends two per layer) for the same answer."""
    if isinstance(received, torch.Tensor) and not item.slots:
        return unflatten(received, item.sent_parts), None, [received]
    if isinstance(received, torch.Tensor):
        values = received[:-world_size]
        return unflatten(values, item.sent_parts), received[-world_size:], [values]
    parts = [t[:-1] for t in received]
    return parts, torch.stack([t[-1] for t in received]), parts


def _flags(found: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Every rank's flags for a group: its one buffer's, or the sum over several (None: no buffer
    of the group holds flag slots)."""
    slotted = [f for f in found if f is not None]
    if len(slotted) <= 1:
        return slotted[0] if slotted else None
    return torch.stack([f.to(torch.float32) for f in slotted]).sum(0)


def finish(host: Host, items: list[InFlight[Any]], index: int = 0) -> None:
    """Steps 5-8 for `items` (one DDP bucket, or every tensor of a Horovod step; not empty): wait for
    all, decode into the gradients and queue the commits for the step's end; if any rank was
    flagged (or a sum that shows them held NaN/Inf: `Encoded.sum_shows`), the step is skipped on
    every rank. The group ends (`end_bucket`) even when it raises, so the bookkeeping stays in step.

    Under "propagate" nothing here reads a value on the host: the decoded gradients carry the NaN
    (a flagged group's are filled with NaN on the device where any rank's flag is set; a sum that
    shows them has them already, the same on every rank), and the checks stay on the device until
    the step's end (`check_at_step_end`). On CUDA this callback runs inline in the hook body as soon
    as the collective is queued (NCCL's futures complete at once), so a host read here would wait
    for this bucket's collective before the backward pass could go on to the next bucket; the
    step's one read, at its end, waits for nothing that was not done. Under "raise" the flags are
    read here, and every rank raises before decoding."""
    try:
        received = [item.pending.wait() for item in items]  # every collective done before any raise
        with timer(items[0].encoded.grads[0]) as dec:
            split = [_split(item, r, host.world_size) for item, r in zip(items, received)]
            flags = _flags([f for _, f, _ in split])
            # whether a rank wrote a flag depends only on the options and the codec: alike on every
            # rank (flags are written into slots: `flags` is then not None)
            flagged = any(item.flagged for item in items)
            if host.nonfinite_policy == "raise" and (
                (flagged and flags is not None and bool(flags.any()))
                or any(i.check_sum and has_nonfinite(shown) for i, (_, _, shown) in zip(items, split))
            ):
                for item in items:
                    poison(item.encoded.grads)
                host.skip_step(torch.zeros(host.world_size) if flags is None else flags, index)  # raises, everywhere
                return
            for item, (payload, _, shown) in zip(items, split):
                for grad, value in zip(item.encoded.grads, item.codec.decode(payload, item.encoded)):
                    grad.copy_(value.view_as(grad))  # a no-op where summed in place (the same memory)
                if item.check_sum and not item.flagged and (ends := extremes(shown)):
                    host.check_finite_at_step_end(ends)  # the sum's NaN/Inf are in the gradients
            # a flagged rank's NaN, in every rank's gradients
            if flagged and flags is not None and host.nonfinite_policy != "raise":
                bad = flags.ne(0).any()  # bool (`any` of uint8 slots is uint8)
                for item in items:
                    poison(item.encoded.grads, where=bad)
                host.check_at_step_end(bad)
        host.stats.decoded(dec)
        for item in items:
            host.commit_at_step_end(functools.partial(item.codec.commit, item.encoded))
    finally:
        host.end_bucket()
