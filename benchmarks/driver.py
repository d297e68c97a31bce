"""What the benchmark drivers share: the output directory, the hosts, following a job's progress.

Each driver (run.py, collectives.py) brings up an emulated cluster (or, where network namespaces
cannot be created, local processes, saying so) and launches its worker script on every host.
"""

from __future__ import annotations

import argparse
import datetime
import re
import threading
import time
from pathlib import Path

from launch.cluster import Cluster
from launch.hosts import Hosts
from launch.job import Job
from launch.local import LocalCluster

__all__ = ["HERE", "ROOT", "add_cluster_options", "follow", "out_dir", "pick_hosts", "torchrun"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", type=int, default=4, help="emulated hosts (one process each)")
    p.add_argument("--rate-mbit", type=float, default=100.0, help="link rate of every host, Mbit/s")
    p.add_argument("--local", action="store_true", help="local processes on loopback, no namespaces or shaping")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per host (one per GPU on GPU nodes)")
    p.add_argument("--out", default="", help="output directory (default results/<UTC time>, linked as results/latest)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds before a launched job is killed")


def out_dir(arg: str) -> Path:
    if arg:
        out = Path(arg)
    else:
        out = ROOT / "results" / datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    if not arg:
        latest = out.parent / "latest"
        if latest.is_symlink() or not latest.exists():
            latest.unlink(missing_ok=True)
            latest.symlink_to(out.name)
    return out


def pick_hosts(args: argparse.Namespace) -> tuple[Hosts, str]:
    if args.local:
        return LocalCluster(args.hosts), f"{args.hosts} local processes (no shaping, --local)"
    ok, why = Cluster.available()
    if not ok:
        print(f"cannot create an emulated cluster ({why}); running on local processes without shaping")
        return LocalCluster(args.hosts), f"{args.hosts} local processes (no shaping: {why})"
    return Cluster(args.hosts, args.rate_mbit), f"{args.hosts} emulated hosts at {args.rate_mbit:g} Mbit/s"


def follow(job: Job, pattern: str = r"^  \[|^wrote|Error|error:") -> threading.Thread:
    """Echo host 0's progress lines (and errors from any host) while the job runs."""
    regex = re.compile(pattern)

    def loop() -> None:
        seen = [0] * len(job.procs)
        while True:
            done = all(p.poll() is not None for p in job.procs)
            for h in range(len(job.procs)):
                lines = job.output(h).splitlines()
                for line in lines[seen[h] :]:
                    line = re.sub(r"\[\d+,\d+\]<std(?:out|err)>:", "", line)  # mpirun's --tag-output
                    if regex.search(line) and (h == 0 or "rror" in line):
                        print(line if h == 0 else f"[host {h}] {line}", flush=True)
                seen[h] = len(lines)
            if done:
                return
            time.sleep(0.5)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def torchrun(hosts: Hosts, script: str, argv: list[str], timeout: float, nproc_per_node: int = 1) -> None:
    """Run benchmarks/<script> under torchrun on every host, echoing its progress; raise if it fails."""
    from launch.torchrun import start_torchrun

    job = start_torchrun(hosts, str(HERE / script), argv, timeout=timeout, stream=False, nproc_per_node=nproc_per_node)
    follower = follow(job)
    job.wait(check=True)
    follower.join(timeout=5)
