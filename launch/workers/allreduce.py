"""Smoke test for a launched job: every rank all-reduces (rank + 1) * [0, 1, ..., n-1].

    torchrun ... launch/workers/allreduce.py [--size N] [--timeout S] [--send-mbytes M]
                                             [--hold SECONDS] [--fail-once RANK] [--freeze RANK]

Prints one line per rank: `RESULT {"rank": r, "world_size": w, "sum": [...], "addr": a, ...}`
(addr: the host the rank ran on). The correct sum is w (w + 1) / 2 * [0, 1, ..., n-1]; the caller
checks it. --send-mbytes times sending that many MiB from rank 0 to the last rank (the
receiver's record gets "send_seconds").
--hold keeps all-reducing for that many seconds after printing `READY` (to cut a link meanwhile).
--fail-once makes that rank exit with code 3 on the first attempt (to exercise --max-restarts).
--freeze makes that rank stop itself (SIGSTOP) after READY, as a hung host would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from launch.dist import finish, init_from_env
from launch.netcheck import local_addr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--send-mbytes", type=float, default=0.0)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--fail-once", type=int, default=None)
    parser.add_argument("--freeze", type=int, default=None)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    info = init_from_env(timeout=opts.timeout)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if opts.fail_once == info.rank and attempt == 0:
        print(f"rank {info.rank}: failing on purpose (attempt {attempt})", flush=True)
        os._exit(3)
    x = (info.rank + 1) * torch.arange(opts.size, dtype=torch.float64, device=info.device)
    dist.all_reduce(x)
    record = {"rank": info.rank, "world_size": info.world_size, "sum": x.tolist(), "attempt": attempt}
    record["addr"] = local_addr(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    last = info.world_size - 1
    if opts.send_mbytes > 0 and last > 0:
        payload = torch.zeros(int(opts.send_mbytes * (1 << 20)) // 4, device=info.device)
        dist.barrier()
        start = time.perf_counter()
        if info.rank == 0:
            dist.send(payload, dst=last)
        elif info.rank == last:
            dist.recv(payload, src=0)
            record["send_seconds"] = time.perf_counter() - start
    print(f"RESULT {json.dumps(record)}", flush=True)
    if opts.hold > 0:
        print(f"READY rank {info.rank}", flush=True)
        if opts.freeze == info.rank:
            os.kill(os.getpid(), signal.SIGSTOP)
        end = time.monotonic() + opts.hold
        while time.monotonic() < end:
            dist.all_reduce(torch.ones(1024, device=info.device))
            time.sleep(0.1)
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
