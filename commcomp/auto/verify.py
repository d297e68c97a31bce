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

import statistics
import time

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
    """`steps` timed steps of the plan, then `steps` of the fallback."""

    def __init__(self, fallback: str, steps: int) -> None:
        self.fallback = fallback
        self.steps = steps
        self.seconds: list[float] = []  # step durations: the plan's, then the fallback's
        self._last: float | None = None

    def tick(self) -> bool:
        """At a step's first bucket: time the step that ended; True once both halves are timed."""
        now = time.perf_counter()
        if self._last is not None:
            self.seconds.append(now - self._last)
        self._last = now
        return len(self.seconds) >= 2 * self.steps

    def method(self, planned: str) -> str:
        """What a gradient travels by in the step now starting."""
        return self.fallback if len(self.seconds) >= self.steps else planned

    def medians(self) -> list[float]:
        """[the plan's median step seconds, the fallback's]."""
        half = self.steps
        return [statistics.median(self.seconds[:half]), statistics.median(self.seconds[half : 2 * half])]
