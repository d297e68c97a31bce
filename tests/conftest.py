"""Suite-wide rules: a skipped test fails the run (a component that did not install is a failure)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `from harness import run` in every test module

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and os.environ.get("COMMCOMP_ALLOW_SKIPS") != "1":
        print(f"\n{len(_skipped)} test(s) skipped; skips count as failures here:", *_skipped, sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
