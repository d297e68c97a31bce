"""Training comparison worker: trains one workload with every method side by side and records the numbers.

Run on every host (one process per host or per GPU), e.g. under torchrun::

    torchrun --nproc-per-node 4 benchmarks/train.py --workloads cnn --methods fp32,gradiveq --out r.json

`benchmarks/run.py` does this on an emulated cluster and prints the table. The methods train in
lockstep: one step of each in turn, the order rotating every step, so a busy spell of the machine
slows every method alike and the ratios between them hold on a shared, noisy machine. Every method
starts from the same initial weights, sees the same batches (per-rank generators seeded identically
for every method) and follows the same learning-rate schedule. Per step it records the wall-clock step time
(forward, backward with its communication, optimizer step), the bytes this rank handed to
collectives and the encode/decode seconds. Every `eval_every` steps it measures the test accuracy
(of the ranks' average model for methods whose ranks hold different models), outside the timed
region: the clock that gives the time to target only runs during training steps, and the ranks
line up (the evaluation's all-reduce) before the next step starts. Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks`, `commcomp` and `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data import accuracy, shard
from benchmarks.methods import METHODS, Setup, setup, unavailable
from benchmarks.workloads import WORKLOADS, Workload, get_workload
from commcomp.stats import sync_device

__all__ = ["MethodRun", "add_method_options", "main", "method_list", "run_workload"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _evaluate(s: Setup, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy over all of (x, y) (of the ranks' average model where they differ), each rank
    scoring its share; a collective, so it also lines the ranks up: no rank's next timed step
    waits for another's evaluation."""
    if s.consensus:
        from commcomp.gossip.consensus import consensus_model

        model = consensus_model(s.model)
    else:
        model = _unwrap(s.model)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = y[rank::world].numel()  # predictions: one per example, or per position
    correct = round(accuracy(model, x[rank::world], y[rank::world]) * mine)
    totals = torch.tensor([correct, mine], dtype=torch.float64)
    dist.all_reduce(totals)  # the ranks' models are identical (or averaged): one score of the whole set
    return float(totals[0] / totals[1])


def _compute_only_step(s: Setup, x: torch.Tensor, y: torch.Tensor, batch: int, gen: torch.Generator) -> float:
    """Median seconds of a training step that communicates nothing (DDP's no_sync: forward, backward,
    optimizer step at learning rate 0), all ranks at once as in training: the least time any
    method's step can take on these cores. Run after the measured steps."""
    assert isinstance(s.model, nn.parallel.DistributedDataParallel)
    for group in s.optimizer.param_groups:
        group["lr"] = 0.0
    times = []
    dist.barrier()
    with s.model.no_sync():
        for _ in range(9):
            idx = torch.randint(len(x), (batch,), generator=gen).to(x.device)
            sync_device(x)
            start = time.perf_counter()
            s.optimizer.zero_grad()
            F.cross_entropy(s.model(x[idx]), y[idx]).backward()
            s.optimizer.step()
            sync_device(x)
            times.append(time.perf_counter() - start)
    dist.barrier()
    return statistics.median(times[1:])


