"""The main benchmark: the training comparison on an emulated cluster, with its table, JSON and plots.

    python -m benchmarks.run                      # 4 hosts at 100 Mbit/s, every method, ~10 minutes
    python -m benchmarks.run --hosts 2 --rate-mbit 1000 --methods fp32,gradiveq
    python -m benchmarks.run --local              # local processes, no shaping

Phases: (1) train.py under torchrun on every host: the MNIST-1D CNN (accuracy, time to target)
and the 5.8M-parameter MLP (step time, throughput) with each method; (2) train_horovod.py under
mpirun when Horovod is installed: Horovod fp32/fp16 and commcomp's compressors on Horovod, on the
MLP; (3) a short collective-bandwidth pass (collectives.py) for the wire-efficiency target.
Where network namespaces cannot be created (not root, no iproute2) it says so and runs on local
processes without shaping. Results go to --out (default results/<UTC time>, linked from
results/latest): results.json, training.png, collectives.png, table.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report
from benchmarks.driver import HERE, add_cluster_options, follow, out_dir, pick_hosts, torchrun
from benchmarks.train import DEFAULT_METHODS, add_method_options
from launch.hosts import Hosts

__all__ = ["main"]

DEFAULT_STEPS = "cnn=80,mlp=4"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cluster_options(p)
    p.add_argument("--workloads", default="cnn,mlp", help="comma-separated: cnn, mlp")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated training methods")
    p.add_argument("--steps", default=DEFAULT_STEPS, help="steps per method, e.g. 300 or cnn=200,mlp=8")
    p.add_argument("--width", default="", help="model width per workload, e.g. cnn=256,mlp=2048")
    p.add_argument("--horovod", default="auto", choices=["auto", "on", "off"], help="the Horovod rows")
    p.add_argument("--horovod-steps", type=int, default=3, help="MLP steps per Horovod method")
    p.add_argument("--collectives", default="16", help="payload MB for the wire-efficiency pass ('' skips it)")
    add_method_options(p)
    return p.parse_args(argv)


def _method_args(args: argparse.Namespace) -> list[str]:
    out = []
    for key in ("powersgd_rank", "powersgd_start", "seed", *(k for k in vars(args) if k.startswith("gradiveq_"))):
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def _horovod_available() -> str | None:
    """None if the Horovod rows can run, else why not."""
    try:
        import horovod.torch  # noqa: F401

        import commcomp.horovod  # noqa: F401
    except ImportError as e:
        return f"Horovod is not installed ({e})"
    if not (HERE / "train_horovod.py").exists():
        return "benchmarks/train_horovod.py is missing"
    return None


def _run_horovod(hosts: Hosts, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from launch.mpi import start_mpirun

    path = out / "horovod.json"
    argv = [sys.executable, str(HERE / "train_horovod.py"), "--steps", str(args.horovod_steps), "--out", str(path)]
    job = start_mpirun(hosts, argv, timeout=args.timeout, stream=False, nproc_per_host=args.nproc_per_node)
    follower = follow(job, r"\[cnn\]|\[mlp\]|wrote|Error")
    job.wait(check=True)
    follower.join(timeout=5)
    return json.loads(path.read_text())["rows"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = out_dir(args.out)
    started = time.monotonic()
    hosts, where = pick_hosts(args)
    print(f"benchmark on {where}; results in {out}", flush=True)
    load_before = os.getloadavg()
    collectives: list[dict[str, Any]] = []
    phases: dict[str, float] = {}  # seconds since the start at the end of each phase
    with hosts:
        print("== training comparison (torchrun)", flush=True)
        train_json = out / "train.json"
        train_argv = [
            *("--workloads", args.workloads, "--methods", args.methods, "--steps", args.steps),
            *(("--width", args.width) if args.width else ()),
            *_method_args(args),
            *("--out", str(train_json)),
        ]
        torchrun(hosts, "train.py", train_argv, args.timeout, args.nproc_per_node)
        rows = json.loads(train_json.read_text())["rows"]
        phases["training"] = time.monotonic() - started
        why = _horovod_available() if args.horovod != "off" else "--horovod off"
        if why is None:
            print("== Horovod rows (mpirun)", flush=True)
            try:
                rows += _run_horovod(hosts, args, out)
                phases["horovod"] = time.monotonic() - started
            except Exception as e:  # the training rows stand on their own; say what failed
                if args.horovod == "on":
                    raise
                print(f"Horovod rows failed, left out: {e}", flush=True)
        elif args.horovod == "on":
            raise SystemExit(f"--horovod on, but {why}")
        else:
            print(f"== Horovod rows skipped: {why}", flush=True)
        if args.collectives:
            print("== collective bandwidth (torchrun)", flush=True)
            coll_json = out / "collectives.json"
            coll_args = ["--worker", "--payloads", args.collectives, "--reps", "2", "--out", str(coll_json)]
            if hosts.rate_mbit is not None:
                coll_args += ["--rate-mbit", str(hosts.rate_mbit)]
            torchrun(hosts, "collectives.py", coll_args, args.timeout, args.nproc_per_node)
            collectives = json.loads(coll_json.read_text())["rows"]
            phases["collectives"] = time.monotonic() - started
    report.derive(rows)
    goals = report.targets(rows, collectives)
    elapsed = time.monotonic() - started
    text = _summary(rows, collectives, goals, where, elapsed)
    print("\n" + text)
    meta = {
        "where": where,
        "hosts": args.hosts,
        "rate_mbit": hosts.rate_mbit,
        "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "elapsed_seconds": elapsed,
        "phase_end_seconds": phases,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cores": os.cpu_count(),
    }
    result = {"meta": meta, "rows": rows, "collectives": collectives, "targets": goals}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.txt").write_text(text + "\n")
    report.plot_training(rows, str(out / "training.png"))
    if collectives:
        from benchmarks.collectives import plot

        plot(collectives, str(out / "collectives.png"))
    print(f"\nresults: {out}/results.json, table.txt, training.png{', collectives.png' if collectives else ''}")
    return result


def _summary(
    rows: list[dict[str, Any]], collectives: list[dict[str, Any]], goals: list[dict[str, Any]], where: str, s: float
) -> str:
    parts = [f"Training comparison on {where} ({s / 60:.1f} min in all)"]
    for w in sorted({r["workload"] for r in rows}):
        target = next((r.get("target_acc") for r in rows if r["workload"] == w and r.get("target_acc")), None)
        extra = f", target accuracy {target:.3f}" if target else ""
        parts += ["", f"[{w}]{extra}", report.format_table(rows, w)]
    if collectives:
        from benchmarks.collectives import format_table

        parts += ["", "[collectives]", format_table(collectives)]
    parts += ["", "Targets:"]
    for g in goals:
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        parts.append(f"  {g['status']:4}  {g['target']}: {value} (limit {g['limit']}) - {g['detail']}")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        parts.append(f"\nnote: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: timings are perturbed")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
