"""Cross-rank consistency: the options fingerprint and the NaN/Inf flags.

Two things must never differ silently between ranks:

- Options. Every component (DDP hook states, Horovod, PQASGD, gossip) describes what must agree in
  an `options()` dict; `options_digest` turns it into one 56-bit number (the first 7 bytes of the
  SHA-256 of its canonical JSON), and `verify_options` (an all-gather) or
  `verify_options_with_root` (a broadcast and an all-reduce, for transports without all-gather)
  compare it across ranks and raise a ValueError on every rank if any rank differs. A checkpoint
  is held against the current options with `check_saved_options`; one saved at another world size
  is refused with `world_size_error` (it needs `commcomp.elastic`).
- Other per-rank facts (the MoE layer's sizes) are compared the same way with `gather_ints`.
- Finite values. A rank whose tensors hold NaN/Inf sets a flag that rides along with the data in
  the same collective: one slot per rank in a summed buffer (`flag_slots`), or one byte per rank in
  a gathered one. Every rank then sees the same flags and raises together (`bad_ranks`), so a bad
  rank never leaves the others waiting in the next collective.

Results computed from every rank's data (decoded payloads, checkpoints of several ranks) are summed
in rank order with `sum_in_order`, so every rank holds bitwise the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "Flag",
    "Gathers",
    "RootChecks",
    "bad_ranks",
    "check_saved_options",
    "extremes",
    "flag_slots",
    "gather_ints",
    "has_nonfinite",
    "joined",
    "nonfinite_flag",
    "options_digest",
    "options_text",
    "sum_in_order",
    "verify_options",
    "verify_options_with_root",
    "world_size_error",
    "write_flags",
]


class Gathers(Protocol):
    """What `verify_options` needs: `commcomp.comm.Collectives` and Horovod's collectives have it."""

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...


class RootChecks(Protocol):
    """What `verify_options_with_root` needs (a gossip `Transport` has it)."""

    rank: int
    world_size: int

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------- options


def options_text(options: dict[str, Any]) -> str:
    """The canonical text of an options dict (sorted keys; non-JSON values by `str`)."""
    return json.dumps(options, sort_keys=True, default=str)


def options_digest(options: dict[str, Any]) -> int:
    """The options' fingerprint: the first 7 bytes of SHA-256 of `options_text` (fits an int64)."""
    return int.from_bytes(hashlib.sha256(options_text(options).encode()).digest()[:7], "little")


