"""The "auto" method: measure the network and each candidate codec, pick a compressor per bucket.

- `measure`: trials of each candidate on a bucket's real gradients, network probes and the fitted
  network model;
- `candidates`: the methods to choose among;
- `plan`: the decision per bucket (pure);
- `verify`: timing a plan against bf16 and fp32 for every bucket on real steps, when the prediction is close;
- `state`: `AutoState`, the schedule of measuring rounds, the plan, checkpoints;
- `hook`: the DDP hook, registered as "auto".
"""

from commcomp.auto.candidates import CANDIDATES, DEFAULT_CANDIDATES
from commcomp.auto.hook import auto_hook
from commcomp.auto.state import AutoState

__all__ = ["CANDIDATES", "DEFAULT_CANDIDATES", "AutoState", "auto_hook"]
