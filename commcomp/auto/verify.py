"""Checking a plan on real steps against sending everything by one plain method, when the
prediction is not clear-cut.

The step-time model (codec seconds + collective times, measured apart) can miss what only a real
step shows: on a fast link a codec's CPU time competes with the other ranks' backward passes, a
collective's time hides behind another rank's computation, and each dependent collective waits for
the slowest rank. So a plan is timed against each of `UNIFORM` (the 16-bit exchange, and no
compression at all) that the candidates include and that it is predicted less than `CLEAR_GAIN`x
faster than: the plan and each alternative take turns in blocks of `steps // 2` steps (so a drift
of the machine's load, or the first steps' warm-up, falls on every arm alike, not on whichever came
first); each step is timed from its first bucket until its last group is decoded and what the step
learned is kept (the part of a step the method changes, its commits included: not the forward pass
or the optimizer, nor whatever the job does between steps, an evaluation, a checkpoint, another
model's step; on a GPU, device time between two events on the current stream: no host wait during
the backward pass, the events are read at the decision).

The plan and the alternatives run two turns. After the first, one small all-reduce takes the
slowest rank's median of each arm and its standard error (from the median absolute deviation: a
step slowed by something else is an outlier, not a trend); if the plan and the fastest alternative
are `CLEAR_GAP`x apart (either way) and their medians `SEPARATED` standard errors apart, that
decides at once, and the second turn, spent sending by what is clearly the slower method, is not
run. Four steps of each are few: a noisy spell once put bf16 and fp32 1.5x apart at 1000 Mbit/s and
kept fp32 for 200 steps, so the gap alone does not decide. Longer checks for near ties (up to 6
turns, until the medians separated) were tried and dropped: in 7 sweeps at 1000 Mbit/s auto took
1.09-1.21x the best fixed method's time to the target, against 1.05-1.14x in 3 with two turns; a
near tie is where more steps tell least (the arms differ by less than the noise), and the arms'
steps (fp32's among them) move the training's path. After the second turn the fastest alternative
replaces the plan only if its median is more than `MARGIN` below the plan's and `SEPARATED` standard
errors from it; on a nearer tie, or one within the noise, the prediction that chose the plan breaks
it (as it does between two alternatives that close). The margin alone let the noise overrule the
prediction: at 1000 Mbit/s on 4 emulated hosts sharing 2 cores, 8 steps of each put fp32 8% ahead
of a bf16 plan, and for the rest of the run the job sent fp32 at 25.0 ms a step where fixed bf16
took 22.9 in the same lockstep run. Every rank switches at the same step counts and decides from
the same numbers.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from commcomp.auto.plan import Choice
from commcomp.stats import timer

__all__ = ["CLEAR_GAIN", "CLEAR_GAP", "MARGIN", "SEPARATED", "UNIFORM", "Verification", "alternatives"]

CLEAR_GAIN = 2.0  # a plan predicted this many times faster than an alternative is trusted as it is
MARGIN = 0.05  # an alternative replaces the plan only if its median step is this much shorter (and separated)
CLEAR_GAP = 1.5  # after one turn of every arm, the plan and the fastest alternative this far apart,
SEPARATED = 2.0  # and their medians this many standard errors apart, decide (after two: to overrule the plan)
UNIFORM = ("bf16", "fp32")  # what a plan may be timed against, in this order


def alternatives(choices: list[Choice]) -> list[str]:
    """The methods of `UNIFORM` to time the plan against: candidates of every bucket, not already
    the plan of every bucket, and predicted less than `CLEAR_GAIN`x slower than the plan; the
    fastest predicted first."""
    planned = sum(c.predicted_seconds for c in choices)
    predicted = {
        name: sum(c.candidates[name]["seconds"] for c in choices)
        for name in UNIFORM
        if choices and all(name in c.candidates for c in choices)
    }
    chosen = [
        name
        for name, seconds in predicted.items()
        if not all(c.method == name for c in choices) and planned * CLEAR_GAIN > seconds
    ]
    return sorted(chosen, key=predicted.__getitem__)


class Verification:
    """From step `start`: the plan and each of `arms` in turn, `steps // 2` steps at a time, twice.

    The arms are counted in steps, not in timings, so a resumed job switches at the same step.
    """

    def __init__(self, arms: list[str], steps: int, start: int, seconds: dict[int, float] | None = None) -> None:
        self.arms = list(arms)
        self.steps = steps
        self.start = start
        self._seconds: dict[int, float] = dict(seconds or {})  # step -> its duration
        self._clocks: dict[int, timer] = {}  # timed steps not yet read (on a GPU: events not waited for)
        self._began: tuple[int, timer] | None = None  # the step in progress, its clock running

    def due(self, step: int) -> str | None:
        """At the first bucket of `step`, before `begin`: "final" once every arm ran both turns (the
        decision; the check is over and this step is not timed), "early" once every arm ran its first
        turn (a clear answer decides: `decide`), else None."""
        elapsed, turn = step - self.start, self._block * (1 + len(self.arms))
        return "final" if elapsed >= 2 * turn else "early" if elapsed == turn else None

    def begin(self, step: int, clock: timer) -> None:
        """At the first bucket of `step` (after a decision that was due, if any): `clock`, started
        there and stopped by the caller before `end` (a `commcomp.stats.timer`: on a GPU, events on
        the current stream, so the step is timed on the device, from its first bucket's gradients
        to its last group's decode, without waiting for the device; the events are read at the
        decision)."""
        self._began = (step, clock)

    def end(self) -> None:
        """When the step ends cleanly (its last group decoded, its commits done, its clock stopped):
        keep its time."""
        if self._began is not None:
            step, clock = self._began
            self._clocks[step] = clock
            self._began = None

    @property
    def seconds(self) -> dict[int, float]:
        """Step -> its duration, for every timed step."""
        for step, clock in self._clocks.items():
            self._seconds[step] = clock.seconds
        self._clocks.clear()
        return self._seconds

    @property
    def _block(self) -> int:
        return max(1, self.steps // 2)

    def _arm(self, step: int) -> int:
        """0: the plan; i: arms[i - 1]."""
        return (step - self.start) // self._block % (1 + len(self.arms))

    def method(self, planned: str, step: int) -> str:
        """What a gradient travels by in `step`."""
        arm = self._arm(step)
        return planned if arm == 0 else self.arms[arm - 1]

    def medians(self) -> list[float]:
        """[the plan's median step seconds, then each arm's] (NaN for an arm without a timing)."""
        return self.summary()[: 1 + len(self.arms)]

    def summary(self) -> list[float]:
        """`medians()`, then the standard error of each (NaN without two timings): 1.4826 x the
        median absolute deviation (the standard deviation, were the times normal), x 1.2533 / sqrt(n)
        (a median's standard error). Robust: a few steps slowed by something else barely move it."""
        timed: list[list[float]] = [[] for _ in range(1 + len(self.arms))]
        for step, seconds in self.seconds.items():
            timed[self._arm(step)].append(seconds)
        medians = [statistics.median(t) if t else math.nan for t in timed]
        errors = [
            1.4826 * statistics.median(abs(x - m) for x in t) * 1.2533 / math.sqrt(len(t)) if len(t) > 1 else math.nan
            for t, m in zip(timed, medians)
        ]
        return medians + errors

    def fastest(self, medians: list[float]) -> str:
        """From `medians` (as from `medians()`, agreed over the ranks): of the plan and the arms,
        in the order predicted (the plan, then `arms` fastest first), the first whose median is
        within `MARGIN` of the fastest median: an arm replaces the plan only if it is more than
        `MARGIN` faster, and between arms as close as that (bf16 and fp32 on a fast link) the
        prediction decides, not the noise. Arms without a timing are left out ("plan" if none has one)."""
        timed = [(m, name) for m, name in zip(medians, ["plan", *self.arms]) if math.isfinite(m)]
        if not timed:
            return "plan"
        best = min(m for m, _ in timed)
        return next(name for m, name in timed if m * (1 - MARGIN) <= best)

    @staticmethod
    def _rival(medians: list[float]) -> int | None:
        """Index in `medians` of the fastest timed alternative, or None if it or the plan has no timing."""
        rest = [i for i in range(1, len(medians)) if math.isfinite(medians[i])]
        if not rest or not math.isfinite(medians[0]):
            return None
        return min(rest, key=medians.__getitem__)

    @staticmethod
    def clear(medians: list[float]) -> bool:
        """Whether the plan and the fastest alternative (by `medians()`) are `CLEAR_GAP`x apart."""
        best = Verification._rival(medians)
        if best is None:
            return False
        plan, rival = medians[0], medians[best]
        return max(plan, rival) >= CLEAR_GAP * min(plan, rival)

    @staticmethod
    def separated(summary: list[float]) -> bool:
        """Whether, by `summary()`, the plan's median and the fastest alternative's are `SEPARATED`
        standard errors apart."""
        half = len(summary) // 2
        medians, errors = summary[:half], summary[half:]
        best = Verification._rival(medians)
        if best is None:
            return False
        spread = math.hypot(errors[0], errors[best])
        return math.isfinite(spread) and abs(medians[0] - medians[best]) > SEPARATED * spread

    def decide(self, summary: list[float], final: bool = True) -> tuple[str, dict[str, Any], str] | None:
        """From the slowest rank's `summary()` (the same on every rank), when a decision is `due`:
        the kept arm ("plan" or a method), the record of the check, and why; None when it was due
        "early" (`final` False) and the plan and the fastest alternative are not both `clear` and
        `separated`."""
        medians = summary[: 1 + len(self.arms)]
        if not final and not (self.clear(medians) and self.separated(summary)):
            return None
        timed = dict(zip(["plan", *self.arms], medians))
        kept, separated = self.fastest(list(timed.values())), self.separated(summary)
        noise = kept != "plan" and not separated  # faster by the margin, not by the noise
        kept = "plan" if noise else kept
        turns = 2 if final else 1
        why = "timed on real steps: " + ", ".join(f"{name} {1e3 * s:.1f} ms" for name, s in timed.items())
        why += f" per step ({turns} turn{'s' if turns > 1 else ''})"
        record = {**{f"{name}_s": s for name, s in timed.items()}, "kept": kept, "turns": turns, "separated": separated}
        return kept, record, why + ("; within the noise, the prediction stands" if noise else "")

    def state_dict(self) -> dict[str, Any]:
        return {"arms": list(self.arms), "steps": self.steps, "start": self.start, "seconds": dict(self.seconds)}
