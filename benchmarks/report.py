"""Turn the workers' raw records into the comparison: derived columns, targets, table, plots.

Derived per row (one method on one workload):
  step_s         median wall-clock seconds of a training step (first step left out: it builds buckets)
  mean_s         mean step seconds (first step left out): includes warm-up phases and the periodic
                 synchronisations of PQASGD, which the median skips
  samples_s      global samples per second at the mean step time (batch per rank x ranks / mean_s)
  mb_step        MB this rank handed to collectives per step, mean over the run (warm-up included)
  mb_last        MB of the last step (the method's steady state)
  ratio          dense bytes / bytes sent over the whole run (1.0 for fp32)
  enc_ms, dec_ms encode / decode milliseconds per step, mean over the run (GradiVeQ's PCA
                 statistics and fits count as encode) ("-": the method does not report them)
  codec_pct      encode + decode as % of the training time of the second half of the run (steady
                 state: GradiVeQ's warm-up, sampling and first fit are over); codec_pct_all is
                 the same over the whole run
  acc            final test accuracy (workloads with evaluation only)
  ttt_s          training seconds until the test accuracy first reached the workload's target
                 (fp32's final accuracy minus 1 point); evaluation time is not counted
  speedup        fp32 mean step time / this method's; ttt_speedup the same for time to target
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["TARGET_GAP", "derive", "format_table", "plot_training", "targets"]

TARGET_GAP = 0.01  # time to target = time to fp32's final accuracy minus 1 point


def _median_step(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 2 else times)


def _time_to(curve: list[list[float]], target: float) -> float | None:
    for _, seconds, acc in curve:
        if acc >= target:
            return seconds
    return None


def derive(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the derived columns to every row that ran (rows are modified and returned)."""
    ran = [r for r in rows if "skipped" not in r]
    for r in ran:
        steps = r["steps"]
        times, sent = r["step_seconds"], r["bytes_per_step_series"]
        r["step_s"] = _median_step(times)
        r["mean_s"] = statistics.mean(times[1:] if len(times) > 2 else times)
        r["mb_step"] = r["bytes_sent"] / steps / 1e6
        r["mb_last"] = sent[-1] / 1e6
        r["ratio"] = r["dense_bytes"] / r["bytes_sent"] if r["bytes_sent"] else math.nan
        r["enc_ms"] = 1e3 * r["encode_seconds"] / steps
        r["dec_ms"] = 1e3 * r["decode_seconds"] / steps
        r["codec_pct_all"] = 100 * (r["encode_seconds"] + r["decode_seconds"]) / sum(times)
        half = steps // 2  # steady state: the second half of the run (warm-up, sampling and first fit are over)
        r["codec_pct"] = 100 * sum(r["codec_seconds_series"][half:]) / sum(times[half:])
        r["samples_s"] = r["batch_size"] * r["world_size"] / r["mean_s"]
        r["acc"] = r["final_accuracy"]
    for workload in {r["workload"] for r in ran}:
        mine = [r for r in ran if r["workload"] == workload]
        base = next((r for r in mine if r["method"] == "fp32"), None)
        target = base["acc"] - TARGET_GAP if base and base["curve"] and base["acc"] is not None else None
        base_ttt = _time_to(base["curve"], target) if base and target is not None else None
        for r in mine:
            r["target_acc"] = target
            r["ttt_s"] = _time_to(r["curve"], target) if target is not None else None
            r["speedup"] = base["mean_s"] / r["mean_s"] if base else math.nan
            r["ttt_speedup"] = base_ttt / r["ttt_s"] if base_ttt and r["ttt_s"] else math.nan
    return rows


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


COLUMNS = [
    ("method", "method", "s"),
    ("step_s", "step s", ".3f"),
    ("mean_s", "mean s", ".3f"),
    ("samples_s", "samples/s", ".0f"),
    ("mb_step", "MB/step", ".3f"),
    ("mb_last", "MB last", ".3f"),
    ("ratio", "ratio", ".1f"),
    ("enc_ms", "enc ms", ".1f"),
    ("dec_ms", "dec ms", ".1f"),
    ("codec_pct", "codec %", ".1f"),
    ("acc", "acc", ".3f"),
    ("ttt_s", "t->target s", ".1f"),
    ("speedup", "x fp32 mean", ".2f"),
    ("ttt_speedup", "x fp32 ttt", ".2f"),
]


