"""Suite-wide rules: test tiers (markers) and "a skipped test fails the run".

Markers are assigned here from one table instead of decorators in every test file, so the tiers can
be read (and changed) in one place:

    multiprocess  starts more than one process (a process group, torchrun, mpirun)
    slow          a convergence run or an end-to-end job: minutes on a 2-core machine
    horovod       needs Horovod
    netns         needs root and network namespaces (the emulated cluster)

`MODULES` gives every test of a module its markers (a module that imports `harness.run` is
multi-process even when not listed); `TESTS` adds markers to the tests whose name
matches a pattern, and `SINGLE_PROCESS` takes `multiprocess` away from the few tests of a
multi-process module that run in this process only. The fast lane is `-m "not slow"`.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from harness import run` in every test module
sys.path.insert(1, os.path.dirname(sys.path[0]))  # `launch` lives next to `commcomp`, not inside the package

import harness

MODULES: dict[str, set[str]] = {
    "test_allreduce_quantizers": {"multiprocess"},
    "test_auto_cluster": {"multiprocess", "netns", "slow"},
    "test_benchmarks": {"multiprocess"},
    "test_cluster": {"multiprocess"},
    "test_ddp_loops": {"multiprocess"},
    "test_elastic": {"multiprocess", "slow"},
    "test_elastic_cluster": {"multiprocess", "netns", "slow"},
    "test_faults": {"multiprocess", "netns", "slow"},
    "test_gossip": {"multiprocess"},
    "test_gossip_mnist": {"multiprocess", "slow"},
    "test_gradiveq": {"multiprocess"},
    "test_horovod": {"multiprocess", "horovod"},
    "test_moe_dist": {"multiprocess"},
    "test_moe_lm": {"multiprocess", "slow"},
    "test_pqasgd": {"multiprocess"},
    "test_quantized_hook": {"multiprocess"},
}

# (module, pattern) -> extra markers; the pattern is matched (fnmatch) against the test's name with
# its parameters, e.g. "test_resume_is_exact[qsgd-options0]". Besides the convergence runs, "slow"
# holds the multi-process tests that the fast lane can leave to CI: it keeps at least one
# multi-process test of every component (hooks, PQASGD, gossip, Horovod, MoE, cluster, launchers).
TESTS: dict[tuple[str, str], set[str]] = {
    ("test_benchmarks", "test_training_records*"): {"slow"},
    ("test_benchmarks", "test_driver_local*"): {"slow"},
    ("test_cluster", "test_links_are_shaped*"): {"netns"},
    ("test_cluster", "test_set_rate_reshapes*"): {"netns"},
    ("test_cluster", "test_teardown_leaves_nothing*"): {"netns"},
    ("test_cluster", "test_sigterm_tears_down*"): {"netns"},
    ("test_cluster", "test_torchrun_across_hosts*"): {"netns"},
    ("test_cluster", "test_torchrun_max_restarts*"): {"netns", "slow"},
    ("test_cluster", "test_mpirun_across_hosts*"): {"netns"},
    ("test_cluster", "test_horovod_under_mpirun*"): {"netns", "horovod"},
    ("test_cluster", "test_cut_link_fails*"): {"netns", "slow"},
    ("test_cluster", "test_local_fallback*"): {"slow"},
    ("test_gossip", "test_mpi_transport*"): {"slow"},
    ("test_gradiveq", "test_mnist1d_*"): {"slow"},
    ("test_gradiveq", "test_checkpoint_resume*"): {"slow"},
    ("test_gradiveq", "test_nan_gradients*"): {"slow"},
    ("test_gradiveq", "test_gradient_as_bucket_view*"): {"slow"},
    ("test_gradiveq", "test_options_differing*"): {"slow"},
    ("test_gradiveq", "test_lambda_zero*"): {"slow"},
    ("test_gradiveq", "test_sampling_steps*"): {"slow"},
    ("test_horovod", "test_mnist1d_*"): {"slow"},
    ("test_horovod", "*mpirun*"): {"slow"},  # the fast lane runs the Horovod suite under horovodrun only
    ("test_horovod", "test_same_parameters_as_the_ddp_hook*"): {"slow"},
    ("test_moe_dist", "test_ddp_on_dense_part*"): {"slow"},
    ("test_overflow", "test_horovod_overflow*"): {"horovod", "slow"},
    ("test_pqasgd", "test_convergence_*"): {"slow"},
    ("test_pqasgd", "test_resume_is_exact*"): {"slow"},
    ("test_pqasgd", "test_clear_errors*"): {"slow"},
    ("test_pqasgd", "test_sparse_parameter*"): {"slow"},
    ("test_pqasgd", "test_identity_equals*"): {"slow"},
    ("test_quantized_hook", "test_resume_is_exact*"): {"slow"},
    ("test_allreduce_quantizers", "test_convergence_*"): {"slow"},
    ("test_allreduce_quantizers", "test_skipped_step_*"): {"slow"},
    ("test_allreduce_quantizers", "test_gloo_sums_*"): {"slow"},
    ("test_allreduce_quantizers", "test_error_feedback_refuses_*"): {"slow"},
}

# single-process tests in modules that are otherwise multi-process
SINGLE_PROCESS: set[tuple[str, str]] = {
    ("test_benchmarks", "test_report_*"),
    ("test_benchmarks", "test_workload_*"),
    ("test_cluster", "test_bad_arguments*"),
    ("test_cluster", "test_init_from_env_single_process*"),
    ("test_gradiveq", "test_conv_layout*"),
    ("test_gradiveq", "test_paper_slice_length*"),
    ("test_gradiveq", "test_linear_rows*"),
    ("test_gradiveq", "test_energy_kept*"),
    ("test_gradiveq", "test_linearity*"),
    ("test_gradiveq", "test_round_trip*"),
    ("test_gradiveq", "test_schedule_phases*"),
    ("test_gradiveq", "test_bad_options*"),
    ("test_pqasgd", "test_bad_arguments*"),
}


def _matches(key: tuple[str, str], module: str, name: str) -> bool:
    return key[0] == module and fnmatch.fnmatchcase(name, key[1])


def _markers(module: str, name: str, spawns: bool) -> set[str]:
    marks = set(MODULES.get(module, set())) | ({"multiprocess"} if spawns else set())
    for key, extra in TESTS.items():
        if _matches(key, module, name):
            marks |= extra
    if any(_matches(key, module, name) for key in SINGLE_PROCESS):
        marks.discard("multiprocess")
    return marks


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: set[tuple[str, str]] = set()
    modules = set()
    for item in items:
        module = item.path.stem
        modules.add(module)
        seen |= {key for key in (*TESTS, *SINGLE_PROCESS) if _matches(key, module, item.name)}
        spawns = getattr(getattr(item, "module", None), "run", None) is harness.run  # a module not listed yet
        marks = _markers(module, item.name, spawns)
        for mark in sorted(marks):
            item.add_marker(getattr(pytest.mark, mark))
        if "netns" in marks:
            item.add_marker(_netns_skip())
    # a renamed test must not drop out of its tier silently
    stale = sorted(k for k in (*TESTS, *SINGLE_PROCESS) if k[0] in modules and k not in seen)
    if stale and not any("::" in a for a in config.args):
        listed = ", ".join(f"{m}.py::{p}" for m, p in stale)
        warnings.warn(f"tests/conftest.py names tests that no longer exist: {listed}", stacklevel=1)


def _netns_skip() -> pytest.MarkDecorator:
    """Skip (which fails the run, see below) the tests of the emulated cluster where it cannot be built."""
    from launch import Cluster

    available, why = Cluster.available()
    return pytest.mark.skipif(not available, reason=f"emulated cluster unavailable: {why}")


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and os.environ.get("COMMCOMP_ALLOW_SKIPS") != "1":
        print(f"\n{len(_skipped)} test(s) skipped; skips count as failures here:", *_skipped, sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
