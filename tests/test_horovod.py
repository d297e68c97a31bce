"""commcomp on real Horovod (`horovodrun --gloo` and `mpirun`), held against the DDP hooks.

The Horovod side runs tests/horovod_worker.py under the real launchers as subprocesses (killed with
their whole process group on timeout); each rank writes its results to a temporary directory. The
DDP side runs the same models, batches and options on gloo through tests/harness.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import horovod_worker as hw
import pytest
import torch
from harness import run
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp.pqasgd import PQASGD

BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("horovod_worker.py")
LAUNCHERS = ("horovodrun", "mpirun")


def launch(launcher: str, world: int, scenario: str, outdir: Path, timeout: float) -> list[dict[str, Any]]:
    """Run `scenario` on `world` ranks under `launcher`; return what each rank wrote."""
    command = [str(BIN / "python"), str(WORKER), scenario, str(outdir)]
    if launcher == "horovodrun":
        command = [str(BIN / "horovodrun"), "-np", str(world), "--gloo", *command]
    else:
        command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(world), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        output, _ = proc.communicate()
        pytest.fail(f"{launcher} {scenario} did not finish within {timeout:.0f}s:\n{output[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{launcher} {scenario} exited with {proc.returncode}:\n{output[-6000:]}")
    return [torch.load(outdir / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=LAUNCHERS)
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(request.param, 2, "suite", tmp_path_factory.mktemp(request.param), timeout=240)


def _ddp_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    out = {}
    runs = (
        ("gradiveq", "gradiveq", "conv", hw.GRADIVEQ),
        ("gradiveq_two", "gradiveq", "conv", hw.GRADIVEQ_TWO),
        ("gradiveq_fitted", "gradiveq", "conv", hw.GRADIVEQ_FITTED),
        ("qsgd", "qsgd", "mlp", hw.QSGD),
    )
    for key, name, kind, options in runs:
        model = hw.build(kind)
        ddp = DDP(model)
        commcomp.register(ddp, name, **options)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        hw.train(ddp, opt, rank, range(hw.PARITY_STEPS), lambda: None)
        out[key] = hw.params(model)
    model = hw.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    PQASGD(model, opt, period=2, quantizer="qsgd", **hw.QSGD)
    hw.train(model, opt, rank, range(hw.PARITY_STEPS), lambda: None)
    out["pqasgd"] = hw.params(model)
    return out


@pytest.fixture(scope="module")
def ddp() -> list[dict[str, torch.Tensor]]:
    return run(_ddp_worker, 2, timeout=180)


def test_every_rank_holds_the_same_parameters_after_every_step(suite):
    for name in ("gradiveq", "gradiveq_two", "gradiveq_fitted", "qsgd", "topk_ef"):
        for rank, result in enumerate(suite):
            assert all(same for _, _, same in result[name]["log"]), f"{name}: ranks differ (rank {rank}'s view)"
        assert torch.equal(suite[0][name]["params"], suite[1][name]["params"])


@pytest.mark.parametrize("method", ["gradiveq", "gradiveq_two", "gradiveq_fitted", "qsgd", "pqasgd"])
def test_same_parameters_as_the_ddp_hook(suite, ddp, method):
    """Same seed, data and options: commcomp on Horovod == commcomp's DDP hook (PQASGD: on
    HorovodCollectives == on torch.distributed)."""
    for rank in range(2):
        horovod = suite[rank][method]["params"]
        reference = ddp[rank][method]
        assert horovod.shape == reference.shape
        torch.testing.assert_close(horovod, reference, rtol=1e-5, atol=1e-6)
        moved = (reference - hw.params(hw.build("conv" if "gradiveq" in method else "mlp"))).abs().max()
        assert moved > 1e-3  # the runs really trained


def test_bytes_sent_are_the_tensors_handed_to_horovod(suite):
    for name in ("gradiveq", "gradiveq_two", "gradiveq_fitted", "qsgd", "topk_ef"):
        for result in suite:
            claimed = [sent for sent, _, _ in result[name]["log"]]
            expected = [exp for _, exp, _ in result[name]["log"]]
            assert claimed == expected, name
    for name in ("gradiveq", "gradiveq_two"):
        tracked = [sent for sent, _, _ in suite[1][name]["log"]]
        # compressed steps after the two dense ones: on this small Net at rank 16 in float32, under half
        assert max(tracked[2:]) * 2 < min(tracked[1:2])
    gradiveq = [sent for sent, _, _ in suite[1]["gradiveq_fitted"]["log"]]
    schedule = [commcomp.gradiveq.Schedule(2, 3, 4).phase(t) for t in range(len(gradiveq))]
    dense = [b for b, phase in zip(gradiveq[1:], schedule[1:]) if phase != "compress"]
    compressed = [b for b, phase in zip(gradiveq, schedule) if phase == "compress"]
    assert max(compressed) * 4 < min(dense)  # GradiVeQ really shrank the compressed steps


def test_checkpoint_resume_is_exact(suite):
    for result in suite:
        assert result["checkpoint"]["step"] == hw.PARITY_STEPS
        assert torch.equal(result["checkpoint"]["params"], result["gradiveq"]["params"])


def test_bad_input_raises_a_clear_error_on_every_rank(suite):
    errors = [result["errors"] for result in suite]
    assert errors[0].keys() == errors[1].keys()
    for rank in range(2):
        e = errors[rank]
        assert e["nan"].startswith("NonFiniteGradientError") and "rank(s) [1]" in e["nan"]
        assert e["mismatch"].startswith("ValueError") and "options differ across ranks" in e["mismatch"]
        assert "unknown compressor 'nope'" in e["unknown_compressor"] and "gradiveq" in e["unknown_compressor"]
        assert "unknown option(s) ['energy']" in e["unknown_option"]
        assert "unknown option(s) ['levels']" in e["unknown_quantizer_option"]
        assert e["no_names"].startswith("ValueError: named_parameters is required")
        assert e["nonlinear_compressor"].startswith("ValueError: topk is not linear")
        assert e["int_tensor"].startswith("TypeError") and "floating-point" in e["int_tensor"]
        assert e["after_errors"] == "no error"  # Horovod still works after the raises


def test_commcomp_compressor_inside_plain_horovod_optimizer(suite):
    for result in suite:
        fp32, fp32_same = result["plain"]["fp32"]
        fp16, fp16_same = result["plain"]["fp16"]
        assert fp32_same and fp16_same
        torch.testing.assert_close(fp16, fp32, rtol=0, atol=1e-3)


@pytest.mark.timeout(1500)
def test_mnist1d_gradiveq_within_one_point_of_horovod_fp32(tmp_path):
    results = launch("mpirun", 4, "convergence", tmp_path, timeout=1200)
    fp32, gradiveq = results[0]["horovod-fp32"], results[0]["gradiveq"]
    print(
        f"MNIST-1D, 4 Horovod ranks: fp32 {fp32['accuracy']:.4f}, gradiveq {gradiveq['accuracy']:.4f}, "
        f"bytes ratio {gradiveq['stats']['total']['compression_ratio']:.2f}x"
    )
    assert all(r[m]["identical"] for r in results for m in ("horovod-fp32", "gradiveq"))
    assert fp32["accuracy"] > 0.85  # the reference really trained
    assert gradiveq["accuracy"] >= fp32["accuracy"] - 0.01
    assert gradiveq["stats"]["total"]["compression_ratio"] > 1.0  # fewer bytes than fp32 overall


def test_an_untested_horovod_version_is_refused_with_a_clear_error() -> None:
    """commcomp.horovod builds on Horovod's private optimizer API, so it names the versions it was
    checked against and refuses others (the check runs when commcomp.horovod is imported)."""
    from commcomp.shims.horovod_internals import TESTED_VERSIONS, check_version

    check_version(TESTED_VERSIONS[0])
    with pytest.raises(RuntimeError, match=r"tested with Horovod 0\.28\.1 but found 0\.27\.0"):
        check_version("0.27.0")
