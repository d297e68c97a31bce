"""Name the ranks that stop answering, instead of a bare gloo timeout (or a hang).

Every rank bumps a counter in the job's rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT)
every `interval` seconds and reads everyone else's. A rank whose counter has not moved for
`timeout` seconds is reported by name, with its address, and this process stops with exit code
`EXIT_CODE` - a cut link, a frozen host or a killed process then fails the job within the timeout
with a message saying which rank is gone. A rank that cannot reach the store itself says so (its
own link is the likely culprit). A rank that finishes or exits marks its counter as done, so it is
never reported.

Two threads keep this honest: one talks to the store (and may block when the network is gone),
the other only compares clocks. An uncaught exception in the main thread (typically gloo's own
"Timed out" error) gets the same diagnosis appended.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

import torch.distributed as dist

from launch.netcheck import local_addr

__all__ = ["EXIT_CODE", "Watchdog"]

EXIT_CODE = 75  # "temporary failure" (EX_TEMPFAIL): a peer is unreachable
_DONE = 1 << 40  # added to a counter when its rank finishes


class Watchdog:
    """Heartbeats through the rendezvous store; reports and stops on a silent peer.

    Args:
        rank, world_size: this process's place in the job.
        master_addr, master_port: the rendezvous store (MASTER_ADDR, MASTER_PORT).
        timeout: seconds of silence after which a peer is declared unreachable.
        interval: seconds between heartbeats (default: timeout / 10, between 0.2 and 2).
        on_lost: called with the message when a peer is lost; default prints it to stderr and
            exits the process with EXIT_CODE two seconds later (the main thread may be stuck
            inside a collective).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        timeout: float,
        interval: float | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.interval = interval or min(2.0, max(0.2, timeout / 10))
        self.master = (master_addr, master_port)
        self.addr = local_addr(master_addr, master_port)
        self.message: str | None = None
        self._on_lost = on_lost or self._abort
        self._prefix = "commcomp/watchdog/"
        now = time.monotonic()
        self._last_seen = [now] * world_size
        self._counts = [-1] * world_size
        self._addrs: dict[int, str] = {}
        self._store_ok = now
        self._stop = threading.Event()
        self._store: dist.Store | None = None
        self._registered = False
        self._threads = [
            threading.Thread(target=self._beat, name="commcomp-heartbeat", daemon=True),
            threading.Thread(target=self._judge, name="commcomp-watchdog", daemon=True),
        ]
        self._prev_hook = sys.excepthook

    def start(self) -> Watchdog:
        """Register this rank (its first heartbeat and its address) before returning, so a rank
        that stops right after this call is still named with its address; then start the threads."""
        try:
            self._store = self._connect()
        except Exception:  # unreachable now: the heartbeat thread keeps trying
            self._store = None
        for t in self._threads:
            t.start()
        sys.excepthook = self._excepthook
        return self

    def stop(self) -> None:
        """Stop watching, wait for the threads, and tell the peers this rank is done (so they never
        report it).

        The wait matters at exit: a thread still inside a store call when the interpreter shuts
        down cannot take the GIL back, and the process aborts (SIGABRT) instead of exiting 0; the
        store's host going away first (rank 0's launcher, done) makes that call fail late. The wait
        is bounded by one store call's timeout.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._prev_hook
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(self._call_timeout() + 1.0)
        if self._store is not None:
            try:
                self._store.add(self._key("beat", self.rank), _DONE)
            except Exception:  # the store may be gone at exit; the peers are told nothing then
                pass

    def _call_timeout(self) -> float:
        """Seconds a store call may take before it fails."""
        return max(2 * self.interval, 1.0)

    def _key(self, kind: str, rank: int) -> str:
        return f"{self._prefix}{kind}/{rank}"

    def _connect(self) -> dist.Store:
        host, port = self.master
        wait = datetime.timedelta(seconds=self._call_timeout())
        store = dist.TCPStore(host, port, is_master=False, timeout=wait, wait_for_workers=False)
        if not self._registered:  # clear what a previous run of this rank left in a reused store
            store.set(self._key("beat", self.rank), "0")
            store.set(self._key("addr", self.rank), self.addr)
            self._registered = True
        return store

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                if self._store is None:
                    self._store = self._connect()
                self._store.add(self._key("beat", self.rank), 1)
                now = time.monotonic()
                for r in range(self.world_size):
                    count = self._store.add(self._key("beat", r), 0)  # read without blocking
                    if count != self._counts[r]:
                        self._counts[r], self._last_seen[r] = count, now
                    if r not in self._addrs and self._store.check([self._key("addr", r)]):
                        self._addrs[r] = self._store.get(self._key("addr", r)).decode()
                self._store_ok = now
            except Exception:  # unreachable store: the judge notices from _store_ok going stale
                self._store = None
            self._stop.wait(self.interval)

    def silent_ranks(self, threshold: float) -> list[int]:
        """Ranks (not finished) whose heartbeat has not moved for `threshold` seconds."""
        now = time.monotonic()
        return [
            r
            for r in range(self.world_size)
            if r != self.rank and self._counts[r] < _DONE and now - self._last_seen[r] > threshold
        ]

    def diagnose(self, threshold: float) -> str | None:
        """A sentence naming who is not answering for `threshold` seconds, or None if all are."""
        store_silence = time.monotonic() - self._store_ok
        if store_silence > threshold:
            host, port = self.master
            return (
                f"rank {self.rank} ({self.addr}) cannot reach the rendezvous store at {host}:{port} "
                f"for {store_silence:.1f}s: this host's link is down, or the store's host is unreachable"
            )
        silent = self.silent_ranks(threshold)
        if not silent:
            return None
        now = time.monotonic()
        who = ", ".join(
            f"rank {r} ({self._addrs.get(r, 'address unknown')}, silent {now - self._last_seen[r]:.1f}s)"
            for r in silent
        )
        return f"rank {self.rank}: not answering: {who}; their host is unreachable or the process is stuck"

    def _judge(self) -> None:
        while not self._stop.wait(self.interval / 2):
            message = self.diagnose(self.timeout)
            if message is not None:
                self.message = f"{message} (watchdog timeout {self.timeout:g}s)"
                self._stop.set()
                self._on_lost(self.message)
                return

    def _abort(self, message: str) -> None:
        print(f"commcomp watchdog: ERROR: {message}; stopping this rank", file=sys.stderr, flush=True)
        time.sleep(2.0)
        os._exit(EXIT_CODE)

    def _excepthook(self, kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        self._prev_hook(kind, value, tb)
        message = self.message or self.diagnose(3 * self.interval)
        if message is not None:
            print(f"commcomp watchdog: the error above is likely because {message}", file=sys.stderr, flush=True)
        self.stop()
