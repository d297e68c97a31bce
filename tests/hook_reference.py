"""What the quantizer-hook tests share: a hook that records the order it saw parameters in, the
batches, the plain reference gradients of every rank, and the per-rank quantizers that simulate
every rank's compression."""

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from commcomp import quantizers
from commcomp.hooks.quantized import QuantizerState, quantizer_hook

ORDER: list[str] = []  # parameter keys in the order the hook compressed them (this process)
BUCKETS: set[int] = set()


# no `from __future__ import annotations` here: DDP checks this hook's annotations as real types
def recording_hook(state: QuantizerState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """`quantizer_hook`, noting the bucket and its parameters' keys in ORDER and BUCKETS."""
    BUCKETS.add(bucket.index())
    ORDER.extend(state.param_key(p) for p in bucket.parameters())
    return quantizer_hook(state, bucket)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)


def rank_quantizers(name: str, options: dict[str, Any], world: int) -> list[Any]:
    """One quantizer per rank, each told its rank (as the hook tells its own)."""
    qs = [quantizers.get(name, **options) for _ in range(world)]
    for r, q in enumerate(qs):
        if hasattr(q, "set_rank"):
            q.set_rank(r)
    return qs


def everyone_grads(ref: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Every rank's plain local gradients of `ref` (all-gathered with torch.distributed), by name."""
    named = list(ref.named_parameters())
    flat = torch.cat([p.grad.reshape(-1) for _, p in named])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    sizes = [p.numel() for _, p in named]
    return [{k: v.view_as(p) for (k, p), v in zip(named, t.split(sizes))} for t in everyone]


def same_on_all_ranks(model: nn.Module) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(t, everyone[0]) for t in everyone)
