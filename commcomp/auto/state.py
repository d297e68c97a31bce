"""`AutoState`: the state of the DDP method that measures and picks a compressor per bucket (its
hook: `commcomp.auto.hook`).

The schedule, counted in finished steps:

- a measuring round of `measure_steps` steps, first at step 0, then `probe_every` steps after the
  last one ended (twice as many after a round that found nothing changed, up to `BACKOFF`x), and
  not before the last round's cost is within `planning_share` of the time since it ended
  (`hold_back`: on a fast link or a short step, the steps alone would let re-planning take a large
  share of the training): at
  the first bucket of its first step, all-reduces of growing sizes probe the network (a later
  round re-times one size, and probes in full at its next step only if that is off the line); on every
  bucket of each of its steps, every candidate runs once on the bucket's real gradients without
  communicating (`commcomp.auto.measure`);
- each bucket of a measuring step is decided before it is sent: one all-reduce takes the maximum
  over ranks of its candidates' timings and errors (and, at the round's first bucket, of the probe
  times), so every rank makes the same choice from the same numbers (`commcomp.auto.plan`), and the
  bucket travels by it from this step on: from step 0, no step is sent by a method the job would
  not have chosen. The plan is kept per parameter (a new process's DDP sends its first step in its
  initial buckets, one bucket for a small or new model, and re-forms them for the steps after); a
  round that measured the process's first step goes on for one more step (`_settles`), which
  measures only the buckets not measured yet, so the plan is made on the buckets the job keeps; a
  round that ends with a different plan counts as a re-plan (`replans`);
- a plan predicted less than 2x faster than sending every bucket in bf16, or in fp32, is timed
  against them on real steps (`commcomp.auto.verify`); an alternative more than 5% faster, by more
  than the noise, replaces it.
  A re-plan round that found the network on its line and kept the plan is not timed again, and
  while the network holds, a bucket predicted the same as the plan a timed check overruled gets the
  check's method again (the verdict stands) instead of being timed anew.

Every collective (probes, the measurement all-reduce, the candidates' own) is issued from the hook
body in bucket order. A bucket that leaves GradiVeQ sends what GradiVeQ had not delivered yet (its
error-feedback residual) with its next gradient (`deliver_residuals`).
"""

import functools
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from commcomp.auto.candidates import CANDIDATES, DEFAULT_CANDIDATES
from commcomp.auto.measure import Network, Trial, agree, check_size, max_over_ranks, probe, recheck, trial
from commcomp.auto.plan import Choice, choose
from commcomp.auto.verify import Verification, alternatives
from commcomp.gradiveq import GradiVeQState
from commcomp.hooks.base import HookState
from commcomp.stats import timer

__all__ = ["AutoState", "hold_back"]


