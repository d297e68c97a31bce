"""A DDP job with the "auto" method whose network turns slow mid-run (run by torchrun for
tests/test_auto_cluster.py).

    torchrun ... tests/auto_cluster_worker.py --dir DIR [--probe-every 2] [--measure-steps 2]

1. Trains until the first plan exists, sets every bucket of it to fp32, with fp32's predicted time
   and bytes (a fast link's plan: on a busy 2-core machine the unshaped link's own plan is a close
   call between the candidates, and a plan that is already the slow link's would leave nothing to
   re-plan), trains on up to the step where the next measuring round starts, and prints the plan
   as `RESULT {"rank": r, "phase": "before", "plan": {...}}`.
2. Prints WAITING; rank 0 waits for the file DIR/go (the test reshapes the links, then creates it)
   while a barrier holds the other ranks.
3. Trains through that measuring round (its check of the network fails on the slowed link, so it
   starts over at the next step with a full probe, and plans again at its end) and prints the plan
   again (phase "after").

Every rank stops at the same step: the plan appears at the same step on every rank, and
`next_round` is the same everywhere. The model is an MLP of about 1.6M parameters (6.3 MB of fp32
gradients): big enough that a 16-bit exchange takes seconds on a slow link, small enough to train
on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `launch` lives next to `commcomp`
    sys.path.insert(0, str(ROOT))

import commcomp  # noqa: E402
from commcomp.auto import AutoState  # noqa: E402
from commcomp.auto.plan import Choice  # noqa: E402
from launch.dist import finish, init_from_env  # noqa: E402

INPUTS, WIDTH, CLASSES, BATCH = 512, 1024, 10, 32


def build() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP checks this)
    layers = [nn.Linear(INPUTS, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, CLASSES)]
    return nn.Sequential(*layers)


def train_step(ddp: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x, y = torch.randn(BATCH, INPUTS, generator=gen), torch.randint(CLASSES, (BATCH,), generator=gen)
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    opt.step()


def report(rank: int, phase: str, plan: dict[str, Any]) -> None:
    print("RESULT " + json.dumps({"rank": rank, "phase": phase, "plan": plan}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--probe-every", type=int, default=2)
    parser.add_argument("--measure-steps", type=int, default=2)
    parser.add_argument("--candidates", default="", help="comma-separated (default: auto's own)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds rank 0 waits for DIR/go")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    info = init_from_env(timeout=90)
    net = build()
    ddp = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    chosen = {"candidates": opts.candidates.split(",")} if opts.candidates else {}
    options = {
        "probe_every": opts.probe_every,
        "measure_steps": opts.measure_steps,
        "planning_share": None,
    }  # every round, as due
    state = commcomp.register(ddp, "auto", **options, **chosen)
    assert isinstance(state, AutoState)

    while not state.plan()["buckets"]:
        if state.step > 10 * opts.measure_steps:
            raise RuntimeError(f"no plan after {state.step} steps")
        train_step(ddp, opt, info.rank, state.step)
    saved = state.state_dict()
    # fp32 with its own predicted time and bytes (the test compares the bytes before and after)
    saved["choices"] = [
        {"params": entry["params"], **Choice.from_dict(entry).switched("fp32", "set by the test").as_dict()}
        for entry in saved["choices"]
    ]
    saved["verify"] = None  # no timed check of the measured plan
    state.load_state_dict(saved)
    slow_round = state.plan()["next_round"]
    while state.step < slow_round:
        train_step(ddp, opt, info.rank, state.step)
    report(info.rank, "before", state.plan())

    print(f"WAITING rank {info.rank}", flush=True)
    if info.rank == 0:
        go, deadline = opts.dir / "go", time.monotonic() + opts.wait
        while not go.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{go} did not appear within {opts.wait} s")
            time.sleep(0.05)
    dist.barrier()

    while state.plan()["rounds"][-1]["step"] < slow_round:  # the round's own record, once it closed
        if state.step > slow_round + 10 * opts.measure_steps:
            raise RuntimeError(f"no measuring round closed between steps {slow_round} and {state.step}")
        train_step(ddp, opt, info.rank, state.step)
    report(info.rank, "after", state.plan())
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
