"""Run a script with torchrun across the hosts of a cluster: one torchrun agent per host.

    with Cluster(hosts=4, rate_mbit=100) as c:
        result = launch_torchrun(c, "train.py", ["--epochs", "1"], nproc_per_node=1, timeout=600)

Host I runs `python -m torch.distributed.run --nnodes N --node-rank I --nproc-per-node P
--master-addr <host 0> --master-port PORT script args...` inside its namespace, with
GLOO_SOCKET_IFNAME (and NCCL's, TensorPipe's, Horovod's) set to its interface. Ranks are
I * P + local rank. With `max_restarts > 0` the agents use the c10d rendezvous on host 0 instead of
the static one, so that when a worker dies every agent restarts its workers together (ranks are
then assigned by the rendezvous); the static rendezvous cannot re-form a group.

On a real cluster the same command, typed on every node, is all there is to it (see the README).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from launch.hosts import Hosts
from launch.job import Job, LaunchResult, kill_tree, worker_env

__all__ = ["launch_torchrun", "start_torchrun", "torchrun_argv"]


def torchrun_argv(
    hosts: Hosts,
    node_rank: int,
    script: str,
    args: Sequence[str] = (),
    *,
    nproc_per_node: int = 1,
    master_port: int,
    max_restarts: int = 0,
    module: bool = False,
    python: str = sys.executable,
    job_id: str = "commcomp",
) -> list[str]:
    """The torchrun command line for host `node_rank`."""
    argv = [python, "-m", "torch.distributed.run", f"--nnodes={hosts.hosts}", f"--nproc-per-node={nproc_per_node}"]
    argv.append(f"--local-addr={hosts.host_addr(node_rank)}")  # not the hostname: namespaces share one
    master = hosts.host_addr(0)
    if max_restarts > 0:
        is_host = "true" if node_rank == 0 else "false"
        argv += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={master}:{master_port}",
            f"--rdzv-id={job_id}",
            f"--rdzv-conf=is_host={is_host}",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.5",
        ]
    else:
        argv += [f"--node-rank={node_rank}", f"--master-addr={master}", f"--master-port={master_port}"]
    return [*argv, *(["-m"] if module else []), script, *args]


def start_torchrun(
    hosts: Hosts,
    script: str,
    args: Sequence[str] = (),
    *,
    nproc_per_node: int = 1,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    max_restarts: int = 0,
    master_port: int | None = None,
    module: bool = False,
    grace: float = 10.0,
    stream: bool = True,
    python: str = sys.executable,
) -> Job:
    """Start one torchrun agent per host; return the running `Job` (`.wait()` gives the result).

    Args:
        hosts: a `Cluster` (or `LocalCluster`), already up.
        script: path of the Python script (a module name with `module=True`).
        args: the script's arguments.
        nproc_per_node: worker processes per host (one per GPU on GPU nodes).
        timeout: seconds before everything is killed and the result marked timed out.
        env: extra environment variables for every worker (they win over the defaults).
        max_restarts: torchrun's --max-restarts (switches to the c10d rendezvous, see above).
        master_port: rendezvous port on host 0 (default: a fresh one from `hosts`).
        grace: seconds the other hosts get after one fails before they are killed.
        stream: echo output as it comes, each line prefixed with `[hI]`.
        python: the interpreter that runs torchrun on every host.
    """
    if not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be a positive int, got {nproc_per_node!r}")
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts must be a non-negative int, got {max_restarts!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    port = master_port or hosts.rendezvous_port()
    # With restarts, a fresh store per rendezvous round: torch's shared agent store keeps the
    # previous round's process-group keys, and a restarted group can then read stale addresses.
    restart_env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if max_restarts > 0 else {}
    procs = []
    try:
        for i in range(hosts.hosts):
            argv = torchrun_argv(
                hosts,
                i,
                script,
                args,
                nproc_per_node=nproc_per_node,
                master_port=port,
                max_restarts=max_restarts,
                module=module,
                python=python,
                job_id=f"commcomp-{port}",
            )
            procs.append(
                hosts.run(
                    i,
                    argv,
                    env=worker_env(hosts.iface(i), {**restart_env, **(env or {})}),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
    except BaseException:
        for p in procs:
            kill_tree(p.pid)
        raise
    return Job(procs, timeout=timeout, grace=grace, stream=stream)


def launch_torchrun(
    hosts: Hosts, script: str, args: Sequence[str] = (), *, check: bool = True, **options: Any
) -> LaunchResult:
    """Run `script args...` with torchrun on every host and wait for it to finish.

    `options` are those of `start_torchrun`. With `check` (default) a failure or timeout raises
    `LaunchError` carrying every failed host's output; otherwise the `LaunchResult` (exit codes
    and output per host, elapsed seconds) says what happened.
    """
    return start_torchrun(hosts, script, args, **options).wait(check=check)
