"""The main benchmark: the training comparison on an emulated cluster, with its tables, JSON and plots.

    python -m benchmarks.run                      # 4 hosts at 100 Mbit/s, the default rows, < 10 minutes
    python -m benchmarks.run --methods all        # every method (much longer)
    python -m benchmarks.run --hosts 2 --rate-mbit 1000 --methods fp32,gradiveq
    python -m benchmarks.run --local --workloads cnn --steps 40   # local processes, no shaping

Phases: (1) train.py under torchrun on every host: the MNIST-1D CNN trained to a plateau (time to
accuracy) and the 1.9M-parameter MLP (step time), each with every method; (2) train_horovod.py
under mpirun when Horovod is installed: Horovod fp32/fp16 and commcomp's GradiVeQ on Horovod, on
the MLP; (3) a short collective-bandwidth pass (collectives.py). Where network namespaces cannot be
created (not root, no iproute2) it says so and runs on local processes without shaping. Results go
to --out (default results/<UTC time>, linked from results/latest): results.json, table.txt,
results.md, training.png, accuracy.png, collectives.png. With --results-md PATH (scripts/bench.sh
passes docs/results.md) the markdown report is also written to PATH, with accuracy.png beside it;
with --readme PATH (scripts/bench.sh passes README.md) the cnn table also replaces the text between
PATH's `<!-- headline:start -->` and `<!-- headline:end -->` lines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report
from benchmarks.driver import HERE, add_cluster_options, follow, out_dir, pick_hosts, torchrun
from benchmarks.train import add_method_options
from launch.hosts import Hosts

__all__ = ["main"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cluster_options(p)
    p.add_argument("--workloads", default="cnn,mlp", help="comma-separated: cnn, mlp, lm")
    p.add_argument(
        "--methods", default="", help="comma-separated training methods, or 'all' (default: each workload's list)"
    )
    p.add_argument("--steps", default="", help="steps per method, e.g. 300 or cnn=200,mlp=8 (default per workload)")
    p.add_argument("--width", default="", help="model width per workload, e.g. cnn=256,mlp=2048")
    p.add_argument("--horovod", default="auto", choices=["auto", "on", "off"], help="the Horovod rows")
    p.add_argument("--horovod-steps", type=int, default=3, help="MLP steps per Horovod method")
    p.add_argument("--horovod-timeout", type=float, default=240.0, help="seconds before the Horovod phase is given up")
    p.add_argument("--collectives", default="16", help="payload MB for the wire-efficiency pass ('' skips it)")
    p.add_argument(
        "--results-md", default="", help="also write the markdown report here, e.g. docs/results.md ('' does not)"
    )
    p.add_argument(
        "--readme", default="", help="also write the cnn table between this file's headline markers ('' does not)"
    )
    add_method_options(p)
    return p.parse_args(argv)


def method_args(args: argparse.Namespace) -> list[str]:
    out = []
    for key in ("powersgd_start", "seed", "gradiveq"):
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
    from launch.job import LaunchError, LaunchResult
    from launch.mpi import start_mpirun

    path = out / "horovod.json"
    argv = [sys.executable, str(HERE / "train_horovod.py"), "--steps", str(args.horovod_steps), "--out", str(path)]
    argv += [*(("--width", args.width) if args.width else ()), *method_args(args)]
    # A stuck mpirun must not eat the run's budget. Now and then (twice in about ten runs here) mpirun
    # starts no worker at all (a daemon never comes up): such a try gets half the budget, then one more.
    timeout = min(args.timeout, args.horovod_timeout) / 2

    def attempt() -> LaunchResult:
        job = start_mpirun(hosts, argv, timeout=timeout, stream=False, nproc_per_host=args.nproc_per_node)
        follower = follow(job, r"\[cnn\]|\[mlp\]|wrote|Error")
        result = job.wait(check=False)
        follower.join(timeout=5)
        return result

    result = attempt()
    if result.timed_out and not any("<stdout>" in out or "<stderr>" in out for out in result.outputs):
        print(f"mpirun started no worker within {timeout:.0f} s; trying once more", flush=True)
        result = attempt()
    if not result.ok:
        raise LaunchError(result)
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
            *method_args(args),
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
            except Exception as e:  # the training rows stand on their own; say what failed
                if args.horovod == "on":
                    raise
                print(f"Horovod rows failed, left out: {str(e)[-2000:]}", flush=True)
                rows.append({"method": "hvd-*", "label": "Horovod rows", "workload": "mlp", "skipped": "failed"})
            phases["horovod"] = time.monotonic() - started
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
    meta = {
        "where": where,
        "hosts": args.hosts,
        "rate_mbit": hosts.rate_mbit,
        "command": "python -m benchmarks.run " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_seconds": time.monotonic() - started,
        "phase_end_seconds": phases,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        **machine(),
    }
    text = summary(rows, collectives, goals, meta)
    print("\n" + text)
    result = {"meta": meta, "rows": rows, "collectives": collectives, "targets": goals}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.txt").write_text(text + "\n")
    (out / "results.md").write_text(summary(rows, collectives, goals, meta, markdown=True) + "\n")
    report.plot_training(rows, str(out / "training.png"))
    report.plot_accuracy(rows, str(out / "accuracy.png"))
    if collectives:
        from benchmarks.collectives import plot

        plot(collectives, str(out / "collectives.png"))
    if args.results_md:
        md = Path(args.results_md)
        md.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "accuracy.png", md.with_suffix(".png"))
        md.write_text(summary(rows, collectives, goals, meta, markdown=True, plot=md.with_suffix(".png").name) + "\n")
        print(f"wrote {md} and {md.with_suffix('.png')}")
    if args.readme and any(r["workload"] == "cnn" for r in rows):
        write_headline(Path(args.readme), headline(rows, meta, args.results_md, goals))
        print(f"wrote the headline table into {args.readme}")
    elif args.readme:
        print(f"{args.readme} left as it was: its headline is the cnn workload's table, which did not run")
    print(f"\nresults: {out}/results.json, table.txt, results.md, training.png, accuracy.png", flush=True)
    return result


def machine() -> dict[str, Any]:
    """What ran the benchmark: cores, CPU model, torch and Python versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version()}


