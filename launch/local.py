"""The fallback when namespaces cannot be created: N "hosts" that are plain local processes.

`LocalCluster` has the part of `Cluster`'s interface the launchers use (`hosts`, `host_addr`,
`iface`, `run`, `rendezvous_port`, a context manager), so a benchmark runs unchanged on either:

    ok, why = Cluster.available()
    with Cluster(hosts=4, rate_mbit=100) if ok else LocalCluster(hosts=4) as c:
        launch_torchrun(c, "train.py")

There is no shaping (`rate_mbit` is None) and no link to cut. Every host is 127.0.0.1 on `lo`.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from launch.hosts import Hosts

__all__ = ["LocalCluster"]


class LocalCluster(Hosts):
    """`hosts` emulated hosts that all run as local processes on the loopback interface."""

    rate_mbit = None

    def __init__(self, hosts: int = 4) -> None:
        if not isinstance(hosts, int) or hosts < 1:
            raise ValueError(f"hosts must be a positive int, got {hosts!r}")
        self.hosts = hosts

    def host_addr(self, host: int) -> str:
        self._check_host(host)
        return "127.0.0.1"

    def iface(self, host: int) -> str:
        self._check_host(host)
        return "lo"

    def rendezvous_port(self) -> int:
        """A port free right now on this machine (another process could still take it first)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def run(
        self, host: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen[Any]:
        self._check_host(host)
        if not argv:
            raise ValueError("argv must name a program")
        return subprocess.Popen(list(argv), env=env, **popen)

    def up(self) -> LocalCluster:
        return self

    def down(self) -> None:
        pass
