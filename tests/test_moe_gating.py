"""Single-process tests of MoE routing and of the layer at world size 1 (no process group)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from commcomp.moe import (
    MoE,
    NoisyTopKGate,
    SwitchGate,
    apply_capacity,
    cv_squared,
    expert_capacity,
    gshard_gating,
    noisy_topk_gating,
    switch_gating,
)
from commcomp.moe.alltoall import decode_payload, encode_payload
from commcomp.moe.gating import _load


def reference_keep(expert_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Plain loops: first choices in token order, then second choices, `capacity` per expert."""
    tokens, k = expert_index.shape
    used = [0] * num_experts
    keep = torch.zeros(tokens, k, dtype=torch.bool)
    for choice in range(k):
        for s in range(tokens):
            e = int(expert_index[s, choice])
            if used[e] < capacity:
                used[e] += 1
                keep[s, choice] = True
    return keep


def test_capacity_drops_exactly_the_overflow() -> None:
    g = torch.Generator().manual_seed(0)
    for tokens, experts, k in [(37, 4, 1), (50, 6, 2), (16, 8, 3)]:
        # skewed choices (distinct per token) so some experts overflow
        logits = torch.randn(tokens, experts, generator=g) + torch.linspace(2, 0, experts)
        index = logits.topk(k, dim=1).indices
        for factor in (0.5, 1.0, 1.25):
            cap = expert_capacity(tokens, experts, k, factor)
            assert cap == math.ceil(factor * tokens * k / experts)
            kept = apply_capacity(index, experts, cap)
            assert torch.equal(kept, reference_keep(index, experts, cap))
            assert torch.bincount(index[kept], minlength=experts).max() <= cap
    assert bool(apply_capacity(index, 8, None).all())


