"""Checkpoints of compressor state that can be loaded at another world size.

A job restarted on more or fewer nodes (torchrun `--nnodes MIN:MAX`, or a restart on other hosts)
cannot load per-rank files one to one: there are more or fewer ranks than files, and some state is
owed by one rank only. `save(obj, path)` gathers every rank's state into one file (a collective:
call it on every rank; rank 0 writes), and `load(obj, path)`, called on every rank of the new job,
turns it into this rank's state at the new world size with one rule per kind of state:

- error-feedback residuals (DDP hooks, Horovod): what compression still owes the model. The old
  residuals are summed and split evenly over the new ranks, so the owed update is preserved: for
  summed payloads (g/N shares: fp16, random-k, GradiVeQ) each new rank gets sum / M; for averaged
  payloads (qsgd, topk, sign: each rank's gradient decoded and averaged) each gets sum / N, so the
  owed average (1/M) * M * sum / N equals the old (1/N) * sum.
- GradiVeQ bases and statistics, step counters, schedules, stats: identical on every rank (they come
  from all-reduced or broadcast data), so rank 0's are used.
- quantizer random streams: re-derived from the seed and the *new* rank (streams shared by every
  rank, such as random-k's coordinates, continue from rank 0's state).
- PQASGD and the gossip algorithms (every rank holds its own model): every new rank's parameters
  become the average of the old ranks' parameters, which keeps the network average. PQASGD keeps
  its last synchronised model (shared). Gossip replicas and public copies become the average of the
  old ones, and the neighbour sums are recomputed for the new topology from it.

A plain `load_state_dict` of a state saved at another world size raises a ValueError naming
these functions. The model's and optimizer's own state dicts are the caller's: save rank 0's (PQASGD
and gossip overwrite the parameters with the average on `load`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from commcomp.elastic_rules import apply
from commcomp.gossip.base import GossipAlgorithm
from commcomp.pqasgd import PQASGD

__all__ = ["FORMAT", "gather", "load", "save"]

FORMAT = "commcomp-elastic/1"


# ----------------------------------------------------------------------------- what is saved


def _target(obj: Any) -> Any:
    """The object whose state is saved: a gossip DDP state's algorithm, a Horovod optimizer's
    compression state, or `obj` itself."""
    for name in ("algorithm", "comm_state"):
        inner = getattr(obj, name, None)
        if inner is not None:
            return inner
    return obj


def _averages_models(obj: Any) -> bool:
    return isinstance(obj, (GossipAlgorithm, PQASGD))


def _record(obj: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"state": obj.state_dict()}
    if _averages_models(obj):
        record["params"] = [p.detach().cpu().clone() for p in obj.params]
    return record


def _all_gather_bytes(obj: Any, data: bytes) -> list[bytes]:
    """Every rank's `data`, in rank order, over the object's own transport."""
    comm = getattr(obj, "transport", None) or getattr(obj, "comm", None)
    if comm is None and hasattr(obj, "collectives"):
        comm = obj.collectives()
    if comm is None:
        raise TypeError(f"commcomp.elastic does not know how to reach the other ranks of a {type(obj).__name__}")
    rank, world = comm.rank, comm.world_size
    sizes = torch.zeros(world, dtype=torch.int64)
    sizes[rank] = len(data)
    sizes = comm.all_reduce_sum(sizes)
    longest = int(sizes.max())
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
    if hasattr(comm, "all_gather"):
        rows = comm.all_gather(mine)
    else:  # a gossip transport: sum a (world, longest) table in which each rank fills its own row
        table = torch.zeros(world, longest, dtype=torch.uint8)
        table[rank] = mine
        rows = list(comm.all_reduce_sum(table).unbind(0))
    return [row[: int(n)].cpu().numpy().tobytes() for row, n in zip(rows, sizes.tolist())]


def gather(obj: Any) -> dict[str, Any]:
    """Every rank's state of `obj` in one dict (a collective; every rank gets the whole dict).

    `obj`: a DDP hook state (`commcomp.register`'s result), a `commcomp.horovod.DistributedOptimizer`,
    `PQASGD`, or a gossip algorithm. Put the result into your own checkpoint, or use `save`.
    """
    target = _target(obj)
    buffer = io.BytesIO()
    torch.save(_record(target), buffer)
    records = [torch.load(io.BytesIO(b), weights_only=False) for b in _all_gather_bytes(target, buffer.getvalue())]
    return {"format": FORMAT, "kind": type(target).__name__, "world_size": len(records), "ranks": records}


def save(obj: Any, path: str | os.PathLike[str]) -> None:
    """`gather(obj)` and write it to `path` from rank 0 (atomically: a temporary file, then a rename)."""
    checkpoint = gather(obj)
    if _rank(obj) == 0:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    _barrier(obj)


def _rank(obj: Any) -> int:
    target = _target(obj)
    comm = getattr(target, "transport", None) or getattr(target, "comm", None)
    return int(comm.rank if comm is not None else target.rank)


def _barrier(obj: Any) -> None:
    """Every rank waits until rank 0 has written (one tiny gather)."""
    _all_gather_bytes(_target(obj), b"\0")


# ----------------------------------------------------------------------------- loading


def load(obj: Any, checkpoint: dict[str, Any] | str | os.PathLike[str]) -> None:
    """Load a `gather`/`save` checkpoint into `obj` at this job's world size (call on every rank)."""
    ckpt: dict[str, Any] = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, weights_only=False)
    target = _target(obj)
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"not a commcomp.elastic checkpoint (format {ckpt.get('format')!r})")
    if ckpt["kind"] != type(target).__name__:
        raise ValueError(f"the checkpoint holds a {ckpt['kind']} state, not a {type(target).__name__}")
    apply(target, ckpt["ranks"])
