"""Suite-wide rules: test tiers (markers) and "a skipped test fails the run".

Markers are assigned here from one table instead of decorators in every test file, so the tiers can
be read (and changed) in one place:

    multiprocess  starts more than one process (a process group, torchrun, mpirun)
    slow          a convergence run or an end-to-end job: minutes on a 2-core machine
    horovod       needs Horovod
    netns         needs root and network namespaces (the emulated cluster)

`MODULES` gives every test of a module its markers; `TESTS` adds markers to the tests whose name
starts with a prefix, and `SINGLE_PROCESS` takes `multiprocess` away from the few tests of a
multi-process module that run in this process only. The fast lane is `-m "not slow"`.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `from harness import run` in every test module

MODULES: dict[str, set[str]] = {
    "test_benchmarks": {"multiprocess"},
    "test_cluster": {"multiprocess"},
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

TESTS: dict[tuple[str, str], set[str]] = {
    ("test_benchmarks", "test_driver_local"): {"slow"},
    ("test_cluster", "test_links_are_shaped"): {"netns"},
    ("test_cluster", "test_teardown_leaves_nothing"): {"netns"},
    ("test_cluster", "test_sigterm_tears_down"): {"netns"},
    ("test_cluster", "test_torchrun_across_hosts"): {"netns"},
    ("test_cluster", "test_torchrun_max_restarts"): {"netns", "slow"},
    ("test_cluster", "test_mpirun_across_hosts"): {"netns"},
    ("test_cluster", "test_horovod_under_mpirun"): {"netns", "horovod"},
    ("test_cluster", "test_cut_link_fails"): {"netns"},
    ("test_gradiveq", "test_mnist1d_"): {"slow"},
    ("test_horovod", "test_mnist1d_"): {"slow"},
    ("test_pqasgd", "test_convergence_"): {"slow"},
}

SINGLE_PROCESS: set[tuple[str, str]] = {
    ("test_benchmarks", "test_report_"),
    ("test_benchmarks", "test_workload_"),
    ("test_cluster", "test_bad_arguments"),
    ("test_cluster", "test_init_from_env_single_process"),
    ("test_gradiveq", "test_conv_layout"),
    ("test_gradiveq", "test_paper_slice_length"),
    ("test_gradiveq", "test_linear_rows"),
    ("test_gradiveq", "test_energy_kept"),
    ("test_gradiveq", "test_linearity"),
    ("test_gradiveq", "test_round_trip"),
    ("test_gradiveq", "test_schedule_phases"),
    ("test_gradiveq", "test_bad_options"),
    ("test_pqasgd", "test_bad_arguments"),
}


def _markers(module: str, name: str) -> set[str]:
    marks = set(MODULES.get(module, set()))
    for (mod, prefix), extra in TESTS.items():
        if mod == module and name.startswith(prefix):
            marks |= extra
    if any(mod == module and name.startswith(prefix) for mod, prefix in SINGLE_PROCESS):
        marks.discard("multiprocess")
    return marks


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: set[tuple[str, str]] = set()
    modules = set()
    for item in items:
        module = item.path.stem
        name = getattr(item, "originalname", item.name)  # without the [parameters]
        modules.add(module)
        for key in (*TESTS, *SINGLE_PROCESS):
            if key[0] == module and name.startswith(key[1]):
                seen.add(key)
        for mark in sorted(_markers(module, name)):
            item.add_marker(getattr(pytest.mark, mark))
    # a renamed test must not drop out of its tier silently
    stale = sorted(k for k in (*TESTS, *SINGLE_PROCESS) if k[0] in modules and k not in seen)
    if stale and not any("::" in a for a in config.args):
        listed = ", ".join(f"{m}.py::{p}*" for m, p in stale)
        warnings.warn(f"tests/conftest.py names tests that no longer exist: {listed}", stacklevel=1)


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and os.environ.get("COMMCOMP_ALLOW_SKIPS") != "1":
        print(f"\n{len(_skipped)} test(s) skipped; skips count as failures here:", *_skipped, sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
