"""Evaluate the consensus model: the average of every rank's model, without touching training."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from commcomp.comm import Collectives, TorchCollectives
from commcomp.flat import flatten, unflatten
from commcomp.gossip.transport import Transport

__all__ = ["consensus_model"]


@torch.no_grad()
def consensus_model(model: nn.Module, comm: Transport | Collectives | dist.ProcessGroup | None = None) -> nn.Module:
    """A deep copy of `model` whose floating parameters and buffers are the average over all ranks.

    One all-reduce of every floating tensor, packed into one float64 buffer (a collective: call it
    on every rank). `comm`: a gossip transport, a `commcomp.comm.Collectives`, a process group or
    None (the whole world). The training model, its optimizer and gossip state are not modified.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if comm is None or isinstance(comm, dist.ProcessGroup):
        comm = TorchCollectives(comm)
    copy_ = copy.deepcopy(model)
    tensors = [t for t in (*copy_.parameters(), *copy_.buffers()) if t.is_floating_point()]
    if not tensors:
        return copy_
    flat = comm.all_reduce_sum(flatten([t.detach() for t in tensors], torch.float64)) / comm.world_size
    for t, mean in zip(tensors, unflatten(flat, [t.shape for t in tensors])):
        t.copy_(mean)
    return copy_
