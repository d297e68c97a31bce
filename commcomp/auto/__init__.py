"""The "auto" method: measure the network and each candidate codec, pick a compressor per bucket.

- `measure`: trials of each candidate on a bucket's real gradients, network probes and the fitted
  network model;
- `plan`: the decision per bucket (pure);
- `state`: `AutoState`, the schedule of measuring rounds, the plan, checkpoints;
- `hook`: the DDP hook, registered as "auto".
"""

from commcomp.auto.hook import auto_hook
from commcomp.auto.state import CANDIDATES, DEFAULT_CANDIDATES, AutoState

__all__ = ["CANDIDATES", "DEFAULT_CANDIDATES", "AutoState", "auto_hook"]
