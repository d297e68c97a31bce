"""DDP integration: `register(ddp_model, method, **options)` and the hooks it installs.

Methods: "gradiveq" (GradiVeQState), any quantizer name from `commcomp.quantizers.names()`
(QuantizerState: e.g. "fp16", "qsgd"), and whatever other modules register (gossip methods).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from commcomp import quantizers
from commcomp.gradiveq import GradiVeQState, gradiveq_hook
from commcomp.hooks.base import METHODS, HookState, NonFiniteGradientError
from commcomp.hooks.quantized import QuantizerState, quantizer_hook
from commcomp.registry import check_options

__all__ = [
    "GradiVeQState",
    "HookState",
    "NonFiniteGradientError",
    "QuantizerState",
    "gradiveq_hook",
    "method_names",
    "quantizer_hook",
    "register",
]


def method_names() -> list[str]:
    """Every name `register` accepts."""
    return sorted(set(METHODS.names()) | set(quantizers.names()))


def register(
    model: nn.parallel.DistributedDataParallel,
    method: str,
    *,
    process_group: dist.ProcessGroup | None = None,
    **options: Any,
) -> HookState:
    """Install the commcomp method `method` on a DDP model and return its state.

    Example::

        model = DistributedDataParallel(net)
        state = commcomp.register(model, "gradiveq", energy_threshold=0.01)
        ...train...
        print(state.stats.as_dict())
        torch.save({"model": model.state_dict(), "comm": state.state_dict()}, path)
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"register() expects a DistributedDataParallel model, got {type(model).__name__}")
    if method in METHODS:
        factory = METHODS.factory(method)
        check_options(f"method {method!r}", factory, options)
        state, hook = factory(model, process_group, **options)
    elif method in quantizers.names():
        state, hook = QuantizerState(process_group, quantizer=method, **options), quantizer_hook
    else:
        raise ValueError(f"unknown communication method {method!r}; valid names: {', '.join(method_names())}")
    state.bind(model)
    model.register_comm_hook(state, hook)
    return state
