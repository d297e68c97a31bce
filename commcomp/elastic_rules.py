"""The per-kind rules of `commcomp.elastic.load`: every old rank's state -> this rank's at the new size.

Each rule builds an ordinary state dict for the new world size and hands it to the object's own
`load_state_dict`, so the objects keep one loading path; see `commcomp.elastic` for the rules'
reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from commcomp.consistency import sum_in_order
from commcomp.gossip.base import GossipAlgorithm
from commcomp.hooks.base import HookState
from commcomp.pqasgd import PQASGD

__all__ = ["apply", "split_residuals"]

Records = list[dict[str, Any]]


def apply(target: Any, records: Records) -> None:
    """Load `records` (one per old rank, in rank order) into `target` at its world size."""
    if isinstance(target, GossipAlgorithm):
        _gossip(target, records)
    elif isinstance(target, PQASGD):
        _pqasgd(target, records)
    elif isinstance(target, HookState):
        _hook(target, records)
    else:
        raise TypeError(f"commcomp.elastic has no resize rule for {type(target).__name__}")


def split_residuals(residuals: list[dict[str, torch.Tensor] | None], new_world: int, summed: bool) -> dict[str, Any]:
    """Old ranks' error-feedback residuals -> one new rank's: their sum split so that the owed update
    is preserved (sum / new_world for summed g/N shares, sum / old_world for averaged gradients)."""
    present = [r for r in residuals if r]
    keys = sorted({k for r in present for k in r})
    divisor = new_world if summed else len(residuals)
    out = {}
    for key in keys:
        out[key] = sum_in_order([r[key] for r in present if key in r]) / divisor
    return out


def _rederive(quantizer: Any, rank: int) -> None:
    """Per-rank random streams restart from the seed and the new rank (shared streams are kept)."""
    if quantizer is not None and hasattr(quantizer, "set_rank"):
        quantizer.set_rank(rank)


def mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean, summed in rank order (so every rank computes the same bits)."""
    return sum_in_order(tensors) / len(tensors)


@torch.no_grad()
def _average_params(params: Sequence[torch.Tensor], records: Records) -> None:
    for k, p in enumerate(params):
        p.copy_(mean([r["params"][k] for r in records]).to(p.device, p.dtype))


def _hook(state: HookState, records: Records) -> None:
    saved = [r["state"] for r in records]
    new = {**saved[0], "world_size": state.world_size}
    if saved[0].get("residuals") is not None:
        residuals = [s.get("residuals") for s in saved]
        new["residuals"] = split_residuals(residuals, state.world_size, state.residuals_summed)
    state.load_state_dict(new)
    for quantizer in state.volatile():  # every quantizer that draws random numbers, nested ones included
        _rederive(quantizer, state.rank)


def _pqasgd(avg: PQASGD, records: Records) -> None:
    _average_params(avg.params, records)
    avg.load_state_dict({**records[0]["state"], "world_size": avg.comm.world_size})
    _rederive(avg.quantizer, avg.comm.rank)


def _gossip(algo: GossipAlgorithm, records: Records) -> None:
    saved = [r["state"] for r in records]
    mine = {k: v for k, v in algo.options().items() if k != "world_size"}
    theirs = {k: v for k, v in saved[0]["options"].items() if k != "world_size"}
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(f"{type(algo).__name__}: the checkpoint was saved with different options {diff}")
    _average_params(algo.params, records)
    averaged = {key: [mean([s["buffers"][key][name] for s in saved]) for name in algo.names] for key in algo.buffers}
    buffers = algo.resized_buffers([p.detach() for p in algo.params], averaged)
    named = {key: dict(zip(algo.names, tensors)) for key, tensors in buffers.items()}
    algo.load_state_dict({**saved[0], "options": algo.options(), "buffers": named})
    _rederive(algo.quantizer, algo.rank)
