"""The auto method's decision, pure: per bucket, the candidate with the smallest predicted time
among those within the error budget.

Predicted time of a candidate on a bucket = its measured codec seconds + the network time of each
collective it issues (`Network.seconds`: latency + wire bytes / bandwidth). Collectives are summed,
not overlapped: a bucket's exchanges queue behind the previous buckets' on one link, and a GradiVeQ
bucket's second exchange cannot start before its first returns. Dense fp32 has no error and is
always allowed; if only lossy candidates were given and all are over the budget, the most accurate
one is chosen.

Candidates predicted within `SWITCH_MARGIN` of the fastest are a tie, as the measurements cannot
tell them apart: a bucket keeps its current method if it is among them (two methods within the
noise of each other do not take turns from one round to the next), and otherwise takes the most
accurate of them (the smallest measured error; then the earlier in the given order): a step that
costs the same sends the gradient more exactly. At 1000 Mbit/s GradiVeQ and bf16 were once
predicted 8.9 and 9.1 ms, and GradiVeQ, chosen for 2%, took a timed check against both before
bf16 came back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from commcomp.auto.measure import Network, Trial

__all__ = ["SWITCH_MARGIN", "Choice", "choose"]

SWITCH_MARGIN = 0.1  # candidates predicted within 10% of the fastest are a tie


@dataclass
class Choice:
    """One bucket's decision, with what it was based on (`candidates`: name -> seconds, bytes, error)."""

    method: str
    predicted_seconds: float
    nbytes: int
    error: float
    why: str
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The choice as plain values ("bytes": what the bucket hands to its collectives per step)."""
        found = asdict(self)
        found["bytes"] = found.pop("nbytes")
        return found

    def switched(self, method: str, why: str) -> Choice:
        """This bucket's choice with `method` instead (one of its candidates), for the reason `why`."""
        row = self.candidates[method]
        return Choice(method, row["seconds"], int(row["bytes"]), row["error"], why, self.candidates)

    @classmethod
    def from_dict(cls, found: dict[str, Any]) -> Choice:
        fields = {k: v for k, v in found.items() if k not in ("bytes", "params", "bucket")}
        return cls(nbytes=int(found["bytes"]), **fields)


def predicted(trial: Trial, network: Network, world_size: int) -> float:
    return trial.seconds + sum(network.seconds(e, world_size) for e in trial.exchanges)


def choose(
    trials: dict[str, Trial], network: Network, world_size: int, max_error: float, current: str | None = None
) -> Choice:
    """The bucket's choice among `trials` (candidate name -> its trial, in preference order);
    `current`: the bucket's method in the plan so far (None: no plan yet)."""
    times = {name: predicted(t, network, world_size) for name, t in trials.items()}
    table = {
        name: {"seconds": times[name], "codec_seconds": t.seconds, "bytes": t.nbytes, "error": t.error}
        for name, t in trials.items()
    }
    allowed = [name for name, t in trials.items() if name == "fp32" or t.error <= max_error]
    refused = [f"{name} (error {trials[name].error:.2f})" for name in trials if name not in allowed]
    if not allowed:  # only lossy candidates were given, all over the budget: the most accurate one
        allowed = [min(trials, key=lambda name: trials[name].error)]
        refused = [r for r in refused if not r.startswith(f"{allowed[0]} ")]
    fastest = min(times[name] for name in allowed)
    tied = [name for name in allowed if times[name] <= (1 + SWITCH_MARGIN) * fastest]
    best = current if current in tied else min(tied, key=lambda name: trials[name].error)
    others = sorted((n for n in allowed if n != best), key=lambda n: times[n])
    if times[best] == fastest:
        why = f"fastest predicted: {best} {1e3 * times[best]:.1f} ms"
    else:  # a tie
        broken = "current" if best == current else "most exact"
        why = f"fastest predicted within {SWITCH_MARGIN:.0%}: {best} {1e3 * times[best]:.1f} ms ({broken})"
    if others:
        why += " vs " + ", ".join(f"{n} {1e3 * times[n]:.1f} ms" for n in others)
    if refused:
        why += f"; over the error budget {max_error:g}: " + ", ".join(refused)
    t = trials[best]
    return Choice(best, times[best], t.nbytes, t.error, why, table)
