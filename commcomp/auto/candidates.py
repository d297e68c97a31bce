"""The methods the auto method chooses among, by name."""

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from commcomp.gradiveq import GradiVeQState
from commcomp.hooks.quantized import QuantizerState

__all__ = ["CANDIDATES", "DEFAULT_CANDIDATES", "Candidate"]

Candidate = Callable[[dist.ProcessGroup | None, dict[str, Any]], QuantizerState | GradiVeQState]

# name -> state factory(process_group, {check_finite, nonfinite}); the order breaks ties
CANDIDATES: dict[str, Candidate] = {
    "fp32": lambda pg, common: QuantizerState(pg, quantizer="identity", **common),
    "bf16": lambda pg, common: QuantizerState(pg, quantizer="bf16", **common),
    "qsgd4": lambda pg, common: QuantizerState(pg, quantizer="qsgd_ar", bits=4, **common),
    "gradiveq": lambda pg, common: GradiVeQState(pg, **common),
    "topk": lambda pg, common: QuantizerState(pg, quantizer="topk", ratio=0.01, error_feedback=True, **common),
}
# top-k is chosen only when asked for: late in training its one-step error falls well under the budget
# (0.33-0.6 on our CNNs), yet top-1% with error feedback never reached the accuracy target on a CNN
# trained to a plateau; one step's error does not show how stale its error feedback makes the update
DEFAULT_CANDIDATES = ("fp32", "bf16", "qsgd4", "gradiveq")
