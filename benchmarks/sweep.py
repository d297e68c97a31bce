"""Link-rate sweep: the cnn time-to-accuracy workload at several link rates, to show which method wins
where and whether "auto" follows.

    python -m benchmarks.sweep                                   # 4 hosts at 25, 100 and 1000 Mbit/s
    python -m benchmarks.sweep --md docs/sweep.md                # also rewrite the docs page
    python -m benchmarks.sweep --rates 50,500 --methods torch-fp16,auto --steps 200
    python -m benchmarks.sweep --seeds 0,1,2 --md docs/sweep.md  # every run three times: medians
    python -m benchmarks.sweep --local --hosts 2 --rates 1,2 --steps 6   # plumbing only: no shaping

At each rate it brings up an emulated cluster (`launch.Cluster`, links shaped to that rate) and runs
benchmarks/train.py under torchrun on the cnn workload with every method in turn: the 16-bit hook
(PyTorch's fp16_compress_hook), PyTorch's powerSGD_hook rank 8, commcomp bf16, QSGD 4-bit
all-reduced, GradiVeQ and auto. DDP fp32 runs once, at the fastest rate (`--fp32-rate`): the target
is its best test accuracy minus 1 point, and fp32's accuracy after each step does not depend on the
link rate (the same batches and the same sums), so one run sets the target for every rate; at the
other rates fp32 is not among the methods compared. Per rate it prints the table, auto's final plan
and auto's targets (within 10% of the best fixed method's time to target, never slower than the
16-bit hook, planning overhead under 5%); then one summary table across the rates. Results go to
--out (default results/sweep-<UTC time>): sweep.json, table.txt, sweep.md, accuracy-<rate>.png;
with --md PATH the markdown report is also written to PATH (docs/sweep.md).

With --seeds, all of it runs once per seed (other initial weights and batches: another path to the
target, on a machine whose load changes from minute to minute), fp32 included, each seed's target
from its own fp32 run; every number in the tables and the targets is then the median over the seeds
(a seed that never reached the target counts as the slowest), and each table lists every seed's time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report
from benchmarks.driver import ROOT, add_cluster_options, pick_hosts, torchrun
from benchmarks.run import machine, method_args
from benchmarks.train import add_method_options
from benchmarks.workloads import get_workload

__all__ = ["COLUMNS", "main", "summary"]

METHODS = "torch-fp16,torch-powersgd-r8,bf16,qsgd4-ar,gradiveq,auto"

COLUMNS = [
    ("label", "method", "s"),
    ("step_s", "step s", ".3f"),
    ("ttt_s", "time to target s", ".1f"),
    ("ttt_steps", "steps", "d"),
    ("x_hook16", "x 16-bit hook", ".2f"),
    ("x_best_fixed", "x best fixed", ".2f"),
    ("best_acc", "best acc", ".3f"),
    ("ratio", "byte ratio", ".1f"),
    ("codec_pct", "codec %", ".1f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cluster_options(p)
    p.add_argument("--rates", default="25,100,1000", help="comma-separated link rates, Mbit/s")
    p.add_argument("--methods", default=METHODS, help="the methods compared at every rate (fp32 is added once)")
    p.add_argument("--fp32-rate", type=float, default=None, help="the rate fp32 runs at (default: the fastest)")
    p.add_argument("--steps", type=int, default=None, help="steps per method (default: the cnn workload's)")
    p.add_argument("--width", type=int, default=None, help="the cnn's channels (default: the workload's)")
    p.add_argument("--md", default="", help="also write the markdown report here, e.g. docs/sweep.md")
    p.add_argument("--seeds", default="", help="comma-separated seeds, all of it run once per seed (default: --seed)")
    add_method_options(p)
    args = p.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        p.error(f"--seeds needs comma-separated integers, got {args.seeds!r}")
    if len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds lists a seed twice: {args.seeds}")
    args.rate_list = [float(r) for r in args.rates.split(",") if r]
    if not args.rate_list or min(args.rate_list) <= 0:
        p.error(f"--rates needs positive rates, got {args.rates!r}")
    if args.fp32_rate is None:
        args.fp32_rate = max(args.rate_list)
    if args.fp32_rate not in args.rate_list:
        p.error(f"--fp32-rate {args.fp32_rate:g} is not one of --rates {args.rates}")
    return args


def _run_rate(args: argparse.Namespace, rate: float, seed: int, out: Path) -> tuple[list[dict[str, Any]], str]:
    """Every method at link rate `rate` (plus fp32 at --fp32-rate) from `seed`: the workers' rows,
    and where they ran."""
    methods = ("fp32," if rate == args.fp32_rate else "") + args.methods
    hosts, where = pick_hosts(argparse.Namespace(**{**vars(args), "rate_mbit": rate}))
    print(f"== {rate:g} Mbit/s, seed {seed}: {where}", flush=True)
    path = out / (f"train-{rate:g}.json" if len(args.seed_list) == 1 else f"train-{rate:g}-seed{seed}.json")
    argv = ["--workloads", "cnn", "--methods", methods, "--out", str(path)]
    argv += method_args(argparse.Namespace(**{**vars(args), "seed": seed}))
    argv += ["--steps", str(args.steps)] if args.steps else []
    argv += ["--width", f"cnn={args.width}"] if args.width else []
    with hosts:
        torchrun(hosts, "train.py", argv, args.timeout, args.nproc_per_node)
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        r["rate_mbit"], r["seed"] = rate, seed
    return rows, where


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out) if args.out else ROOT / "results" / f"sweep-{stamp:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.monotonic(), os.getloadavg()
    seeds = args.seed_list
    by_seed: dict[float, dict[int, list[dict[str, Any]]]] = {}  # rate -> seed -> rows
    wheres: list[str] = []
    minutes: dict[str, float] = {}
    for seed in seeds:
        for rate in sorted(args.rate_list, key=lambda r: r != args.fp32_rate):  # fp32's rate first
            begun = time.monotonic()
            by_seed.setdefault(rate, {})[seed], where = _run_rate(args, rate, seed, out)
            wheres.append(where)
            minutes[f"{rate:g}"] = minutes.get(f"{rate:g}", 0.0) + (time.monotonic() - begun) / 60
    best_acc: dict[int, float] = {}
    for seed in seeds:
        fp32 = next((r for r in by_seed[args.fp32_rate][seed] if r["method"] == "fp32" and "skipped" not in r), None)
        if fp32 is None or fp32.get("best_accuracy") is None:
            raise SystemExit(f"DDP fp32 did not run (seed {seed}): no target accuracy")
        best_acc[seed] = fp32["best_accuracy"]
    runs: dict[float, list[dict[str, Any]]] = {}
    goals: list[dict[str, Any]] = []
    for rate in sorted(by_seed):
        for seed in seeds:
            report.derive(by_seed[rate][seed], best_acc[seed] - report.TARGET_GAP)
        runs[rate] = report.median_rows([by_seed[rate][seed] for seed in seeds])
        for r in runs[rate]:
            r["ttt_each"] = ", ".join("never" if t is None else f"{t:.1f}" for t in r.get("ttt_runs", []))
        goals += report.auto_targets(runs[rate], f" at {rate:g} Mbit/s")
    workload = get_workload("cnn", args.width)
    meta = {
        "where": wheres[0].replace(f" at {args.fp32_rate:g} Mbit/s", ""),
        "rates_mbit": sorted(runs),
        "fp32_rate_mbit": args.fp32_rate,
        "seeds": seeds,
        # one target with one seed; with several, each seed has its own (None here: see by_seed)
        "fp32_best_accuracy": best_acc[seeds[0]] if len(seeds) == 1 else None,
        "target_acc": best_acc[seeds[0]] - report.TARGET_GAP if len(seeds) == 1 else None,
        "fp32_best_accuracy_by_seed": {str(s): a for s, a in best_acc.items()},
        "target_acc_by_seed": {str(s): a - report.TARGET_GAP for s, a in best_acc.items()},
        "steps": args.steps or workload.default_steps,
        "width": workload.width,
        "command": "python -m benchmarks.sweep " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date_utc": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_seconds": time.monotonic() - started,
        "minutes_per_rate": minutes,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        **machine(),
    }
    result = {"meta": meta, "runs": {f"{k:g}": v for k, v in sorted(runs.items())}, "targets": goals}
    if len(seeds) > 1:  # "runs": the medians (with the first seed's curves and records)
        result["runs_by_seed"] = {f"{k:g}": {str(s): rows for s, rows in v.items()} for k, v in sorted(by_seed.items())}
    text = summary(runs, goals, meta, by_seed=by_seed)
    markdown = summary(runs, goals, meta, markdown=True, by_seed=by_seed)
    print("\n" + text)
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    (out / "table.txt").write_text(text + "\n")
    (out / "sweep.md").write_text(markdown + "\n")
    for rate, rows in runs.items():
        report.plot_accuracy(rows, str(out / f"accuracy-{rate:g}.png"))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(markdown + "\n")
        print(f"wrote {args.md}")
    print(f"\nresults: {out}/sweep.json, table.txt, sweep.md, accuracy-<rate>.png", flush=True)
    return result


def _overview(runs: dict[float, list[dict[str, Any]]], markdown: bool) -> str:
    """Time to target per method (columns) and rate (rows), the best fixed method, auto / best, auto's plan."""
    methods: list[str] = []
    for rows in runs.values():
        methods += [r["method"] for r in rows if r["method"] not in [*methods, "fp32"] and "skipped" not in r]
    head = ["Mbit/s", *methods, "best fixed", "auto / best", "auto's buckets"]
    body = []
    for rate, rows in sorted(runs.items()):
        by = {r["method"]: r for r in rows if "skipped" not in r}
        cells = [f"{rate:g}"]
        for m in methods:
            ttt = by[m]["ttt_s"] if m in by else "-"
            cells.append("never" if ttt is None else ttt if isinstance(ttt, str) else f"{ttt:.1f}")
        best = report.best_fixed(rows)
        auto = by.get(report.AUTO)
        cells.append("-" if best is None else best["method"])
        cells.append("-" if auto is None or auto.get("x_best_fixed") is None else f"{auto['x_best_fixed']:.2f}")
        cells.append("-" if auto is None else report.plan_summary(auto, short=True).split(";")[0])
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body])


