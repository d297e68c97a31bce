"""Run a program with OpenMPI's mpirun across the hosts of a cluster (also Horovod under mpirun).

    with Cluster(hosts=4, rate_mbit=100) as c:
        launch_mpirun(c, [sys.executable, "train_horovod.py"], nproc_per_host=1, timeout=600)

mpirun itself runs on host 0. It starts its daemons on the other hosts through an "rsh agent"
(launch/rsh_agent.sh) that runs the daemon inside the host's namespace, since there is no ssh
between namespaces; MPI's own traffic (btl) and its control traffic (oob) are kept on the hosts'
interface. Processes are not bound to cores (every host shares this machine's cores). Each rank
gets MASTER_ADDR (host 0) and MASTER_PORT, so `launch.dist.init_from_env()` also works under
mpirun. On a `LocalCluster` it is a plain local `mpirun -np N`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launch.cluster import Cluster
from launch.hosts import Hosts
from launch.job import Job, LaunchResult, worker_env

__all__ = ["RSH_AGENT", "launch_mpirun", "mpirun_argv", "start_mpirun"]

RSH_AGENT = Path(__file__).with_name("rsh_agent.sh")


def mpirun_argv(
    hosts: Hosts,
    argv: Sequence[str],
    *,
    nproc_per_host: int = 1,
    export: Sequence[str] = (),
    mca: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The mpirun command line (run on host 0) that starts `argv` `nproc_per_host` times per host."""
    total = hosts.hosts * nproc_per_host
    cmd = ["mpirun", "--allow-run-as-root", "-np", str(total), "--bind-to", "none", "--tag-output"]
    params: dict[str, str] = {}
    if isinstance(hosts, Cluster):
        cmd += ["--host", ",".join(f"{hosts.host_addr(i)}:{nproc_per_host}" for i in range(hosts.hosts))]
        iface = hosts.iface(0)
        params = {
            "plm_rsh_agent": str(RSH_AGENT),
            "plm_rsh_no_tree_spawn": "1",  # every daemon is started from host 0, by the agent
            "btl": "self,tcp",  # no shared memory: hosts share /dev/shm and hostname, segments would clash
            "btl_tcp_if_include": iface,
            "oob_tcp_if_include": iface,
        }
    else:
        cmd += ["--oversubscribe"]
    params.update(mca or {})
    for key, value in params.items():
        cmd += ["--mca", key, value]
    for name in export:
        cmd += ["-x", name]
    return [*cmd, *extra_args, *argv]


def start_mpirun(
    hosts: Hosts,
    argv: Sequence[str],
    *,
    nproc_per_host: int = 1,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    mca: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    stream: bool = True,
) -> Job:
    """Start mpirun on host 0 and return the running `Job` (one process; `.wait()` gives the result).

    Args:
        hosts: a `Cluster` (or `LocalCluster`), already up.
        argv: the program and its arguments, e.g. [sys.executable, "script.py"].
        nproc_per_host: MPI ranks per host; ranks are numbered host by host.
        timeout: seconds before everything is killed and the result marked timed out.
        env: extra environment variables, exported to every rank.
        mca: extra or overriding MCA parameters (name -> value).
        extra_args: more mpirun options, placed before `argv`.
        stream: echo output as it comes (mpirun tags each line with [jobid,rank]).
    """
    if not argv:
        raise ValueError("argv must name a program")
    if not isinstance(nproc_per_host, int) or nproc_per_host < 1:
        raise ValueError(f"nproc_per_host must be a positive int, got {nproc_per_host!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if shutil.which("mpirun") is None:
        raise FileNotFoundError("mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)")
    extra = {"MASTER_ADDR": hosts.host_addr(0), "MASTER_PORT": str(hosts.rendezvous_port())}
    if isinstance(hosts, Cluster):
        extra["COMMCOMP_NETNS_MAP"] = " ".join(f"{hosts.host_addr(i)}={hosts.netns(i)}" for i in range(hosts.hosts))
    full_env = worker_env(hosts.iface(0), {**extra, **(env or {})})
    export = sorted({*extra, *(env or {}), "GLOO_SOCKET_IFNAME", "PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS"})
    cmd = mpirun_argv(hosts, argv, nproc_per_host=nproc_per_host, export=export, mca=mca, extra_args=extra_args)
    proc = hosts.run(
        0, cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    return Job([proc], timeout=timeout, grace=0.0, stream=stream)


def launch_mpirun(hosts: Hosts, argv: Sequence[str], *, check: bool = True, **options: Any) -> LaunchResult:
    """Run `argv` under mpirun across every host and wait for it (options as for `start_mpirun`).

    With `check` (default) a non-zero exit or timeout raises `LaunchError` with the output.
    """
    return start_mpirun(hosts, argv, **options).wait(check=check)