def check_saved_options(owner: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ValueError naming the differing keys if a checkpoint's options are not `current`'s
    (compared as their canonical text, so tuples and lists, or dtypes and their names, agree)."""
    mine, theirs = json.loads(options_text(current)), json.loads(options_text(saved))
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(f"{owner}.load_state_dict: the state was saved with different options {diff}")


def world_size_error(owner: str, saved: int, current: int) -> ValueError:
    """The error a plain `load_state_dict` raises for a state saved at another world size."""
    return ValueError(
        f"{owner}: this state was saved at world size {saved}, but this job has {current} ranks; per-rank "
        "states cannot be loaded one to one at another world size. Save with commcomp.elastic.save(obj, path) "
        "(every rank's state in one file) and load with commcomp.elastic.load(obj, path), which splits it "
        "for the new world size"
    )


def _differ(owner: str, odd: list[int], options: dict[str, Any]) -> ValueError:
    return ValueError(
        f"{owner}: the options differ across ranks (ranks {odd} differ from rank 0); "
        f"this rank has {options_text(options)}"
    )


def gather_ints(comm: Gathers, values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every rank's `values` (one int64 row each, the same length everywhere), in rank order."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    return [row.tolist() for row in comm.all_gather(mine)]


def verify_options(
    owner: str, options: dict[str, Any], comm: Gathers, device: torch.device, extra: Sequence[int] = ()
) -> int:
    """All-gather `[digest, *extra]` and raise ValueError on every rank if any rank's row differs
    from rank 0's. `owner` names the component in the message. Returns the bytes this rank sent."""
    row = [options_digest(options), *extra]
    table = gather_ints(comm, row, device)
    odd = [r for r, other in enumerate(table) if other != table[0]]
    if odd:
        raise _differ(owner, odd, options)
    return 8 * len(row)  # int64 values


def verify_options_with_root(owner: str, options: dict[str, Any], comm: RootChecks, device: torch.device) -> None:
    """Broadcast rank 0's digest, all-reduce one mismatch flag per rank, and raise ValueError on every
    rank if any rank differs (two small collectives, for transports without all-gather)."""
    digest = options_digest(options)
    root = comm.broadcast(torch.tensor([digest], dtype=torch.int64, device=device), 0)
    flags = torch.zeros(comm.world_size, dtype=torch.int64, device=device)
    flags[comm.rank] = int(int(root.item()) != digest)
    odd = bad_ranks(comm.all_reduce_sum(flags))
    if odd:
        raise _differ(owner, odd, options)


# ----------------------------------------------------------------------------- NaN / Inf flags


def extremes(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The smallest and largest value of each non-empty floating tensor of `tensors`, as 0-dim
    tensors on their own devices (none if there is no such tensor; integers are finite). One pass
    over each: a NaN makes both NaN, an infinity is one of them. Exact, about half the cost of a
    float64 sum and a tenth of an element-wise `isfinite`. Left as they are, so a check read later
    (`HookState.check_finite_at_step_end`) costs nothing more now."""
    return [end for t in tensors if t.is_floating_point() and t.numel() for end in torch.aminmax(t.detach())]


def joined(values: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-dim `values` (not empty) in one tensor on `device`. `torch.stack` widens mixed dtypes (bool,
    16-bit, fp32, fp64) to the widest among them, which holds every value exactly: a finite value
    stays finite, a flag stays 0 or 1."""
    return torch.stack([v.to(device) for v in values])


def nonfinite_flag(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A 0-dim bool tensor, True if any of `tensors` holds a NaN or an infinity; None if none of
    them is a non-empty floating tensor (`extremes`). The flag stays on the first tensor's device:
    nothing is read back to the host, so a GPU's queue does not stall for it (`flag_slots` writes it
    into a buffer as it is)."""
    ends = extremes(tensors)
    return torch.isfinite(joined(ends, ends[0].device)).all().logical_not() if ends else None


def has_nonfinite(tensors: Sequence[torch.Tensor]) -> bool:
    """True if any of `tensors` holds a NaN or an infinity: their extremes (`extremes`), read on
    the host at once."""
    ends = extremes(tensors)
    return bool(ends) and not all(map(math.isfinite, joined(ends, ends[0].device).tolist()))


Flag = bool | torch.Tensor | None  # a rank's NaN/Inf flag: on the host, or as `nonfinite_flag` gives it


def write_flags(slots: torch.Tensor, bad: Flag, rank: int) -> torch.Tensor:
    """Fill `slots` (one per rank) with 0, and 1 in this rank's slot if `bad` (a tensor flag is
    copied as it is, without reading it on the host); returns `slots`."""
    slots.zero_()
    if isinstance(bad, torch.Tensor):
        slots[rank] = bad
    elif bad:
        slots[rank] = 1
    return slots


def flag_slots(bad: Flag, rank: int, world_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One slot per rank, 1 in this rank's slot if `bad`: appended to a summed buffer, so after the
    sum every rank knows which ranks were bad."""
    return write_flags(torch.empty(world_size, dtype=dtype, device=device), bad, rank)


def bad_ranks(flags: torch.Tensor) -> list[int]:
    """The ranks whose flag is set (summed slots, or one gathered flag per rank)."""
    return [int(r) for r in torch.nonzero(flags).flatten().tolist()]


# ----------------------------------------------------------------------------- sums alike everywhere


def sum_in_order(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum in list (rank) order into a new tensor, so every rank gets bitwise the same result."""
    out = tensors[0].clone()
    for t in tensors[1:]:
        out += t
    return out