def summary(
    runs: dict[float, list[dict[str, Any]]],
    goals: list[dict[str, Any]],
    meta: dict[str, Any],
    markdown: bool = False,
    by_seed: dict[float, dict[int, list[dict[str, Any]]]] | None = None,
) -> str:
    """The report: setting, target, one table per rate with auto's plan (each seed's, from `by_seed`),
    the overview, the targets."""
    rates = ", ".join(f"{r:g}" for r in meta["rates_mbit"])
    per_rate = ", ".join(f"{k} Mbit/s {v:.1f}" for k, v in meta["minutes_per_rate"].items())
    seeds = meta.get("seeds", [0])
    repeated = (
        f"; seeds {', '.join(map(str, seeds))}: every number is the median over them (a seed that never reached"
        " the target counts as the slowest), the last column lists each seed's time to target"
        if len(seeds) > 1
        else ""
    )
    run_line = (
        f"{meta['where']} at {rates} Mbit/s; cnn ({meta['width']} channels), {meta['steps']} steps per method"
        f"{repeated}; {meta['elapsed_seconds'] / 60:.1f} min in all ({per_rate} min)"
    )
    machine_line = (
        f"{meta['cores']} cores ({meta['cpu']}), torch {meta['torch']}, Python {meta['python']}, load average "
        f"{meta['load_average_before'][0]:.1f} before and {meta['load_average_after'][0]:.1f} after"
    )
    if len(seeds) > 1:
        best = meta["fp32_best_accuracy_by_seed"]
        each = ", ".join(f"seed {s} {best[str(s)] - report.TARGET_GAP:.3f} ({best[str(s)]:.3f})" for s in seeds)
        target_line = f"Target accuracy per seed: its DDP fp32 best test accuracy (in brackets) minus 1 point: {each}."
    else:
        target_line = (
            f"Target accuracy {meta['target_acc']:.3f}: DDP fp32's best test accuracy"
            f" ({meta['fp32_best_accuracy']:.3f}) minus 1 point."
        )
    target_line += (
        f" fp32 ran once{' per seed' if len(seeds) > 1 else ''}, at {meta['fp32_rate_mbit']:g} Mbit/s: its accuracy"
        " after each step does not depend on the link rate (the same batches, the same sums), so the target holds"
        " at every rate; at the other rates fp32 is not among the methods compared."
    )
    if markdown:
        parts = [
            "# Link-rate sweep",
            "",
            "Written by the sweep itself (`benchmarks/sweep.py`); rerun it to refresh, do not edit. What it"
            " measures: [benchmarks.md](benchmarks.md#link-rate-sweep).",
            "",
            f"- Command: `{meta['command']}`",
            f"- Date: {meta['date_utc']}",
            f"- Run: {run_line}",
            f"- Machine: {machine_line}",
            "",
            target_line,
        ]
    else:
        parts = [f"Link-rate sweep on {run_line}", f"{meta['date_utc']}; {machine_line}", target_line]
    columns = [*COLUMNS, ("ttt_each", "per seed s", "s")] if len(seeds) > 1 else COLUMNS
    for rate, rows in sorted(runs.items()):
        title = f"## {rate:g} Mbit/s" if markdown else f"[{rate:g} Mbit/s]"
        parts += ["", title, "", report.format_table(rows, "cnn", markdown, columns)]
        plans = by_seed[rate] if by_seed and len(seeds) > 1 else {seeds[0]: rows}
        for seed, seed_rows in plans.items():
            for r in seed_rows:
                if r.get("plan"):
                    which = f" (seed {seed})" if len(plans) > 1 else ""
                    parts += ["", f"{r.get('label', r['method'])}, final plan{which}: {report.plan_summary(r)}"]
    overview = _overview(runs, markdown)
    title = "## Time to target (s) per rate" if markdown else "[time to target (s) per rate]"
    parts += ["", title, "", overview]
    verdicts = report.format_targets(goals, markdown) or "(no auto row: nothing to judge)"
    parts += ["", "## Targets" if markdown else "Targets:", "", verdicts]
    if max(meta["load_average_before"][0], meta["load_average_after"][0]) > (meta["cores"] or 1):
        parts.append(f"\nnote: load average above {meta['cores']} cores: timings are perturbed")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