class MethodRun:
    """One method training `workload` for `steps` steps, a step at a time (`step`), and its record
    (`result`). Every method starts from the same initial weights and sees the same batches."""

    def __init__(
        self, name: str, workload: Workload, data: tuple[torch.Tensor, ...], steps: int, options: dict[str, Any]
    ) -> None:
        self.name, self.workload, self.steps = name, workload, steps
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        device = torch.device(options.get("device", "cpu"))
        seed = int(options.get("seed", 0))
        torch.manual_seed(seed)  # same initial weights for every method (and rank)
        net = workload.model().to(device)
        self.options = {**workload.options(steps), **{k: v for k, v in options.items() if v is not None}}
        self.optimizers: list[torch.optim.Optimizer] = []  # the SGD inside whatever the method wraps

        def make_opt(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
            opt = torch.optim.SGD(params, lr=workload.lr, momentum=workload.momentum)
            self.optimizers.append(opt)
            return opt

        self.s = setup(name, net, self.options, make_opt)
        x, y, xt, yt = data
        x, y = shard(x, y, self.rank, self.world)
        self.x, self.y, self.xt, self.yt = x.to(device), y.to(device), xt.to(device), yt.to(device)
        self.gen = torch.Generator().manual_seed(seed * 100_003 + self.rank)
        self.times: list[float] = []
        self.sent: list[int] = []
        self.codec: list[float] = []  # encode + decode seconds per step
        self.curve: list[list[float]] = []  # [step, cumulative training seconds, test accuracy]
        self.trained = self.evaluating = 0.0  # seconds in training steps / in evaluations (not training)
        self.last = self.s.counters()

    def step(self, step: int) -> None:
        """Training step `step` (timed), then the test accuracy if it is due (not timed)."""
        s, workload = self.s, self.workload
        idx = torch.randint(len(self.x), (workload.batch_size,), generator=self.gen).to(self.x.device)
        xb, yb = self.x[idx], self.y[idx]
        for o in self.optimizers:
            for group in o.param_groups:
                group["lr"] = workload.lr_at(step, self.steps)
        with s.stepping():
            sync_device(xb)
            start = time.perf_counter()
            s.optimizer.zero_grad()
            F.cross_entropy(s.model(xb), yb).backward()
            s.optimizer.step()
            s.after_step()
            sync_device(xb)
            dt = time.perf_counter() - start
        self.trained += dt
        self.times.append(dt)
        now = s.counters()
        self.sent.append(now.bytes_sent - self.last.bytes_sent)
        self.codec.append(now.encode_seconds + now.decode_seconds - self.last.encode_seconds - self.last.decode_seconds)
        self.last = now
        if workload.evaluates(step + 1, self.steps):
            start = time.perf_counter()
            self.curve.append([step + 1, self.trained, _evaluate(s, self.xt, self.yt)])
            self.evaluating += time.perf_counter() - start
        if self.rank == 0 and ((step + 1) % max(1, self.steps // 4) == 0 or step + 1 == self.steps):
            acc = f", test acc {self.curve[-1][2]:.3f}" if self.curve else ""
            print(f"  [{workload.name}] {self.name}: step {step + 1}/{self.steps}, {dt:.3f} s/step{acc}", flush=True)

    def result(self) -> dict[str, Any]:
        """This rank's record, once every step ran (every rank calls it: it may run collectives)."""
        s, workload, name = self.s, self.workload, self.name
        accs = [acc for _, _, acc in self.curve]  # workloads without evaluation: step time only
        c = s.counters()
        extra = s.final()  # e.g. auto's plan
        timed = name == "fp32" and workload.eval_every  # the floor of the time-to-target ratios
        floor = _compute_only_step(s, self.x, self.y, workload.batch_size, self.gen) if timed else None
        return {
            "method": name,
            "label": METHODS[name].label,
            "workload": workload.name,
            "world_size": self.world,
            "batch_size": workload.batch_size,
            "steps": self.steps,
            "step_seconds": self.times,
            "bytes_per_step_series": self.sent,
            "codec_seconds_series": self.codec,
            "bytes_sent": c.bytes_sent,
            "dense_bytes": c.dense_bytes,
            "encode_seconds": c.encode_seconds,
            "decode_seconds": c.decode_seconds,
            "train_seconds": self.trained,
            "eval_seconds": self.evaluating,
            "compute_only_step_s": floor,
            "curve": self.curve,
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "info": s.info,
            "options": {k: v for k, v in self.options.items() if k.split("_")[0] in name},  # gradiveq, powersgd_start
            **extra,
        }


def run_workload(workload: Workload, methods: list[str], steps: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Every available method on `workload`, side by side: one step of each method in turn (in an
    order that rotates every step), so that the machine's load at any moment falls on every method
    alike and the ratios between methods hold however busy the machine gets. Unavailable methods
    get a row saying why."""
    data = workload.data()
    rows: dict[str, dict[str, Any]] = {}
    runs: list[MethodRun] = []
    try:
        for name in methods:
            why = unavailable(name)
            if why:
                if dist.get_rank() == 0:
                    print(f"  [{workload.name}] {name}: skipped ({why})", flush=True)
                label = METHODS[name].label if name in METHODS else name
                rows[name] = {"method": name, "label": label, "workload": workload.name, "skipped": why}
                continue
            runs.append(MethodRun(name, workload, data, steps, options))
        for step in range(steps):
            turn = step % len(runs) if runs else 0
            for run in runs[turn:] + runs[:turn]:
                run.step(step)
        rows.update({run.name: run.result() for run in runs})
    finally:
        for run in runs:
            run.s.stack.close()
        dist.barrier()
    return [rows[name] for name in methods if name in rows]


def add_method_options(p: argparse.ArgumentParser) -> None:
    """Options passed to the methods (shared with the driver). Unset ones take the workload's
    setting (`Workload.method_defaults`), else the method's own default."""
    p.add_argument("--powersgd-start", type=int, default=None, help="steps of plain all-reduce before PowerSGD")
    p.add_argument(
        "--gradiveq",
        default=None,
        help="GradiVeQ options instead of its defaults, e.g. 'warmup_steps=10,error_feedback=true'",
    )
    p.add_argument("--seed", type=int, default=0)


def method_list(text: str, workload: Workload) -> list[str]:
    """'' -> the workload's default methods, 'all' -> every method, else the comma-separated names."""
    if not text:
        return list(workload.methods)
    if text == "all":
        return list(METHODS)
    return [m for m in text.split(",") if m]


def parse_args(argv: list[str] | None = None, methods: str = "", workloads: str = "cnn,mlp") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=workloads, help=f"comma-separated, from {', '.join(WORKLOADS)}")
    p.add_argument(
        "--methods",
        default=methods,
        help=f"comma-separated, from {', '.join(METHODS)}; 'all'; default: each workload's own list",
    )
    p.add_argument("--steps", default="", help="steps per method, e.g. 300 or cnn=300,mlp=8 (default per workload)")
    p.add_argument("--width", default="", help="model width per workload, e.g. cnn=256,mlp=2048")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default="", help="JSON file rank 0 writes")
    add_method_options(p)
    return p.parse_args(argv)


def per_workload(text: str, names: list[str]) -> dict[str, int]:
    """'300' -> every workload 300; 'cnn=300,mlp=8' -> per name."""
    if not text:
        return {}
    if "=" not in text:
        return dict.fromkeys(names, int(text))
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in WORKLOADS:
            raise ValueError(f"unknown workload {key!r} in {text!r}; valid names: {', '.join(WORKLOADS)}")
        out[key] = int(value)
    return out


def main(argv: list[str] | None = None, methods: str = "", workloads: str = "cnn,mlp") -> None:
    """Parse the command line, initialise torch.distributed from the launcher's environment, run.
    `methods`, `workloads`: the defaults of --methods and --workloads."""
    args = parse_args(argv, methods, workloads)
    from launch.dist import finish, init_from_env

    info = init_from_env()
    torch.set_num_threads(args.threads)
    names = [w for w in args.workloads.split(",") if w]
    steps, widths = per_workload(args.steps, names), per_workload(args.width, names)
    options = {k: v for k, v in vars(args).items() if k not in ("workloads", "methods", "steps", "width", "out")}
    options["device"] = str(info.device)
    rows: list[dict[str, Any]] = []
    for name in names:
        workload = get_workload(name, widths.get(name))
        todo = method_list(args.methods, workload)
        rows += run_workload(workload, todo, steps.get(name, workload.default_steps), options)
    if info.rank == 0 and args.out:
        meta = {"world_size": info.world_size, "backend": info.backend, "device": str(info.device)}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}))
        print(f"wrote {args.out}", flush=True)
    finish()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
