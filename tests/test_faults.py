"""Faults on the emulated cluster: a worker SIGKILLed mid-training resumes from its checkpoint exactly."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `launch` lives next to `commcomp`, not inside the installed package
    sys.path.insert(0, str(ROOT))

from commcomp.gradiveq import Schedule  # noqa: E402
from launch import Cluster, launch_torchrun  # noqa: E402
from launch.torchrun import start_torchrun  # noqa: E402
from launch.workers.train_ckpt import SCHEDULE  # noqa: E402

WORKER = str(ROOT / "launch" / "workers" / "train_ckpt.py")
AVAILABLE, WHY = Cluster.available()
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"emulated cluster unavailable: {WHY}")

STEPS, EVERY, KILL_AFTER = 32, 4, 12  # checkpoints at 4, 8, ..., 28; the kill comes after the one at 12


def _final(directory: Path) -> list[dict]:
    return [torch.load(directory / f"final.rank{r}.pt", weights_only=False) for r in range(2)]


@needs_netns
def test_sigkilled_worker_resumes_from_checkpoint_with_identical_parameters(tmp_path: Path) -> None:
    """Kill host 1's worker with SIGKILL after the step-12 checkpoint; torchrun (--max-restarts 1)
    restarts both workers, they load model, optimizer, step and their own GradiVeQ hook state
    (error-feedback residuals, bases, sampling sums) and finish. The final parameters must equal
    those of an uninterrupted run bitwise: every step's batch depends only on (rank, step), the
    checkpoint holds everything a step reads, and a two-rank sum is the same whichever rank comes
    first, so nothing may differ."""
    schedule = Schedule(SCHEDULE["warmup_steps"], SCHEDULE["sample_steps"], SCHEDULE["compress_steps"])
    args = ["--steps", str(STEPS), "--every", str(EVERY), "--timeout", "20"]
    with Cluster(hosts=2, rate_mbit=100) as c:
        launch_torchrun(c, WORKER, [*args, "--dir", str(tmp_path / "straight")], timeout=120, stream=False)
        job = start_torchrun(
            c,
            WORKER,
            [*args, "--dir", str(tmp_path / "killed"), "--step-delay", "0.15"],
            max_restarts=1,
            timeout=150,
            stream=False,
        )
        with job:
            # host 1 finishing step KILL_AFTER + 1 means every rank got past checkpoint KILL_AFTER
            job.wait_for(rf"STEP {KILL_AFTER + 1} rank", hosts=[1], timeout=90)
            pids = re.findall(r"STEP (\d+) rank \d+ attempt 0 pid (\d+)", job.output(1))
            last_step, pid = int(pids[-1][0]), int(pids[-1][1])
            assert last_step < STEPS, "the worker finished before it could be killed; raise --step-delay"
            os.kill(pid, signal.SIGKILL)  # a real, uncatchable kill of host 1's worker process
            result = job.wait()
    assert result.returncodes == [0, 0]
    out = "".join(result.outputs)
    restarted = re.findall(r"START rank \d+ attempt 1 pid \d+ resume (\d+)", result.outputs[1])
    assert restarted, "host 1's agent did not restart its killed worker"
    # host 0's worker is restarted too (as a membership change, so its attempt count may stay 0)
    resumed = [int(s) for s in re.findall(r"START rank \d+ attempt \d+ pid \d+ resume ([1-9]\d*)", out)]
    assert len(resumed) == 2 and len(set(resumed)) == 1 and KILL_AFTER <= resumed[0] < STEPS, resumed
    refits = [t for t in range(STEPS) if schedule.refit(t)]
    assert any(t < resumed[0] for t in refits) and any(t >= resumed[0] for t in refits)  # bases saved and refitted
    straight, killed = _final(tmp_path / "straight"), _final(tmp_path / "killed")
    assert straight[0]["compressed_layers"] > 0  # GradiVeQ really compressed something
    for r in range(2):
        assert torch.equal(straight[r]["params"], straight[0]["params"])  # ranks agree
        assert torch.equal(killed[r]["params"], straight[0]["params"]), f"rank {r}: resumed run differs"
