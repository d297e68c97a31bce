"""A restartable commcomp training job: DDP + GradiVeQ (tracked basis, error feedback) on MNIST-1D, with checkpoints.

    torchrun --max-restarts 1 ... benchmarks/train_ckpt.py --dir DIR [--steps 32] [--every 8]
                                                          [--step-delay S] [--timeout S]

Every rank trains the same 1-D CNN (benchmarks.data.CNN1D) on its own deterministic batch for each
step: the examples of its shard picked by a generator seeded with (step, rank), so a step computes
the same thing whether or not the job was restarted before it. GradiVeQ compresses every step after
two warm-up steps, and its bases and residuals change at every step.

Every `--every` steps the job checkpoints into DIR, atomically (a temporary file, then os.replace):
  ckpt-<step>.rank<r>.pt   rank r's model, optimizer, step and GradiVeQ hook state (the error-feedback
                           residuals differ per rank, so each rank keeps its own); the two newest stay
  latest                   the step of the newest checkpoint that every rank finished writing,
                           written by rank 0 after a barrier
On start, a rank that finds `latest` loads its own file of that step and continues from there.
Restarts may hand out ranks differently (torchrun's c10d rendezvous); everything is keyed by rank,
so that does not matter. At the end each rank writes its parameters to DIR/final.rank<r>.pt.

Prints `START rank r attempt a pid p resume s`, `STEP step rank r attempt a pid p` after each
step and `CKPT step` (rank 0) when a checkpoint is complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

if __package__ in (None, ""):  # run as a script: make `benchmarks`, `commcomp` and `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import commcomp
from benchmarks.data import CNN1D, load_mnist1d, shard
from launch.dist import finish, init_from_env

__all__ = ["atomic_save", "latest_step", "main"]

SCHEDULE: dict[str, Any] = dict(warmup_steps=2)
BATCH = 32


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file next to `path`, then rename: a reader sees all or nothing."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def latest_step(directory: Path) -> int | None:
    """The step of the newest complete checkpoint in `directory`, or None if there is none."""
    marker = directory / "latest"
    return int(marker.read_text()) if marker.exists() else None


def _batch(x: torch.Tensor, y: torch.Tensor, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100_003 * step + rank)
    idx = torch.randint(0, x.shape[0], (BATCH,), generator=g)
    return x[idx], y[idx]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="checkpoint and output directory (shared)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--every", type=int, default=8, help="checkpoint every this many steps")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--timeout", type=float, default=None)
    opts = parser.parse_args()
    if opts.steps < 1 or opts.every < 1:
        raise ValueError(f"--steps and --every must be >= 1, got {opts.steps} and {opts.every}")
    torch.set_num_threads(1)
    info = init_from_env(timeout=opts.timeout)
    rank, attempt, pid = info.rank, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), os.getpid()
    opts.dir.mkdir(parents=True, exist_ok=True)

    x, y, _, _ = load_mnist1d()
    xs, ys = shard(x, y, rank, info.world_size)
    xs, ys = xs.to(info.device), ys.to(info.device)
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    net = CNN1D(channels=32).to(info.device)
    ddp = DDP(net)
    state = commcomp.register(ddp, "gradiveq", **SCHEDULE)
    if not isinstance(state, commcomp.GradiVeQState):
        raise TypeError(f"expected a GradiVeQState from commcomp.register, got {type(state).__name__}")
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    start = latest_step(opts.dir) or 0
    if start:
        ckpt = torch.load(opts.dir / f"ckpt-{start}.rank{rank}.pt", map_location=info.device, weights_only=False)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        state.load_state_dict(ckpt["hook"])
        if ckpt["step"] != start or state.step != start:
            raise RuntimeError(f"checkpoint of step {start} holds step {ckpt['step']} (hook step {state.step})")
    print(f"START rank {rank} attempt {attempt} pid {pid} resume {start}", flush=True)

    for step in range(start, opts.steps):
        bx, by = _batch(xs, ys, rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(bx), by).backward()
        opt.step()
        print(f"STEP {step + 1} rank {rank} attempt {attempt} pid {pid}", flush=True)
        done = step + 1
        if done % opts.every == 0 and done < opts.steps:
            ckpt = {"model": net.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict(), "step": done}
            atomic_save(ckpt, opts.dir / f"ckpt-{done}.rank{rank}.pt")
            torch.distributed.barrier()  # every rank's file is on disk before `latest` names the step
            if rank == 0:
                marker = opts.dir / "latest"
                tmp = marker.with_name(f"latest.tmp{pid}")
                tmp.write_text(str(done))
                os.replace(tmp, marker)
                print(f"CKPT {done}", flush=True)
            # `latest` names `done - every` or later by now on every rank: older files are unused
            (opts.dir / f"ckpt-{done - 2 * opts.every}.rank{rank}.pt").unlink(missing_ok=True)
        if opts.step_delay > 0:
            time.sleep(opts.step_delay)

    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).cpu()
    atomic_save(
        {"params": params, "compressed_layers": sum(t is not None for t in state.layers.values())},
        opts.dir / f"final.rank{rank}.pt",
    )
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