NOTES = [
    "Time to target: training seconds (evaluation excluded) until the test accuracy first reached the target,"
    " DDP fp32's best test accuracy minus 1 point; 'never': not within the run. x fp32, x 16-bit hook,"
    " x PowerSGD best: that time as a fraction of DDP fp32's, PyTorch fp16_compress_hook's and the best"
    " PowerSGD rank's (below 1 is faster).",
    "16-bit hook: PyTorch's fp16_compress_hook. Its bf16_compress_hook is not measured here: DDP refuses it"
    " on gloo/CPU (it needs CUDA 11+ and NCCL 2.10+).",
    "PowerSGD: PyTorch's powerSGD_hook with error feedback and warm start, plain all-reduce for the first"
    " steps, one bucket (with several buckets it crashes on gloo); 'PowerSGD best' is the rank that reached"
    " the target first.",
    "Byte ratio: dense bytes / bytes handed to collectives over the whole run (warm-up and sampling included)."
    " Codec %: encode + decode share of the step time over the second half of the run ('-': not reported;"
    " PyTorch's hooks decode inside callbacks that also wait for the network).",
    "Codec % above 10% on CPU: GradiVeQ's products per compressed layer (the two sides X U and X^T P, the"
    " rank-2d decode and the error-feedback residual) cost 6 x rank multiply-adds per weight per step, 96 at"
    " rank 16, as many as the forward and backward passes of the mlp's 32 samples per rank (3 x 32), so on"
    " these cores its codec is a large share of a small step (PowerSGD runs three rank-d products; its codec"
    " time is not reported). On the cnn, whose convolutions do more work per weight, its share is smaller. The"
    " Horovod rows also share the 2 cores with Horovod's background threads, which stretches every timed region.",
]


