"""Turn the workers' raw records into the comparison: derived columns, targets, tables, plot.

Derived per row (one method on one workload):
  step_s         median wall-clock seconds of a training step (first step left out: DDP builds buckets)
  mean_s         mean step seconds (first step left out): includes warm-up and sampling phases and
                 PQASGD's periodic synchronisations, which the median skips
  samples_s      global samples per second at the mean step time (batch per rank x ranks / mean_s)
  mb_step        MB this rank handed to collectives per step, mean over the run (warm-up included)
  mb_last        MB of the last step (the method's steady state)
  ratio          whole-run byte ratio: dense bytes / bytes sent over the whole run, warm-up, sampling
                 and refits included (1.0 for fp32)
  enc_ms, dec_ms encode / decode milliseconds per step, mean over the run ("-": not reported)
  codec_pct      encode + decode as % of the training time of the second half of the run (steady
                 state: warm-ups, sampling and first fits are over); codec_pct_all: whole run
  acc, best_acc  final and best test accuracy (workloads with evaluation only)
  ttt_s          training seconds (evaluation excluded) until the test accuracy first reached the
                 workload's target: DDP fp32's BEST accuracy minus 1 point
  ttt_steps      the steps taken by then (about ttt_s / step_s: a gap in ttt_s between two rows with
                 the same step time is in the steps, i.e. the path the training took)
  x_fp32, x_hook16, x_powersgd
                 time to target as a fraction of DDP fp32's, of PyTorch's fp16_compress_hook's and
                 of the best PowerSGD rank's (the PowerSGD row that reached the target first)
  speedup        fp32 mean step time / this method's (step-time workloads)
  floor_x_fp32   DDP fp32's compute-only step (no communication) / its median step: the least time
                 ratio to fp32 a method can reach while learning at fp32's pace per step
  x_best_fixed   time to target as a fraction of the fastest method's that fixes its compression up
                 front (every row but auto's; `best_fixed` marks that row)
  overhead_pct   (auto) the most time any rank spent measuring and planning, as % of the row's
                 training seconds
  ttt_runs       (rows combined over repeated runs, `median_rows`) each run's time to target; the
                 numbers above are then the medians over the runs
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AUTO",
    "AUTO_GAP",
    "CODEC_LIMIT_PCT",
    "HOOK16",
    "OVERHEAD_LIMIT_PCT",
    "TARGET_GAP",
    "TTT_LIMIT",
    "best_fixed",
    "byte_ratio",
    "derive",
    "format_table",
    "format_targets",
    "median_rows",
    "plot_accuracy",
    "plot_training",
    "powersgd_best",
    "reached",
    "relate",
    "targets",
]

Row = dict[str, Any]

TARGET_GAP = 0.01  # target accuracy = fp32's best test accuracy minus 1 point
TTT_LIMIT = 0.20  # GradiVeQ's time to target, as a fraction of fp32's
BYTE_RATIO_LIMIT = 8.0  # GradiVeQ's whole-run byte ratio
CODEC_LIMIT_PCT = 10.0  # encode + decode share of the step, every commcomp method
HOOK16 = "torch-fp16"  # the 16-bit baseline (PyTorch's bf16 hook refuses gloo/CPU)
POWERSGD = "torch-powersgd-"  # prefix of the PowerSGD rows (one per rank)
BASELINES = ("fp32", "torch-", "hvd-fp32", "hvd-fp16")  # not commcomp: no codec % target
AUTO = "auto"  # the method that measures the network and picks the compression per bucket
AUTO_GAP = 1.10  # auto's time to target, at most this times the best fixed method's
OVERHEAD_LIMIT_PCT = 5.0  # auto's measuring and planning, % of its training time


def reached(curve: Sequence[Sequence[float]], target: float) -> tuple[int, float] | None:
    """(steps, training seconds) at the first evaluation whose accuracy reached `target` (curve rows
    are [step, training seconds, accuracy]), or None if none did."""
    for step, seconds, acc in curve:
        if acc >= target:
            return int(step), seconds
    return None


def byte_ratio(dense_bytes: int, bytes_sent: int) -> float:
    """Dense bytes / bytes sent (nan when nothing was sent)."""
    return dense_bytes / bytes_sent if bytes_sent else math.nan


def powersgd_best(rows: Sequence[Row]) -> Row | None:
    """The PowerSGD row that reached the target first; if none did, the one with the best accuracy."""
    psgd = [r for r in rows if r["method"].startswith(POWERSGD) and "skipped" not in r]
    if not psgd:
        return None
    reached = [r for r in psgd if r.get("ttt_s") is not None]
    if reached:
        return min(reached, key=lambda r: r["ttt_s"])
    return max(psgd, key=lambda r: r.get("best_acc") or 0.0)


def _fraction(mine: float | None, theirs: float | None) -> float | None:
    return mine / theirs if mine is not None and theirs else None


def best_fixed(rows: Sequence[Row]) -> Row | None:
    """The row, auto's excepted, that reached the target first (None if none did)."""
    reached = [r for r in rows if r["method"] != AUTO and "skipped" not in r and r.get("ttt_s") is not None]
    return min(reached, key=lambda r: r["ttt_s"]) if reached else None


