"""What every set of hosts offers the launchers: `Cluster` (namespaces) and `LocalCluster` (processes)."""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Hosts"]


class Hosts(ABC):
    """`hosts` machines the launchers start one process on each; a context manager (up/down)."""

    hosts: int
    rate_mbit: float | None

    def _check_host(self, host: int) -> int:
        if not isinstance(host, int) or isinstance(host, bool) or not 0 <= host < self.hosts:
            raise ValueError(f"host must be an int in [0, {self.hosts}), got {host!r}")
        return host

    @abstractmethod
    def host_addr(self, host: int) -> str:
        """The address other hosts reach host `host` at."""

    @abstractmethod
    def iface(self, host: int) -> str:
        """Host `host`'s network interface (the value for GLOO_SOCKET_IFNAME)."""

    @abstractmethod
    def rendezvous_port(self) -> int:
        """A TCP port on host 0 for the next job's rendezvous."""

    @abstractmethod
    def run(
        self, host: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen[Any]:
        """Start `argv` on host `host`; extra keywords go to subprocess.Popen."""

    @abstractmethod
    def up(self) -> Hosts: ...

    @abstractmethod
    def down(self) -> None: ...

    def __enter__(self) -> Any:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
