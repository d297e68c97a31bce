"""Tests of the benchmark code: the report's arithmetic and verdicts on constructed records, the
workload's schedules, and the worker and driver on local processes with tiny settings.

The constructed records have known answers worked out by hand (a time to target read off a known
curve, a byte ratio from known counters, PASS/MISS from rows built to pass or to miss). The worker's
byte counts are checked against a direct computation from the model: plain DDP hands every
gradient value (4 bytes) to its all-reduce once per step, PyTorch's fp16 hook half of that.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from harness import run

from benchmarks import report
from benchmarks.workloads import get_workload

ROOT = Path(__file__).resolve().parents[1]

WIDTH = 24  # CNN1D(24): its two 1,728-value conv weights are big enough for GradiVeQ to compress
STEPS = 6
OPTIONS = {"powersgd_start": 3, "seed": 3}


def _gradiveq_options() -> dict[str, str]:
    """GradiVeQ options that make it compress within the test's few steps: one warm-up step, and a
    short sampling phase where its basis is fitted from samples (basis="fitted")."""
    from commcomp import GradiVeQState

    if "basis" in inspect.signature(GradiVeQState).parameters:  # the default basis needs no sampling phase
        return {"gradiveq": "warmup_steps=1"}
    return {"gradiveq": "warmup_steps=1,sample_steps=2,compress_steps=100"}


# ----- the report on constructed records -----


def _row(method: str, curve: list[list[float]], steps: int = 4, **extra: Any) -> dict[str, Any]:
    """A worker record with one-second steps, 100 dense bytes per step and no codec time."""
    row = {
        "method": method,
        "label": method,
        "workload": "cnn",
        "world_size": 4,
        "batch_size": 8,
        "steps": steps,
        "step_seconds": [1.0] * steps,
        "bytes_per_step_series": [100] * steps,
        "codec_seconds_series": [0.0] * steps,
        "bytes_sent": 100 * steps,
        "dense_bytes": 100 * steps,
        "encode_seconds": 0.0,
        "decode_seconds": 0.0,
        "curve": curve,
        "final_accuracy": curve[-1][2] if curve else None,
        "options": {},
    }
    row.update(extra)
    return row


def test_report_reached() -> None:
    curve = [[10, 2.0, 0.5], [20, 4.5, 0.8], [30, 7.0, 0.79], [40, 9.0, 0.9]]
    assert report.reached(curve, 0.8) == (20, 4.5)  # the first evaluation at or above the target
    assert report.reached(curve, 0.85) == (40, 9.0)
    assert report.reached(curve, 0.95) is None
    assert report.reached([], 0.1) is None


def test_report_derive() -> None:
    fp32 = _row("fp32", [[1, 1.0, 0.5], [2, 2.0, 0.9], [3, 3.0, 0.92], [4, 4.0, 0.91]], compute_only_step_s=0.25)
    hook = _row("torch-fp16", [[2, 1.0, 0.5], [4, 2.0, 0.915]])
    slow = _row("torch-powersgd-r1", [[4, 1.0, 0.6]])
    fast = _row("torch-powersgd-r4", [[2, 0.5, 0.7], [4, 1.0, 0.911]])
    # 4 steps, 400 dense bytes, 50 sent: ratio 8; 0.5 s of codec in each 1 s step of the second half
    mine = _row(
        "gradiveq",
        [[2, 0.25, 0.6], [4, 0.5, 0.93]],
        bytes_sent=50,
        bytes_per_step_series=[20, 10, 10, 10],
        encode_seconds=0.6,
        decode_seconds=0.4,
        codec_seconds_series=[0.0, 0.0, 0.5, 0.5],
    )
    skipped = {"method": "qsgd4-ar", "workload": "cnn", "skipped": "not there"}
    rows = report.derive([fp32, hook, slow, fast, mine, skipped])
    assert fp32["target_acc"] == pytest.approx(0.91)  # best (0.92, not the final 0.91) minus 1 point
    assert [r["ttt_s"] for r in rows[:5]] == [3.0, 2.0, None, 1.0, 0.5]
    assert [r["ttt_steps"] for r in rows[:5]] == [3, 4, None, 4, 4]  # the steps of those evaluations
    assert report.powersgd_best(rows) is fast and fast["powersgd_best"] and not slow["powersgd_best"]
    assert mine["x_fp32"] == pytest.approx(0.5 / 3.0)
    assert mine["x_hook16"] == pytest.approx(0.5 / 2.0)
    assert mine["x_powersgd"] == pytest.approx(0.5 / 1.0)
    assert slow["x_fp32"] is None  # never reached: no ratio
    assert mine["ratio"] == 8.0 and fp32["ratio"] == 1.0
    assert mine["mb_step"] == pytest.approx(50 / 4 / 1e6) and mine["mb_last"] == pytest.approx(10 / 1e6)
    assert mine["codec_pct"] == pytest.approx(50.0) and mine["codec_pct_all"] == pytest.approx(25.0)
    assert mine["best_acc"] == 0.93 and fp32["best_acc"] == 0.92 and fp32["acc"] == 0.91
    assert mine["floor_x_fp32"] == 0.25  # fp32's compute-only step / its 1 s step
    assert report.byte_ratio(400, 0) != report.byte_ratio(400, 0)  # nan: nothing sent


def test_report_powersgd_best_when_none_reaches() -> None:
    rows = [_row("torch-powersgd-r1", [[4, 1.0, 0.3]]), _row("torch-powersgd-r8", [[4, 1.0, 0.6]])]
    for r in rows:
        r["ttt_s"], r["best_acc"] = None, r["curve"][-1][2]
    assert report.powersgd_best(rows) is rows[1]  # the best accuracy
    assert report.powersgd_best([_row("fp32", [])]) is None


def _verdicts(gq_curve: list[list[float]], gq_bytes: int, gq_codec: float) -> dict[str, str]:
    fp32 = _row("fp32", [[5, 5.0, 0.8], [10, 10.0, 0.9]], steps=10)
    hook = _row("torch-fp16", [[10, 5.0, 0.9]], steps=10)
    psgd = _row("torch-powersgd-r8", [[10, 3.0, 0.9]], steps=10)
    gq = _row(
        "gradiveq",
        gq_curve,
        steps=10,
        bytes_sent=gq_bytes,
        encode_seconds=gq_codec * 10,
        codec_seconds_series=[gq_codec] * 10,
    )
    rows = report.derive([fp32, hook, psgd, gq])
    goals = report.targets(rows)
    return {g["target"].split(" (defaults) ")[-1].split(" <=")[0]: g["status"] for g in goals}


def test_report_targets_pass_and_miss() -> None:
    # fp32 reaches its target (0.89) in 10 s: GradiVeQ at 1.5 s is 0.15x, ahead of 5 s and 3 s,
    # sends 1000 dense bytes / 100 = 10x, codec 0.05 s of each 1 s step = 5%
    good = _verdicts([[10, 1.5, 0.9]], 100, 0.05)
    assert good == {
        "time to target": "PASS",
        "ahead of the 16-bit hook": "PASS",
        "ahead of PowerSGD best": "PASS",
        "whole-run byte ratio >= 8x": "PASS",
        "codec %": "PASS",
    }
    # 2.5 s (0.25x) still ahead of both, 500 bytes (2x), codec 20%
    slow = _verdicts([[10, 2.5, 0.9]], 500, 0.2)
    assert slow["time to target"] == "MISS" and slow["ahead of PowerSGD best"] == "PASS"
    assert slow["whole-run byte ratio >= 8x"] == "MISS" and slow["codec %"] == "MISS"
    # 4 s: behind PowerSGD (3 s), ahead of the hook (5 s)
    behind = _verdicts([[10, 4.0, 0.9]], 100, 0.0)
    assert behind["ahead of PowerSGD best"] == "MISS" and behind["ahead of the 16-bit hook"] == "PASS"
    # never reaches the target: every time target misses
    never = _verdicts([[10, 1.0, 0.5]], 100, 0.0)
    assert [never[k] for k in ("time to target", "ahead of the 16-bit hook", "ahead of PowerSGD best")] == ["MISS"] * 3


def test_report_gradiveq_options() -> None:
    from benchmarks.methods import gradiveq_options

    text = "warmup_steps=10, energy_threshold=0.01,error_feedback=true,basis=fitted,max_components=none"
    assert gradiveq_options({"gradiveq": text}) == {
        "warmup_steps": 10,
        "energy_threshold": 0.01,
        "error_feedback": True,
        "basis": "fitted",
        "max_components": None,
    }
    assert gradiveq_options({"gradiveq": None}) == gradiveq_options({}) == {}
    with pytest.raises(ValueError, match="name=value"):
        gradiveq_options({"gradiveq": "warmup_steps"})


def test_report_tables() -> None:
    rows = report.derive(
        [
            _row("fp32", [[4, 4.0, 0.9]]),
            _row("gradiveq", [[4, 2.0, 0.5]]),
            {"method": "qsgd4-ar", "label": "QSGD", "workload": "cnn", "skipped": "not installed"},
        ]
    )
    md = report.format_table(rows, "cnn", markdown=True).splitlines()
    assert md[0].startswith("| method | step s | time to target s | steps | x fp32 |") and len(md) == 2 + 2 + 2
    assert md[3].split(" | ")[2:4] == ["never", "-"] and md[-1] == "- QSGD: skipped (not installed)"
    text = report.format_table(rows, "cnn").splitlines()
    assert len({len(line) for line in text[:3]}) == 1  # aligned columns


def test_readme_headline_is_written_between_its_markers(tmp_path: Path) -> None:
    from benchmarks.run import HEADLINE_END, HEADLINE_START, headline, write_headline

    rows = report.derive([_row("fp32", [[4, 4.0, 0.9]]), _row("gradiveq", [[4, 2.0, 0.5]])])
    meta = {"command": "python -m benchmarks.run", "date_utc": "today", "hosts": 4, "rate_mbit": 100.0, "where": "-"}
    goals = report.targets(rows)
    text = headline(rows, meta, "docs/results.md", goals)
    assert report.format_table(rows, "cnn", markdown=True) in text and "4 emulated hosts at 100 Mbit/s" in text
    assert goals and report.format_targets(goals, markdown=True) in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{HEADLINE_START}\nold table\n{HEADLINE_END}\n\nafter\n")
    write_headline(readme, text)
    write_headline(readme, text)  # idempotent: the markers stay, the old text goes
    assert readme.read_text() == f"# x\n\n{HEADLINE_START}\n{text}\n{HEADLINE_END}\n\nafter\n"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="headline:start"):
        write_headline(readme, text)
    assert HEADLINE_START in (ROOT / "README.md").read_text()  # the real README has its markers


def _plan(methods: list[str], replans: int = 1) -> dict[str, Any]:
    """A plan as `AutoState.plan()` returns it."""
    buckets = [
        {"bucket": i, "params": [f"p{i}"], "method": m, "predicted_seconds": 0.01, "bytes": 1000, "error": 0.0}
        for i, m in enumerate(methods)
    ]
    network = {"latency_s": 0.001, "mbit": 95.0}
    return {"step": 40, "replans": replans, "network": network, "overhead_seconds": 0.5, "buckets": buckets}


def _auto_verdicts(auto_s: float, overhead_s: float, hook_s: float = 5.0, hook_acc: float = 0.9) -> dict[str, Any]:
    """auto's targets against fp32 (10 s), the 16-bit hook (`hook_s`, reaching `hook_acc`) and
    GradiVeQ (4 s); auto trains 20 s in all, reaching the target after `auto_s`, and spent
    `overhead_s` planning."""
    rows = [
        _row("fp32", [[5, 5.0, 0.8], [10, 10.0, 0.9]], steps=10),
        _row("torch-fp16", [[10, hook_s, hook_acc]], steps=10),
        _row("gradiveq", [[10, 4.0, 0.9]], steps=10),
        _row("auto", [[10, auto_s, 0.9]], steps=10, train_seconds=20.0, overhead_seconds_max=overhead_s),
    ]
    rows[-1]["plan"] = _plan(["qsgd_ar", "bf16", "qsgd_ar"])
    report.derive(rows)
    return {g["target"].split(" ")[1]: g for g in report.auto_targets(rows)}


def test_report_auto_targets() -> None:
    good = _auto_verdicts(4.2, 0.5)  # 1.05x GradiVeQ's 4 s, ahead of the hook; 0.5 s of 20 s = 2.5%
    assert good["within"]["status"] == "PASS" and good["within"]["value"] == pytest.approx(4.2 / 4.0)
    assert good["planning"]["status"] == "PASS" and good["planning"]["value"] == pytest.approx(2.5)
    late = _auto_verdicts(4.5, 2.0)  # 1.125x the best fixed method; 10% overhead
    assert late["within"]["status"] == "MISS" and late["planning"]["status"] == "MISS"
    # within 10% of the best fixed method, which is the hook, yet slower than it
    behind_hook = _auto_verdicts(4.2, 0.5, hook_s=4.0)
    assert behind_hook["within"]["status"] == "MISS" and "16-bit hook 4.0 s" in behind_hook["within"]["detail"]
    assert _auto_verdicts(30.0, 0.5)["within"]["status"] == "MISS"  # never reached the target
    hook_never = _auto_verdicts(4.2, 0.5, hook_acc=0.5)["within"]  # auto is not slower than a hook that never got there
    assert hook_never["status"] == "PASS" and "16-bit hook never reached it" in hook_never["detail"]
    # the main benchmark's targets include auto's, and its report names auto's plan
    from benchmarks.run import summary

    rows = [_row("fp32", [[4, 4.0, 0.9]]), _row("auto", [[4, 2.0, 0.9]], train_seconds=4.0, overhead_seconds_max=0.1)]
    rows[1]["plan"] = _plan(["qsgd_ar", "bf16", "qsgd_ar"])
    report.derive(rows)
    goals = report.targets(rows)
    assert any(g["target"].startswith("auto planning overhead") for g in goals)
    assert report.plan_summary(rows[1], short=True).startswith("qsgd_ar x2, bf16;")
    meta = {
        **dict.fromkeys(("cores", "cpu", "torch", "python", "date_utc", "where"), "x"),
        **{"elapsed_seconds": 1.0, "phase_end_seconds": {}, "load_average_before": [0.0], "load_average_after": [0.0]},
    }
    meta["cores"] = 2
    text = summary(rows, [], goals, meta)
    assert "auto, final plan: bucket 0 (1 tensors) qsgd_ar, sends 0.001 MB/step;" in text
    assert "network estimate 95 Mbit/s, latency 1.00 ms; 1 re-plans by step 40" in text


def test_report_byte_phases() -> None:
    # a 16-bit fallback (100 bytes, then 101), a first plan (20), a re-plan (5, then 5.1 rounded down)
    series = [100, 101, 20, 20, 20, 5, 5, 5]
    assert report.byte_phases(series) == [(1, 2, 100.5), (3, 5, 20), (6, 8, 5)]
    assert report.byte_phases([7]) == [(1, 1, 7)] and report.byte_phases([]) == []
    row = _row("auto", [[4, 1.0, 0.9]], bytes_per_step_series=[2_000_000, 2_000_000, 50_000, 50_000])
    row["plan"] = _plan(["topk"])
    assert "sent 2.000 MB/step in steps 1-2, 0.050 MB/step in steps 3-4" in report.plan_summary(row)


def test_report_given_target() -> None:
    """The sweep's rates without an fp32 row: the target is given, the best fixed method is the fastest
    row other than auto's."""
    rows = [_row("torch-fp16", [[2, 2.0, 0.85], [4, 3.0, 0.9]]), _row("auto", [[4, 1.0, 0.95]])]
    report.derive(rows, target=0.88)
    assert [r["ttt_s"] for r in rows] == [3.0, 1.0] and rows[0]["target_acc"] == 0.88
    assert report.best_fixed(rows) is rows[0] and rows[0]["best_fixed"] and not rows[1]["best_fixed"]
    assert rows[1]["x_best_fixed"] == pytest.approx(1.0 / 3.0) and rows[1]["x_fp32"] is None