def derive(rows: list[Row], target: float | None = None) -> list[Row]:
    """Add the derived columns to every row that ran (rows are modified and returned). The target
    accuracy is DDP fp32's best minus 1 point, from the fp32 row of each workload; `target` gives it
    instead (the sweep runs fp32 at one link rate only: its accuracy per step does not depend on it)."""
    ran = [r for r in rows if "skipped" not in r]
    for r in ran:
        steps = r["steps"]
        times, sent = r["step_seconds"], r["bytes_per_step_series"]
        later = times[1:] if len(times) > 2 else times
        r["step_s"], r["mean_s"] = statistics.median(later), statistics.mean(later)
        r["mb_step"] = r["bytes_sent"] / steps / 1e6
        r["mb_last"] = sent[-1] / 1e6
        r["ratio"] = byte_ratio(r["dense_bytes"], r["bytes_sent"])
        r["enc_ms"] = 1e3 * r["encode_seconds"] / steps
        r["dec_ms"] = 1e3 * r["decode_seconds"] / steps
        r["codec_pct_all"] = 100 * (r["encode_seconds"] + r["decode_seconds"]) / sum(times)
        half = steps // 2
        r["codec_pct"] = 100 * sum(r["codec_seconds_series"][half:]) / sum(times[half:])
        r["samples_s"] = r["batch_size"] * r["world_size"] / r["mean_s"]
        r["acc"] = r["final_accuracy"]
        r.setdefault("best_acc", max((a for _, _, a in r["curve"]), default=None))
        if "overhead_seconds_max" in r:
            r["overhead_pct"] = 100 * r["overhead_seconds_max"] / r["train_seconds"]
    for workload in {r["workload"] for r in ran}:
        mine = [r for r in ran if r["workload"] == workload]
        by = {r["method"]: r for r in mine}
        base = by.get("fp32")
        goal = target
        if goal is None and base and base.get("best_acc") is not None:
            goal = base["best_acc"] - TARGET_GAP
        if not any(r.get("curve") for r in mine):
            goal = None  # a step-time workload
        floor = base.get("compute_only_step_s") if base else None
        for r in mine:
            r["target_acc"] = goal
            r["floor_x_fp32"] = floor / base["step_s"] if base and floor else None  # a step sending nothing / fp32
            found = reached(r["curve"], goal) if goal is not None else None
            r["ttt_steps"], r["ttt_s"] = found if found is not None else (None, None)
            r["speedup"] = base["mean_s"] / r["mean_s"] if base else math.nan
        relate(mine)
    return rows


def relate(rows: list[Row]) -> None:
    """The columns that compare one workload's rows (that ran) with each other: time to target as a
    fraction of fp32's, the 16-bit hook's, the best PowerSGD rank's and the best fixed method's."""
    by = {r["method"]: r for r in rows}
    timed = any(r.get("target_acc") is not None for r in rows)  # time-to-accuracy workloads only
    best = powersgd_best(rows) if timed else None
    fixed = best_fixed(rows) if timed else None
    refs = {"x_fp32": by.get("fp32"), "x_hook16": by.get(HOOK16), "x_powersgd": best, "x_best_fixed": fixed}
    for r in rows:
        r["powersgd_best"] = r is best
        r["best_fixed"] = r is fixed
        for key, ref in refs.items():
            r[key] = _fraction(r["ttt_s"], ref["ttt_s"]) if ref else None


