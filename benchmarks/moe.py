"""MoE layer benchmark: tokens per second and all-to-all bytes per step, commcomp's `MoE` (fp32,
fp16 and bf16 dispatch) side by side with fairscale's `MOELayer`, versus world size and experts.

Both layers route top-2 (GShard) with capacity 2·S/E per expert (commcomp: gate "gshard",
capacity_factor 1.0), share the gate and expert weights, and run the same experts (Linear -> GELU
-> Linear). One step is forward + backward of mean(y²) + aux loss; no optimizer. Per step: a
barrier, then the wall-clock time of the slowest rank, and its CPU time (which a busy machine
inflates less); the table gives the medians over the steps.
Bytes: the tensors each rank hands to `all_to_all_single` / `all_gather` during one step,
counted by a pass-through wrapper around the `dist` name of both layers' modules (for commcomp
also checked against the layer's own `stats`); "remote" leaves out the chunk a rank sends to
itself. For the fp16/bf16 variants the output and input-gradient error relative to fp32 dispatch
(same weights, same input, hence the same routing) measures what the compression costs.

Local processes (spawn + gloo on this machine)::

    python benchmarks/moe.py --world-sizes 1 2 4 --experts 4 8 16 --out results/moe

One world size under torchrun (for instance on the emulated cluster; rank 0 writes the results)::

    torchrun --nproc-per-node 4 benchmarks/moe.py --torchrun --experts 4 8 16 --out results/moe

From Python: `run_moe_benchmark(world_sizes=(1, 2, 4), experts=(4, 8), out_dir="results/moe")`.
Writes moe.json, moe.md (the table) and moe.png into the output directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make `commcomp` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import commcomp.moe.alltoall as commcomp_alltoall
from benchmarks.counting import CountingDist, count_collectives
from commcomp.moe import MoE, feed_forward

__all__ = ["fairscale_problem", "main", "measure", "report", "run_moe_benchmark", "run_moe_cluster_benchmark", "spawn"]

VARIANTS = {"commcomp": None, "commcomp-fp16": torch.float16, "commcomp-bf16": torch.bfloat16}


def fairscale_problem() -> str | None:
    """None if fairscale's MOELayer imports, else why not."""
    try:
        from fairscale.nn import MOELayer, Top2Gate  # noqa: F401
    except Exception as err:  # any import failure means: leave fairscale out, and say why
        return f"fairscale does not import: {type(err).__name__}: {err}"
    return None


