"""GradiVeQ: PCA-based vector quantization of gradient slices (Yu et al., NeurIPS 2018).

- `codec`: pure tensor code (`SlicePlan`, `plan_slices`, `LayerCodec`);
- `schedule`: which steps are warm-up, sampled or compressed (`Schedule`);
- `refit`: the collectives that fit a basis on one rank and share it (`refit_bases`);
- `hook`: the DDP hook and its state (`GradiVeQState`, `gradiveq_hook`), also used by Horovod.
"""

from commcomp.gradiveq.codec import LayerCodec, SlicePlan, plan_slices
from commcomp.gradiveq.fitted import FittedExchange, FittedOptions, Share
from commcomp.gradiveq.hook import GradiVeQState, gradiveq_hook
from commcomp.gradiveq.refit import refit_bases
from commcomp.gradiveq.schedule import Schedule
from commcomp.gradiveq.tracked import TrackedLayer, matrix_plan, orthonormalize

__all__ = [
    "FittedExchange",
    "FittedOptions",
    "GradiVeQState",
    "LayerCodec",
    "Schedule",
    "Share",
    "SlicePlan",
    "TrackedLayer",
    "gradiveq_hook",
    "matrix_plan",
    "orthonormalize",
    "plan_slices",
    "refit_bases",
]
