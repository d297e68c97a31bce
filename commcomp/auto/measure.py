"""What the auto method measures: each candidate's codec on a bucket's real gradients, and the network.

A `Trial` is one candidate run on one bucket without communicating: encode this rank's gradients,
decode them as if they were the sum (or, for an all-gathered payload, N payloads), and compare with
the input. It gives the codec's seconds on this device, the collectives the candidate would issue
with their exact bytes, and its relative error on the bucket's actual gradients (one step, before
error feedback). Trials leave the candidates' state as they found it (random streams restored,
residuals and bases untouched).

The network is probed with plain all-reduces of growing sizes (`probe`); `Network.fit` turns the
timings into a latency per collective and seconds per wire byte (`commcomp.stats.wire_factor`
converts the bytes handed to a collective into what it carries at this world size). A re-plan round
first re-times one size (`recheck`) and probes in full only when it is off the line (`Network.holds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from commcomp.exchange import nbytes
from commcomp.flat import flatten, unflatten
from commcomp.gradiveq import GradiVeQState
from commcomp.gradiveq.single import SingleExchange
from commcomp.gradiveq.tracked import bits_checksum, orthonormalize
from commcomp.hooks.quantized import QuantizerState
from commcomp.quantizers import SharedScaleQuantizer, StochasticQuantizer
from commcomp.stats import timer, wire_factor

__all__ = [
    "DRIFT",
    "ENOUGH",
    "GROWTH",
    "LATENCY_BOUND",
    "Exchange",
    "Network",
    "Probes",
    "Trial",
    "agree",
    "check_size",
    "max_over_ranks",
    "next_size",
    "probe",
    "recheck",
    "transfer_bound",
    "trial",
    "trial_gradiveq",
    "trial_quantizer",
]

ENOUGH = 0.02  # seconds: a probe whose transfer took this long (and the latency) is dominated by the transfer
GROWTH = 4  # a probe size after a latency-bound one is this many times larger (else twice)
LATENCY_BOUND = 1.5  # a probe that took under this many times the fastest one is latency-bound
DRIFT = 2.0  # a re-plan round probes the network in full when a check is off the fitted line by more


@dataclass(frozen=True)
class Exchange:
    """One collective a candidate issues for a bucket: its kind and the bytes handed to it."""

    kind: str  # "allreduce" or "allgather"
    nbytes: int


@dataclass
class Trial:
    """One candidate on one bucket: codec seconds (encode + decode), relative error, collectives."""

    seconds: float
    error: float
    exchanges: tuple[Exchange, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.exchanges)


def _relative_error(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """sqrt(sum ||decoded - input||^2 / sum ||input||^2) over (input, decoded) pairs (one host sync)."""
    if not pairs:
        return 0.0
    lost = torch.stack([torch.linalg.vector_norm(d.reshape(-1).float() - x.reshape(-1).float()) for x, d in pairs])
    held = torch.stack([torch.linalg.vector_norm(x.float()) for x, _ in pairs])
    lost2, held2 = float(lost.double().pow(2).sum()), float(held.double().pow(2).sum())
    return math.sqrt(lost2 / held2) if held2 > 0 else 0.0


def trial_quantizer(state: QuantizerState, keys: list[str], grads: list[torch.Tensor], like: torch.Tensor) -> Trial:
    """A quantizer candidate on one bucket: the same inputs as its real exchange (g/N when summed)."""
    q, n = state.quantizer, state.world_size
    saved = q.state_dict()  # the random streams this trial advances
    inputs = [g.detach() / n if q.linear else g.detach() for g in grads]
    payloads, agreement = [], 0
    with timer(like) as enc:
        for key, h in zip(keys, inputs):
            if isinstance(q, StochasticQuantizer):
                q.set_stream(key)
            if isinstance(q, SharedScaleQuantizer):
                stats = q.local_stats(h)  # this rank's grid stands in for the agreed one
                agreement += nbytes(stats)
                payloads.append(q.compress_shared(h, stats, n))
            else:
                payloads.append(q.compress(h))
    with timer(like) as dec:
        decoded = [
            q.decode_sum(p.batched(), torch.empty(h.numel(), device=h.device))
            if isinstance(q, SharedScaleQuantizer)
            else q.decompress(p)
            for h, p in zip(inputs, payloads)
        ]
    q.load_state_dict(saved)
    sent, error = sum(p.nbytes for p in payloads), _relative_error(list(zip(inputs, decoded)))
    if not q.linear:  # all-gathered: every rank decodes N payloads
        return Trial(enc.seconds + n * dec.seconds, error, (Exchange("allgather", sent),))
    exchanges = ((Exchange("allreduce", agreement),) if agreement else ()) + (Exchange("allreduce", sent),)
    return Trial(enc.seconds + dec.seconds, error, exchanges)


class _TrialHost:
    """A GradiVeQ state as its one-exchange codec sees it in a trial: the same layers, residuals,
    wire dtype and rank, but the step-end check that decoding registers (the ranks' basis checksums)
    goes nowhere: a trial's "sum" is this rank's own payload."""

    def __init__(self, state: GradiVeQState) -> None:
        self.state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self.state, name)

    def check_at_step_end(self, bad: torch.Tensor, error: Any = None) -> None:
        del bad, error


def trial_gradiveq(state: GradiVeQState, keys: list[str], grads: list[torch.Tensor], like: torch.Tensor) -> Trial:
    """GradiVeQ's one-exchange step on one bucket, timed as the hook runs it: its codec
    (`commcomp.gradiveq.single`) encodes copies of the gradients with their residuals, lays the
    payload end to end and cuts it apart as the engine does, computes this rank's residual, decodes
    (its own payload standing in for the sum) and takes the next bases' checksum as keeping them
    would; nothing is kept: the trial times and counts what the hook runs and sends (checksum slots
    included), not a second copy of its math. The error is that of bases caught up with this
    gradient (one power step from the current ones, untimed): the bases track the gradients within
    a few steps, so the error of the current ones (random before the first step) would judge
    GradiVeQ by its first step."""
    codec = SingleExchange(_TrialHost(state))  # a TrackedHost by delegation
    copies = [g.detach().clone() for g in grads]
    with timer(like) as t:
        encoded = codec.encode(list(keys), copies)
        received = unflatten(flatten(encoded.parts), [p.shape for p in encoded.parts])
        if encoded.later is not None:
            encoded.later()
        codec.decode(received, encoded)
        for share in encoded.context:
            if share.bases is not None:
                bits_checksum(list(share.bases))
    values = sum(p.numel() for p in encoded.parts)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, g in zip(keys, grads):
        layer = state.tracked_layer(key, g.shape)
        if layer is None:
            continue
        x = layer.plan.matrix(g.detach()).float()
        p = orthonormalize(x @ layer.start_bases(x.device)[0])
        u = orthonormalize(x.T @ p)
        kept = p @ (p.T @ x)
        pairs.append((x, kept + (x - kept) @ u @ u.T))  # X minus what lies outside both bases
    return Trial(t.seconds, _relative_error(pairs), (Exchange("allreduce", values * state.wire_dtype.itemsize),))


def trial(
    state: QuantizerState | GradiVeQState, keys: list[str], grads: list[torch.Tensor], like: torch.Tensor
) -> Trial:
    if isinstance(state, GradiVeQState):
        return trial_gradiveq(state, keys, grads, like)
    return trial_quantizer(state, keys, grads, like)


@dataclass
class Probes:
    """Probe all-reduces on this rank: `seconds` per size in bytes (the faster of its runs), the bytes
    of every all-reduce issued (`sent`, the line-up included) and the time of every timed run (`spent`)."""

    seconds: dict[int, float]
    sent: list[int]
    spent: float


def probe(cap: int, group: dist.ProcessGroup | None, device: torch.device, enough: float = ENOUGH) -> Probes:
    """All-reduces of growing sizes from 4 KB up to `cap` bytes (`next_size`), timed on this rank.
    Issued from a hook body; every rank probes the same sizes.

    An untimed one-value all-reduce first lines the ranks up, so the first probe does not absorb
    the ranks' different arrival times (which would read as latency). Each size runs twice and
    keeps the faster run (a busy CPU only ever adds time); the second run carries this rank's time
    of the first in its first value, reduced with MAX, so every rank reads the slowest rank's time
    and stops after the same size. The sizes grow until that time is `transfer_bound`: the
    transfer then clearly outweighs the latency (on a 25 Mbit/s link: at 64 KB).
    """
    agreed: list[float] = []  # the slowest rank's first run of each size so far
    found: dict[int, float] = {}
    sent, spent = [_line_up(group, device)], 0.0
    size = min(4 << 10, cap)
    while True:
        buf = torch.zeros(max(2, size // 4), device=device)
        runs: list[float] = []
        for _ in range(2):
            buf[0] = runs[0] if runs else 0.0
            with timer(buf) as t:
                dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
            runs.append(t.seconds)
            sent.append(nbytes(buf))
        agreed.append(float(buf[0]))
        found[size] = min(runs)
        spent += sum(runs)
        if size >= cap or transfer_bound(agreed, enough):
            return Probes(found, sent, spent)
        size = next_size(size, agreed, cap)


def next_size(size: int, times: list[float], cap: int) -> int:
    """The probe size after `size`, whose time is the last of `times` (the slowest rank's, of every
    size so far): `GROWTH`x larger while that time is within `LATENCY_BOUND`x the fastest (the
    transfer is then under half the latency, so 4x the bytes add at most about two latencies),
    else 2x, at most `cap`. On a fast link the probe reaches a large bucket in about half the
    all-reduces of doubling; on a slow one it doubles as soon as the transfer shows, so it does
    not jump past the size where the transfer takes over (growing 4x throughout went from a
    64 KB probe, sped up by a shaped link's burst, to 256 KB at 25 Mbit/s: 0.13 s, twice)."""
    latency_bound = times[-1] < LATENCY_BOUND * min(times)
    return min((GROWTH if latency_bound else 2) * size, cap)


def transfer_bound(times: list[float], enough: float = ENOUGH) -> bool:
    """True if the last of `times` (a probe's times of growing sizes) spent `enough` seconds, and
    at least the fastest smaller size's time, beyond that fastest time: its transfer alone then
    outweighs the latency and is long enough to time. The fastest, not the first: a first size
    slowed by a busy CPU would raise the bar and send the probe on to sizes that only cost time.
    The bar is on the transfer, not the whole time: a bar on the whole (20 ms and 4x the fastest)
    rises with the latency, and on a 100 Mbit/s link whose small all-reduces took about 10 ms it
    sent the probe on to 512 KB (89 ms, twice) after a size whose transfer had already taken over
    20 ms and more than the latency."""
    if len(times) < 2:
        return False
    fastest = min(times[:-1])
    return times[-1] - fastest >= max(enough, fastest)


def recheck(size: int, group: dist.ProcessGroup | None, device: torch.device) -> Probes:
    """The median of three all-reduces of `size` bytes on this rank, after a line-up: a re-plan
    round's check that the network still fits its line (`Network.holds`). Not the fastest: after
    a quiet spell a shaped link's token bucket lets the first run through above the link rate."""
    sent, runs = [_line_up(group, device)], []
    buf = torch.zeros(max(2, size // 4), device=device)
    for _ in range(3):
        with timer(buf) as t:
            dist.all_reduce(buf, group=group)
        runs.append(t.seconds)
        sent.append(nbytes(buf))
    return Probes({size: sorted(runs)[1]}, sent, sum(runs))


def check_size(rounds: list[dict[str, Any]]) -> int:
    """The size a re-plan round re-times: where the last round's probe stopped growing (the first
    size that was `transfer_bound`), or its largest. A small size slowed by a busy CPU is not the
    transfer."""
    last = {int(size): seconds for size, seconds in rounds[-1]["probes"].items()}
    sizes = sorted(last)
    times = [last[size] for size in sizes]
    return next((size for i, size in enumerate(sizes) if transfer_bound(times[: i + 1])), sizes[-1])


def _line_up(group: dist.ProcessGroup | None, device: torch.device) -> int:
    """An untimed one-value all-reduce (the ranks arrive at different times); its bytes."""
    line_up = torch.zeros(1, device=device)
    dist.all_reduce(line_up, group=group)
    return nbytes(line_up)


def agree(
    probes: dict[int, float], trials: dict[str, Trial], group: dist.ProcessGroup | None, device: torch.device
) -> tuple[dict[int, float], dict[str, Trial], int]:
    """The slowest rank's probe times and, per candidate, the slowest rank's codec seconds and the
    worst error: one all-reduce (MAX), so every rank decides from the same numbers. Every rank
    passes the same probe sizes and candidates. Returns them with the bytes handed to the all-reduce."""
    sizes = sorted(probes)
    values = [probes[size] for size in sizes] + [v for t in trials.values() for v in (t.seconds, t.error)]
    found, sent = max_over_ranks(values, group, device)
    rest = iter(found[len(sizes) :])
    agreed = {name: Trial(next(rest), next(rest), t.exchanges) for name, t in trials.items()}
    return dict(zip(sizes, found)), agreed, sent


def max_over_ranks(
    values: list[float], group: dist.ProcessGroup | None, device: torch.device
) -> tuple[list[float], int]:
    """Each of `values` maximised over the ranks (one all-reduce, float64), and the bytes handed to it."""
    flat = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    return flat.tolist(), nbytes(flat)


@dataclass(frozen=True)
class Network:
    """Time of a collective: `latency` + wire bytes x `seconds_per_byte`."""

    latency: float
    seconds_per_byte: float

    @classmethod
    def fit(cls, sizes: list[int], seconds: list[float], world_size: int) -> Network:
        """Least-squares line through the probes (all-reduces of `sizes` bytes), kept physical:
        latency >= 0 and a positive cost per byte. A probe that took longer than every larger one
        is left out: an all-reduce's time grows with its size, so that one was slowed by something
        else (a stalled connection, a busy CPU), and one such time far off the line would tilt it
        (a 1 s stall at 64 KB on a 10 Gbit/s link fitted as ~2 Mbit/s)."""
        pairs = sorted(zip(sizes, seconds))
        kept = [
            (s, t) for i, (s, t) in enumerate(pairs) if i == len(pairs) - 1 or t <= max(u for _, u in pairs[i + 1 :])
        ]
        sizes, seconds = [s for s, _ in kept], [t for _, t in kept]
        x = [s * wire_factor("allreduce", world_size) for s in sizes]
        mx, my = sum(x) / len(x), sum(seconds) / len(seconds)
        var = sum((a - mx) ** 2 for a in x)
        slope = sum((a - mx) * (b - my) for a, b in zip(x, seconds)) / var if var > 0 else 0.0
        slope = max(slope, 1e-12)  # at most ~8 Tbit/s: never free
        return cls(max(0.0, my - slope * mx), slope)

    @property
    def mbit(self) -> float:
        """The fitted bandwidth per rank, in Mbit/s."""
        return 8 / self.seconds_per_byte / 1e6

    def seconds(self, exchange: Exchange, world_size: int) -> float:
        wire = exchange.nbytes * wire_factor(exchange.kind, world_size)
        return self.latency + wire * self.seconds_per_byte

    def holds(self, size: int, seconds: float, world_size: int) -> bool:
        """Whether an all-reduce of `size` bytes that took `seconds` fits this line within a factor
        of `DRIFT` (a link that changed by less than that rarely changes the plan)."""
        expected = self.seconds(Exchange("allreduce", size), world_size)
        return expected / DRIFT <= seconds <= expected * DRIFT
