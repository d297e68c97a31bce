"""Checking a plan against the 16-bit fallback on real steps, when the prediction is not clear-cut.

The step-time model (codec seconds + collective times, measured apart) can miss what only a real
step shows: on a fast link a codec's CPU time competes with the other ranks' backward passes, and
each dependent collective waits for the slowest rank. So when a plan is predicted less than 2x
faster than sending every bucket by the fallback, the next `steps` steps run the plan and the
`steps` after them the fallback; each step is timed from one first bucket to the next, the median
of each half is taken (an evaluation or a checkpoint in between is an outlier, not a trend), one
all-reduce takes the slowest rank's, and the faster one is kept. Every rank switches at the same
step counts and decides from the same numbers.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from commcomp.auto.plan import Choice

__all__ = ["Verification", "worth_verifying"]

CLEAR_GAIN = 2.0  # a plan predicted this many times faster than the fallback is trusted as it is


def worth_verifying(choices: list[Choice], fallback: str) -> bool:
    """Whether the plan differs from the fallback and is predicted less than `CLEAR_GAIN`x faster."""
    if all(c.method == fallback for c in choices) or any(fallback not in c.candidates for c in choices):
        return False
    planned = sum(c.predicted_seconds for c in choices)
    return planned * CLEAR_GAIN > sum(c.candidates[fallback]["seconds"] for c in choices)


class Verification:
    """From step `start`: `steps` timed steps of the plan, then `steps` of the fallback.

    The halves are counted in steps, not in timings, so a resumed job (whose first step has no
    timing: the clock of the step before it stopped with the old process) switches at the same step.
    """

    def __init__(self, fallback: str, steps: int, start: int, seconds: dict[int, float] | None = None) -> None:
        self.fallback = fallback
        self.steps = steps
        self.start = start
        self.seconds: dict[int, float] = dict(seconds or {})  # step -> its duration
        self._last: tuple[int, float] | None = None  # the step in progress and when it began

    def tick(self, step: int) -> bool:
        """At the first bucket of `step`: time the step that ended; True once both halves are done."""
        now = time.perf_counter()
        if self._last is not None:
            self.seconds[self._last[0]] = now - self._last[1]
        self._last = (step, now)
        return step - self.start >= 2 * self.steps

    def method(self, planned: str, step: int) -> str:
        """What a gradient travels by in `step`."""
        return self.fallback if step - self.start >= self.steps else planned

    def medians(self) -> list[float]:
        """[the plan's median step seconds, the fallback's] (NaN for a half without a timing)."""
        halves: list[list[float]] = [[], []]
        for step, seconds in self.seconds.items():
            halves[(step - self.start) >= self.steps].append(seconds)
        return [statistics.median(h) if h else math.nan for h in halves]

    def state_dict(self) -> dict[str, Any]:
        return {"fallback": self.fallback, "steps": self.steps, "start": self.start, "seconds": dict(self.seconds)}
