"""GradiVeQ's collectives: fit each layer's basis on one rank and share it with every rank.

Blocking collectives on a `commcomp.comm.Collectives`, called from the hook body (DDP) or at the
start of a Horovod step, in the same order on every rank.
"""

from __future__ import annotations

from typing import Protocol

import torch

from commcomp.comm import Collectives
from commcomp.gradiveq.codec import LayerCodec

__all__ = ["FitOptions", "refit_bases"]


class FitOptions(Protocol):
    @property
    def energy_threshold(self) -> float: ...

    @property
    def max_components(self) -> int | None: ...


def refit_bases(
    codecs: list[LayerCodec], comm: Collectives, src: int, options: FitOptions, device: torch.device
) -> None:
    """Fit every codec's basis on rank `src`, broadcast (d, energy, U, mu) to all ranks, and check that
    every rank holds the same bits (an all-gathered checksum); raise on every rank if not.

    Every rank must call this with the same codecs in the same order (their sample counts agree
    because the sampled gradients were the all-reduced ones). Bases travel as float32, the precision
    compression computes in, and every rank (src included) keeps that rounded copy.
    """
    codecs = [c for c in codecs if c.count >= 2]
    if not codecs:
        return
    is_src = comm.rank == src
    fits = [c.fit(options.energy_threshold, options.max_components) for c in codecs] if is_src else []
    if not is_src:
        for c in codecs:
            c.reset()
    dims = torch.tensor([u.shape[1] for u, _ in fits] if is_src else [0] * len(codecs), device=device)
    dims = comm.broadcast(dims, src)
    sizes = [c.plan.K * (int(d) + 1) for c, d in zip(codecs, dims)]
    if is_src:
        energies = torch.tensor([c.energy for c in codecs], dtype=torch.float64)
        flat = torch.cat([energies, *[torch.cat([u.reshape(-1), mu]) for u, mu in fits]])
        flat = flat.to(device=device, dtype=torch.float32)
    else:
        flat = torch.empty(len(codecs) + sum(sizes), dtype=torch.float32, device=device)
    flat = comm.broadcast(flat, src)
    energies, *blocks = flat.split([len(codecs), *sizes])
    for c, d, e, block in zip(codecs, dims.tolist(), energies.tolist(), blocks):
        k = c.plan.K
        c.set_basis(block[: k * d].view(k, d).double(), block[k * d :].double(), e)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=device).remainder_(9973)
    checksum = (flat.double() * weights).sum().reshape(1)
    everyone = comm.all_gather(checksum)
    odd = [r for r, t in enumerate(everyone) if not torch.equal(t, everyone[src])]
    if odd:
        raise RuntimeError(f"GradiVeQ bases differ on ranks {odd} from rank {src} after the broadcast; stopping")
