"""commcomp: send fewer bytes in distributed PyTorch training without losing accuracy.

Quick start::

    model = torch.nn.parallel.DistributedDataParallel(net)
    state = commcomp.register(model, "gradiveq")   # or "qsgd", "fp16", ...
"""

from commcomp import quantizers
from commcomp.ddp import GradiVeQState, QuantizerState, gradiveq_hook, method_names, quantizer_hook, register
from commcomp.error_feedback import ErrorFeedback
from commcomp.stats import CommStats

__all__ = [
    "CommStats",
    "ErrorFeedback",
    "GradiVeQState",
    "QuantizerState",
    "gradiveq_hook",
    "method_names",
    "quantizer_hook",
    "quantizers",
    "register",
]
__version__ = "0.1.0"