# the numbers `median_rows` takes the median of over repeated runs (the times to target: "never" is
# the slowest)
MEDIAN_KEYS = (
    *("step_s", "best_acc", "acc", "ratio", "codec_pct", "overhead_pct", "overhead_seconds_max", "train_seconds"),
    "target_acc",
)
REACHED_KEYS = ("ttt_s", "ttt_steps")


def _median(values: list[Any], never_is_slowest: bool) -> float | None:
    if never_is_slowest:
        middle = statistics.median(math.inf if v is None else v for v in values)
        return None if math.isinf(middle) else middle
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def median_rows(runs: Sequence[Sequence[Row]]) -> list[Row]:
    """One workload's rows over repeated runs (each: one run's derived rows, e.g. one per seed), one
    row per method: the first run's row with the median over the runs of each number a table or a
    target reads (a run that never reached the target counts as the slowest, so the median is
    "never" when half of them or more never did), `ttt_runs` each run's time to target, and the
    comparison columns (`relate`) computed anew on the medians."""
    out: list[Row] = []
    for first in runs[0]:
        if "skipped" in first:
            out.append(first)
            continue
        same = [r for run in runs for r in run if r["method"] == first["method"] and "skipped" not in r]
        row = dict(first)
        for key in (k for k in MEDIAN_KEYS + REACHED_KEYS if k in first):
            row[key] = _median([r.get(key) for r in same], key in REACHED_KEYS)
        if row.get("ttt_steps") is not None:
            row["ttt_steps"] = round(row["ttt_steps"])
        row["ttt_runs"] = [r.get("ttt_s") for r in same]
        out.append(row)
    relate([r for r in out if "skipped" not in r])
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


# (key, title, format) per column; "label" is the method's description.
ACCURACY_COLUMNS = [
    ("label", "method", "s"),
    ("step_s", "step s", ".3f"),
    ("ttt_s", "time to target s", ".1f"),
    ("ttt_steps", "steps", "d"),
    ("x_fp32", "x fp32", ".2f"),
    ("x_hook16", "x 16-bit hook", ".2f"),
    ("x_powersgd", "x PowerSGD best", ".2f"),
    ("best_acc", "best acc", ".3f"),
    ("acc", "final acc", ".3f"),
    ("ratio", "byte ratio", ".1f"),
    ("codec_pct", "codec %", ".1f"),
]
STEP_COLUMNS = [
    ("label", "method", "s"),
    ("step_s", "step s", ".3f"),
    ("mean_s", "mean s", ".3f"),
    ("samples_s", "samples/s", ".0f"),
    ("mb_step", "MB/step", ".3f"),
    ("mb_last", "MB last", ".3f"),
    ("ratio", "byte ratio", ".1f"),
    ("enc_ms", "enc ms", ".1f"),
    ("dec_ms", "dec ms", ".1f"),
    ("codec_pct", "codec %", ".1f"),
    ("speedup", "x fp32 step", ".2f"),
]


def _cells(r: Row, columns: list[tuple[str, str, str]]) -> list[str]:
    cells, keys = [], {key for key, _, _ in columns}
    for key, _, spec in columns:
        if key == "label":
            mark = " = PowerSGD best" if r.get("powersgd_best") and "x_powersgd" in keys else ""
            mark += " = best fixed" if r.get("best_fixed") and "x_best_fixed" in keys else ""
            cells.append(str(r.get("label", r["method"])) + mark)
        elif key == "ttt_s" and r.get("target_acc") is not None and r["ttt_s"] is None:
            cells.append("never")
        else:
            cells.append(_fmt(r.get(key), spec))
    return cells


def format_table(
    rows: list[Row], workload: str, markdown: bool = False, columns: list[tuple[str, str, str]] | None = None
) -> str:
    """One workload's rows as an aligned plain-text (or markdown) table; skipped rows say why.
    `columns`: (key, title, format) per column; default: by the kind of workload."""
    mine = [r for r in rows if r["workload"] == workload]
    if columns is None:
        columns = ACCURACY_COLUMNS if any(r.get("curve") for r in mine) else STEP_COLUMNS
    head = [title for _, title, _ in columns]
    body = [_cells(r, columns) for r in mine if "skipped" not in r]
    skipped = [f"{r.get('label', r['method'])}: skipped ({r['skipped']})" for r in mine if "skipped" in r]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines + ([""] if skipped else []) + [f"- {s}" for s in skipped])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in [head, *body]
    ]
    return "\n".join(lines + skipped)