def test_report_median_rows_over_seeds() -> None:
    """Repeated runs: every number a table or target reads is the median over the runs (a run that
    never reached the target is the slowest), and the comparison columns come from the medians."""
    hook_times, auto_times = [3.0, 6.0, 4.0], [2.0, None, 6.0]  # auto: reached at 2 s, never, at 6 s
    runs = []
    for i, (hook, auto) in enumerate(zip(hook_times, auto_times)):
        auto_curve = [[4, 1.0, 0.5]] + ([[8, auto, 0.95]] if auto is not None else [])
        rows = [
            _row("torch-fp16", [[4, 1.0, 0.5], [8, hook, 0.95]], step_seconds=[0.5 + i] * 4),
            _row("auto", auto_curve, train_seconds=10.0 + i, overhead_seconds_max=0.1 * (i + 1)),
        ]
        runs.append(report.derive(rows, target=0.9))
    hook, auto = report.median_rows(runs)
    assert hook["ttt_s"] == 4.0 and hook["ttt_runs"] == hook_times and hook["step_s"] == 1.5
    assert auto["ttt_s"] == 6.0 and auto["ttt_runs"] == auto_times and auto["ttt_steps"] == 8  # never > 6 s
    assert auto["overhead_pct"] == pytest.approx(statistics.median(100 * 0.1 * (i + 1) / (10 + i) for i in range(3)))
    assert hook["best_fixed"] and auto["x_best_fixed"] == pytest.approx(6.0 / 4.0) and auto["x_hook16"] == 1.5
    assert runs[0][1]["ttt_s"] == 2.0 and runs[0][1]["x_best_fixed"] == pytest.approx(2.0 / 3.0)  # runs untouched
    within = report.auto_targets([hook, auto])[1]
    assert within["status"] == "MISS" and within["detail"].startswith("auto 6.0 s to 0.900 (medians over 3 runs")
    # "never" when half of the runs or more never reached the target
    (never,) = report.median_rows([[runs[0][1]], [runs[1][1]]])
    assert never["ttt_s"] is None and never["ttt_steps"] is None and never["ttt_runs"] == [2.0, None]
    assert never["acc"] == pytest.approx((0.95 + 0.5) / 2)  # the final accuracy too, not the first run's
    alone = [{k: v for k, v in r.items() if k != "ttt_runs"} for r in report.median_rows([runs[0]])]
    assert alone == runs[0]  # one run: its own rows


