"""Communication for expert parallelism: a peer check, the split-size exchange, and an all-to-all
whose backward is the reverse all-to-all.

Every helper here is called in the same order on every rank. Sizes are exchanged before any
payload moves, so ranks that disagree (a different number of experts, model width or payload
dtype, or bad input on one rank) all raise a ValueError instead of hanging inside the collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from commcomp.stats import CommStats

__all__ = ["all_to_all", "check_peers", "exchange_counts", "group_rank_and_size"]

# dtypes a payload may have; their index is what ranks compare
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process_group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _sent(stats: CommStats, tensor: Tensor, dense: Tensor | None = None) -> None:
    dense = tensor if dense is None else dense
    stats.sent(tensor.numel() * tensor.element_size(), dense.numel() * dense.element_size())


def check_peers(
    group: dist.ProcessGroup | None,
    fields: dict[str, int],
    problem: Exception | None,
    device: torch.device,
    stats: CommStats,
) -> None:
    """Compare `fields` and input health across ranks; every rank raises together if they differ.

    `problem` is this rank's complaint about its own input (raised as it is on this rank; the other
    ranks raise a ValueError naming this rank), so a bad input on one rank never leaves the others
    waiting in the next collective.
    """
    _, world = group_rank_and_size(group)
    mine = torch.tensor([int(problem is not None), *fields.values()], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    _sent(stats, mine)
    table = torch.stack(everyone).tolist()  # (W, 1 + fields)
    if problem is not None:
        raise problem
    bad = [r for r, row in enumerate(table) if row[0]]
    if bad:
        raise ValueError(f"MoE input was rejected on rank(s) {bad}; see the error raised there")
    differ = []
    for i, name in enumerate(fields, start=1):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            shown = [str(DTYPES[v]) if name == "payload dtype" and 0 <= v < len(DTYPES) else v for v in values]
            differ.append(f"{name}: " + ", ".join(f"rank {r} has {v}" for r, v in enumerate(shown)))
    if differ:
        raise ValueError("MoE layers differ across ranks; " + "; ".join(differ))


def exchange_counts(group: dist.ProcessGroup | None, send_counts: Tensor, stats: CommStats) -> Tensor:
    """send_counts (W, L): rows this rank sends to each local expert of each rank -> (W, L) it receives."""
    send_counts = send_counts.contiguous()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    _sent(stats, send_counts)
    return recv_counts


class _AllToAll(torch.autograd.Function):
    """Rows `send_splits[j]` of x go to rank j; the backward sends the gradients the reverse way."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        group: dist.ProcessGroup | None,
        payload_dtype: torch.dtype | None,
        stats: CommStats,
        ends_step: bool,
    ) -> Tensor:
        ctx.reverse = (recv_splits, send_splits, group, payload_dtype, stats)
        ctx.ends_step = ends_step
        payload = (x if payload_dtype is None else x.to(payload_dtype)).contiguous()
        out = payload.new_empty((sum(recv_splits), *payload.shape[1:]))
        dist.all_to_all_single(out, payload, recv_splits, send_splits, group=group)
        _sent(stats, payload, x)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        out = _AllToAll.apply(grad, *ctx.reverse, False)
        if ctx.ends_step:  # the last collective of a training step
            ctx.reverse[-1].end_step()
        return (out, None, None, None, None, None, None)


def all_to_all(
    x: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup | None,
    payload_dtype: torch.dtype | None,
    stats: CommStats,
    ends_step: bool = False,
) -> Tensor:
    """Differentiable `all_to_all_single` of the rows of x with uneven splits.

    The payload is cast to `payload_dtype` (None: x's own dtype) for the wire and back to x's dtype
    on arrival, in both directions. Bytes handed to the collective are added to `stats`; when
    `ends_step`, the backward closes the step in `stats` (`end_step()`).
    """
    return _AllToAll.apply(x, send_splits, recv_splits, group, payload_dtype, stats, ends_step)