def one_hot_keep(expert_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """The earlier computation: a (K·S, E) one-hot whose running sum gives each pick's place."""
    one_hot = torch.nn.functional.one_hot(expert_index.t().reshape(-1), num_experts)
    place = (one_hot.cumsum(0) - 1).mul_(one_hot).sum(1)
    return (place < capacity).reshape(expert_index.shape[1], -1).t()


def test_capacity_equals_the_one_hot_computation() -> None:
    g = torch.Generator().manual_seed(5)
    for tokens, experts, k in [(1, 1, 1), (9, 3, 3), (64, 5, 2), (200, 16, 4)]:
        index = torch.rand(tokens, experts, generator=g).pow(3).topk(k, dim=1).indices
        for cap in (0, 1, 3, tokens * k):
            assert torch.equal(apply_capacity(index, experts, cap), one_hot_keep(index, experts, cap))


def test_capacity_memory_is_linear_in_picks() -> None:
    """No allocation scales with tokens x experts: the largest is a few int64 per pick (the sort's
    scratch included), where a one-hot takes E of them."""
    from torch.profiler import ProfilerActivity, profile

    tokens, experts, k = 2048, 512, 2
    index = torch.randint(0, experts, (tokens, k), generator=torch.Generator().manual_seed(6))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        apply_capacity(index, experts, 8)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= 64 * tokens * k, f"largest allocation {largest} B; a one-hot is {8 * tokens * k * experts} B"


def test_noisy_gate_resume_is_exact() -> None:
    """The gate's noise generator is in the state dict: save, load into a fresh layer, continue ==
    uninterrupted, bit for bit."""

    def make() -> tuple[MoE, torch.optim.Optimizer]:
        torch.manual_seed(0)
        moe = MoE(6, 4, gate="noisy_topk", capacity_factor=1.0)
        return moe, torch.optim.SGD(moe.parameters(), lr=0.1)

    def train(moe: MoE, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
            y, aux = moe(x)
            opt.zero_grad()
            (y.square().mean() + aux).backward()
            opt.step()

    moe, opt = make()
    train(moe, opt, range(6))
    reference = [p.detach().clone() for p in moe.parameters()]

    first, first_opt = make()
    train(first, first_opt, range(3))
    saved = {"model": first.state_dict(), "opt": first_opt.state_dict()}
    resumed, resumed_opt = make()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, range(3, 6))
    for a, b in zip(reference, resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_switch_and_gshard_weights() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 4, generator=g) + torch.tensor([1.5, 0.0, 0.0, -1.0])
    probs = logits.softmax(1)

    top1 = switch_gating(logits, capacity_factor=1.0)
    assert torch.equal(top1.expert_index[:, 0], probs.argmax(1))
    expected = probs.max(1).values * top1.kept[:, 0]
    torch.testing.assert_close(top1.combine_weight[:, 0], expected)
    assert torch.equal(top1.kept, reference_keep(top1.expert_index, 4, 10))
    assert not bool(top1.kept.all())  # expert 0 is favoured and overflows

    top2 = gshard_gating(logits, capacity_factor=1.0)
    p = probs.gather(1, top2.expert_index)
    assert bool((top2.expert_index[:, 0] != top2.expert_index[:, 1]).all())
    torch.testing.assert_close(top2.combine_weight, (p / p.sum(1, keepdim=True)) * top2.kept)
    assert torch.equal(top2.kept, reference_keep(top2.expert_index, 4, 20))

    # balancing loss: weight · E · Σ f_e P_e
    f = torch.bincount(probs.argmax(1), minlength=4).float() / 40
    torch.testing.assert_close(top1.aux_loss, 0.01 * 4 * (f * probs.mean(0)).sum())


def test_noisy_topk_without_noise_is_softmax_of_top_k() -> None:
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(30, 6, generator=g)
    r = noisy_topk_gating(clean, None, None, k=2)
    top = clean.topk(2, dim=1)
    assert torch.equal(r.expert_index, top.indices)
    torch.testing.assert_close(r.combine_weight, top.values.softmax(1))
    assert bool(r.kept.all())
    importance = torch.zeros(30, 6).scatter(1, top.indices, top.values.softmax(1)).sum(0)
    load = torch.bincount(top.indices.reshape(-1), minlength=6).float()
    torch.testing.assert_close(r.aux_loss, 0.1 * cv_squared(importance) + 0.1 * cv_squared(load))


def test_load_estimator_is_probability_of_staying_in_top_k() -> None:
    """P(x, i): with the other experts' noisy scores fixed, resample expert i's noise (Monte Carlo)."""
    g = torch.Generator().manual_seed(3)
    clean, std = torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g) + 0.3
    noisy = clean + torch.randn(5, 4, generator=g) * std
    k, draws = 2, 200_000
    estimate = torch.zeros(4)
    for i in range(4):
        resampled = noisy.unsqueeze(0).repeat(draws, 1, 1)  # (D, S, E)
        resampled[:, :, i] = clean[:, i] + torch.randn(draws, 5, generator=g) * std[:, i]
        in_top = (resampled.topk(k, dim=2).indices == i).any(2).float()  # (D, S)
        estimate[i] = in_top.mean(0).sum()
    torch.testing.assert_close(_load(clean, noisy, std, k), estimate, atol=0.02, rtol=0)


@pytest.mark.parametrize("gate", ["noisy_topk", "switch"])
def test_balancing_loss_decreases_when_trained_alone(gate: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8) + 0.5
    if gate == "noisy_topk":
        module = NoisyTopKGate(8, 4, k=2, seed=0)
        with torch.no_grad():  # start badly unbalanced: expert 0 wins almost every token
            module.w_gate[:, 0] = 1.0
    else:
        module = SwitchGate(8, 4, capacity_factor=None)
        with torch.no_grad():
            module.wg.weight[0] = 1.0
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    losses, loads = [], []
    for _ in range(60):
        r = module(x)
        losses.append(r.aux_loss.item())
        loads.append(cv_squared(torch.bincount(r.expert_index.reshape(-1), minlength=4)).item())
        opt.zero_grad()
        r.aux_loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
        opt.step()
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert sum(loads[-5:]) / 5 < 0.5 * loads[0], loads