# ----- the workload's schedules -----


def test_workload_schedules() -> None:
    w = get_workload("cnn")
    steps = w.default_steps
    lrs = [w.lr_at(s, steps) for s in range(steps)]
    warm = round(w.warmup_fraction * steps)
    assert lrs[warm - 1] == pytest.approx(w.lr) and lrs[0] == pytest.approx(w.lr / warm)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :]))  # cosine: never rises after warm-up
    assert lrs[-1] < 0.001 * w.lr
    done = [d for d in range(1, steps + 1) if w.evaluates(d, steps)]
    assert done[-1] == steps
    second_half = [d for d in done if d >= steps / 2]
    assert max(b - a for a, b in itertools.pairwise(second_half)) <= w.eval_every  # resolves time to target
    assert not get_workload("mlp").evaluates(4, 4)


# ----- the worker and the driver on local processes -----


def _train(rank: int, world_size: int, methods: list[str]) -> list[dict[str, Any]]:
    import torch

    from benchmarks.data import accuracy
    from benchmarks.methods import setup
    from benchmarks.train import _evaluate, run_workload

    workload = get_workload("cnn", WIDTH)
    rows = run_workload(workload, methods, STEPS, {**OPTIONS, **_gradiveq_options()})
    # the evaluation (ranks split the test set) scores the whole set as one process would
    torch.manual_seed(0)
    net = workload.model()
    s = setup("fp32", net, {}, lambda p: torch.optim.SGD(p, lr=0.1))
    _, _, xt, yt = workload.data()
    rows.append({"evaluated": _evaluate(s, xt, yt), "reference": accuracy(net, xt, yt)})
    s.stack.close()
    return rows


