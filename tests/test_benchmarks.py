"""Smoke tests of the benchmark scripts on local processes with tiny settings.

The byte counts in the records are checked against a direct computation from the model: plain DDP
hands every gradient value (4 bytes) to its all-reduce once per step, PyTorch's fp16 hook half of
that; GradiVeQ's dense bytes are the gradient bytes and its compressed steps send fewer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from harness import run

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.workloads import get_workload  # noqa: E402

WIDTH = 24  # CNN1D(24): its two 1,728-value conv weights are big enough for GradiVeQ to compress
STEPS = 6
OPTIONS = {
    "gradiveq_warmup_steps": 1,
    "gradiveq_sample_steps": 2,
    "gradiveq_compress_steps": 100,
    "powersgd_start": 3,
    "seed": 3,
}


def _train(rank: int, world_size: int, methods: list[str]) -> list[dict]:
    from benchmarks.train import run_workload

    workload = get_workload("cnn", WIDTH)
    return run_workload(workload, methods, STEPS, dict(OPTIONS))


def _grad_values() -> int:
    return sum(p.numel() for p in get_workload("cnn", WIDTH).model().parameters())


def test_training_records_and_bytes() -> None:
    methods = ["fp32", "torch-fp16", "gradiveq", "torch-powersgd"]
    ranks = run(_train, 2, methods, timeout=120)
    rows = report.derive(ranks[0])
    values = _grad_values()
    by = {r["method"]: r for r in rows}
    assert list(by) == methods
    for r in rows:
        for key in ("step_s", "mb_step", "ratio", "acc", "ttt_s", "speedup", "codec_pct", "curve", "target_acc"):
            assert key in r, (r["method"], key)
        assert len(r["step_seconds"]) == len(r["bytes_per_step_series"]) == STEPS
        assert 0.0 <= r["acc"] <= 1.0
        assert r["dense_bytes"] == STEPS * 4 * values  # every method replaces the same fp32 all-reduce
    assert by["fp32"]["bytes_per_step_series"] == [4 * values] * STEPS
    assert by["torch-fp16"]["bytes_per_step_series"] == [2 * values] * STEPS
    gq = by["gradiveq"]["bytes_per_step_series"]
    assert gq[:3] == [gq[0], gq[1], gq[1]] and gq[1] >= 4 * values  # warm-up (+ option check), sampling
    assert max(gq[4:]) < 4 * values / 2, gq  # compressed steps (step 3 also broadcasts the fitted bases)
    psgd = by["torch-powersgd"]["bytes_per_step_series"]  # plain all-reduce (default_hooks) until step 3
    assert psgd[:3] == [4 * values] * 3 and max(psgd[3:]) < 4 * values / 2, psgd
    assert by["fp32"]["speedup"] == pytest.approx(1.0)
    # symmetric methods: every rank hands over the same bytes (GradiVeQ's broadcast counts on its source only)
    assert [r["bytes_per_step_series"] for r in ranks[1][:2]] == [r["bytes_per_step_series"] for r in ranks[0][:2]]
    assert json.loads(json.dumps(rows, default=str))  # the record is JSON


def test_driver_local(tmp_path: Path) -> None:
    from benchmarks import run as driver

    out = tmp_path / "out"
    result = driver.main(
        [
            *("--local", "--hosts", "2", "--workloads", "cnn", "--methods", "fp32,gradiveq"),
            *("--steps", "4", "--width", f"cnn={WIDTH}", "--horovod", "off", "--collectives", "1"),
            *("--gradiveq-warmup-steps", "1", "--gradiveq-sample-steps", "1", "--out", str(out)),
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["fp32", "gradiveq"]
    assert {c["method"] for c in saved["collectives"]} >= {"fp32", "fp16", "gradiveq"}
    fp32_coll = next(c for c in saved["collectives"] if c["method"] == "fp32")
    assert fp32_coll["bytes_sent"] == fp32_coll["dense_bytes"]
    assert {g["target"].split(" ")[0] for g in result["targets"]} >= {"GradiVeQ", "encode+decode"}
    for name in ("table.txt", "training.png", "collectives.png"):
        assert (out / name).stat().st_size > 0