def test_identity_experts_return_gate_weighted_input() -> None:
    torch.manual_seed(0)
    for gate in ("noisy_topk", "switch", "gshard"):
        moe = MoE(8, 4, expert=nn.Identity, gate=gate, capacity_factor=0.75).eval()  # no gate noise
        x = torch.randn(2, 20, 8)
        y, _ = moe(x)
        routing = moe.gate(x.reshape(-1, 8))
        expected = routing.combine_weight.sum(1, keepdim=True) * x.reshape(-1, 8)
        torch.testing.assert_close(y.reshape(-1, 8), expected)
        assert not bool(routing.kept.all())  # some picks dropped: their tokens get less (or nothing)


def test_single_process_layer_matches_token_loop() -> None:
    torch.manual_seed(0)
    moe = MoE(6, 4, gate="gshard", capacity_factor=0.8).eval()
    x = torch.randn(25, 6)
    y, _ = moe(x)
    r = moe.gate(x)
    expected = torch.zeros_like(x)
    for s in range(25):
        for c in range(2):
            if r.kept[s, c]:
                expected[s] += r.combine_weight[s, c] * moe.experts[int(r.expert_index[s, c])](x[s : s + 1])[0]
    torch.testing.assert_close(y, expected)
    assert torch.equal(moe.last_load, torch.bincount(r.expert_index[r.kept], minlength=4))


def test_no_tokens() -> None:
    for gate in ("noisy_topk", "switch", "gshard"):
        y, aux = MoE(6, 4, gate=gate)(torch.randn(0, 6, requires_grad=True))
        assert y.shape == (0, 6) and bool(torch.isfinite(aux))


def test_bad_arguments_raise_clear_errors() -> None:
    moe = MoE(8, 4)
    with pytest.raises(ValueError, match="d_model=8"):
        moe(torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating point"):
        moe(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="k must be between 1 and num_experts=4"):
        MoE(8, 4, k=5)
    with pytest.raises(ValueError, match="exactly 1 expert"):
        MoE(8, 4, gate="switch", k=2)
    with pytest.raises(ValueError, match="unknown MoE gate 'top3'; valid names: gshard, noisy_topk, switch"):
        MoE(8, 4, gate="top3")
    with pytest.raises(ValueError, match="unknown option"):
        MoE(8, 4, gate="switch", gate_options={"w_load": 0.1})
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        MoE(8, 4, capacity_factor=0.0)
    with pytest.raises(ValueError, match="dispatch_dtype"):
        MoE(8, 4, dispatch_dtype=torch.int8)
    with pytest.raises(ValueError, match="experts must keep the shape"):
        MoE(8, 4, expert=lambda: nn.Linear(8, 3))
    with pytest.raises(TypeError, match=r"not an nn\.Module"):
        MoE(8, 4, expert=lambda: "linear")
    with pytest.raises(ValueError, match="num_experts"):
        MoE(8, 0)


def test_payload_encoding_keeps_relative_precision() -> None:
    """fp16 chunks are scaled per chunk: tiny gradients survive (a plain fp16 cast flushes them)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 3, 5, generator=g)
    x[:4] *= 1e-8  # chunk 0: far below fp16's smallest normal (6e-5)
    x[4:7] *= 1e4  # chunk 2: beyond fp16's largest value (65504) after a few more bits
    splits = [4, 0, 3, 5]
    for dtype, eps in [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)]:
        wire, wire_splits = encode_payload(x, splits, dtype)
        assert wire.dtype == dtype and sum(wire_splits) == wire.shape[0]
        back = decode_payload(wire, splits, dtype, torch.float32)
        assert back.shape == x.shape
        assert float(((back - x).abs() / x.abs()).max()) <= eps
    assert float(((x[:4].half().float() - x[:4]).abs() / x[:4].abs()).max()) > 0.5  # why scaling is needed
    wire, wire_splits = encode_payload(x, splits, None)
    assert wire is x and wire_splits == splits
    empty, _ = encode_payload(torch.zeros(0, 5), [0, 0], torch.float16)
    assert decode_payload(empty, [0, 0], torch.float16, torch.float32).shape == (0, 5)