def targets(rows: list[Row], collectives: list[Row] | None = None) -> list[Row]:
    """The targets, each with PASS/MISS/N/A, the measured value, the limit and how it was measured."""
    out: list[Row] = []

    def add(name: str, value: float | None, limit: float, ok: bool | None, detail: str) -> None:
        status = "N/A" if ok is None else ("PASS" if ok else "MISS")
        out.append({"target": name, "status": status, "value": value, "limit": limit, "detail": detail})

    by = {(r["workload"], r["method"]): r for r in rows if "skipped" not in r}
    fp32, gq = by.get(("cnn", "fp32")), by.get(("cnn", "gradiveq"))
    if fp32 and gq and fp32.get("target_acc") is not None:
        _gradiveq_targets(
            add, gq, fp32, by.get(("cnn", HOOK16)), powersgd_best([r for r in rows if r["workload"] == "cnn"])
        )
    out += auto_targets([r for r in rows if r["workload"] == "cnn"])
    _codec_target(add, list(by.values()))
    _collective_targets(add, collectives or [])
    return out


def auto_targets(rows: Sequence[Row], where: str = "") -> list[Row]:
    """Auto's targets on one time-to-accuracy run (derived `rows` of one workload, `where` e.g.
    " at 25 Mbit/s" appended to the names): its planning overhead under 5% of its training time,
    and its time to target within 10% of the best fixed method's and no later than the 16-bit hook's."""
    auto = next((r for r in rows if r["method"] == AUTO and "skipped" not in r), None)
    if auto is None or auto.get("target_acc") is None:
        return []
    out: list[Row] = []

    def add(name: str, value: float | None, limit: float, ok: bool | None, detail: str) -> None:
        status = "N/A" if ok is None else ("PASS" if ok else "MISS")
        out.append({"target": name + where, "status": status, "value": value, "limit": limit, "detail": detail})

    pct = auto.get("overhead_pct")
    add(
        f"auto planning overhead < {OVERHEAD_LIMIT_PCT:g}%",
        pct,
        OVERHEAD_LIMIT_PCT,
        None if pct is None else pct < OVERHEAD_LIMIT_PCT,
        "no plan recorded"
        if pct is None
        else f"{auto['overhead_seconds_max']:.2f} s (the slowest rank's) of {auto['train_seconds']:.1f} s of training",
    )
    mine, best = auto["ttt_s"], best_fixed(rows)
    hook = next((r for r in rows if r["method"] == HOOK16 and "skipped" not in r), None)
    never = f" (auto never reached it: best {auto['best_acc']:.3f})" if mine is None else ""
    runs = len(auto.get("ttt_runs", []))
    medians = f" (medians over {runs} runs, each to its own target)" if runs > 1 else ""
    parts = [f"auto {_fmt(mine, '.1f')} s to {auto['target_acc']:.3f}{never}{medians}"]
    ok: bool | None = mine is not None
    if best is None:
        parts.append("no fixed method reached the target")
    else:
        parts.append(f"best fixed: {best.get('label', best['method'])} {best['ttt_s']:.1f} s")
        ok = ok and mine <= AUTO_GAP * best["ttt_s"]
    if hook is None:
        parts.append("the 16-bit hook was not run")
    else:
        parts.append("16-bit hook never reached it" if hook["ttt_s"] is None else f"16-bit hook {hook['ttt_s']:.1f} s")
        ok = ok and (hook["ttt_s"] is None or mine <= hook["ttt_s"])
    add(
        f"auto within {100 * (AUTO_GAP - 1):.0f}% of the best fixed method and not slower than the 16-bit hook",
        auto.get("x_best_fixed"),
        AUTO_GAP,
        ok,
        ", ".join(parts),
    )
    return out


