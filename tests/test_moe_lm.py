"""A small MoE transformer language model trained character-level on the standard library's source
on 4 ranks: experts spread over the ranks, DDP with a commcomp hook on the dense part."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from harness import run
from torch.nn.parallel import DistributedDataParallel

from benchmarks.lm import MoELM, batch, encode, evaluate, stdlib_text, train_step, unigram_entropy
from commcomp.ddp import register
from commcomp.moe import ddp_ignore_experts

WORLD, EXPERTS, STEPS, CONTEXT, BATCH = 4, 8, 120, 64, 8


def _train(rank: int, world: int, hook: str) -> dict:
    codes = encode(stdlib_text(400_000))
    split = int(0.9 * codes.numel())
    train, held_out = codes[:split], codes[split:]
    moe_group = dist.new_group(backend="gloo")  # MoE all-to-alls apart from DDP's all-reduces
    torch.manual_seed(rank)  # experts start different on every rank; DDP broadcasts rank 0's dense weights
    model = MoELM(64, 4, 2, CONTEXT, num_experts=EXPERTS, gate="noisy_topk", process_group=moe_group)
    ddp_ignore_experts(model)
    ddp = DistributedDataParallel(model)
    state = register(ddp, hook, warmup_steps=20)  # the default tracked basis after 20 dense steps
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank reads its own windows
    held = batch(held_out, 16, CONTEXT, torch.Generator().manual_seed(2000 + rank))
    before = evaluate(model, held, moe_group)

    load = torch.zeros(len(model.moes), EXPERTS)
    routed = torch.zeros(len(model.moes), EXPERTS)
    for step in range(STEPS):
        train_step(model, ddp, opt, *batch(train, BATCH, CONTEXT, data), world)
        if step >= STEPS - 20:  # expert load over the last 20 steps
            load += torch.stack([m.last_load for m in model.moes]).float()
            routed += torch.stack([m.last_routed for m in model.moes]).float()
    after = evaluate(model, held, moe_group)
    clean = torch.stack([m.last_load for m in model.moes]).float()  # the evaluation's routing: no noise
    for t in (load, routed, clean):
        dist.all_reduce(t)
    return {
        "unigram": unigram_entropy(train),
        "before": before,
        "after": after,
        "load_share": (load / load.sum(1, keepdim=True)).tolist(),  # per layer, per expert
        "clean_share": (clean / clean.sum(1, keepdim=True)).tolist(),
        "dropped": float(1 - load.sum() / routed.sum()),
        "hook_bytes": state.stats.bytes_sent,
        "moe_bytes": sum(m.stats.bytes_sent for m in model.moes),
    }


def test_moe_language_model_learns_stdlib_text_with_balanced_experts() -> None:
    results = run(_train, WORLD, "gradiveq", timeout=300)
    r = results[0]
    shares = torch.tensor(r["load_share"])  # (layers, E), each row sums to 1
    clean = torch.tensor(r["clean_share"])
    report = (
        f"\nMoE LM, {WORLD} ranks x {EXPERTS // WORLD} experts, {STEPS} steps: held-out loss "
        f"{r['before']:.3f} -> {r['after']:.3f} nats/char; unigram entropy {r['unigram']:.3f}; "
        f"expert load share (last 20 steps, ideal {1 / EXPERTS:.3f}): min {shares.min():.3f} "
        f"max {shares.max():.3f}; without gate noise (evaluation) min {clean.min():.3f} max "
        f"{clean.max():.3f}; picks dropped {r['dropped']:.1%}; bytes: MoE all-to-all "
        f"{r['moe_bytes'] / 2**20:.1f} MiB, GradiVeQ hook {r['hook_bytes'] / 2**20:.1f} MiB (rank 0)"
    )
    print(report)
    assert all(x["after"] == pytest.approx(r["after"]) for x in results)  # evaluation averaged over ranks
    assert r["after"] < r["unigram"] - 0.5, report  # well below the best context-free model
    # balanced: no expert gets less than half or more than twice its fair share of picks
    assert shares.min() > 0.5 / EXPERTS and shares.max() < 2.0 / EXPERTS, report
    assert r["dropped"] < 0.1, report