class A2ACounter(CountingDist):
    """`benchmarks.counting.CountingDist` (all bytes handed to a collective, in `bytes_sent`) that
    also counts, in `remote`, the bytes of all_to_all_single and all_gather bound for other ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.remote = 0

    def all_to_all_single(
        self,
        output: Tensor,
        input: Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
        group: dist.ProcessGroup | None = None,
        **kw: Any,
    ) -> Any:
        row = input[0].numel() * input.element_size() if input.dim() and input.shape[0] else 0
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        own = input_split_sizes[rank] * row if input_split_sizes else input.shape[0] // world * row
        self.remote += input.numel() * input.element_size() - own
        return super().all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    def all_gather(
        self, tensor_list: list[Tensor], tensor: Tensor, group: dist.ProcessGroup | None = None, **kw: Any
    ) -> Any:
        self.remote += tensor.numel() * tensor.element_size() * (dist.get_world_size(group) - 1)
        return super().all_gather(tensor_list, tensor, group=group, **kw)


def _layers(experts: int, d_model: int, hidden: int, with_fairscale: bool) -> dict[str, nn.Module]:
    """The layers to compare, all with the same gate and expert weights (seeded alike on every rank)."""
    torch.manual_seed(1234 + dist.get_rank())  # expert weights differ per rank, gate weights are copied
    base = MoE(d_model, experts, lambda: feed_forward(d_model, hidden), gate="gshard", capacity_factor=1.0)
    gate_weight = torch.randn(experts, d_model, generator=torch.Generator().manual_seed(0)) / d_model**0.5
    gate: Any = base.gate  # typed as a plain Module by nn.Module's attribute lookup
    gate.wg.weight.data.copy_(gate_weight)
    layers: dict[str, nn.Module] = {}
    for name, dtype in VARIANTS.items():
        layer = MoE(
            d_model, experts, lambda: feed_forward(d_model, hidden), gate="gshard", capacity_factor=1.0,
            dispatch_dtype=dtype,
        )  # fmt: skip
        layer.load_state_dict(base.state_dict())
        layers[name] = layer
    if with_fairscale:
        from fairscale.nn import MOELayer, Top2Gate

        gate = Top2Gate(d_model, experts)
        gate.wg.weight.data.copy_(gate_weight)
        local = nn.ModuleList(feed_forward(d_model, hidden) for _ in range(base.num_local))
        local.load_state_dict(base.experts.state_dict())
        layers["fairscale"] = MOELayer(gate, local)
    return layers


def _fairscale_module() -> ModuleType:
    import fairscale.nn.moe.moe_layer

    return fairscale.nn.moe.moe_layer


def _step(name: str, layer: nn.Module, x: Tensor) -> Tensor:
    """Forward + backward; returns the output. fairscale wants (groups, tokens, M) input."""
    if name == "fairscale":
        groups: int = layer.num_local_experts  # type: ignore[assignment]  # an int attribute of fairscale's layer
        y = layer(x.view(groups, -1, x.shape[1])).reshape(x.shape)
        aux = layer.l_aux
    else:
        y, aux = layer(x)
    (y.pow(2).mean() + aux).backward()
    return y


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _mean_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def measure(
    experts: Sequence[int], tokens: int, d_model: int, hidden: int, steps: int, warmup: int, with_fairscale: bool
) -> list[dict[str, Any]]:
    """Run every layer on the current default process group; returns the rows (same on every rank)."""
    world = dist.get_world_size()
    rows = []
    for num_experts in experts:
        if num_experts % world:
            continue
        layers = _layers(num_experts, d_model, hidden, with_fairscale)
        data = torch.Generator().manual_seed(10 + dist.get_rank())
        xs = [torch.randn(tokens, d_model, generator=data) for _ in range(warmup + steps)]
        outputs: dict[str, tuple[Tensor, Tensor]] = {}
        for name, layer in layers.items():
            module = _fairscale_module() if name == "fairscale" else commcomp_alltoall
            times, cpu_times, sent, remote = [], [], [], []
            for i, x in enumerate(xs):
                x = x.clone().requires_grad_()
                layer.zero_grad()
                dist.barrier()
                counter = A2ACounter()
                with count_collectives(module, counter=counter):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    y = _step(name, layer, x)
                    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                if i == 0:
                    assert x.grad is not None  # x requires grad and _step ran backward
                    outputs[name] = (y.detach(), x.grad)
                if isinstance(layer, MoE) and world > 1 and layer.stats.last.bytes_sent != counter.bytes_sent:
                    raise RuntimeError(
                        f"{name}: stats say {layer.stats.last.bytes_sent} bytes, counted {counter.bytes_sent}"
                    )
                if i >= warmup:
                    times.append(_max_over_ranks(elapsed))
                    cpu_times.append(_max_over_ranks(cpu))
                    sent.append(counter.bytes_sent)
                    remote.append(counter.remote)
            median = statistics.median(times)
            row = {
                "world_size": world,
                "experts": num_experts,
                "local_experts": num_experts // world,
                "tokens_per_rank": tokens,
                "d_model": d_model,
                "hidden": hidden,
                "impl": name,
                "step_seconds": median,
                "cpu_seconds": statistics.median(cpu_times),
                "tokens_per_second": world * tokens / median,
                "bytes_per_step": _mean_over_ranks(statistics.mean(sent)),
                "remote_bytes_per_step": _mean_over_ranks(statistics.mean(remote)),
            }
            if name in VARIANTS and VARIANTS[name] is not None:
                y, g = outputs[name]
                y32, g32 = outputs["commcomp"]
                row["output_rel_error"] = _max_over_ranks(_rel(y, y32))
                row["grad_rel_error"] = _max_over_ranks(_rel(g, g32))
            rows.append(row)
    return rows


def _spawned(rank: int, world: int, store: str, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
        out = fn(*args)
        if rank == 0:
            results.put(("ok", out))
    except BaseException as err:
        results.put(("error", f"rank {rank}: {type(err).__name__}: {err}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 3600) -> Any:
    """Run fn(*args) on `world` local gloo processes (one thread each); returns rank 0's result."""
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="commcomp-bench-")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_spawned, args=(r, world, os.path.join(tmp, "store"), fn, args, results))
        for r in range(world)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while True:  # poll, so that a worker dying before it can report does not leave us waiting
            try:
                status, value = results.get(timeout=2)
                break
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"ranks {dead} exited without a result" if dead else "timed out") from None
        if status != "ok":
            raise RuntimeError(value)
        for p in procs:
            p.join(timeout=60)
        return value
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def table(rows: list[dict[str, Any]]) -> str:
    head = "| W | E | impl | step ms | CPU ms | tokens/s | KiB/step/rank | remote KiB | out err | grad err |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        err = (f"{r['output_rel_error']:.1e}", f"{r['grad_rel_error']:.1e}") if "output_rel_error" in r else ("", "")
        lines.append(
            f"| {r['world_size']} | {r['experts']} | {r['impl']} | {1e3 * r['step_seconds']:.1f} | "
            f"{1e3 * r['cpu_seconds']:.1f} | "
            f"{r['tokens_per_second']:.0f} | {r['bytes_per_step'] / 1024:.0f} | "
            f"{r['remote_bytes_per_step'] / 1024:.0f} | {err[0]} | {err[1]} |"
        )
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any]) -> None:
    """Print the table; write moe.json, moe.md and (with matplotlib) moe.png into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    print(text)
    (out / "moe.md").write_text(text + "\n")
    (out / "moe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    experts = sorted({r["experts"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(2, len(experts), figsize=(4 * len(experts), 7), squeeze=False)
    for col, e in enumerate(experts):
        for impl in impls:
            sel = sorted((r for r in rows if r["experts"] == e and r["impl"] == impl), key=lambda r: r["world_size"])
            ws = [r["world_size"] for r in sel]
            axes[0][col].plot(ws, [r["tokens_per_second"] for r in sel], marker="o", label=impl)
            axes[1][col].plot(ws, [r["bytes_per_step"] / 2**20 for r in sel], marker="o", label=impl)
        axes[0][col].set_title(f"{e} experts")
        axes[1][col].set_xlabel("world size")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(sorted({r["world_size"] for r in rows}))
    axes[0][0].set_ylabel("tokens / s (all ranks)")
    axes[1][0].set_ylabel("all-to-all MiB / step / rank")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "moe.png", dpi=100)
    print(f"wrote {out / 'moe.json'}, {out / 'moe.md'}, {out / 'moe.png'}")


def _meta(args: dict[str, Any]) -> dict[str, Any]:
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(), **args}
    problem = fairscale_problem()
    if problem is None:
        import fairscale

        meta["fairscale"] = fairscale.__version__
    else:
        meta["fairscale"] = problem
    return meta


def run_moe_benchmark(
    world_sizes: Sequence[int] = (1, 2, 4),
    experts: Sequence[int] = (4, 8, 16),
    tokens: int = 1024,
    d_model: int = 128,
    hidden: int = 512,
    steps: int = 10,
    warmup: int = 2,
    out_dir: str | Path = "results/moe",
    with_fairscale: bool = True,
    note: str = "",
) -> list[dict[str, Any]]:
    """Spawn each world size on local gloo processes, measure, and write the report; returns the rows.

    `note` is stored in the report's meta (e.g. why a cluster run fell back to local processes)."""
    problem = fairscale_problem() if with_fairscale else None
    if problem:
        print(f"fairscale left out: {problem}")
    settings = {"tokens": tokens, "d_model": d_model, "hidden": hidden, "steps": steps, "warmup": warmup}
    rows: list[dict[str, Any]] = []
    for world in world_sizes:
        args = (experts, tokens, d_model, hidden, steps, warmup, with_fairscale and problem is None)
        rows += spawn(measure, world, *args)
    meta = {**settings, "launcher": "spawn", "world_sizes": list(world_sizes), **({"note": note} if note else {})}
    report(rows, out_dir, _meta(meta))
    return rows


