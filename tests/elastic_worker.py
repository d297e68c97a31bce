"""A job that continues at another world size from a `commcomp.elastic` checkpoint (run by torchrun).

    torchrun ... tests/elastic_worker.py --dir DIR --from-step S --to-step T [--resume-from OLD]

DDP on a small MLP with 2-bit QSGD and error feedback (so every rank owes something). With
--resume-from the job loads OLD/elastic.pt (the hook state of every rank of the previous job,
whatever its size) with `commcomp.elastic.load`, and OLD/model.pt (rank 0's model and optimizer).
It trains steps S..T-1 (batches chosen by (rank, step)), then saves DIR/elastic.pt and DIR/model.pt
and writes DIR/out.rank<r>.pt: the world size, the residuals right after loading, the parameters.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `launch` lives next to `commcomp`
    sys.path.insert(0, str(ROOT))

import commcomp  # noqa: E402
from commcomp import elastic  # noqa: E402
from launch.dist import finish, init_from_env  # noqa: E402

OPTIONS = {"bits": 2, "error_feedback": True}


def build() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def residuals(state: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in (state.state_dict().get("residuals") or {}).items()}


def job(rank: int, world_size: int, directory: str, start: int, stop: int, resume_from: str | None) -> torch.Tensor:
    """The job's work once torch.distributed is up (also run by tests/harness.py as a reference)."""
    out_dir = Path(directory)
    net = build()
    ddp = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    state = commcomp.register(ddp, "qsgd", **OPTIONS)
    loaded: dict[str, torch.Tensor] = {}
    if resume_from is not None:
        saved = torch.load(Path(resume_from) / "model.pt", weights_only=False)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        elastic.load(state, Path(resume_from) / "elastic.pt")
        loaded = residuals(state)
    print(f"START rank {rank} of {world_size} at step {start}", flush=True)
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(1000 * rank + step)
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen) + rank
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        opt.step()
    elastic.save(state, out_dir / "elastic.pt")
    if rank == 0:
        tmp = out_dir / f"model.pt.tmp{os.getpid()}"
        torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp)
        os.replace(tmp, out_dir / "model.pt")
    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.save({"world_size": world_size, "loaded": loaded, "params": params}, out_dir / f"out.rank{rank}.pt")
    print(f"DONE rank {rank} of {world_size}", flush=True)
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--from-step", type=int, required=True)
    parser.add_argument("--to-step", type=int, required=True)
    parser.add_argument("--resume-from", type=Path, default=None)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    info = init_from_env(timeout=60)
    opts.dir.mkdir(parents=True, exist_ok=True)
    resume = None if opts.resume_from is None else str(opts.resume_from)
    job(info.rank, info.world_size, str(opts.dir), opts.from_step, opts.to_step, resume)
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
