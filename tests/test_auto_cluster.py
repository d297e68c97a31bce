"""The "auto" method notices when the network turns slow mid-run and re-plans (emulated cluster).

Four hosts on unshaped links train DDP with `commcomp.register(model, "auto", ...)` until the
first plan exists (tests/auto_cluster_worker.py), which the worker then sets to fp32 for every
bucket: a fast link's plan (the unshaped links' own plan is a close call between the candidates on
this busy 2-core machine, and one that already suits the slow link would leave nothing to re-plan).
Then the test shapes every link to 20 Mbit/s with `Cluster.set_rate` while the workers wait, and
they train through the next measuring round: its check of the network fails, the round probes in
full at its next step and plans again. Checked from the plans the workers print: every rank
reports the same plan before and after (each rank's own planning time aside), the plan changed
(one more re-plan), the measured bandwidth fell, the network was probed in full, and the new plan
sends fewer bytes than the old one. Nothing here asserts a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from launch import Cluster, start_torchrun

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("auto_cluster_worker.py"))
HOSTS, SLOW = 4, 20.0


def _plans(outputs: list[str], phase: str) -> list[dict[str, Any]]:
    """The plans the workers printed for `phase`, by rank."""
    records = [json.loads(m) for out in outputs for m in re.findall(r"RESULT (\{.*\})", out)]
    found = sorted((r for r in records if r["phase"] == phase), key=lambda r: r["rank"])
    assert [r["rank"] for r in found] == list(range(HOSTS)), f"{phase}: plans from ranks {[r['rank'] for r in found]}"
    return [r["plan"] for r in found]


def _summary(plan: dict[str, Any]) -> str:
    methods = "; ".join(f"{b['bucket']}: {b['method']} ({b['bytes']} B), {b['why']}" for b in plan["buckets"])
    return f"{plan['network']['mbit']:.1f} Mbit/s measured, replans {plan['replans']}, buckets {methods}"


def test_a_slower_link_triggers_a_replan(tmp_path: Path) -> None:
    # the worker sets the plan to fp32 before the link slows down; at 20 Mbit/s bf16 and QSGD send 2x
    # and 8x fewer bytes for a codec time far below the transfer's, so the fp32 plan cannot stand
    args = ["--dir", str(tmp_path), "--probe-every", "2", "--measure-steps", "2", "--candidates", "fp32,bf16,qsgd4"]
    with Cluster(hosts=HOSTS, rate_mbit=None) as c, start_torchrun(c, WORKER, args, timeout=110, grace=5.0) as job:
        job.wait_for("WAITING", timeout=90)
        c.set_rate(SLOW)
        (tmp_path / "go").touch()
        result = job.wait()

    before, after = _plans(result.outputs, "before"), _plans(result.outputs, "after")
    print(f"unshaped: {_summary(before[0])}\nat {SLOW:g} Mbit/s: {_summary(after[0])}")
    for plans in (before, after):  # each rank's own planning time aside
        decided = [{k: v for k, v in p.items() if k != "overhead_seconds"} for p in plans]
        odd = sorted({k for d in decided for k in d if d.get(k) != decided[0].get(k)})
        assert not odd, f"the ranks disagree on the plan: {odd} ({[d.get(odd[0]) for d in decided]})"
    old, new = before[0], after[0]
    assert old["buckets"] and all(b["method"] == "fp32" for b in old["buckets"]), "no fp32 plan before the slowdown"
    assert new["replans"] >= old["replans"] + 1, "no re-plan after the link slowed down"
    assert new["network"]["mbit"] < old["network"]["mbit"], (old["network"], new["network"])
    assert new["rounds"][-1]["probed"] == "in full", new["rounds"][-1]  # the check of the old line failed
    assert sum(b["bytes"] for b in new["buckets"]) < sum(b["bytes"] for b in old["buckets"])