def run_moe_cluster_benchmark(
    world_sizes: Sequence[int] = (2, 4),
    experts: Sequence[int] = (4, 8),
    tokens: int = 1024,
    d_model: int = 128,
    hidden: int = 512,
    steps: int = 5,
    warmup: int = 1,
    out_dir: str | Path = "results/moe-cluster",
    with_fairscale: bool = True,
    rate_mbit: float = 100.0,
    timeout: float = 900.0,
) -> list[dict[str, Any]]:
    """The same measurements on the emulated multi-host cluster (`launch.Cluster`): for each world
    size W, W hosts whose links are shaped to `rate_mbit`, one torchrun agent and one rank per host.
    Each job's rank 0 writes its rows into a temporary directory; they are merged into one report
    in `out_dir`. Where namespaces cannot be created, runs on local processes instead and says so.
    Returns the rows."""
    from launch import Cluster, launch_torchrun

    if not rate_mbit > 0:
        raise ValueError(f"rate_mbit must be positive, got {rate_mbit!r}")
    sizes = (tokens, d_model, hidden, steps, warmup)
    ok, reason = Cluster.available()
    if not ok:
        note = f"emulated cluster unavailable ({reason}): ran on local processes instead"
        print(note)
        return run_moe_benchmark(world_sizes, experts, *sizes, out_dir, with_fairscale, note=note)
    problem = fairscale_problem() if with_fairscale else None
    if problem:
        print(f"fairscale left out: {problem}")
    options = ["--tokens", "--d-model", "--hidden", "--steps", "--warmup"]
    args = ["--torchrun", "--experts", *map(str, experts), *(f"{o}={v}" for o, v in zip(options, sizes, strict=True))]
    args += ["--no-fairscale"] if not with_fairscale or problem else []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="commcomp-moe-") as tmp:
        for world in world_sizes:
            out = Path(tmp) / f"w{world}"
            with Cluster(hosts=world, rate_mbit=rate_mbit) as cluster:
                launch_torchrun(cluster, str(Path(__file__).resolve()), [*args, "--out", str(out)], timeout=timeout)
            rows += json.loads((out / "moe.json").read_text())["rows"]
    settings = dict(zip(("tokens", "d_model", "hidden", "steps", "warmup"), sizes, strict=True))
    launcher = f"torchrun on the emulated cluster: one host per rank, links shaped to {rate_mbit} Mbit/s"
    report(
        rows,
        out_dir,
        _meta({**settings, "launcher": launcher, "rate_mbit": rate_mbit, "world_sizes": list(world_sizes)}),
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", help="not with --torchrun; default 1 2 4 (--cluster: 2 4)")
    p.add_argument("--experts", type=int, nargs="+", help="default 4 8 16 (--cluster: 4 8)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512, help="expert hidden width")
    p.add_argument("--steps", type=int, help="default 10 (--cluster: 5)")
    p.add_argument("--warmup", type=int, help="default 2 (--cluster: 1)")
    p.add_argument("--no-fairscale", action="store_true")
    p.add_argument("--torchrun", action="store_true", help="this process is one rank of a torchrun job")
    p.add_argument("--cluster", action="store_true", help="one emulated host (torchrun agent) per rank")
    p.add_argument("--rate-mbit", type=float, default=100.0, help="link rate of every host with --cluster")
    p.add_argument("--out", help="default results/moe (--cluster: results/moe-cluster)")
    a = p.parse_args(argv)
    if a.torchrun and a.cluster:
        p.error("--torchrun (one rank of a job) and --cluster (start the jobs) exclude each other")
    small = a.cluster  # the cluster's defaults keep a run to a few minutes
    world_sizes = a.world_sizes or ([2, 4] if small else [1, 2, 4])
    a.experts = a.experts or ([4, 8] if small else [4, 8, 16])
    a.steps = a.steps if a.steps is not None else (5 if small else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if small else 2)
    a.out = a.out or ("results/moe-cluster" if small else "results/moe")
    sizes = (a.tokens, a.d_model, a.hidden, a.steps, a.warmup)
    if a.cluster:
        run_moe_cluster_benchmark(world_sizes, a.experts, *sizes, a.out, not a.no_fairscale, a.rate_mbit)
        return
    if not a.torchrun:
        run_moe_benchmark(world_sizes, a.experts, *sizes, a.out, not a.no_fairscale)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=600))
    try:
        problem = None if a.no_fairscale else fairscale_problem()
        rows = measure(a.experts, a.tokens, a.d_model, a.hidden, a.steps, a.warmup, not a.no_fairscale and not problem)
        if dist.get_rank() == 0:
            settings = {"tokens": a.tokens, "d_model": a.d_model, "hidden": a.hidden, "steps": a.steps}
            report(rows, a.out, _meta({**settings, "launcher": "torchrun", "world_sizes": [dist.get_world_size()]}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