def _grad_values() -> int:
    return sum(p.numel() for p in get_workload("cnn", WIDTH).model().parameters())


def test_training_records_and_bytes() -> None:
    methods = ["fp32", "torch-fp16", "gradiveq", "torch-powersgd-r1", "torch-bf16"]
    ranks = run(_train, 2, methods, timeout=180)
    check = ranks[0].pop()
    assert check["evaluated"] == check["reference"]
    assert ranks[0][0]["compute_only_step_s"] > 0 and ranks[0][1]["compute_only_step_s"] is None
    rows = report.derive(ranks[0])
    values = _grad_values()
    by = {r["method"]: r for r in rows}
    assert list(by) == methods
    assert "refuses gloo" in by["torch-bf16"]["skipped"]
    ran = [r for r in rows if "skipped" not in r]
    for r in ran:
        assert len(r["step_seconds"]) == len(r["bytes_per_step_series"]) == STEPS
        assert 0.0 <= r["acc"] <= 1.0
        assert r["dense_bytes"] == STEPS * 4 * values  # every method replaces the same fp32 all-reduce
        # the clock of the curve is the sum of the step times up to each evaluation: evaluation excluded
        for step, seconds, _ in r["curve"]:
            assert seconds == pytest.approx(sum(r["step_seconds"][: int(step)]))
    assert by["fp32"]["bytes_per_step_series"] == [4 * values] * STEPS
    assert by["fp32"]["ratio"] == 1.0 and by["torch-fp16"]["ratio"] == 2.0
    assert by["torch-fp16"]["bytes_per_step_series"] == [2 * values] * STEPS
    gq = by["gradiveq"]["bytes_per_step_series"]
    assert max(gq[4:]) < 4 * values, gq  # compressed steps
    assert by["gradiveq"]["ratio"] == pytest.approx(STEPS * 4 * values / sum(gq))
    psgd = by["torch-powersgd-r1"]["bytes_per_step_series"]  # plain all-reduce (default_hooks) until step 3
    assert psgd[:3] == [4 * values] * 3 and max(psgd[3:]) < 4 * values / 2, psgd
    # symmetric methods: every rank hands over the same bytes
    assert [r["bytes_per_step_series"] for r in ranks[1][:2]] == [r["bytes_per_step_series"] for r in ranks[0][:2]]