def byte_phases(series: Sequence[int], tolerance: float = 0.05) -> list[tuple[int, int, float]]:
    """The run cut where the bytes per step change by more than `tolerance` (relative): (first
    step, last step, mean bytes per step) per phase, steps counted from 1. Shows a method that
    changes its plan (auto's measuring rounds, timed checks, re-plans) in the bytes it actually sent."""
    phases: list[tuple[int, int, float]] = []
    start = 0
    for i in range(1, len(series) + 1):
        if i == len(series) or abs(series[i] - series[start]) > tolerance * max(series[start], 1):
            phases.append((start + 1, i, statistics.mean(series[start:i])))
            start = i
    return phases


def plan_summary(row: Row, short: bool = False) -> str:
    """What auto's final plan uses: per bucket (or, `short`, the method counts), the network
    estimate, the re-plans and the planning overhead."""
    plan = row.get("plan")
    if not plan:
        return "no plan recorded"
    buckets = plan.get("buckets", [])
    if short:
        counts: dict[str, int] = {}
        for b in buckets:
            counts[b["method"]] = counts.get(b["method"], 0) + 1
        uses = ", ".join(f"{m} x{n}" if n > 1 else m for m, n in counts.items())
    else:
        uses = "; ".join(
            f"bucket {b['bucket']} ({len(b.get('params', []))} tensors) {b['method']}, sends "
            f"{b.get('bytes', 0) / 1e6:.3f} MB/step" + (f" ({b['why']})" if b.get("why") else "")
            for b in buckets
        )
    net = plan.get("network")
    text = uses or "no plan yet"
    if net:
        text += f"; network estimate {net['mbit']:.0f} Mbit/s, latency {1e3 * net['latency_s']:.2f} ms"
    text += f"; {plan.get('replans', 0)} re-plans by step {plan.get('step', '?')}"
    if not short and row.get("bytes_per_step_series"):
        phases = byte_phases(row["bytes_per_step_series"])
        text += "; sent " + ", ".join(f"{b / 1e6:.3f} MB/step in steps {a}-{z}" for a, z, b in phases)
    if row.get("overhead_pct") is not None:
        text += f"; planning overhead {row['overhead_pct']:.1f}% of its training time"
    return text


def _gradiveq_targets(add: Any, gq: Row, fp32: Row, hook: Row | None, psgd: Row | None) -> None:
    mine = gq["ttt_s"]
    note = f"; options {gq['options']}, not the defaults" if gq.get("options") else ""
    never = f" (GradiVeQ never reached it: best {gq['best_acc']:.3f}, final {gq['acc']:.3f})" if mine is None else ""
    base = fp32["ttt_s"]
    add(
        f"GradiVeQ (defaults) time to target <= {TTT_LIMIT:.2f} x DDP fp32's",
        gq["x_fp32"],
        TTT_LIMIT,
        mine is not None and base is not None and mine <= TTT_LIMIT * base,
        f"GradiVeQ {_fmt(mine, '.1f')} s, DDP fp32 {_fmt(base, '.1f')} s to {fp32['target_acc']:.3f}{never}{note}"
        + (f"; a step that sends nothing takes {fp32['floor_x_fp32']:.2f}x fp32's" if fp32.get("floor_x_fp32") else ""),
    )
    for other, name, key in ((hook, "the 16-bit hook", "x_hook16"), (psgd, "PowerSGD best", "x_powersgd")):
        if other is None:
            add(f"GradiVeQ (defaults) ahead of {name}", None, 1.0, None, f"{name} was not run{note}")
            continue
        theirs = other["ttt_s"]
        ok = mine is not None and (theirs is None or mine < theirs)
        detail = f"GradiVeQ {_fmt(mine, '.1f')} s, {other.get('label', other['method'])} {_fmt(theirs, '.1f')} s"
        add(f"GradiVeQ (defaults) ahead of {name}", gq[key], 1.0, ok, detail + never + note)
    add(
        f"GradiVeQ (defaults) whole-run byte ratio >= {BYTE_RATIO_LIMIT:g}x",
        gq["ratio"],
        BYTE_RATIO_LIMIT,
        gq["ratio"] >= BYTE_RATIO_LIMIT,
        f"{gq['dense_bytes'] / 1e6:.1f} MB dense / {gq['bytes_sent'] / 1e6:.1f} MB sent over {gq['steps']} steps{note}",
    )


