"""Routing as pure functions: which experts each token goes to, with what weight, and the aux loss.

Dimension letters: S tokens, E experts, K choices per token.

Three gates share one core (`route`): pick the K best experts per token from a score, weight them
by the softmax probabilities (optionally renormalised over the K picks), then drop the picks that
overflow an expert's capacity. They differ in the score and in the auxiliary loss:

* noisy top-k (Shazeer et al. 2017): score H = x·W_g + N(0,1)·softplus(x·W_noise); weights are
  softmax(KeepTopK(H)) (= softmax probabilities renormalised over the picks); aux loss
  w_importance·CV(importance)² + w_load·CV(load)² with the smooth load estimator P(x, i).
* Switch (Fedus et al. 2021), K = 1: weight is the top softmax probability itself;
  aux loss = weight·E·Σ_e f_e·P_e (f_e: fraction of first choices, P_e: mean probability).
* GShard (Lepikhin et al. 2020), K = 2: weights g1, g2 renormalised to sum to 1 before dropping;
  same aux loss as Switch.

Capacity: `capacity = ceil(capacity_factor · S · K / E)` picks per expert. Picks are admitted in
priority order, all first choices (token order) before any second choice, and so on; a pick whose
place in its expert's queue is `>= capacity` is dropped: its weight becomes 0 and the token's
output gets nothing from that expert (the caller's residual connection carries the token on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Routing",
    "apply_capacity",
    "cv_squared",
    "expert_capacity",
    "gshard_gating",
    "noisy_topk_gating",
    "route",
    "switch_gating",
    "switch_loss",
]


@dataclass
class Routing:
    """A gate's decision for S tokens with K choices each."""

    expert_index: Tensor  # (S, K) int64: the k-th choice of each token
    combine_weight: Tensor  # (S, K) float: weight of that choice in the output, 0 where dropped
    kept: Tensor  # (S, K) bool: False where the capacity limit dropped the pick
    aux_loss: Tensor  # () float: load-balancing loss, for the caller to add to its loss


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float | None) -> int | None:
    """Picks each expert accepts: ceil(capacity_factor · tokens · k / experts); None means no limit."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * k / num_experts)


def apply_capacity(expert_index: Tensor, num_experts: int, capacity: int | None) -> Tensor:
    """(S, K) bool mask of the picks that fit: choice rank first, then token order, `capacity` per expert.

    Memory is O(K·S + E): a stable sort lines the picks up expert by expert in queue order, and a
    pick's place in its expert's queue is its position in that line minus where the expert's run starts.
    """
    if capacity is None:
        return torch.ones_like(expert_index, dtype=torch.bool)
    # Queue order is choice-major: flatten (K, S) so all first choices come before second choices.
    flat = expert_index.t().reshape(-1)  # (K·S,) expert of each pick, in queue order
    order = flat.argsort(stable=True)  # (K·S,) picks grouped by expert, queue order kept within each
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    starts = counts.cumsum(0) - counts  # (E,) where each expert's run begins in `order`
    place = torch.empty_like(flat)
    place[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # (K·S,) place in queue
    return (place < capacity).reshape(expert_index.shape[1], -1).t()  # (S, K)


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, var(x) / mean(x)² (population variance); 0 for one value."""
    if x.numel() < 2:
        return x.new_zeros(())
    x = x.float()
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


