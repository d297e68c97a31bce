"""GradiVeQ: PCA-based vector quantization of gradient slices (Yu et al., NeurIPS 2018).

- `codec`: pure tensor code (`SlicePlan`, `plan_slices`, `LayerCodec`);
- `schedule`: which steps are warm-up, sampled or compressed (`Schedule`);
- `refit`: the collectives that fit a basis on one rank and share it (`refit_bases`);
- `hook`: the DDP hook and its state (`GradiVeQState`, `gradiveq_hook`), also used by Horovod.
"""

from commcomp.gradiveq.codec import LayerCodec, SlicePlan, plan_slices
from commcomp.gradiveq.hook import GradiVeQExchange, GradiVeQState, Share, gradiveq_hook
from commcomp.gradiveq.refit import refit_bases
from commcomp.gradiveq.schedule import Schedule

__all__ = [
    "GradiVeQExchange",
    "GradiVeQState",
    "LayerCodec",
    "Schedule",
    "Share",
    "SlicePlan",
    "gradiveq_hook",
    "plan_slices",
    "refit_bases",
]
