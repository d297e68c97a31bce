"""What every commcomp DDP hook shares: the state base class, step bookkeeping, checks, registry.

Ordering rule: every collective is issued from the hook body itself, never from a `.then()`
callback. DDP calls the hook for buckets 0, 1, 2, ... in the same order on every rank, so the
collectives are issued in the same order everywhere even with several buckets in flight (PyTorch's
PowerSGD hook issues some from callbacks and, on gloo, crashes with "Received data size doesn't
match expected size"). Callbacks only decode.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from commcomp import consistency
from commcomp.comm import Collectives, TorchCollectives
from commcomp.consistency import world_size_error
from commcomp.exchange import DenseExchange, ExchangeCodec, TorchWire, dense_nbytes, finish, send, tiles
from commcomp.overflow import NonFiniteGradientError, check_nonfinite
from commcomp.quantizers import StochasticQuantizer
from commcomp.registry import Registry, check_options
from commcomp.stats import CommStats

__all__ = [
    "METHODS",
    "Hook",
    "HookState",
    "NonFiniteGradientError",
    "exchange_hook",
    "register_method",
    "register_simple_method",
    "send_group",
]

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


class HookState:
    """Base of every hook state: process group, step counter, stats, checks, checkpointing.

    Subclasses add their own fields and extend `options()`, `state_dict()` and `load_state_dict()`.
    The process group is left out of pickling and of `state_dict()`.

    Overflow steps (`nonfinite`, see `commcomp.overflow`): a step in which any rank flags NaN/Inf
    leaves the state as it was. What a step learns is committed only when its last group decodes
    cleanly; the random streams its sending half advanced (`volatile()`) are put back otherwise, and
    the step is not counted. "propagate" fills the flagged groups' gradients with NaN on every rank;
    "raise" raises `NonFiniteGradientError` on every rank.
    """

    def __init__(
        self, process_group: dist.ProcessGroup | None = None, check_finite: bool = True, nonfinite: str = "propagate"
    ) -> None:
        # --- configuration ---
        self.process_group = process_group
        self.check_finite = check_finite
        self.nonfinite_policy = check_nonfinite(nonfinite)
        # --- internal state ---
        self.step = 0  # finished steps (backward passes)
        self._names: dict[int, str] = {}  # id(param) -> stable name
        self._verified = False  # options checked against the other ranks
        self._pending = 0  # buckets of this step still decoding
        self._last_seen = False
        self._lock = threading.Lock()
        self._skip_step = False  # a group of this step was flagged
        # this step's checks left on the device (a dense sum's NaN/Inf, GradiVeQ's bases), read at its end
        self._late_checks: list[tuple[list[torch.Tensor], bool, Callable[[], Exception] | None]] = []
        self._commits: list[Callable[[], None]] = []  # what this step learned, applied when it ends cleanly
        self._restore: list[tuple[Any, dict[str, Any]]] = []  # volatile objects' states at the step's start
        # --- statistics ---
        self.num_buckets = 0  # buckets in the latest step
        self.stats = CommStats()

    # ----- identity of the ranks -----
    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def collectives(self) -> Collectives:
        """The transport for the state's own blocking collectives (option check, GradiVeQ refits)."""
        return TorchCollectives(self.process_group)

    # ----- naming parameters so state survives bucket rebuilds and checkpoints -----
    def bind(self, model: nn.Module) -> None:
        """Name parameters after the model's `named_parameters()` (keys of `state_dict()`)."""
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self._names = {id(p): n for n, p in module.named_parameters()}

    def param_key(self, param: torch.Tensor) -> str:
        key = self._names.get(id(param))
        if key is None:  # unbound state: name by first sight, which is deterministic across runs
            key = self._names[id(param)] = f"param{len(self._names)}"
        return key

    # ----- configuration checks -----
    def options(self) -> dict[str, Any]:
        """Options that must agree on every rank."""
        return {"class": type(self).__name__, "check_finite": self.check_finite, "nonfinite": self.nonfinite_policy}

    def verify_options(self, device: torch.device) -> None:
        """Compare `options()` (and the world size) across ranks, raising on every rank if any rank
        differs (one all-gather on `collectives()`); runs once, at the first bucket."""
        comm, name = self.collectives(), type(self).__name__
        nbytes = consistency.verify_options(name, self.options(), comm, device, [self.world_size])
        self.stats.sent(nbytes, kind="allgather", world_size=self.world_size)
        self._verified = True

    # ----- bucket bookkeeping -----
    def begin_bucket(self, bucket: dist.GradBucket) -> None:
        """Checks at the top of every hook call; verifies options on the very first one."""
        self.begin(bucket.buffer(), bucket.index(), bucket.is_last())

    def begin(self, like: torch.Tensor, index: int, last: bool) -> None:
        """Start group `index` of a step (`last`: the step's final group) with gradients like `like`.

        DDP calls this per bucket (through `begin_bucket`); the Horovod optimizer once per step.
        Every group that began must end with `end_bucket()`.
        """
        if not like.is_floating_point():
            raise TypeError(f"{type(self).__name__}: gradients must be floating point, got {like.dtype}")
        if not self._verified:
            self.verify_options(like.device)
        if index == 0:
            self._last_seen = False
            self._skip_step = False
            self._late_checks = []
            self._commits = []
            self._restore = [(obj, obj.state_dict()) for obj in self.volatile()]
        with self._lock:
            self._pending += 1
        if last:
            self._last_seen = True
            self.num_buckets = index + 1

    def add_group(self) -> None:
        """One more group in the bucket that began last (sent through another codec); every group
        ends with its own `end_bucket()`."""
        with self._lock:
            self._pending += 1

    def end_bucket(self) -> None:
        """Called when a bucket's result is ready; the step ends after the last bucket decodes."""
        with self._lock:
            self._pending -= 1
            done = self._pending == 0 and self._last_seen
            if done:
                self._last_seen = False
                error = self._read_late_checks()
                if self._skip_step:  # the step never happened, as far as the state is concerned
                    for obj, saved in self._restore:
                        obj.load_state_dict(saved)
                    self.stats.skipped()
                else:
                    for commit in self._commits:
                        commit()
                    self.step += 1
                self._commits, self._restore = [], []
                self.stats.end_step()
                if error is not None:
                    raise error

    def volatile(self) -> list[Any]:
        """Objects whose state the sending half of a step changes before anyone knows whether the step
        is clean (the quantizers' random streams); saved at the step's start, restored if it is skipped.
        Quantizers that draw nothing have no such state: left out, nothing to save every step."""
        found: list[Any] = []
        for value in vars(self).values():
            if isinstance(value, StochasticQuantizer):
                found.append(value)
            elif isinstance(value, HookState):
                found.extend(value.volatile())
        return found

    def commit_at_step_end(self, commit: Callable[[], None]) -> None:
        """Run `commit` (keep residuals, statistics) when the step ends, unless an overflow skips it."""
        with self._lock:
            self._commits.append(commit)

    def check_at_step_end(self, bad: torch.Tensor, error: Callable[[], Exception] | None = None) -> None:
        """Skip the step if `bad` (a 0-dim bool tensor, the same on every rank: a flagged rank,
        GradiVeQ's ranks projected onto other bases) is true, and then raise `error()` if given;
        read on the host once the step's last group is in (`end_bucket`), with the step's other such
        checks, so no decoding callback waits for the device."""
        with self._lock:
            self._late_checks.append(([bad], False, error))

    def check_finite_at_step_end(self, values: list[torch.Tensor]) -> None:
        """Skip the step if any of `values` (0-dim floating tensors, the same on every rank: a dense
        sum's `consistency.extremes`) is NaN or Inf; read with the other late checks. Nothing is
        computed from them now: a flag would cost a few small operations per bucket, in a callback
        that delays the step."""
        with self._lock:
            self._late_checks.append((values, True, None))

    def _read_late_checks(self) -> Exception | None:
        """At the step's end: read the step's late checks (one host read); any set skips the step;
        the first error of those set, to raise once the step is closed."""
        checks, self._late_checks = self._late_checks, []
        if not checks:
            return None
        read = iter(consistency.joined([v for values, _, _ in checks for v in values], checks[0][0][0].device).tolist())
        found = []
        for values, finite, error in checks:
            mine = [next(read) for _ in values]
            if (not all(map(math.isfinite, mine))) if finite else any(mine):
                found.append(error)
        self._skip_step |= bool(found)
        return next((error() for error in found if error is not None), None)

    def skip_step(self, flags: torch.Tensor, bucket_index: int) -> None:
        """Some rank flagged NaN/Inf, or a dense sum held them (every rank sees the same `flags` and
        sums): the step will leave the state untouched; with nonfinite="raise", raise
        `NonFiniteGradientError` on every rank."""
        bad = consistency.bad_ranks(flags)
        self._skip_step = True
        if self.nonfinite_policy == "raise":
            where = (
                f"in the gradients of rank(s) {bad} (or in what they sent: a value out of the wire dtype's range)"
                if bad
                else "in the sum of the ranks' gradients, all finite: the sum overflowed the wire dtype"
            )
            raise NonFiniteGradientError(
                f"{type(self).__name__}: NaN or Inf {where} (bucket {bucket_index}, step {self.step}); "
                "no update was applied from them"
            )

    def nonfinite(self, tensors: list[torch.Tensor]) -> consistency.Flag:
        """This rank's flag: true if checking is on and any of `tensors` holds NaN/Inf (a 0-dim bool
        tensor on their device, not read on the host; None when there is nothing to check)."""
        return consistency.nonfinite_flag(tensors) if self.check_finite else None

    # ----- the exchange -----
    def exchange_codec(self, params: list[tuple[str, torch.Size]], like: torch.Tensor) -> ExchangeCodec:
        """The codec for this step's group of gradients `params` (name, shape), in sending order.

        Called in the hook body before anything is sent, so a subclass may issue blocking collectives
        here (GradiVeQ refits its bases).
        """
        raise NotImplementedError(f"{type(self).__name__} does not send through the exchange engine")

    @property
    def residuals_summed(self) -> bool:
        """Error-feedback residuals are shares of a summed payload (g/N), not parts of a gradient that
        is averaged after decoding; `commcomp.elastic` splits them accordingly at another world size."""
        return True

    # ----- checkpointing -----
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "stats": self.stats.state_dict(),
            "options": self.options(),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("options", {}).get("class") not in (None, type(self).__name__):
            raise ValueError(f"state_dict is for {state['options']['class']}, not {type(self).__name__}")
        saved_world = state.get("world_size", self.world_size)
        if saved_world != self.world_size:
            raise world_size_error(type(self).__name__, saved_world, self.world_size)
        self.step = int(state["step"])
        self.stats.load_state_dict(state["stats"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["process_group"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def exchange_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP hook of every exchange-engine state: one bucket through `commcomp.exchange`.

    The state's codec, the flags and the collective are issued here (the hook body); the callback
    only decodes.
    """
    state.begin_bucket(bucket)
    keys = [state.param_key(p) for p in bucket.parameters()]
    buf, grads = bucket.buffer(), bucket.gradients()
    codec = state.exchange_codec([(k, g.shape) for k, g in zip(keys, grads)], buf)
    return send_group(state, codec, keys, grads, buf, bucket.index())


def send_group(
    host: HookState, codec: ExchangeCodec, keys: list[str], grads: list[torch.Tensor], buf: torch.Tensor, index: int
) -> torch.futures.Future[torch.Tensor]:
    """Send gradients `grads` (named `keys`) of begun bucket `index` (buffer `buf`) through `codec`
    on `host`'s process group; the returned future decodes them (in the callback), ends the group,
    and completes with `buf`. A `DenseExchange` of the whole bucket sends `buf` as one tensor."""
    wire = TorchWire(host.process_group)
    dense = dense_nbytes(grads, buf)
    if isinstance(codec, DenseExchange) and tiles(grads, buf):
        keys, grads = [f"bucket{index}"], [buf]
    item = send(host, codec, keys, grads, wire, like=buf, dense_bytes=dense, name=f"bucket{index}")

    def decode(fut: torch.futures.Future[Any]) -> torch.Tensor:
        del fut  # the same future as item.pending's
        finish(host, [item], index)
        return buf

    return item.pending.future.then(decode)


# name -> factory(model, process_group, **options) -> (state, hook)
METHODS: Registry[tuple[HookState, Hook]] = Registry("communication method")


def register_method(name: str) -> Callable[[Callable[..., tuple[HookState, Hook]]], Callable[..., Any]]:
    """Decorator for `factory(model, process_group, **options) -> (state, hook)`."""
    return METHODS.register(name)


def register_simple_method(name: str, state_cls: type[HookState], hook: Hook) -> None:
    """Register a method whose options are exactly `state_cls`'s keyword arguments."""

    def factory(
        model: nn.parallel.DistributedDataParallel, process_group: dist.ProcessGroup | None, **options: Any
    ) -> tuple[HookState, Hook]:
        check_options(f"method {name!r}", state_cls, options)
        return state_cls(process_group, **options), hook

    METHODS.register(name)(factory)