def _train_lm(rank: int, world_size: int) -> list[dict[str, Any]]:
    import torch

    from benchmarks.methods import setup
    from benchmarks.train import _evaluate, run_workload

    workload = get_workload("lm", 32)
    rows = run_workload(workload, ["fp32", "auto"], 4, {"seed": 3})
    torch.manual_seed(0)
    net = workload.model()
    s = setup("fp32", net, {}, lambda p: torch.optim.SGD(p, lr=0.1))
    _, _, xt, yt = workload.data()
    net.eval()
    with torch.no_grad():
        reference = float((net(xt).argmax(1) == yt).double().mean())  # every position of every window
    rows.append({"evaluated": _evaluate(s, xt, yt), "reference": reference})
    s.stack.close()
    return rows


def test_lm_workload_scores_every_position_and_trains_with_auto() -> None:
    """The transformer workload: next-character windows the same on every call, logits with the
    classes in dimension 1, the ranks' split evaluation equal to one pass over every position, and
    a short run of fp32 and auto that records its curve and auto's plan."""
    w = get_workload("lm", 32)
    x, y, xt, yt = w.data()
    assert x.shape == y.shape and xt.shape == yt.shape and x.shape[1] == xt.shape[1]
    assert bool((x[:, 1:] == y[:, :-1]).all())  # the targets are the inputs shifted by one character
    assert all(bool((a == b).all()) for a, b in zip(w.data(), (x, y, xt, yt)))
    assert w.model()(x[:3]).shape == (3, 128, x.shape[1])
    ranks = run(_train_lm, 2, timeout=180)
    check = ranks[0].pop()
    assert check["evaluated"] == pytest.approx(check["reference"], abs=1e-12)
    fp32, auto = ranks[0]
    assert fp32["curve"][-1][0] == 4 and 0.0 <= fp32["final_accuracy"] <= 1.0
    assert len(auto["plan"]["buckets"]) >= 1 and auto["plan"]["rounds"][0]["step"] == 1


