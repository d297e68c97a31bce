"""Thin gate modules around the pure routing functions in `gating.py`, and the gate registry.

A gate maps tokens (S, M) to a `Routing`. Build one by name with `make_gate(name, d_model,
num_experts, k, capacity_factor, **options)`; `GATES.names()` lists the names:

* "noisy_topk": Shazeer et al. 2017, any k; W_g and W_noise start at zero (the noise breaks the tie).
* "switch": Switch Transformer, k = 1.
* "gshard": GShard, k = 2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from commcomp.moe.gating import Routing, gshard_gating, noisy_topk_gating, switch_gating
from commcomp.registry import Registry

__all__ = ["GATES", "GShardGate", "NoisyTopKGate", "SwitchGate", "check_gate_args", "make_gate"]

GATES: Registry[nn.Module] = Registry("MoE gate")


def check_gate_args(num_experts: int, k: int, capacity_factor: float | None) -> None:
    """ValueError unless 1 <= k <= num_experts and capacity_factor is None or positive."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be at least 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be between 1 and num_experts={num_experts}, got k={k}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive or None (no limit), got {capacity_factor}")


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating. Noise is drawn only in training mode, from a generator seeded with `seed`.

    Args:
        noise_epsilon: added to softplus(x·W_noise) so the noise scale, which divides in the load
            estimator, stays positive (tensor2tensor uses 1e-2).
        w_importance, w_load: weights of the two balancing losses (0.1 each in the paper's
            language-modelling runs).
        seed: seed of this gate's noise generator (one generator per device). `MoE` uses the
            rank unless `gate_options` gives a seed, so no two ranks draw the same noise. The
            generators' states are part of `state_dict()`, so a resumed run is exact.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int | None = 2,
        capacity_factor: float | None = None,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        noise_epsilon: float = 1e-2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.k, self.capacity_factor = 2 if k is None else k, capacity_factor
        check_gate_args(num_experts, self.k, capacity_factor)
        self.w_importance, self.w_load, self.noise_epsilon = w_importance, w_load, noise_epsilon
        self.seed = seed
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts))
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    # The noise generators travel in the module's state_dict (as its "_extra_state" entry), so a
    # resumed run draws the same noise as an uninterrupted one.
    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generators = {}
        for device, gen_state in state["generators"].items():
            self._generator(torch.device(device)).set_state(gen_state)

    def forward(self, x: Tensor) -> Routing:
        clean = x @ self.w_gate
        noise_std = noise = None
        if self.training:
            noise_std = F.softplus(x @ self.w_noise) + self.noise_epsilon
            noise = torch.randn(clean.shape, generator=self._generator(x.device), device=x.device)
        return noisy_topk_gating(clean, noise_std, noise, self.k, self.capacity_factor, self.w_importance, self.w_load)


class SwitchGate(nn.Module):
    """Top-1 Switch routing; `aux_weight` is the balancing loss weight (0.01 in the paper)."""

    fixed_k = 1

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int | None = None,
        capacity_factor: float | None = 1.25,
        aux_weight: float = 0.01,
    ) -> None:
        super().__init__()
        if k is not None and k != self.fixed_k:
            raise ValueError(f"{type(self).__name__} routes each token to exactly {self.fixed_k} expert(s); got k={k}")
        self.k, self.capacity_factor, self.aux_weight = self.fixed_k, capacity_factor, aux_weight
        check_gate_args(num_experts, self.k, capacity_factor)
        self.wg = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: Tensor) -> Routing:
        return switch_gating(self.wg(x), self.capacity_factor, self.aux_weight)


class GShardGate(SwitchGate):
    """Top-2 GShard routing; weights of the two picks sum to 1 before capacity drops."""

    fixed_k = 2

    def forward(self, x: Tensor) -> Routing:
        return gshard_gating(self.wg(x), self.capacity_factor, self.aux_weight)


GATES.register("noisy_topk")(NoisyTopKGate)
GATES.register("switch")(SwitchGate)
GATES.register("gshard")(GShardGate)


def make_gate(
    name: str, d_model: int, num_experts: int, k: int | None, capacity_factor: float | None, **options: float
) -> nn.Module:
    """Build the gate registered as `name` (k=None: the gate's own k, 2 for "noisy_topk").

    Unknown names or options raise ValueError listing the valid ones.
    """
    return GATES.get(name, d_model=d_model, num_experts=num_experts, k=k, capacity_factor=capacity_factor, **options)
