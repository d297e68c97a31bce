"""Expert-parallel Mixture-of-Experts: gating functions, gate modules, the `MoE` layer, and helpers
that keep expert parameters out of data-parallel averaging. See `layer.py` for the data flow."""

from __future__ import annotations

from commcomp.moe.gates import GATES, GShardGate, NoisyTopKGate, SwitchGate, make_gate
from commcomp.moe.gating import (
    Routing,
    apply_capacity,
    cv_squared,
    expert_capacity,
    gshard_gating,
    noisy_topk_gating,
    switch_gating,
)
from commcomp.moe.layer import MoE, feed_forward
from commcomp.moe.params import (
    ddp_ignore_experts,
    dense_parameters,
    expert_names,
    expert_parameters,
    is_expert_parameter,
    mark_experts,
    scale_expert_grads,
)

__all__ = [
    "GATES",
    "GShardGate",
    "MoE",
    "NoisyTopKGate",
    "Routing",
    "SwitchGate",
    "apply_capacity",
    "cv_squared",
    "ddp_ignore_experts",
    "dense_parameters",
    "expert_capacity",
    "expert_names",
    "expert_parameters",
    "feed_forward",
    "gshard_gating",
    "is_expert_parameter",
    "make_gate",
    "mark_experts",
    "noisy_topk_gating",
    "scale_expert_grads",
    "switch_gating",
]