def test_driver_local(tmp_path: Path) -> None:
    from benchmarks import run as driver

    out, md = tmp_path / "out", tmp_path / "docs" / "results.md"
    result = driver.main(
        [
            *("--local", "--hosts", "2", "--workloads", "cnn", "--methods", "fp32,torch-fp16,gradiveq"),
            *("--steps", "4", "--width", f"cnn={WIDTH}", "--horovod", "off", "--collectives", "1"),
            *("--gradiveq", "warmup_steps=1", "--out", str(out)),
            *("--results-md", str(md)),
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["fp32", "torch-fp16", "gradiveq"]
    assert saved["meta"]["cores"] >= 1 and saved["meta"]["torch"]
    fp32_coll = next(c for c in saved["collectives"] if c["method"] == "fp32")
    assert fp32_coll["bytes_sent"] == fp32_coll["dense_bytes"]
    names = {g["target"] for g in result["targets"]}
    assert any(n.startswith("GradiVeQ (defaults) time to target") for n in names)
    assert any(n.startswith("codec %") for n in names)
    text = md.read_text()
    assert "--results-md" in text and "| DDP fp32 |" in text and "## Targets" in text
    gq = next(r for r in saved["rows"] if r["method"] == "gradiveq")
    assert "not the defaults" in next(g["detail"] for g in result["targets"] if "byte ratio" in g["target"])
    assert math.isclose(gq["ratio"], gq["dense_bytes"] / gq["bytes_sent"])
    for name in ("table.txt", "training.png", "accuracy.png", "collectives.png", "results.md"):
        assert (out / name).stat().st_size > 0
    assert md.with_suffix(".png").stat().st_size > 0


def _auto_available() -> bool:
    from benchmarks.methods import unavailable

    return unavailable("auto") is None


def test_sweep_local(tmp_path: Path) -> None:
    """The sweep on local processes (rates not applied): fp32 once at the fastest rate, the others
    at every rate, one target for all, auto's plan and targets per rate, the docs page written."""
    from benchmarks import sweep

    methods = "torch-fp16,auto" if _auto_available() else "torch-fp16,bf16"
    out, md = tmp_path / "out", tmp_path / "docs" / "sweep.md"
    result = sweep.main(
        [
            *("--local", "--hosts", "2", "--rates", "1,3", "--methods", methods, "--steps", "4"),
            *("--width", str(WIDTH), "--out", str(out), "--md", str(md)),
        ]
    )
    saved = json.loads((out / "sweep.json").read_text())
    assert list(saved["runs"]) == ["1", "3"]
    assert [r["method"] for r in saved["runs"]["3"]] == ["fp32", *methods.split(",")]
    assert [r["method"] for r in saved["runs"]["1"]] == methods.split(",")
    fp32 = saved["runs"]["3"][0]
    target = max(acc for _, _, acc in fp32["curve"]) - report.TARGET_GAP
    assert saved["meta"]["target_acc"] == pytest.approx(target) and saved["meta"]["fp32_rate_mbit"] == 3
    for rows in saved["runs"].values():
        for r in rows:
            found = report.reached(r["curve"], target) or (None, None)
            assert r["target_acc"] == pytest.approx(target) and (r["ttt_steps"], r["ttt_s"]) == found
    text = md.read_text()
    assert "## 1 Mbit/s" in text and "## 3 Mbit/s" in text and "--rates 1,3" in text
    if "auto" in methods:
        for rows in saved["runs"].values():
            auto = rows[-1]
            plan = auto["plan"]
            assert {b["method"] for b in plan["buckets"]} and auto["overhead_seconds_max"] >= 0
            assert auto["overhead_pct"] == pytest.approx(100 * auto["overhead_seconds_max"] / auto["train_seconds"])
        names = [g["target"] for g in result["targets"]]
        assert sum(n.startswith("auto within 10%") for n in names) == 2
        assert any(n.endswith(" at 1 Mbit/s") for n in names)
        assert "final plan:" in text


def test_sweep_local_over_seeds(tmp_path: Path) -> None:
    """--seeds: every run once per seed, fp32 included, each seed's target from its own fp32 run;
    the tables and targets read the medians over the seeds, and every seed's record is kept."""
    from benchmarks import sweep

    out, md = tmp_path / "out", tmp_path / "sweep.md"
    result = sweep.main(
        [
            *("--local", "--hosts", "2", "--rates", "2", "--methods", "torch-fp16", "--steps", "4"),
            *("--width", str(WIDTH), "--seeds", "3,5", "--out", str(out), "--md", str(md)),
        ]
    )
    by_seed = result["runs_by_seed"]["2"]
    meta = result["meta"]
    assert list(by_seed) == ["3", "5"] and meta["seeds"] == [3, 5]
    assert meta["target_acc"] is None and list(meta["target_acc_by_seed"]) == ["3", "5"]  # no one target
    for seed, rows in by_seed.items():
        assert [(r["method"], r["seed"]) for r in rows] == [("fp32", int(seed)), ("torch-fp16", int(seed))]
        target = max(acc for _, _, acc in rows[0]["curve"]) - report.TARGET_GAP
        assert all(r["target_acc"] == pytest.approx(target) for r in rows)
        assert meta["target_acc_by_seed"][seed] == pytest.approx(target)
    first, second = (rows[0]["curve"] for rows in by_seed.values())
    assert first != second  # other initial weights and batches
    for i, row in enumerate(result["runs"]["2"]):
        each = [rows[i]["ttt_s"] for rows in by_seed.values()]
        assert row["ttt_runs"] == each
        expected = None if None in each else statistics.median(each)
        assert row["ttt_s"] == (None if expected is None else pytest.approx(expected))
        assert row["step_s"] == pytest.approx(statistics.median(rows[i]["step_s"] for rows in by_seed.values()))
    text = md.read_text()
    assert "seeds 3, 5: every number is the median" in text and "per seed s" in text and "seed 5 " in text
