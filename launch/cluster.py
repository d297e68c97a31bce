"""An emulated multi-host cluster on one machine: network namespaces, a bridge, shaped links.

Layout of a cluster named TAG with prefix P (all names are network namespaces):

    P-TAG-sw    the "switch": bridge br0 with one port hI per host, nothing else
    P-TAG-hI    host I: loopback plus interface cc0 (the other end of port hI), address .I+1

Every link is created directly inside these namespaces, so the root namespace's interfaces and
routes are never touched, and deleting the namespaces removes every veth and the bridge. Each
host's link is shaped to `rate_mbit` in both directions with a token bucket filter (tc tbf): on
cc0 for what the host sends and on hI for what it receives; `set_rate` reshapes them while jobs
run. Two clusters never clash, even with the same subnet, because each has its own switch namespace.

Teardown runs on leaving the `with` block, at interpreter exit and on SIGINT/SIGTERM. A cluster
whose owner was killed with SIGKILL is "stale"; `python -m launch down --all-stale` (and
every new `Cluster`) removes those.

    with Cluster(hosts=4, rate_mbit=100) as c:
        proc = c.run(1, ["python", "-c", "print('hello from host 1')"])
        proc.wait()

Command line: `python -m launch --help` (launch/cli.py).
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, cast

from launch.hosts import Hosts

__all__ = ["HOST_IFACE", "Cluster", "ClusterError", "list_clusters", "remove_clusters"]

HOST_IFACE = "cc0"  # the interface name in every host namespace (same name everywhere, for mpirun)
BRIDGE = "br0"
DEFAULT_PREFIX = "commcomp"
DEFAULT_SUBNET = "10.213.0.0/24"
_NETCHECK = Path(__file__).with_name("netcheck.py")
_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,15}")  # names given on the command line start with a letter
_OWNED_RE = re.compile(r"(\d+)-(?:[0-9a-f]{6}|probe)")  # Python-owned: <owner pid>-<random>, probes


class ClusterError(RuntimeError):
    """A namespace, link or shaping command failed, or the machine cannot host a cluster."""


def _cmd(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {out.stderr.strip() or out.stdout.strip()}")
    return out


def _netns_names() -> list[str]:
    out = _cmd("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _check_rate(rate_mbit: float | None) -> None:
    if rate_mbit is not None and not rate_mbit > 0:
        raise ValueError(f"rate_mbit must be positive or None, got {rate_mbit!r}")


def _shape(netns: str, dev: str, rate_mbit: float | None) -> None:
    """Limit what `dev` in `netns` sends to `rate_mbit` (None: remove the limit).

    `replace` creates the filter, or changes an existing one in place (same kind, no handle
    given) rather than deleting it and adding a new one, which would drop what it holds queued.
    """
    if rate_mbit is None:
        roots = json.loads(_cmd("tc", "-j", "-n", netns, "qdisc", "show", "dev", dev, "root").stdout or "[]")
        if any(q.get("kind") == "tbf" for q in roots):  # deleting the default (noqueue) is an error
            _cmd("tc", "-n", netns, "qdisc", "del", "dev", dev, "root")
        return
    _cmd("tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf", *_tbf_args(rate_mbit))


def _tbf_args(rate_mbit: float) -> list[str]:
    """tbf parameters that keep a long transfer within a few percent of `rate_mbit`.

    The bucket must hold at least one timer tick of traffic (the kernel refills it per tick) and
    one 64 KB segment (veth hands over GSO super-packets); the queue holds 100 ms of traffic, so
    TCP's bursts are delayed rather than dropped and a single flow fills the link.
    """
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(64 * 1024, int(rate_bytes / 250))
    limit = max(2 * burst, int(rate_bytes * 0.1))
    return ["rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]


def _signal_teardown(signum: int, frame: FrameType | None) -> None:
    """Tear down every live cluster, then behave as the previous handler would have."""
    _teardown_all()
    previous = _saved_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_live: set[Cluster] = set()
_saved_handlers: dict[int, Any] = {}
_lock = threading.Lock()


def _teardown_all() -> None:
    for cluster in list(_live):
        if cluster.owner == os.getpid():  # not in a forked child: the parent still uses it
            cluster.down()


def _register(cluster: Cluster) -> None:
    with _lock:
        if not _live:
            atexit.register(_teardown_all)
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGINT, signal.SIGTERM):
                    _saved_handlers[signum] = signal.signal(signum, _signal_teardown)
        _live.add(cluster)


def _unregister(cluster: Cluster) -> None:
    with _lock:
        if cluster not in _live:
            return
        _live.discard(cluster)
        if not _live:
            atexit.unregister(_teardown_all)
            if threading.current_thread() is threading.main_thread():
                for signum, handler in _saved_handlers.items():
                    signal.signal(signum, handler)
                _saved_handlers.clear()


class Cluster(Hosts):
    """N emulated hosts joined by a switch, each link shaped to `rate_mbit` both ways.

    Args:
        hosts: number of hosts (1 to 250).
        rate_mbit: link rate of every host in Mbit/s, or None for unshaped links.
        subnet: private IPv4 network for the hosts; host I gets the (I+1)-th address. It exists
            only inside this cluster's namespaces.
        name_prefix: first part of every namespace name (lowercase letters and digits).
        name: the cluster's name; by default `<pid>-<random>`, which marks it as owned by this
            process (stale once the process is gone). Names given here start with a letter and
            are never considered stale.
    """

    def __init__(
        self,
        hosts: int = 4,
        rate_mbit: float | None = 100.0,
        subnet: str = DEFAULT_SUBNET,
        name_prefix: str = DEFAULT_PREFIX,
        name: str | None = None,
    ) -> None:
        if not isinstance(hosts, int) or not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be an int between 1 and 250, got {hosts!r}")
        _check_rate(rate_mbit)
        network = ipaddress.ip_network(subnet)
        if not isinstance(network, ipaddress.IPv4Network) or not network.is_private:
            raise ValueError(f"subnet must be a private IPv4 network, got {subnet!r}")
        if network.num_addresses - 2 < hosts:
            raise ValueError(f"subnet {subnet} has room for fewer than {hosts} hosts")
        if not _NAME_RE.fullmatch(name_prefix):
            raise ValueError(f"name_prefix must be 1-16 lowercase letters/digits, got {name_prefix!r}")
        if name is not None and not _NAME_RE.fullmatch(name):
            raise ValueError(f"name must be 1-16 lowercase letters/digits starting with a letter: {name!r}")
        self.hosts = hosts
        self.rate_mbit = rate_mbit
        self.network = network
        self.owner = os.getpid()
        self.name = name or f"{self.owner}-{secrets.token_hex(3)}"
        self.prefix = name_prefix
        self._up = False
        self._jobs = 0

    # ----- names and addresses -----
    def netns(self, host: int) -> str:
        """Name of host `host`'s network namespace."""
        return f"{self.prefix}-{self.name}-h{self._check_host(host)}"

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}-{self.name}-sw"

    def host_addr(self, host: int) -> str:
        """IPv4 address of host `host` (reachable only from the cluster's hosts)."""
        return str(self.network.network_address + 1 + self._check_host(host))

    def iface(self, host: int) -> str:
        """Name of host `host`'s network interface (the value for GLOO_SOCKET_IFNAME)."""
        self._check_host(host)
        return HOST_IFACE

    def rendezvous_port(self) -> int:
        """A port on host 0 for the next job (each cluster is its own network: nothing else there)."""
        self._jobs += 1
        return 29500 + self._jobs % 500

    # ----- lifecycle -----
    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether this machine can host a cluster; if not, the reason (to fall back to local runs)."""
        return _probe()

    def up(self, keep: bool = False) -> Cluster:
        """Create the namespaces, bridge and shaped links. `keep=True` leaves them after exit."""
        if self._up:
            return self
        ok, reason = Cluster.available()
        if not ok:
            raise ClusterError(f"cannot create an emulated cluster: {reason}")
        remove_clusters(self.prefix, stale_only=True)
        if self.switch_netns in _netns_names():
            raise ClusterError(f"a cluster named {self.name!r} already exists; take it down first")
        if not keep:
            _register(self)
        self._up = True
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        sw = self.switch_netns
        _cmd("ip", "netns", "add", sw)
        _cmd("ip", "-n", sw, "link", "set", "lo", "up")
        _cmd("ip", "-n", sw, "link", "add", "name", BRIDGE, "type", "bridge")
        _cmd("ip", "-n", sw, "link", "set", BRIDGE, "up")
        prefixlen = str(self.network.prefixlen)
        for i in range(self.hosts):
            ns, port = self.netns(i), f"h{i}"
            _cmd("ip", "netns", "add", ns)
            _cmd("ip", "-n", ns, "link", "set", "lo", "up")
            _cmd("ip", "-n", sw, "link", "add", "name", port, "type", "veth", "peer", "name", HOST_IFACE, "netns", ns)
            _cmd("ip", "-n", sw, "link", "set", port, "master", BRIDGE)
            _cmd("ip", "-n", sw, "link", "set", port, "up")
            _cmd("ip", "-n", ns, "addr", "add", f"{self.host_addr(i)}/{prefixlen}", "dev", HOST_IFACE)
            _cmd("ip", "-n", ns, "link", "set", HOST_IFACE, "up")
            if self.rate_mbit is not None:
                for where, dev in self._link_ends(i):
                    _shape(where, dev, self.rate_mbit)

    def _link_ends(self, host: int) -> tuple[tuple[str, str], tuple[str, str]]:
        """(namespace, device) of both ends of host `host`'s link: its cc0 (what it sends) and its
        switch port (what it receives)."""
        return (self.netns(host), HOST_IFACE), (self.switch_netns, f"h{host}")

    def set_rate(self, rate_mbit: float | None) -> None:
        """Reshape every host's link, both ways, to `rate_mbit` Mbit/s (None: unshaped), live.

        Running jobs keep their connections; from the next packet on, the kernel sends at the
        new rate (a link slowed down mid-job, to see how a method copes). Raises ClusterError if
        the cluster is not up or a `tc` command fails (links reshaped before it keep the new rate).
        """
        _check_rate(rate_mbit)
        if not self._up:
            raise ClusterError(f"cluster {self.name!r} is not up")
        for i in range(self.hosts):
            for where, dev in self._link_ends(i):
                _shape(where, dev, rate_mbit)
        self.rate_mbit = rate_mbit

    def down(self) -> None:
        """Stop every process left in the namespaces and delete them (links and bridge go too)."""
        _unregister(self)
        self._up = False
        _remove_namespaces(sorted(n for n in _netns_names() if n.startswith(f"{self.prefix}-{self.name}-")))

    # ----- running things on hosts -----
    def run(
        self, host: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen[Any]:
        """Start `argv` on host `host` (inside its namespace); extra keywords go to Popen."""
        if not argv:
            raise ValueError("argv must name a program")
        return subprocess.Popen(["ip", "netns", "exec", self.netns(host), *argv], env=env, **popen)

    def set_link(self, host: int, up: bool) -> None:
        """Bring host `host`'s link down (cut it off, as a pulled cable) or back up."""
        _cmd("ip", "-n", self.netns(host), "link", "set", HOST_IFACE, "up" if up else "down")

    def measure_rate(self, src: int, dst: int, nbytes: int = 8 << 20, port: int = 5201) -> float:
        """Send `nbytes` over TCP from host `src` to host `dst`; return the rate seen, in Mbit/s."""
        receiver = self.run(
            dst,
            [sys.executable, str(_NETCHECK), "receive", self.host_addr(dst), str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        replies = cast(IO[str], receiver.stdout)
        try:
            if replies.readline().strip() != "listening":
                raise ClusterError(f"the receiver on host {dst} did not start")
            send = [sys.executable, str(_NETCHECK), "send", self.host_addr(dst), str(port), str(nbytes)]
            sender = self.run(src, send, stderr=subprocess.PIPE, text=True)
            _, err = sender.communicate(timeout=600)
            if sender.returncode != 0:
                raise ClusterError(f"sending from host {src} to host {dst} failed: {err.strip()}")
            got, seconds = replies.readline().split()
        finally:
            receiver.kill()
            receiver.wait()
        if int(got) != nbytes:
            raise ClusterError(f"host {dst} received {got} of {nbytes} bytes")
        return int(got) * 8 / float(seconds) / 1e6

    def status(self) -> str:
        """A readable description of the cluster as the kernel sees it."""
        rate = "unshaped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s each way"
        lines = [f"cluster {self.name}: {self.hosts} hosts on {self.network}, links {rate}"]
        for i in range(self.hosts):
            link = _cmd("ip", "-n", self.netns(i), "-br", "link", "show", HOST_IFACE, check=False).stdout.split()
            state = link[1] if len(link) > 1 else "missing"
            lines.append(f"  host {i}: netns {self.netns(i)}  {HOST_IFACE} {self.host_addr(i)}  {state}")
        return "\n".join(lines)

    @classmethod
    def attach(cls, name: str, name_prefix: str = DEFAULT_PREFIX) -> Cluster:
        """The existing cluster `name` (e.g. made by `python -m launch up`)."""
        found = list_clusters(name_prefix).get(name)
        if not found:
            raise ClusterError(f"no cluster named {name!r} (prefix {name_prefix!r}) exists")
        hosts = sum(1 for n in found if re.search(r"-h\d+$", n))
        c = cls.__new__(cls)
        c.hosts, c.name, c.prefix, c._up, c._jobs, c.owner = hosts, name, name_prefix, True, 0, os.getpid()
        addr = _cmd("ip", "-n", c.netns(0), "-o", "-4", "addr", "show", HOST_IFACE).stdout.split()[3]
        c.network = ipaddress.IPv4Interface(addr).network  # `-4`: IPv4 only
        qdisc = _cmd("tc", "-n", c.netns(0), "qdisc", "show", "dev", HOST_IFACE).stdout
        rate = re.search(r"rate (\d+(?:\.\d+)?)([KMG]?)bit", qdisc)
        scale = {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}
        c.rate_mbit = float(rate.group(1)) * scale[rate.group(2)] if rate else None
        return c


def list_clusters(name_prefix: str = DEFAULT_PREFIX) -> dict[str, list[str]]:
    """Existing clusters with this prefix: name -> its namespaces."""
    pattern = re.compile(rf"{re.escape(name_prefix)}-(.+)-(?:h\d+|sw)")
    found: dict[str, list[str]] = {}
    for ns in _netns_names():
        m = pattern.fullmatch(ns)
        if m:
            found.setdefault(m.group(1), []).append(ns)
    return found


def _is_stale(name: str) -> bool:
    owner = _OWNED_RE.fullmatch(name)
    return owner is not None and not Path(f"/proc/{owner.group(1)}").exists()


def remove_clusters(name_prefix: str = DEFAULT_PREFIX, stale_only: bool = True) -> list[str]:
    """Delete clusters with this prefix: only those whose owner process is gone, or all of them."""
    removed = []
    for name, namespaces in list_clusters(name_prefix).items():
        if not stale_only or _is_stale(name):
            _remove_namespaces(namespaces)
            removed.append(name)
    return removed


def _remove_namespaces(namespaces: Sequence[str]) -> None:
    """Kill the processes inside `namespaces`, then delete them; a namespace holding a process
    would otherwise live on, unnamed, with its links."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        pids = _pids_in(namespaces)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline and _pids_in(namespaces):
            time.sleep(0.05)
    for ns in namespaces:
        _cmd("ip", "netns", "delete", ns, check=False)
    left = set(namespaces) & set(_netns_names())
    if left:
        raise ClusterError(f"could not delete namespaces {sorted(left)}")


def _pids_in(namespaces: Sequence[str]) -> list[int]:
    pids: list[int] = []
    for ns in namespaces:
        pids += [int(p) for p in _cmd("ip", "netns", "pids", ns, check=False).stdout.split()]
    return [p for p in pids if p != os.getpid()]


_probe_result: tuple[bool, str] | None = None


def _probe() -> tuple[bool, str]:
    """Try the real thing once per process: a namespace with a veth pair and a tbf qdisc."""
    global _probe_result
    if _probe_result is not None:
        return _probe_result
    if not sys.platform.startswith("linux"):
        _probe_result = (False, "network namespaces need Linux")
    elif os.geteuid() != 0:
        _probe_result = (False, "creating network namespaces needs root")
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        _probe_result = (False, "the `ip` and `tc` commands (package iproute2) are missing")
    else:
        ns = f"{DEFAULT_PREFIX}-{os.getpid()}-probe-sw"  # swept as stale if this process dies now
        try:
            _cmd("ip", "netns", "add", ns)
            _cmd("ip", "-n", ns, "link", "add", "name", "ta", "type", "veth", "peer", "name", "tb")
            _cmd("tc", "-n", ns, "qdisc", "add", "dev", "ta", "root", "tbf", *_tbf_args(100))
            _probe_result = (True, "")
        except ClusterError as e:
            _probe_result = (False, str(e))
        finally:
            _cmd("ip", "netns", "delete", ns, check=False)
    return _probe_result
