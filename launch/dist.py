"""Start torch.distributed from what the launcher put in the environment, on any hardware.

    from launch.dist import init_from_env, finish
    info = init_from_env(timeout=60)        # nccl + cuda:LOCAL_RANK with GPUs, else gloo + cpu
    model = Net().to(info.device)
    ...
    finish()

Works under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), under mpirun
(OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK; MASTER_ADDR and MASTER_PORT passed with `-x`) and as a
single plain process (a world of one). The timeout bounds every collective and, with the
watchdog on, the time before a rank that stops answering is named and the job stops.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from launch.watchdog import Watchdog

__all__ = ["DEFAULT_TIMEOUT", "DistInfo", "finish", "init_from_env"]

DEFAULT_TIMEOUT = 300.0  # seconds; COMMCOMP_TIMEOUT overrides it when no timeout is passed
_BACKENDS = ("gloo", "nccl", "mpi")
_watchdog: Watchdog | None = None


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and what it computes on."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def _env_int(*names: str, default: int | None = None) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None
    if default is None:
        raise ValueError(f"none of the environment variables {', '.join(names)} is set")
    return default


def _timeout(timeout: float | None) -> float:
    if timeout is None:
        raw = os.environ.get("COMMCOMP_TIMEOUT", str(DEFAULT_TIMEOUT))
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"COMMCOMP_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return timeout


def init_from_env(timeout: float | None = None, backend: str | None = None, watchdog: bool = True) -> DistInfo:
    """Initialise the default process group from the launcher's environment variables.

    Args:
        timeout: seconds a collective may take (default: $COMMCOMP_TIMEOUT, else 300).
        backend: "gloo", "nccl" or "mpi"; by default nccl when CUDA is available, else gloo.
        watchdog: name ranks that stop answering for `timeout` seconds and stop (see
            launch.watchdog); needs MASTER_ADDR/MASTER_PORT to point at a TCPStore.
    """
    global _watchdog
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised; call finish() first")
    seconds = _timeout(timeout)
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    rank = _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", default=0)
    world = _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
    local_rank = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of size {world}")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    limit = timedelta(seconds=seconds)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=limit)
        return DistInfo(0, 1, local_rank, backend, device)
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise ValueError("MASTER_ADDR and MASTER_PORT must be set (torchrun sets them; pass them to mpirun with -x)")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=limit)
    if watchdog and world > 1:
        _watchdog = Watchdog(rank, world, addr, int(port), seconds).start()
        atexit.register(_watchdog.stop)
    return DistInfo(rank, world, local_rank, backend, device)


def finish() -> None:
    """End the job on this rank: wait for every rank (a barrier), stop the watchdog, destroy the group.

    The barrier keeps a rank that finishes early (and, under plain env:// or mpirun, takes the
    rendezvous store down with it) from looking like a lost host to ranks still working.
    """
    global _watchdog
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if _watchdog is not None:
        _watchdog.stop()
        atexit.unregister(_watchdog.stop)
        _watchdog = None
    if dist.is_initialized():
        dist.destroy_process_group()