def _codec_target(add: Any, rows: list[Row]) -> None:
    measured = [r for r in rows if not r["method"].startswith(BASELINES) and not math.isnan(r["codec_pct"])]
    if not measured:
        return
    worst = max(measured, key=lambda r: r["codec_pct"])
    over = [
        f"{r['workload']} {r['method']} {r['codec_pct']:.1f}%" for r in measured if r["codec_pct"] > CODEC_LIMIT_PCT
    ]
    add(
        f"codec % <= {CODEC_LIMIT_PCT:g}% for every commcomp method",
        worst["codec_pct"],
        CODEC_LIMIT_PCT,
        not over,
        f"{len(measured)} rows; worst {worst['workload']} {worst['method']} {worst['codec_pct']:.1f}%"
        + (f"; over the limit: {', '.join(over)}" if over else ""),
    )


def _collective_targets(add: Any, collectives: list[Row]) -> None:
    measured = [c for c in collectives if c.get("wire_efficiency") is not None]
    if not measured:
        return
    largest = max(c["payload_mb"] for c in measured)
    for c in measured:
        if c["method"] != "fp32" and c["payload_mb"] == largest:
            add(
                f"collective >= 85% of link rate in bytes sent ({c['method']}, {largest:g} MB payload)",
                c["wire_efficiency"],
                0.85,
                c["wire_efficiency"] >= 0.85,
                f"{c['wire_bytes'] / 1e6:.2f} MB on the wire in {c['seconds'] - c['codec_seconds']:.3f} s "
                f"of communication ({c['codec_seconds']:.3f} s encode/decode besides)",
            )


def format_targets(goals: list[Row], markdown: bool = False) -> str:
    lines = []
    for g in goals:
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        text = f"{g['target']}: {value} (limit {g['limit']:g}) - {g['detail']}"
        lines.append(f"- **{g['status']}** {text}" if markdown else f"  {g['status']:4}  {text}")
    return "\n".join(lines)


def _accuracy_panels(axes: Sequence[Any], ran: list[Row]) -> None:
    """Test accuracy against training seconds (axes[0]) and, if given, against steps (axes[1])."""
    import matplotlib.pyplot as plt

    for ax in axes:
        colours = [plt.get_cmap("tab10")(i) for i in range(10)]
        ax.set_prop_cycle(color=colours * 2, linestyle=["-"] * 10 + ["--"] * 10)  # 20 methods told apart
    for r in ran:
        if r["curve"]:
            step, seconds, acc = zip(*r["curve"])
            for ax, x in zip(axes, (seconds, step)):
                ax.plot(x, acc, label=r.get("label", r["method"]))
    target = next((r["target_acc"] for r in ran if r.get("target_acc") is not None), None)
    for ax in axes:
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    axes[0].set(xlabel="training seconds (evaluation excluded)", ylabel="test accuracy", title="accuracy vs time")
    if any(r["curve"] for r in ran):
        axes[0].legend(fontsize=7)
    if len(axes) > 1:
        axes[1].set(xlabel="step", ylabel="test accuracy", title="accuracy vs step")


def plot_accuracy(rows: list[Row], path: str) -> None:
    """Test accuracy against training time, one line per method, the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    _accuracy_panels([ax], [r for r in rows if "skipped" not in r])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training(rows: list[Row], path: str) -> None:
    """Accuracy vs training time and vs step (workloads with evaluation), step time and MB per step
    per method (every workload)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if "skipped" not in r]
    workloads = sorted({r["workload"] for r in ran})
    fig, axes = plt.subplots(1 + len(workloads), 2, figsize=(13, 4 * (1 + len(workloads))), squeeze=False)
    _accuracy_panels(axes[0], ran)
    for i, w in enumerate(workloads, start=1):
        mine = [r for r in ran if r["workload"] == w]
        names = [r["method"] for r in mine]
        axes[i][0].barh(names, [r["step_s"] for r in mine])
        axes[i][0].set(xlabel="median step seconds", title=f"{w}: step time")
        axes[i][1].barh(names, [r["mb_step"] for r in mine])
        axes[i][1].set(xlabel="MB sent per step per rank (mean)", title=f"{w}: bytes per step", xscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
