"""Command line for emulated clusters: `python -m launch COMMAND ...` (run as root).

up [--hosts 4] [--rate 100 | --unshaped] [--name default]   create a cluster that stays up
status [--name NAME]                                        show one cluster, or list all
exec [--name NAME] HOST COMMAND...                          run COMMAND on host HOST (0-based)
rate [--name NAME] SRC DST [--mbytes 8]                     measure the link rate SRC -> DST
shape [--name NAME] (MBIT | --unshaped)                     reshape every link live
torchrun [--name NAME] [--nproc-per-node P] SCRIPT ARGS...  torchrun on every host
mpirun [--name NAME] [--nproc-per-host P] PROGRAM ARGS...   mpirun across the hosts
down [--name NAME | --all-stale | --all]                    delete a cluster / leftovers
"""

from __future__ import annotations

import argparse
import sys

from launch.cluster import DEFAULT_PREFIX, DEFAULT_SUBNET, Cluster, ClusterError, list_clusters, remove_clusters
from launch.job import LaunchError
from launch.mpi import launch_mpirun
from launch.torchrun import launch_torchrun

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n")[0])
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix (default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)

    def named(name: str, help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help)
        cmd.add_argument("--name", default="default", help="cluster name (default %(default)s)")
        return cmd

    up = named("up", "create a cluster that stays up until `down`")
    up.add_argument("--hosts", type=int, default=4)
    up.add_argument("--rate", type=float, default=100.0, help="link rate per host, Mbit/s (default 100)")
    up.add_argument("--unshaped", action="store_true", help="no rate limit")
    up.add_argument("--subnet", default=DEFAULT_SUBNET)
    sub.add_parser("status", help="show a cluster, or list all").add_argument("--name")
    ex = named("exec", "run a command on one host")
    ex.add_argument("host", type=int)
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    rate = named("rate", "measure the TCP rate from host SRC to host DST")
    rate.add_argument("src", type=int)
    rate.add_argument("dst", type=int)
    rate.add_argument("--mbytes", type=float, default=8.0)
    shape = named("shape", "reshape every host's link (both ways) to a new rate, live")
    limit = shape.add_mutually_exclusive_group(required=True)
    limit.add_argument("mbit", type=float, nargs="?", help="new link rate per host, Mbit/s")
    limit.add_argument("--unshaped", action="store_true", help="no rate limit")
    tr = named("torchrun", "run a script with torchrun on every host")
    tr.add_argument("--nproc-per-node", type=int, default=1)
    tr.add_argument("--max-restarts", type=int, default=0)
    tr.add_argument("--timeout", type=float, default=3600.0)
    tr.add_argument("script")
    tr.add_argument("args", nargs=argparse.REMAINDER)
    mp = named("mpirun", "run a program under mpirun across the hosts")
    mp.add_argument("--nproc-per-host", type=int, default=1)
    mp.add_argument("--timeout", type=float, default=3600.0)
    mp.add_argument("argv", nargs=argparse.REMAINDER)
    down = sub.add_parser("down", help="delete a cluster, or leftovers")
    which = down.add_mutually_exclusive_group()
    which.add_argument("--name", default="default")
    which.add_argument("--all-stale", action="store_true", help="clusters whose owning process is gone")
    which.add_argument("--all", action="store_true", help="every cluster with this prefix")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    try:
        return _run(opts)
    except (ClusterError, ValueError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(opts: argparse.Namespace) -> int:
    prefix = opts.prefix
    if opts.command == "up":
        rate = None if opts.unshaped else opts.rate
        c = Cluster(opts.hosts, rate, opts.subnet, name_prefix=prefix, name=opts.name).up(keep=True)
        print(c.status())
        return 0
    if opts.command == "status":
        names = [opts.name] if opts.name else sorted(list_clusters(prefix))
        for name in names:
            print(Cluster.attach(name, prefix).status())
        if not names:
            print(f"no clusters with prefix {prefix!r}")
        return 0
    if opts.command == "down":
        if opts.all or opts.all_stale:
            gone = remove_clusters(prefix, stale_only=not opts.all)
            print(f"removed {len(gone)} cluster(s): {' '.join(gone)}")
        else:
            Cluster.attach(opts.name, prefix).down()
            print(f"removed cluster {opts.name}")
        return 0
    c = Cluster.attach(opts.name, prefix)
    if opts.command == "exec":
        if not opts.argv:
            raise ValueError("exec needs a command to run")
        return c.run(opts.host, opts.argv).wait()
    if opts.command == "rate":
        nbytes = int(opts.mbytes * (1 << 20))
        print(f"host {opts.src} -> host {opts.dst}: {c.measure_rate(opts.src, opts.dst, nbytes):.1f} Mbit/s")
        return 0
    if opts.command == "shape":
        c.set_rate(None if opts.unshaped else opts.mbit)
        print(c.status())
        return 0
    if opts.command == "torchrun":
        launch_torchrun(
            c,
            opts.script,
            opts.args,
            nproc_per_node=opts.nproc_per_node,
            max_restarts=opts.max_restarts,
            timeout=opts.timeout,
        )
        return 0
    if opts.command == "mpirun":
        if not opts.argv:
            raise ValueError("mpirun needs a program to run")
        launch_mpirun(c, opts.argv, nproc_per_host=opts.nproc_per_host, timeout=opts.timeout)
        return 0
    raise ValueError(f"unknown command {opts.command!r}")  # argparse rejects these first