def route(
    score: Tensor, probs: Tensor, k: int, capacity: int | None, renormalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k of `score` (S, E); weights from `probs` (S, E); returns (expert_index, weight, kept).

    `weight` is the pick's probability, renormalised over the k picks when `renormalize`; it is
    the weight *before* capacity drops (multiply by `kept` for the combine weight).
    """
    expert_index = score.topk(k, dim=1).indices  # (S, K)
    weight = probs.gather(1, expert_index)  # (S, K)
    if renormalize:
        weight = weight / weight.sum(1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    kept = apply_capacity(expert_index, score.shape[1], capacity)
    return expert_index, weight, kept


def switch_loss(probs: Tensor, first_choice: Tensor, weight: float) -> Tensor:
    """Switch/GShard balancing loss: weight · E · Σ_e f_e · P_e; equals `weight` when perfectly balanced."""
    num_experts = probs.shape[1]
    if probs.shape[0] == 0:  # no tokens on this rank: nothing to balance
        return probs.new_zeros(())
    fraction = torch.bincount(first_choice, minlength=num_experts).float() / probs.shape[0]  # (E,) f_e, no gradient
    mean_prob = probs.float().mean(0)  # (E,) P_e
    return weight * num_experts * (fraction * mean_prob).sum()


def switch_gating(logits: Tensor, capacity_factor: float | None = 1.25, aux_weight: float = 0.01) -> Routing:
    """Top-1 routing of Switch Transformer on router logits (S, E)."""
    probs = logits.float().softmax(1)
    capacity = expert_capacity(logits.shape[0], logits.shape[1], 1, capacity_factor)
    index, weight, kept = route(probs, probs, 1, capacity, renormalize=False)
    return Routing(index, weight * kept, kept, switch_loss(probs, index[:, 0], aux_weight))


def gshard_gating(logits: Tensor, capacity_factor: float | None = 1.25, aux_weight: float = 0.01) -> Routing:
    """Top-2 routing of GShard on router logits (S, E); needs E >= 2."""
    probs = logits.float().softmax(1)
    capacity = expert_capacity(logits.shape[0], logits.shape[1], 2, capacity_factor)
    index, weight, kept = route(probs, probs, 2, capacity, renormalize=True)
    return Routing(index, weight * kept, kept, switch_loss(probs, index[:, 0], aux_weight))


def _load(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Smooth load estimate Σ_x P(x, i) of Shazeer et al. (appendix A), (E,).

    P(x, i) = Φ((clean_i - threshold_i) / std_i), where threshold_i is the k-th largest noisy
    score among the *other* experts: the (k+1)-th largest overall if i is among the top k, the
    k-th largest otherwise.
    """
    top = noisy.topk(k + 1, dim=1).values  # (S, K+1)
    threshold_if_in, threshold_if_out = top[:, k : k + 1], top[:, k - 1 : k]  # (S, 1) each
    is_in = noisy > threshold_if_in  # (S, E)
    threshold = torch.where(is_in, threshold_if_in, threshold_if_out)
    return torch.special.ndtr((clean - threshold) / noise_std).sum(0)


def noisy_topk_gating(
    clean_logits: Tensor,
    noise_std: Tensor | None,
    noise: Tensor | None,
    k: int,
    capacity_factor: float | None = None,
    w_importance: float = 0.1,
    w_load: float = 0.1,
) -> Routing:
    """Noisy top-k gating of Shazeer et al. 2017.

    clean_logits: (S, E) x·W_g. noise_std: (S, E) softplus(x·W_noise) (+ a small epsilon, to keep
    it positive); noise: (S, E) standard normal draws, or None for no noise (evaluation). Without
    noise (or when k == E) the load is the count of picks per expert, which has no gradient; the
    importance loss still has one.
    """
    clean = clean_logits.float()
    num_experts = clean.shape[1]
    if noise is None or noise_std is None:
        noisy = clean
    else:
        noisy = clean + noise.float() * noise_std.float()
    probs = noisy.softmax(1)
    capacity = expert_capacity(clean.shape[0], num_experts, k, capacity_factor)
    index, weight, kept = route(noisy, probs, k, capacity, renormalize=True)
    # Importance and load are measured before capacity drops, as in the paper (which has no capacity).
    gates = torch.zeros_like(probs).scatter(1, index, weight)  # (S, E) G(x)
    importance = gates.sum(0)
    if noise is not None and noise_std is not None and k < num_experts:
        load = _load(clean, noisy, noise_std.float(), k)
    else:
        load = (gates > 0).float().sum(0)
    aux = w_importance * cv_squared(importance) + w_load * cv_squared(load)
    return Routing(index, weight * kept, kept, aux)