def summary(
    rows: list[dict[str, Any]],
    collectives: list[dict[str, Any]],
    goals: list[dict[str, Any]],
    meta: dict[str, Any],
    markdown: bool = False,
    plot: str = "accuracy.png",
) -> str:
    """The report: where and what ran, one table per workload, the collectives, the targets."""
    machine_line = (
        f"{meta['cores']} cores ({meta['cpu']}), torch {meta['torch']}, Python {meta['python']}, load average "
        f"{meta['load_average_before'][0]:.1f} before and {meta['load_average_after'][0]:.1f} after"
    )
    phases, last = [], 0.0
    for name, end in meta["phase_end_seconds"].items():
        phases.append(f"{name} {(end - last) / 60:.1f}")
        last = end
    run_line = f"{meta['where']}, {meta['elapsed_seconds'] / 60:.1f} min in all ({', '.join(phases)} min)"
    if markdown:
        parts = [
            "# Benchmark results",
            "",
            "Written by the benchmark itself (`benchmarks/run.py`); rerun it to refresh, do not edit. What the"
            " workloads, columns and targets are: [benchmarks.md](benchmarks.md).",
            "",
            f"- Command: `{meta['command']}`",
            f"- Date: {meta['date_utc']}",
            f"- Run: {run_line}",
            f"- Machine: {machine_line}",
        ]
    else:
        parts = [f"Training comparison on {run_line}", f"{meta['date_utc']}; {machine_line}"]
    for w in sorted({r["workload"] for r in rows}):
        target = next((r["target_acc"] for r in rows if r["workload"] == w and r.get("target_acc")), None)
        floor = next((r["floor_x_fp32"] for r in rows if r["workload"] == w and r.get("floor_x_fp32")), None)
        extra = f", target accuracy {target:.3f}" if target else ""
        if target and floor:
            extra += f" (a step that sends nothing takes {floor:.2f}x DDP fp32's step)"
        title = f"## {w}{extra}" if markdown else f"[{w}]{extra}"
        parts += ["", title, "", report.format_table(rows, w, markdown)]
        for r in rows:
            if r["workload"] == w and r.get("plan"):
                parts += ["", f"{r.get('label', r['method'])}, final plan: {report.plan_summary(r)}"]
        if markdown and target:
            parts += ["", f"![test accuracy against training time]({plot})"]
    if collectives:
        from benchmarks.collectives import format_table

        table = format_table(collectives)
        parts += ["", "## collectives", "", "```", table, "```"] if markdown else ["", "[collectives]", table]
    parts += ["", "## Targets" if markdown else "Targets:", "", report.format_targets(goals, markdown)]
    if markdown:
        parts += ["", "## Notes", "", *(f"- {n}" for n in NOTES)]
    if max(meta["load_average_before"][0], meta["load_average_after"][0]) > (meta["cores"] or 1):
        parts.append(f"\nnote: load average above {meta['cores']} cores: timings are perturbed")
    return "\n".join(parts)


HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


def headline(
    rows: list[dict[str, Any]], meta: dict[str, Any], report_path: str = "", goals: list[dict[str, Any]] | None = None
) -> str:
    """The README's headline: the cnn table of this run, with its date and setting, and the targets."""
    cnn = [r for r in rows if r["workload"] == "cnn"]
    target = next((r["target_acc"] for r in cnn if r.get("target_acc")), None)
    where = f"{meta['hosts']} emulated hosts at {meta['rate_mbit']:g} Mbit/s" if meta["rate_mbit"] else meta["where"]
    source = f"[{report_path}]({report_path})" if report_path else "the benchmark's results.md"
    lines = [
        f"Written by the benchmark (`{meta['command']}`, {meta['date_utc']}, {where}); the full report is",
        f"{source}.",
        "",
        f"**cnn, target accuracy {target:.3f}**" if target else "**cnn**",
        "",
        report.format_table(rows, "cnn", markdown=True),
    ]
    if goals:
        lines += ["", "Targets, PASS or MISS in this run:", "", report.format_targets(goals, markdown=True)]
    return "\n".join(lines)


def write_headline(readme: Path, text: str) -> None:
    """Replace what stands between the headline markers of `readme` with `text`."""
    old = readme.read_text()
    start, end = old.find(HEADLINE_START), old.find(HEADLINE_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {HEADLINE_START} ... {HEADLINE_END} lines to write the headline between")
    readme.write_text(old[: start + len(HEADLINE_START)] + "\n" + text + "\n" + old[end:])


if __name__ == "__main__":
    main()
