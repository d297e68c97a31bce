"""commcomp: send fewer bytes in distributed PyTorch training without losing accuracy.

Quick start::

    model = torch.nn.parallel.DistributedDataParallel(net)
    state = commcomp.register(model, "auto")   # or "gradiveq", "qsgd", "topk", "fp16", "choco", ...

Submodules: `quantizers`, `topologies`, `gossip`, `moe`, `pqasgd`, `elastic` (checkpoints across world
sizes), `overflow` (mixed-precision overflow steps); `commcomp.horovod` (imported on its
own, since it needs Horovod).
"""

from commcomp import auto, elastic, gossip, moe, overflow, quantizers, topologies  # gossip registers "dpsgd", ...
from commcomp.auto import AutoState
from commcomp.ddp import GradiVeQState, QuantizerState, gradiveq_hook, method_names, quantizer_hook, register
from commcomp.error_feedback import ErrorFeedback
from commcomp.pqasgd import PQASGD
from commcomp.stats import CommStats

__all__ = [
    "PQASGD",
    "AutoState",
    "CommStats",
    "ErrorFeedback",
    "GradiVeQState",
    "QuantizerState",
    "auto",
    "elastic",
    "gossip",
    "gradiveq_hook",
    "method_names",
    "moe",
    "overflow",
    "quantizer_hook",
    "quantizers",
    "register",
    "topologies",
]
__version__ = "0.1.0"