class AutoState(HookState):
    """State of `auto_hook` (`commcomp.register(model, "auto")`).

    Args:
        process_group: the group (None: the whole world).
        candidates: the methods to choose from, among `CANDIDATES`: "fp32" (dense), "bf16", "qsgd4"
            (QSGD 4-bit on an agreed grid, all-reduced), "gradiveq" (tracked basis, rank 16, error
            feedback), "topk" (top 1% with error feedback, all-gathered). Default: all but "topk"
            (`DEFAULT_CANDIDATES`; see there why).
        max_error: the error budget: a candidate whose relative error on a bucket's gradients
            (||decoded - g|| / ||g||, one step, before error feedback) exceeds it is not chosen for
            that bucket. fp32 is always allowed.
        measure_steps: steps per measuring round (codec timings keep the round's fastest, errors its
            worst; a round's first step runs every trial twice: see `measure`).
        probe_every: steps between the end of a round and the next one (re-planning on drift); each
            round whose check found the network on its line and that kept the plan doubles the
            spacing, up to `BACKOFF` x probe_every; any other round sets it back to probe_every.
        planning_share: a round due by `probe_every` waits until the previous round's cost (the
            slowest rank's seconds in probes, trials and agreement) is at most this share of the
            time since it ended (the slowest rank's); None: rounds follow probe_every alone.
        check_finite, nonfinite: as for every hook (`commcomp.overflow`).
    """

    fallback = "bf16"  # what a bucket without a choice travels by (a NaN measured at step 0)
    keep_rounds = 20  # measuring rounds kept in `rounds`
    verify_steps = 8  # a timed check's turns are blocks of half this many steps per arm (`commcomp.auto.verify`)
    BACKOFF = 8  # at most this many times probe_every between rounds while nothing changes
    FOLD = 32  # step timings kept unread for `planning_share` (read in batches of this many, oldest first)

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        candidates: tuple[str, ...] | list[str] | None = None,
        max_error: float = 0.8,
        measure_steps: int = 1,
        probe_every: int = 200,
        planning_share: float | None = 0.02,
        check_finite: bool = True,
        nonfinite: str = "propagate",
    ) -> None:
        super().__init__(process_group, check_finite, nonfinite)
        if isinstance(candidates, str):
            raise ValueError(
                f"candidates must be a list of names, got the string {candidates!r} (one: [{candidates!r}])"
            )
        names = list(DEFAULT_CANDIDATES if candidates is None else candidates)
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"candidates must be distinct names among {list(CANDIDATES)}, got {names}")
        if not max_error >= 0:
            raise ValueError(f"max_error must be >= 0, got {max_error}")
        if measure_steps < 1 or probe_every < 1:
            raise ValueError(f"measure_steps and probe_every must be >= 1, got {measure_steps}, {probe_every}")
        if planning_share is not None and not 0 < planning_share <= 1:
            raise ValueError(f"planning_share must be in (0, 1] or None, got {planning_share}")
        # --- configuration ---
        self.max_error = float(max_error)
        self.measure_steps = measure_steps
        self.probe_every = probe_every
        self.planning_share = None if planning_share is None else float(planning_share)
        common = {"check_finite": check_finite, "nonfinite": nonfinite}
        self.methods = {name: CANDIDATES[name](process_group, common) for name in names}
        for sub in self.methods.values():
            sub.stats = self.stats  # one account of every byte and second
        # --- the plan ---
        self.choices: dict[tuple[str, ...], Choice] = {}  # measured bucket's parameter names -> its choice
        self._planned: dict[str, str] = {}  # parameter name -> its method (from `choices`)
        self._by_param: dict[str, str] = {}  # the same, with this round's decisions so far
        self.network: Network | None = None
        self.replans = 0
        self.rounds: list[dict[str, Any]] = []  # the latest measuring rounds: step, network, methods per bucket
        self.next_round = 0  # step at which the next measuring round starts
        self.interval = probe_every  # steps from the end of a round to the next one (`BACKOFF`)
        self.planning_seconds = 0.0  # this rank's time in probes, trials and planning
        self.round_cost = 0.0  # this rank's planning seconds in the last round (`hold_back`)
        # --- internal state ---
        self._measuring = False  # this step belongs to a measuring round
        self._round_ok = True  # every bucket of this measuring step was decided (no NaN measured)
        self.full_probe = False  # the next round probes the network in full (its check failed)
        self._checking = False  # this round re-times one size instead of probing in full
        self._decided: dict[tuple[str, ...], Choice] = {}  # this round's choices so far, per bucket
        self._verify: Verification | None = None  # a plan being timed against the alternatives
        # what the last timed check overruled, per parameter: (predicted method, kept method, why);
        # while the network holds, the same prediction gets the same verdict (`decide`)
        self._overruled: dict[str, tuple[str, str, str]] = {}
        self._step_now = 0  # the step in progress (`step` may move on while the last bucket is planned)
        self._round_steps = 0  # steps of the current round measured so far
        self._probes: dict[int, float] = {}  # this round's probe seconds per size (bytes), until agreed
        self._round_probes: dict[int, float] = {}  # the agreed ones (the slowest rank's)
        self._trials: dict[tuple[str, ...], dict[str, Trial]] = {}  # this round's, per bucket
        self._order: list[tuple[str, ...]] = []  # this step's buckets, in order
        self._largest = 0  # bytes of the largest bucket seen
        self._first_step: int | None = None  # this process's first step (DDP's initial buckets)
        self._planned_before = 0.0  # planning_seconds when the last round ended
        self._round_ended: int | None = None  # the step after the last round (None: none yet, or resumed)
        self._clock: timer | None = None  # the step in progress, from its first bucket (`hold_back`, the timed check)
        self._spans: list[timer] = []  # the latest steps since the last round ended, timed so
        self._spent = 0.0  # the seconds of those before them (`FOLD`)

    # ----- what a gradient travels by -----
    def method(self, key: str) -> str:
        """The plan is kept per parameter, so it holds whatever buckets DDP forms (a new process's
        first step has DDP's initial buckets, not the rebuilt ones the plan was measured on)."""
        planned = self._by_param.get(key) or self._fallback()
        return planned if self._verify is None else self._verify.method(planned, self._step_now)

    def _fallback(self) -> str:
        return next((n for n in (self.fallback, "fp32") if n in self.methods), next(iter(self.methods)))

    def volatile(self) -> list[Any]:
        """The random streams of the methods this step may send with (the plan's, the fallback for
        parameters it does not know, the timed check's arms): the others do not draw (trials restore
        what they draw)."""
        used = {*self._by_param.values(), self._fallback(), *(self._verify.arms if self._verify else ())}
        return [obj for name, sub in self.methods.items() if name in used for obj in sub.volatile()]

    # ----- measuring -----
    def probe_cap(self) -> int:
        """The largest probe: the largest bucket, at most 4 MB (a bucket's fp32 all-reduce is the
        largest transfer a plan can choose)."""
        return min(max(self._largest, 64 << 10), 4 << 20)

    def observe(self, keys: tuple[str, ...], grads: list[torch.Tensor], buf: torch.Tensor, index: int) -> None:
        """At every bucket, before it is sent: on a measuring step, probe the network (first
        bucket), run every candidate on the bucket and decide its method."""
        self._largest = max(self._largest, buf.numel() * buf.element_size())
        if index == 0:
            self.start_step(buf)
        self._order.append(keys)
        if self._measuring:
            measured = self._measured(keys)
            if measured is None:
                self.measure(keys, grads, buf)
                self.decide(keys, buf)
            else:
                self._decided[keys] = measured

    def _measured(self, keys: tuple[str, ...]) -> Choice | None:
        """On a round's step beyond `measure_steps` (`_settles`): the round's choice for a bucket of
        the same parameters (DDP may re-form a bucket in another order), else None: measure it."""
        if self._round_steps < self.measure_steps:
            return None
        same = set(keys)
        return next((choice for old, choice in self._decided.items() if set(old) == same), None)

    def after_last_bucket(self, buf: torch.Tensor) -> None:
        """After the step's last bucket was sent: plan, if a measuring round ends with this step."""
        if self._measuring:
            self.conclude(buf)

    def start_step(self, buf: torch.Tensor) -> None:
        """At the step's first bucket: is this a measuring step? If it starts a round, probe the network."""
        self._order, self._round_ok = [], True
        self._step_now = self.step
        if self._first_step is None:
            self._first_step = self.step
        if self._verify is not None:
            due = self._verify.due(self.step)
            if due is not None:
                self._end_verification(buf, final=due == "final")
        timed = self.planning_share is not None or self._verify is not None
        self._clock = timer(buf).start() if timed else None
        if self._verify is not None and self._clock is not None:
            self._verify.begin(self.step, self._clock)
        self._measuring = self.step >= self.next_round
        if self._measuring and self._round_steps == 0:
            self._measuring = self._may_begin(buf)
        if self._measuring and self._round_steps == 0:  # the network once per round
            self._decided = {}
            size = None if self.network is None or self.full_probe or not self.rounds else check_size(self.rounds)
            group, device = self.process_group, buf.device
            found = probe(self.probe_cap(), group, device) if size is None else recheck(size, group, device)
            self._probes, self._checking = found.seconds, size is not None
            for nbytes in found.sent:
                self.stats.sent(nbytes, kind="allreduce", world_size=self.world_size)
            # the probes' own time; waiting for the ranks to line up is time the bucket would have waited
            self.planning_seconds += found.spent

    def _may_begin(self, buf: torch.Tensor) -> bool:
        """A round is due by the steps: may it begin, by `planning_share`? The time it is a share
        of is that of the steps since the last round as this hook sees them, each from its first
        bucket until its last group is decoded (on a GPU, device time): not the forward pass or the
        optimizer, nor anything else the job runs between steps (an evaluation, another model), so
        the share is of less than the training time. One small all-reduce agrees on the slowest
        rank's last round cost and the shortest time, so every rank holds the round back alike,
        until the step `hold_back` gives (recorded with the last round). The first round, and the
        first after a resume (its steps were not timed), always begin."""
        if self.planning_share is None or self._round_ended is None:  # (a round ended: `rounds` holds it)
            return True
        began = time.perf_counter()
        spent = self._spent + sum(clock.seconds for clock in self._spans)
        (cost, elapsed), sent = max_over_ranks([self.round_cost, -spent], self.process_group, buf.device)
        self.stats.sent(sent, kind="allreduce", world_size=self.world_size)
        wait = hold_back(cost, -elapsed, self.step - self._round_ended, self.planning_share)
        self.planning_seconds += time.perf_counter() - began
        if wait:
            self.next_round = self.step + wait
            self.rounds[-1]["held_back"] = {
                "at": self.step,
                "until": self.next_round,
                "cost_s": cost,
                "elapsed_s": -elapsed,
            }
            return False
        return True

    def measure(self, keys: tuple[str, ...], grads: list[torch.Tensor], buf: torch.Tensor) -> None:
        """Run every candidate on this bucket's gradients (no communication); at a round's first
        step twice, keeping the faster time: a codec's first call also allocates its buffers and
        state, and on a busy machine one timing can take in a stretch where the OS ran another
        process (a re-plan round once timed a cast to bf16 of a 1 MB bucket at 6.6 ms instead of
        about 0.4, and switched the bucket to fp32 until a timed check put it back)."""
        with timer(buf) as t:
            kept = self._trials.get(keys)
            if kept is None:  # the round's first step
                kept = {name: trial(sub, list(keys), grads, buf) for name, sub in self.methods.items()}
            found = {name: trial(sub, list(keys), grads, buf) for name, sub in self.methods.items()}
            if kept is not None:  # the round's fastest time, worst error
                for name, new in found.items():
                    old = kept[name]
                    found[name] = Trial(min(old.seconds, new.seconds), max(old.error, new.error), new.exchanges)
            self._trials[keys] = found
        self.planning_seconds += t.seconds

    def decide(self, keys: tuple[str, ...], buf: torch.Tensor) -> None:
        """Agree on this bucket's numbers (the maximum over ranks; the round's probe times with its
        first bucket) and choose its method, which it travels by from now on."""
        with timer(buf) as t:
            probes, trials, sent = agree(self._probes, self._trials[keys], self.process_group, buf.device)
            self.stats.sent(sent, kind="allreduce", world_size=self.world_size)
            if probes:  # the round's first bucket
                self._probes, self._round_probes = {}, probes
                self._update_network(probes)
            numbers = [v for c in trials.values() for v in (c.seconds, c.error)]
            if not self._round_ok or self.network is None or not all(map(math.isfinite, numbers)):
                self._round_ok = False  # a NaN measured (an overflow step), or the network changed
            else:
                current = {self._by_param.get(key) for key in keys}  # per parameter: DDP may have rebuilt its buckets
                method = current.pop() if len(current) == 1 else None
                choice = choose(trials, self.network, self.world_size, self.max_error, method)
                verdict = {self._overruled.get(key) for key in keys}
                if self._checking and len(verdict) == 1 and (found := verdict.pop()) and found[0] == choice.method:
                    # the prediction a timed check overruled, on a network that held: its verdict stands
                    choice = choice.switched(found[1], found[2])
                self._decided[keys] = choice
                self._by_param.update(dict.fromkeys(keys, choice.method))
        self.planning_seconds += t.seconds

    def _update_network(self, probes: dict[int, float]) -> None:
        """Fit the network to a full probe, or check it against a re-plan round's one size: off the
        line by more than `DRIFT`, the round starts over with a full probe at the next step."""
        if not self._checking:
            if all(map(math.isfinite, probes.values())):
                self.network = Network.fit(list(probes), list(probes.values()), self.world_size)
                self.full_probe = False
            return
        ((size, seconds),) = probes.items()
        if self.network is None or not self.network.holds(size, seconds, self.world_size):
            self.full_probe, self._round_ok = True, False

    def conclude(self, buf: torch.Tensor) -> None:
        """After the measuring step's last bucket was sent: close the round once all its steps
        decided every bucket (an overflow step measured NaN: measure again at the next step)."""
        if not self._round_ok:  # the round starts over at the next step, probes included
            self._round_steps, self._trials = 0, {}
            return
        self._round_steps += 1
        if self._round_steps < self.measure_steps or self._settles():
            return
        net = self.network
        assert net is not None
        before = self._planned
        self._set({keys: self._decided[keys] for keys in self._order})  # this step's buckets
        # a round whose check found the network on its line and which kept the plan has nothing new
        # to time (the plan already stood against the alternatives, or replaced them), and the next
        # round can wait twice as long
        settled = self._checking and before == self._by_param
        self.interval = min(2 * self.interval, self.BACKOFF * self.probe_every) if settled else self.probe_every
        self.rounds.append(
            {
                "step": self._step_now,
                "latency_s": net.latency,
                "mbit": net.mbit,
                "methods": [c.method for c in self.choices.values()],
                "probes": self._round_probes,
                "probed": "checked" if self._checking else "in full",
                "interval": self.interval,
            }
        )
        del self.rounds[: -self.keep_rounds]
        if before and before != self._by_param:  # per parameter: DDP's rebuilt buckets are no change
            self.replans += 1
        self._round_steps, self._trials = 0, {}
        self.next_round = self._step_now + 1 + self.interval
        self.round_cost, self._planned_before = self.planning_seconds - self._planned_before, self.planning_seconds
        self._round_ended = self._step_now + 1
        self._spans, self._spent = [], 0.0  # the steps after this one (`end_bucket`)
        if not self._checking:  # a new line: the verdicts on the old one do not carry over
            self._overruled = {}
        arms = [] if settled else alternatives(list(self.choices.values()))
        if arms:
            self._verify = Verification(arms, self.verify_steps, self._step_now + 1)

    def _settles(self) -> bool:
        """Whether the round that measured this step goes on for one more step because DDP is
        about to re-form its buckets: it forms them after the process's first step, from the order
        the gradients arrived in (a model of several buckets can have one in its first step), and
        they stay so. The extra step measures only buckets this round has not measured, so a model
        whose buckets stay the same pays nothing for it, and the plan is made on the buckets the job
        keeps."""
        return self._step_now == self._first_step and self._round_steps == self.measure_steps

    def end_bucket(self) -> None:
        """After the step's last group: a timed check takes the step's time, its commits included (a
        clean step only: a skipped one is not counted, and not timed)."""
        step = self.step
        super().end_bucket()
        if self.step != step and self._clock is not None:
            clock, self._clock = self._clock.stop(), None
            since = self._round_ended is None or step >= self._round_ended  # not a round's own last step
            if self.planning_share is not None and since:
                self._spans.append(clock)
                if len(self._spans) > 2 * self.FOLD:  # read the oldest (on a GPU, long done: no wait)
                    self._spent += sum(old.seconds for old in self._spans[: self.FOLD])
                    del self._spans[: self.FOLD]
        if self.step != step and self._verify is not None:
            self._verify.end()

    def _end_verification(self, buf: torch.Tensor, final: bool) -> None:
        """A timed check's decision is due (`Verification.due`): keep the plan, or the alternative
        that beat it (`Verification.decide`); an early one that is not clear-cut goes on."""
        assert self._verify is not None
        summary, sent = max_over_ranks(self._verify.summary(), self.process_group, buf.device)
        self.stats.sent(sent, kind="allreduce", world_size=self.world_size)
        decided = self._verify.decide(summary, final)
        if decided is None:
            return
        kept, self.rounds[-1]["timed"], why = decided
        self._verify = None
        self._overruled = {}
        if kept != "plan":
            self._overruled = {key: (c.method, kept, why) for keys, c in self.choices.items() for key in keys}
            self._set({keys: c.switched(kept, why) for keys, c in self.choices.items()})

    def deliver_residuals(self, method: str, keys: list[str], grads: list[torch.Tensor]) -> None:
        """Before gradients go by `method`: add to those GradiVeQ sent before what it had not
        delivered yet (this rank's error-feedback residual, a share of the summed payload, so N times
        it: the other method's g/N then carries it), in the hook body, and let the residual go when
        the step ends cleanly (a skipped step keeps it for the next). The ranks' residuals sum to
        what the averaged updates missed: a bucket that leaves GradiVeQ, at a re-plan or for a timed
        check's arm, loses nothing it held back (its first steps, on bases still turning towards the
        gradients, hold back most of them)."""
        gradiveq = self.methods.get("gradiveq")
        if method == "gradiveq" or not isinstance(gradiveq, GradiVeQState) or gradiveq.memory is None:
            return
        residuals = gradiveq.memory.residuals
        for key, grad in zip(keys, grads):
            if key in residuals and (layer := gradiveq.tracked_layer(key, grad.shape)) is not None:
                grad.add_(layer.plan.gradient(residuals[key]).to(grad.dtype), alpha=self.world_size)
                self.commit_at_step_end(functools.partial(_forget, residuals, key))

    def _set(self, choices: dict[tuple[str, ...], Choice]) -> None:
        self.choices = choices
        self._planned = {key: c.method for keys, c in choices.items() for key in keys}
        self._by_param = dict(self._planned)

    # ----- reporting -----
    def plan(self) -> dict[str, Any]:
        """The current plan: method per bucket with its predicted time, bytes, error and why; the
        network model; re-plans; this rank's planning seconds. "buckets" is empty before the first plan."""
        net = self.network
        return {
            "step": self.step,
            "replans": self.replans,
            "network": None if net is None else {"latency_s": net.latency, "mbit": net.mbit},
            "overhead_seconds": self.planning_seconds,
            "next_round": self.next_round,
            "interval": self.interval,
            "rounds": list(self.rounds),
            "buckets": [
                {"bucket": i, "params": list(keys), **c.as_dict()} for i, (keys, c) in enumerate(self.choices.items())
            ],
        }

    # ----- configuration and checkpoints -----
    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "candidates": list(self.methods),
            "max_error": self.max_error,
            "measure_steps": self.measure_steps,
            "probe_every": self.probe_every,
            "planning_share": self.planning_share,
        }

    def state_dict(self) -> dict[str, Any]:
        net = self.network
        return {
            **super().state_dict(),
            "choices": [{"params": list(k), **c.as_dict()} for k, c in self.choices.items()],
            "network": None if net is None else [net.latency, net.seconds_per_byte],
            "replans": self.replans,
            "rounds": list(self.rounds),
            "next_round": self.next_round,
            "interval": self.interval,
            "full_probe": self.full_probe,
            "planning_seconds": self.planning_seconds,
            "round_cost": self.round_cost,
            "verify": None if self._verify is None else self._verify.state_dict(),
            "overruled": {key: list(verdict) for key, verdict in self._overruled.items()},
            "methods": {name: sub.state_dict() for name, sub in self.methods.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, sub in self.methods.items():
            sub.load_state_dict(state["methods"][name])
        super().load_state_dict(state)
        self._set({tuple(entry["params"]): Choice.from_dict(entry) for entry in state["choices"]})
        self.network = None if state["network"] is None else Network(*state["network"])
        self.replans = int(state["replans"])
        self.rounds = list(state["rounds"])
        self.next_round = int(state["next_round"])
        self.interval = int(state.get("interval", self.probe_every))  # older checkpoints: none saved
        self.full_probe = bool(state["full_probe"])
        self.planning_seconds = float(state["planning_seconds"])
        self.round_cost = float(state.get("round_cost", 0.0))  # older checkpoints: none saved
        self._planned_before = self.planning_seconds
        self._round_ended = None  # the steps since were not timed here: the next round due begins
        self._spans, self._spent = [], 0.0
        self._round_steps, self._probes, self._trials = 0, {}, {}  # a round in progress starts over
        self._verify = None if state["verify"] is None else Verification(**state["verify"])
        overruled = state.get("overruled", {})  # older checkpoints: none saved
        self._overruled = {key: (str(a), str(b), str(c)) for key, (a, b, c) in overruled.items()}


def hold_back(cost: float, elapsed: float, steps: int, share: float) -> int:
    """Steps a due round waits (0: it begins): until the last round's `cost` seconds are at most
    `share` of the time since it ended, at the pace of the `steps` taken in the `elapsed` seconds
    since (at least one step, if it waits at all)."""
    if cost <= share * elapsed:
        return 0
    if steps <= 0 or elapsed <= 0:  # no pace yet: one step at a time
        return 1
    return max(1, math.ceil((cost / share - elapsed) / (elapsed / steps)))


def _forget(residuals: dict[str, torch.Tensor], key: str) -> None:
    residuals.pop(key, None)
