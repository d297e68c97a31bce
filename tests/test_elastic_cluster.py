"""A torchrun job restarted on a different number of emulated hosts continues from one elastic checkpoint.

Two hosts train 6 steps of DDP with 2-bit QSGD and error feedback and save with
`commcomp.elastic.save`; then three hosts (a new torchrun job, new namespaces, shaped links) load
it with `commcomp.elastic.load` and train 6 more. Checked: the owed update of the residuals is
preserved across the resize, the three ranks agree, and their parameters equal those of the same
continuation run locally on three gloo processes (tests/harness.py) from the same files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from elastic_worker import job
from harness import run

from launch import Cluster, launch_torchrun

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("elastic_worker.py"))


def _owed(residuals: list[dict[str, torch.Tensor]], world: int) -> dict[str, torch.Tensor]:
    """The update error feedback still owes: qsgd payloads are averaged, so (1/N) * sum of residuals."""
    keys = residuals[0].keys()
    return {k: torch.stack([r[k] for r in residuals]).sum(0) / world for k in keys}


def test_restart_on_three_hosts_from_a_two_host_checkpoint(tmp_path: Path) -> None:
    first, second, local = tmp_path / "first", tmp_path / "second", tmp_path / "local"
    for d in (first, second, local):
        d.mkdir()
    with Cluster(hosts=2, rate_mbit=100) as c:
        launch_torchrun(
            c, WORKER, ["--dir", str(first), "--from-step", "0", "--to-step", "6"], timeout=120, stream=False
        )
    args = ["--dir", str(second), "--from-step", "6", "--to-step", "12", "--resume-from", str(first)]
    with Cluster(hosts=3, rate_mbit=100) as c:
        launch_torchrun(c, WORKER, args, timeout=120, stream=False)

    saved = torch.load(first / "elastic.pt", weights_only=False)
    assert saved["world_size"] == 2
    before = _owed([r["state"]["residuals"] for r in saved["ranks"]], 2)
    assert any(float(v.abs().sum()) > 0 for v in before.values())
    outs = [torch.load(second / f"out.rank{r}.pt", weights_only=False) for r in range(3)]
    assert all(o["world_size"] == 3 for o in outs)
    after = _owed([o["loaded"] for o in outs], 3)
    for key, owed in before.items():
        torch.testing.assert_close(after[key], owed, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(o["params"], outs[0]["params"]) for o in outs)
    assert bool(torch.isfinite(outs[0]["params"]).all())

    reference = run(job, 3, str(local), 6, 12, str(first), timeout=120)
    assert torch.equal(reference[0], outs[0]["params"]), "the cluster's continuation differs from the local one"
