"""PQASGD's pure parts: which parameters it averages, and its update rules as tensor code.

Nothing here communicates: `commcomp.pqasgd.averager.PQASGD` hands what these functions build to
the collectives and feeds them what comes back. Every rank runs them on the same gathered data in
the same order, so after a synchronisation the models are bitwise identical.

Notation (Jiang & Agrawal, NeurIPS 2018): x_i this rank's parameters, x_bar the last synchronised
model, Q the quantizer, M the number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from commcomp.consistency import sum_in_order
from commcomp.quantizers import Payload, Quantizer, StochasticQuantizer
from commcomp.quantizers.sparse import RandK

__all__ = [
    "apply_mean_change",
    "check_int",
    "encode_changes",
    "floating_params",
    "sample_coordinates",
    "write_coordinates",
]

Tensors = Sequence[torch.Tensor]


# ----------------------------------------------------------------------------- quantized averaging


def encode_changes(q: Quantizer, names: Sequence[str], params: Tensors, x_bar: Tensors) -> list[Payload]:
    """Q(x_i - x_bar) for every parameter (a stochastic quantizer draws from the parameter's own stream)."""
    payloads = []
    for name, p, xb in zip(names, params, x_bar):
        if isinstance(q, StochasticQuantizer):
            q.set_stream(name)
        payloads.append(q.compress(p.detach() - xb))
    return payloads


def apply_mean_change(q: Quantizer, per_rank: Sequence[list[Payload]], params: Tensors, x_bar: Tensors) -> None:
    """x_bar <- x_bar + mean_m Q(delta_m), then x_i <- x_bar, for every parameter (in place).

    `per_rank[m]` holds rank m's payloads, one per parameter; they are decoded and summed in rank
    order, so every rank computes the same bits.
    """
    for i, (p, xb) in enumerate(zip(params, x_bar)):
        mean = sum_in_order([q.decompress(ps[i]) for ps in per_rank]).div_(len(per_rank))
        xb.add_(mean.to(xb.dtype))
        p.copy_(xb)


# ----------------------------------------------------------------------------- sparse averaging


def sample_coordinates(sampler: RandK, names: Sequence[str], params: Tensors) -> list[Payload]:
    """The coordinates averaged this time and their values on this rank, per parameter. Each
    parameter has its own stream of a generator seeded alike on every rank, so all ranks pick alike."""
    payloads: list[Payload] = []
    for name, p in zip(names, params):
        sampler.set_stream(name)
        payloads.append(sampler.compress(p.detach()))
    return payloads


def write_coordinates(params: Tensors, x_bar: Tensors, payloads: list[Payload], values: Tensors) -> None:
    """Write the averaged `values` into the sampled coordinates of x_i and x_bar (in place); the other
    coordinates stay local."""
    for p, xb, pl, chosen in zip(params, x_bar, payloads, values):
        idx = pl.meta["indices"]
        p.view(-1)[idx] = chosen
        xb.view(-1)[idx] = chosen


# ----------------------------------------------------------------------------- arguments


def check_int(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def floating_params(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """The names and parameters PQASGD averages: the model's floating-point ones, on one dtype and device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"PQASGD expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("PQASGD replaces DDP's gradient averaging: pass the plain model, not a DDP wrapper")
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    params = [p for _, p in named]
    if not params:
        raise ValueError("PQASGD: the model has no floating-point parameters")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise TypeError(
            f"PQASGD needs every parameter on one dtype and device, got {sorted(map(str, dtypes))} "
            f"on {sorted(map(str, devices))}"
        )
    return [n for n, _ in named], params
