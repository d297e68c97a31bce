"""A job: one launcher process per host, their output, exit codes, a deadline and clean killing.

`Job` is what the torchrun and mpirun launchers return from `start_*`; `Job.wait()` gives a
`LaunchResult` or raises `LaunchError`. When one host's process fails, the others get `grace`
seconds to report their own errors and are then killed; at the deadline everything is killed.
Killing takes the whole process tree (torchrun starts its workers in their own sessions, so a
process-group kill would miss them).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

__all__ = ["Job", "LaunchError", "LaunchResult", "kill_tree", "worker_env"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the directory holding `launch`
_IFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HOROVOD_GLOO_IFACE")


def worker_env(iface: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a job's processes on a host whose network interface is `iface`.

    This process's environment, plus: every library's interface variable set to `iface` (gloo,
    NCCL, TensorPipe, Horovod), unbuffered Python output, one OpenMP thread unless set, and the
    directory holding `launch` on PYTHONPATH so workers can `import launch.dist`. `extra` wins.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != _ROOT]
    env["PYTHONPATH"] = os.pathsep.join([_ROOT, *rest])
    env.update(dict.fromkeys(_IFACE_VARS, iface))
    env.update(extra or {})
    return env


@dataclass
class LaunchResult:
    """What a finished job left: per-host exit codes (negative: killed by that signal) and output."""

    returncodes: list[int]
    outputs: list[str]
    elapsed: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(code == 0 for code in self.returncodes)

    def summary(self, tail: int = 40) -> str:
        """Which hosts failed or hung: their error lines (watchdog verdicts, exception lines) and
        the end of their output."""
        head = f"timed out after {self.elapsed:.1f}s" if self.timed_out else f"failed after {self.elapsed:.1f}s"
        parts = [f"job {head}; exit codes by host: {self.returncodes}"]
        for i, (code, out) in enumerate(zip(self.returncodes, self.outputs, strict=True)):
            if code != 0:
                lines = out.rstrip().splitlines()
                errors = [line for line in lines if _ERROR_LINE.search(line)]
                parts.append(f"--- host {i} (exit code {code}) ---")
                parts.extend(errors[-tail:])
                parts.append(f"    ... last {min(tail, len(lines))} lines:")
                parts.extend(lines[-tail:])
        return "\n".join(parts)


# "commcomp watchdog: ..." verdicts, the last line of Python tracebacks ("SomeError: ..."), and what
# a process prints when it dies in native code (an abort, a fatal Python error, a C++ terminate)
_ERROR_LINE = re.compile(
    r"commcomp watchdog|^(\[rank\d+\]: )?[\w.]*(Error|Exception)\b.*:"
    r"|Fatal Python error|terminate called|Aborted|core dumped"
)


class LaunchError(RuntimeError):
    """A job failed or timed out; `result` holds every host's exit code and output."""

    def __init__(self, result: LaunchResult) -> None:
        super().__init__(result.summary())
        self.result = result


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the name in () may hold spaces
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(roots: Iterable[int]) -> set[int]:
    """`roots` and all their descendants (one scan of /proc)."""
    tree, out, todo = _children(), set(), list(roots)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(tree.get(p, []))
    return out


def kill_tree(pid: int, grace: float = 3.0) -> None:
    """SIGTERM `pid` and all its descendants, then SIGKILL whatever is left after `grace` s."""
    procs = _descendants([pid])
    _signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = [p for p in procs if not _is_gone(p)]
        if not alive:
            return
        time.sleep(0.05)
        procs |= _descendants(alive)  # children forked meanwhile
    _signal_all(procs, signal.SIGKILL)


def _signal_all(pids: set[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Job:
    """Processes started on several hosts (one per host), watched together.

    Args:
        procs: the started processes, stdout piped (text), stderr merged into it.
        timeout: seconds from now after which everything is killed.
        grace: seconds the other hosts get after the first failure before they are killed.
        stream: echo every line to stdout prefixed with `[hI]` as it arrives.
    """

    def __init__(self, procs: Sequence[subprocess.Popen[str]], timeout: float, grace: float, stream: bool):
        self.procs = list(procs)
        self._start = time.monotonic()
        self._deadline = self._start + timeout
        self._grace = grace
        self._lines: list[list[str]] = [[] for _ in self.procs]
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(i, p.stdout, stream), daemon=True)
            for i, p in enumerate(self.procs)
        ]
        for t in self._readers:
            t.start()

    def _read(self, host: int, pipe: IO[str] | None, stream: bool) -> None:
        if pipe is None:
            return
        for line in pipe:
            with self._cond:
                self._lines[host].append(line)
                self._cond.notify_all()
            if stream:
                sys.stdout.write(f"[h{host}] {line}")
                sys.stdout.flush()

    def output(self, host: int) -> str:
        with self._cond:
            return "".join(self._lines[host])

    def wait_for(self, pattern: str, hosts: Sequence[int] | None = None, timeout: float = 60.0) -> None:
        """Block until the output of every host in `hosts` (default all) matches `pattern`."""
        regex = re.compile(pattern)
        wanted = range(len(self.procs)) if hosts is None else hosts
        end = time.monotonic() + timeout
        with self._cond:
            while not all(regex.search("".join(self._lines[h])) for h in wanted):
                left = end - time.monotonic()
                if left <= 0 or all(p.poll() is not None for p in self.procs):
                    raise TimeoutError(f"no output matching {pattern!r} from hosts {list(wanted)}")
                self._cond.wait(min(left, 0.5))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                kill_tree(p.pid)

    def wait(self, check: bool = True) -> LaunchResult:
        """Wait for every host (killing as described above); raise LaunchError if `check` and any failed."""
        failed_at: float | None = None
        timed_out = False
        try:
            while any(p.poll() is None for p in self.procs):
                now = time.monotonic()
                if failed_at is None and any(p.poll() not in (None, 0) for p in self.procs):
                    failed_at = now
                if now >= self._deadline:
                    timed_out = True
                    break
                if failed_at is not None and now - failed_at >= self._grace:
                    break
                time.sleep(0.1)
        finally:
            self.kill()
        for p in self.procs:
            p.wait()
        for t in self._readers:
            t.join(timeout=5)
        codes = [p.returncode for p in self.procs]
        result = LaunchResult(codes, [self.output(i) for i in range(len(self.procs))], self.elapsed(), timed_out)
        if check and not result.ok:
            raise LaunchError(result)
        return result

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()
