"""What compressed MoE dispatch costs in training: the small MoE transformer language model of
`benchmarks/lm.py`, trained character-level on the standard library's source, once per dispatch
dtype (fp32, fp16, bf16), from the same initial weights on the same batches.

    python benchmarks/moe_lm.py --world-size 4 --steps 300 --out results/moe

Experts are spread over the ranks; the dense part uses DDP (plain all-reduce) with the experts
ignored. Reports held-out loss (nats per character) every `--eval-every` steps, the unigram
entropy baseline, all-to-all bytes per step and the seconds per step; writes moe_lm.json and
moe_lm.md into the output directory. From Python: `run_moe_lm_benchmark(...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `commcomp` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lm import MoELM, batch, encode, evaluate, stdlib_text, train_step, unigram_entropy
from benchmarks.moe import spawn
from commcomp.moe import ddp_ignore_experts

__all__ = ["DTYPES", "main", "run_moe_lm_benchmark", "train"]

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(dtype_name: str, steps: int, eval_every: int, experts: int, batch_size: int, context: int) -> dict[str, Any]:
    """Train one model with dispatch dtype `dtype_name` on the current process group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    codes = encode(stdlib_text(1_000_000))
    split = int(0.9 * codes.numel())
    train_codes, held_out = codes[:split], codes[split:]
    moe_group = dist.new_group(backend="gloo")
    torch.manual_seed(rank)  # the same initial weights for every dtype; DDP broadcasts rank 0's dense ones
    model = MoELM(
        64, 4, 2, context, num_experts=experts, gate="noisy_topk", process_group=moe_group,
        dispatch_dtype=DTYPES[dtype_name],
    )  # fmt: skip
    ddp_ignore_experts(model)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1000 + rank)
    held = batch(held_out, 32, context, torch.Generator().manual_seed(2000 + rank))
    curve = [(0, evaluate(model, held, moe_group))]
    seconds = 0.0
    for step in range(1, steps + 1):
        x, y = batch(train_codes, batch_size, context, data)
        start = time.perf_counter()
        train_step(model, ddp, opt, x, y, world)
        seconds += time.perf_counter() - start
        if step % eval_every == 0 or step == steps:
            curve.append((step, evaluate(model, held, moe_group)))
    moe_bytes = sum(m.stats.total.bytes_sent for m in model.moes) / max(1, model.moes[0].stats.total.steps)
    return {
        "dispatch": dtype_name,
        "world_size": world,
        "experts": experts,
        "unigram_entropy": unigram_entropy(train_codes),
        "held_out_loss": curve,
        "moe_bytes_per_step_rank0": moe_bytes,
        "seconds_per_step_rank0": seconds / steps,
    }


def _train_all(dtypes: Sequence[str], *args: Any) -> list[dict[str, Any]]:
    return [train(name, *args) for name in dtypes]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dispatch | held-out loss start | held-out loss end | unigram entropy | MoE KiB/step/rank | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        curve = r["held_out_loss"]
        lines.append(
            f"| {r['dispatch']} | {curve[0][1]:.3f} | {curve[-1][1]:.3f} | {r['unigram_entropy']:.3f} | "
            f"{r['moe_bytes_per_step_rank0'] / 1024:.0f} | {r['seconds_per_step_rank0']:.3f} |"
        )
    return "\n".join(lines)


def run_moe_lm_benchmark(
    world_size: int = 4,
    steps: int = 300,
    dtypes: Sequence[str] = ("fp32", "fp16", "bf16"),
    eval_every: int = 50,
    experts: int = 8,
    batch_size: int = 8,
    context: int = 64,
    out_dir: str | Path = "results/moe",
) -> list[dict[str, Any]]:
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        raise ValueError(f"unknown dispatch dtype(s) {unknown}; valid: {sorted(DTYPES)}")
    rows = spawn(_train_all, world_size, list(dtypes), steps, eval_every, experts, batch_size, context)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    print(text)
    (out / "moe_lm.md").write_text(text + "\n")
    (out / "moe_lm.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="windows per rank per step")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--out", default="results/moe")
    a = p.parse_args(argv)
    run_moe_lm_benchmark(a.world_size, a.steps, a.dtypes, a.eval_every, a.experts, a.batch, a.context, a.out)


if __name__ == "__main__":
    main()
