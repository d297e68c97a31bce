"""Communication for expert parallelism: a peer check, the split-size exchange, and an all-to-all
whose backward is the reverse all-to-all.

Every helper here is called in the same order on every rank. Sizes are exchanged before any
payload moves, so ranks that disagree (a different number of experts, model width or payload
dtype, or bad input on one rank) all raise a ValueError instead of hanging inside the collective.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from commcomp.comm import TorchCollectives
from commcomp.consistency import gather_ints
from commcomp.stats import CommStats

__all__ = [
    "Route",
    "all_to_all",
    "check_peers",
    "decode_payload",
    "encode_payload",
    "exchange_counts",
    "group_rank_and_size",
]

# dtypes a payload may have; their index is what ranks compare
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process_group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _sent(stats: CommStats, tensor: Tensor, group: dist.ProcessGroup | None, splits: list[int], dense: Tensor) -> None:
    """Count an all-to-all of `tensor`'s rows (`splits` per rank); the rows kept for this rank do not
    cross the network. `dense`: what would have been sent without payload compression."""
    rank, world = group_rank_and_size(group)
    nbytes = tensor.numel() * tensor.element_size()
    rows = sum(splits)
    wire = nbytes * (rows - splits[rank]) / rows if rows else 0.0
    dense_bytes = dense.numel() * dense.element_size()
    stats.sent(nbytes, dense_bytes, kind="alltoall", world_size=world, wire=wire, dense_kind="alltoall")


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
    comm = TorchCollectives(group)
    table = gather_ints(comm, [int(problem is not None), *fields.values()], device)  # (W, 1 + fields)
    stats.sent(comm.bytes_sent, comm.bytes_sent, kind="allgather", world_size=comm.world_size, dense_kind="allgather")
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
    _sent(stats, send_counts, group, [send_counts.shape[1]] * send_counts.shape[0], send_counts)
    return recv_counts


# fp16 chunks are scaled by a power of two so that their largest magnitude lands in (2^13, 2^14]
FP16_TOP_EXPONENT = 14


def _chunk_ids(splits: list[int], device: torch.device) -> Tensor:
    """(rows,) index of the chunk each row belongs to."""
    sizes = torch.tensor(splits, device=device)
    return torch.arange(len(splits), device=device).repeat_interleave(sizes)


def _header_rows(splits: list[int], device: torch.device) -> Tensor:
    """Where each chunk's header row sits in a wire buffer whose chunk j has splits[j] + 1 rows."""
    sizes = torch.tensor(splits, device=device) + 1
    return sizes.cumsum(0) - sizes


def encode_payload(x: Tensor, splits: list[int], dtype: torch.dtype | None) -> tuple[Tensor, list[int]]:
    """The wire buffer for x's rows split as `splits`, and its splits.

    None: x itself. bfloat16: a plain cast (it has float32's range). float16: every chunk j gets a
    header row holding an exponent e_j and carries x·2^e_j, which puts the chunk's largest
    magnitude just under 2^14, so small values (gradients, typically) stay out of fp16's
    subnormal range and large ones cannot overflow.
    """
    if dtype is None:
        return x.contiguous(), splits
    if dtype != torch.float16:
        return x.to(dtype).contiguous(), splits
    rows = x.float().flatten(1)  # (T, D)
    chunk = _chunk_ids(splits, x.device)  # (T,)
    amax = rows.new_zeros(len(splits)).scatter_reduce(0, chunk, rows.abs().amax(1), "amax")
    exponent = (FP16_TOP_EXPONENT - torch.log2(amax)).floor()
    exponent = torch.where(torch.isfinite(exponent), exponent, 0.0).clamp(-100, 100)  # (W,)
    wire = rows.new_empty((rows.shape[0] + len(splits), rows.shape[1]))
    header = _header_rows(splits, x.device)
    wire[header] = exponent.unsqueeze(1).expand(-1, rows.shape[1])
    wire[torch.arange(rows.shape[0], device=x.device) + chunk + 1] = rows * torch.exp2(exponent)[chunk].unsqueeze(1)
    return wire.to(dtype).view(-1, *x.shape[1:]), [n + 1 for n in splits]


def decode_payload(wire: Tensor, splits: list[int], dtype: torch.dtype | None, out_dtype: torch.dtype) -> Tensor:
    """Inverse of `encode_payload`: the rows (splits[j] of them from chunk j) in `out_dtype`."""
    if dtype != torch.float16:
        return wire.to(out_dtype)
    rows = wire.flatten(1).float()
    header = _header_rows(splits, wire.device)
    chunk = _chunk_ids(splits, wire.device)
    data = rows[torch.arange(chunk.numel(), device=wire.device) + chunk + 1]
    scale = torch.exp2(-rows[header, 0])[chunk].unsqueeze(1)
    return (data * scale).to(out_dtype).view(-1, *wire.shape[1:])


@dataclass(frozen=True)
class Route:
    """One uneven all-to-all: rows `send_splits[j]` go to rank j, `recv_splits[j]` come from it.

    payload_dtype: the wire dtype (None: the input's own; float16 chunks are scaled, see
    `encode_payload`). stats: where the bytes handed to the collective are counted.
    """

    send_splits: list[int]
    recv_splits: list[int]
    group: dist.ProcessGroup | None
    payload_dtype: torch.dtype | None
    stats: CommStats

    def reversed(self) -> Route:
        """The same exchange the other way round (what the backward, or the combine, sends)."""
        return replace(self, send_splits=self.recv_splits, recv_splits=self.send_splits)


class _AllToAll(torch.autograd.Function):
    """x's rows travel along `route`; the backward sends the gradients along `route.reversed()`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, route: Route, ends_step: bool) -> Tensor:
        ctx.route = route
        ctx.ends_step = ends_step
        payload, wire_send = encode_payload(x, route.send_splits, route.payload_dtype)
        wire_recv = route.recv_splits if wire_send is route.send_splits else [n + 1 for n in route.recv_splits]
        out = payload.new_empty((sum(wire_recv), *payload.shape[1:]))
        dist.all_to_all_single(out, payload, wire_recv, wire_send, group=route.group)
        _sent(route.stats, payload, route.group, wire_send, x)
        return decode_payload(out, route.recv_splits, route.payload_dtype, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out = _AllToAll.apply(grad, ctx.route.reversed(), False)
        if ctx.ends_step:  # the last collective of a training step
            ctx.route.stats.end_step()
        return (out, None, None)


def all_to_all(x: Tensor, route: Route, ends_step: bool = False) -> Tensor:
    """Differentiable `all_to_all_single` of the rows of x with uneven splits, along `route`.

    The payload is cast to `route.payload_dtype` for the wire and back to x's dtype on arrival, in
    both directions. Bytes handed to the collective are added to `route.stats`; when `ends_step`,
    the backward closes the step in `route.stats` (`end_step()`).
    """
    return _AllToAll.apply(x, route, ends_step)
