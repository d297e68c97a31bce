"""A small multi-process harness for tests: real gloo process groups, one fresh file store per run.

`run(fn, world_size, *args)` spawns `world_size` processes, initialises a gloo process group in
each from a new FileStore in a private temporary directory, calls `fn(rank, world_size, *args)`
and returns the per-rank results (rank order). A failure on any rank raises `WorkerError` with that
rank's traceback; a run that has not finished within `timeout` seconds is killed and raises
`TimeoutError` naming the ranks still running, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["WorkerError", "run"]


class WorkerError(RuntimeError):
    """A worker process raised; the message carries its rank and traceback."""


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
        )
        out = fn(rank, world_size, *args)
        # plain pickle copies tensors by value (the queue's pickler would share memory with a dying process)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return the results by rank."""
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="commcomp-test-")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, os.path.join(tmp, "store"), timeout, fn, args, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout + 30
    try:
        while len(out) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(out) - set(errors))
                detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s{detail}")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                for r in dead:
                    if r not in errors:
                        errors[r] = f"process exited with code {procs[r].exitcode} without reporting"
                continue
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors[rank] = value
        for p in procs:
            p.join(timeout=30)
        if errors:
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise WorkerError(f"{len(errors)} of {world_size} ranks failed:{detail}")
        return [out[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
