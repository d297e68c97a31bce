"""Faults on the emulated cluster: a worker SIGKILLed mid-training resumes from its checkpoint exactly."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch

from benchmarks.train_ckpt import SCHEDULE
from launch import Cluster, launch_torchrun
from launch.torchrun import start_torchrun

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "benchmarks" / "train_ckpt.py")

# Checkpoints after steps 8, 16 and 24, all after GradiVeQ's warm-up: its bases and error-feedback
# residuals change at every step, so the resumed run needs the saved ones at once.
STEPS, EVERY, KILL_AFTER = 32, 8, 16
ARGS = ["--steps", str(STEPS), "--every", str(EVERY), "--timeout", "20"]


def _final(directory: Path) -> list[dict]:
    return [torch.load(directory / f"final.rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The same job run straight through (no restarts): each rank's final parameters."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    with Cluster(hosts=2, rate_mbit=100) as c:
        launch_torchrun(c, WORKER, [*ARGS, "--dir", str(directory)], timeout=120, stream=False)
    return _final(directory)


@pytest.mark.parametrize("host", [1, 0], ids=["host1", "host0-rendezvous"])
def test_sigkilled_worker_resumes_from_checkpoint_with_identical_parameters(
    uninterrupted: list[dict], tmp_path: Path, host: int
) -> None:
    """SIGKILL the worker on `host` after the step-16 checkpoint; torchrun (--max-restarts 1)
    restarts both workers, they load model, optimizer, step and their own GradiVeQ hook state
    (error-feedback residuals, bases, sampling sums) and finish. Host 0 also runs the rendezvous
    agent, and its worker usually is rank 0, whose process holds the workers' store.

    The final parameters must equal those of the uninterrupted run bitwise: every step's batch
    depends only on (rank, step), the checkpoint holds everything a step reads, each rank loads
    the files of its own rank number, and the all-reduce adds the ranks' contributions in an order
    fixed by the rank numbers and the world size, which the restart does not change."""
    with Cluster(hosts=2, rate_mbit=100) as c:
        job = start_torchrun(
            c,
            WORKER,
            [*ARGS, "--dir", str(tmp_path), "--step-delay", "0.15"],
            max_restarts=1,
            timeout=150,
            stream=False,
        )
        with job:
            # `host` finishing step KILL_AFTER + 1 means every rank got past checkpoint KILL_AFTER
            job.wait_for(rf"STEP {KILL_AFTER + 1} rank", hosts=[host], timeout=90)
            pids = re.findall(r"STEP (\d+) rank \d+ attempt 0 pid (\d+)", job.output(host))
            last_step, pid = int(pids[-1][0]), int(pids[-1][1])
            assert last_step < STEPS, "the worker finished before it could be killed; raise --step-delay"
            os.kill(pid, signal.SIGKILL)  # a real, uncatchable kill of that host's worker process
            result = job.wait()
    assert result.returncodes == [0, 0]
    out = "".join(result.outputs)
    restarted = re.findall(r"START rank \d+ attempt 1 pid \d+ resume (\d+)", result.outputs[host])
    assert restarted, f"host {host}'s agent did not restart its killed worker"
    assert "exitcode: -9" in result.outputs[host]  # torchrun saw its worker die of SIGKILL
    # the other host's worker is restarted too (if it did not fail itself, as a membership change,
    # and its attempt count stays 0)
    resumed = [int(s) for s in re.findall(r"START rank \d+ attempt \d+ pid \d+ resume ([1-9]\d*)", out)]
    assert len(resumed) == 2 and len(set(resumed)) == 1 and KILL_AFTER <= resumed[0] < STEPS, resumed
    assert resumed[0] > SCHEDULE["warmup_steps"]  # resumed among compressed steps, with saved bases
    killed = _final(tmp_path)
    assert uninterrupted[0]["compressed_layers"] > 0  # GradiVeQ really compressed something
    for r in range(2):
        assert torch.equal(uninterrupted[r]["params"], uninterrupted[0]["params"])  # ranks agree
        assert torch.equal(killed[r]["params"], uninterrupted[0]["params"]), f"rank {r}: resumed run differs"