def format_table(rows: list[dict[str, Any]], workload: str) -> str:
    """A plain-text table of one workload's rows."""
    mine = [r for r in rows if r["workload"] == workload]
    head = [title for _, title, _ in COLUMNS]
    body = []
    for r in mine:
        if "skipped" in r:
            body.append([r["method"], f"skipped: {r['skipped']}"] + [""] * (len(COLUMNS) - 2))
        else:
            body.append([_fmt(r.get(key), spec) for key, _, spec in COLUMNS])
    full = [head, *(row for row in body if not row[1].startswith("skipped"))]
    widths = [max(len(row[i]) for row in full) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for row in body:
        if row[1].startswith("skipped"):
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
        else:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], collectives: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Issue 7's targets, each with PASS/MISS/N/A, the measured value and the limit."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, ok: bool | None, detail: str) -> None:
        status = "N/A" if ok is None else ("PASS" if ok else "MISS")
        out.append({"target": name, "status": status, "value": value, "limit": limit, "detail": detail})

    by = {(r["workload"], r["method"]): r for r in rows if "skipped" not in r}
    fp32, gq = by.get(("cnn", "fp32")), by.get(("cnn", "gradiveq"))
    psgd = [r for (w, m), r in by.items() if w == "cnn" and m.startswith("torch-powersgd")]
    if fp32 and gq:
        base, mine = _time_to(fp32["curve"], fp32["target_acc"]), gq["ttt_s"]
        ratio = mine / base if mine is not None and base else None
        detail = f"GradiVeQ {_fmt(mine, '.1f')} s vs DDP fp32 {_fmt(base, '.1f')} s to {fp32['target_acc']:.3f}"
        add("GradiVeQ time to target <= 0.25 x DDP fp32", ratio, 0.25, None if ratio is None else ratio <= 0.25, detail)
        if ratio is None and mine is None:
            out[-1]["status"] = "MISS"
            out[-1]["detail"] = detail + f" (GradiVeQ never reached it: final accuracy {gq['acc']:.3f})"
        if psgd:
            best = min(psgd, key=lambda r: r["ttt_s"] if r["ttt_s"] is not None else math.inf)
            theirs = best["ttt_s"]
            ok = mine is not None and (theirs is None or mine < theirs)
            rel = mine / theirs if mine is not None and theirs else None
            add(
                "GradiVeQ ahead of PowerSGD to the same target",
                rel,
                1.0,
                ok,
                f"GradiVeQ {_fmt(mine, '.1f')} s vs PowerSGD {_fmt(theirs, '.1f')} s",
            )
    measured = [c for c in collectives or [] if c.get("wire_efficiency") is not None]
    if measured:
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
    for (workload, method), r in sorted(by.items()):
        if method.startswith("torch-") or method == "fp32" or math.isnan(r["codec_pct"]):
            continue
        add(
            f"encode+decode <= 10% of step time ({workload}, {method})",
            r["codec_pct"] / 100,
            0.10,
            None if math.isnan(r["codec_pct"]) else r["codec_pct"] <= 10,
            f"second half of the run; over the whole run {r['codec_pct_all']:.1f}%",
        )
    return out


def plot_training(rows: list[dict[str, Any]], path: str) -> None:
    """accuracy vs training time (cnn), step time and MB per step per method (every workload)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if "skipped" not in r]
    workloads = sorted({r["workload"] for r in ran})
    fig, axes = plt.subplots(1 + len(workloads), 2, figsize=(13, 4 * (1 + len(workloads))), squeeze=False)
    for ax in axes[0]:
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # more methods than the default 10 colours
    ax = axes[0][0]
    for r in ran:
        if r["curve"]:
            c = list(zip(*r["curve"]))
            ax.plot(c[1], c[2], label=r["method"])
    target = next((r["target_acc"] for r in ran if r.get("target_acc") is not None), None)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target")
    ax.set(xlabel="training seconds", ylabel="test accuracy", title="accuracy vs time")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for r in ran:
        if r["curve"]:
            c = list(zip(*r["curve"]))
            ax.plot(c[0], c[2], label=r["method"])
    ax.set(xlabel="step", ylabel="test accuracy", title="accuracy vs step")
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
