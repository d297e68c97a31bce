"""Horovod integration: commcomp's compressors inside Horovod, and Horovod as a commcomp transport.

- `DistributedOptimizer(optimizer, named_parameters, compressor="gradiveq", **options)` is Horovod's
  own `hvd.DistributedOptimizer` (same backward hooks, same overlap of communication with the
  backward pass, same `synchronize()` / `skip_synchronize()`), with one change: each parameter's
  gradient goes through a commcomp compressor whose state (GradiVeQ bases and PCA sums,
  error-feedback residuals, quantizer generators) is keyed by the parameter's name. Linear
  payloads (GradiVeQ coefficients, fp16, identity) are summed by Horovod's allreduce (op=Sum) and
  decoded after; other quantizers (qsgd, topk, sign) are packed into bytes and all-gathered. The
  per-gradient rules are the DDP hooks' own (`GradiVeQState`, `QuantizerState`), so a run gives the
  same parameters on Horovod as under DDP.
- `Compression.fp16` / `.none` and `QuantizerCompressor(name)`: Horovod `Compressor`s for
  stateless linear quantizers, for `hvd.DistributedOptimizer(..., compression=...)`.
- `HorovodCollectives`: the `commcomp.comm.Collectives` protocol on Horovod, so PQASGD and the
  GradiVeQ refit run on Horovod as they do on torch.distributed.

Only the global process set is supported. Call `hvd.init()` before building any of these.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import horovod.torch as hvd
import torch
from horovod.torch.optimizer import _DistributedOptimizer

from commcomp import quantizers
from commcomp.comm import Collectives
from commcomp.exchange import ExchangeCodec, InFlight, finish, nbytes, send
from commcomp.gradiveq import GradiVeQState
from commcomp.hooks.base import HookState
from commcomp.hooks.quantized import QuantizerState, flatten_summable, unflatten_summable
from commcomp.quantizers import Payload, Quantizer
from commcomp.registry import check_options
from commcomp.stats import CommStats

__all__ = [
    "HOROVOD_METHODS",
    "Compression",
    "DistributedOptimizer",
    "HorovodCollectives",
    "HorovodGradiVeQState",
    "HorovodQuantizerState",
    "QuantizerCompressor",
    "compressor_names",
    "make_optimizer",
    "make_state",
]


class HorovodCollectives:
    """`Collectives` on Horovod's global process set (blocking calls, one collective each).

    Every call gets the name `<prefix>.<kind>.<n>`, n counting this object's calls, so ranks that
    issue the same calls in the same order meet on the same names (Horovod matches by name).
    """

    def __init__(self, prefix: str = "commcomp") -> None:
        self.prefix = prefix
        self.rank = hvd.rank()
        self.world_size = hvd.size()
        self.bytes_sent = 0
        self._calls = 0

    def _name(self, kind: str) -> str:
        self._calls += 1
        return f"{self.prefix}.{kind}.{self._calls}"

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += nbytes(tensor)
        return hvd.allreduce_(tensor, op=hvd.Sum, name=self._name("allreduce"))

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.bytes_sent += nbytes(tensor)
        gathered = hvd.allgather(tensor.contiguous().unsqueeze(0), name=self._name("allgather"))
        return list(gathered.unbind(0))

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.rank == src:
            self.bytes_sent += nbytes(tensor)
        return hvd.broadcast_(tensor, src, name=self._name("broadcast"))


class _OnHorovod(HookState):
    """Runs a hook state's own collectives (option check, refits, flags) on Horovod."""

    @property
    def rank(self) -> int:
        return hvd.rank()

    @property
    def world_size(self) -> int:
        return hvd.size()

    def collectives(self) -> Collectives:
        return HorovodCollectives(f"commcomp.{type(self).__name__}")


class HorovodGradiVeQState(_OnHorovod, GradiVeQState):
    """`GradiVeQState` (same options, schedule and checkpoints) whose collectives run on Horovod."""


class HorovodQuantizerState(_OnHorovod, QuantizerState):
    """`QuantizerState` (same options and checkpoints) whose collectives run on Horovod."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if hasattr(self.quantizer, "set_rank"):  # per-rank rounding noise follows Horovod's rank
            self.quantizer.set_rank(self.rank)


def compressor_names() -> list[str]:
    """Every name `DistributedOptimizer` accepts as `compressor`."""
    return sorted({"gradiveq", *quantizers.names()})


def make_state(
    compressor: str | Quantizer, *, error_feedback: bool = False, check_finite: bool = True, **options: Any
) -> HookState:
    """The per-parameter compression state for `compressor` (a name or a Quantizer instance)."""
    if isinstance(compressor, Quantizer):
        return HorovodQuantizerState(
            quantizer=compressor, error_feedback=error_feedback, check_finite=check_finite, **options
        )
    if compressor == "gradiveq":
        check_options("compressor 'gradiveq'", GradiVeQState, options)
        if options.get("sample_quantizer") is not None:
            raise ValueError("sample_quantizer is supported by the DDP GradiVeQ hook only, not on Horovod yet")
        return HorovodGradiVeQState(error_feedback=error_feedback, check_finite=check_finite, **options)
    if compressor in quantizers.names():
        return HorovodQuantizerState(
            quantizer=compressor, error_feedback=error_feedback, check_finite=check_finite, **options
        )
    raise ValueError(f"unknown compressor {compressor!r}; valid names: {', '.join(compressor_names())}")


# ----------------------------------------------------------------------------- one step's traffic


class HorovodPending:
    """A Horovod collective in flight (the `commcomp.exchange.Pending` of `HorovodWire`)."""

    def __init__(self, handle: int, summed: bool) -> None:
        self.handle, self.summed = handle, summed

    def wait(self) -> torch.Tensor | list[torch.Tensor]:
        out = hvd.synchronize(self.handle)
        return out if self.summed else list(out.unbind(0))


class HorovodWire:
    """`commcomp.exchange.Wire` on Horovod: allreduce (op=Sum) or allgather, asynchronous, by name."""

    def start(self, flat: torch.Tensor, summed: bool, name: str) -> HorovodPending:
        if summed:
            return HorovodPending(hvd.allreduce_async_(flat, name=name, op=hvd.Sum), True)
        return HorovodPending(hvd.allgather_async(flat.unsqueeze(0), name=name), False)


class _Traffic:
    """One Horovod step through the exchange engine: `begin` (checks, the step's codec, GradiVeQ's
    refit), `send` one gradient (from the backward hooks), `finish` (wait, decode, commit, end the step).
    The whole step is one group of the state's bucket bookkeeping, so the step counter advances
    through `HookState.end_bucket` as under DDP."""

    def __init__(self, state: HookState) -> None:
        self.state = state
        self.wire = HorovodWire()
        self.codec: ExchangeCodec | None = None

    def begin(self, params: list[tuple[str, torch.Size]], like: torch.Tensor) -> None:
        self.state.begin(like, 0, True)
        self.codec = self.state.exchange_codec(sorted(params), like)

    def send(self, key: str, grad: torch.Tensor) -> InFlight[HorovodPending]:
        if self.codec is None:
            raise RuntimeError("commcomp.horovod: a gradient was sent before the step began")
        name = f"commcomp.{key}"
        return send(self.state, self.codec, [key], [grad], self.wire, like=grad, dense_bytes=nbytes(grad), name=name)

    def finish(self, items: list[InFlight[HorovodPending]]) -> None:
        """Wait for every collective, raise on every rank if any rank had NaN/Inf, decode into the
        gradients; the step counts as done either way (as in the DDP hooks)."""
        self.codec = None
        finish(self.state, list(items))


# ----------------------------------------------------------------------------- the optimizer


class _CommcompMethods(torch.optim.Optimizer):
    """Methods laid over Horovod's `_DistributedOptimizer` (never instantiated by itself).

    Horovod builds its optimizer as a new class whose methods are copied from `_DistributedOptimizer`
    on top of the user's optimizer class; `DistributedOptimizer` below does the same and then
    replaces the three methods that touch gradients, plus checkpointing.
    """

    _parameter_names: dict[torch.Tensor, str]
    _requires_update: set[torch.Tensor]
    _handles: dict[Any, Any]
    _allreduce_delay: dict[torch.Tensor, int]
    _synchronized: bool
    backward_passes_per_step: int
    _register_hooks: Any

    def __init__(self, params: Any, named_parameters: list[tuple[str, torch.Tensor]], traffic: _Traffic) -> None:
        self._traffic = traffic
        self._started = False
        _DistributedOptimizer.__init__(
            self, params, named_parameters, hvd.Compression.none, 1, hvd.Sum, 1.0, None, False, hvd.global_process_set
        )
        if hvd.size() == 1:  # Horovod skips its hooks on one rank; commcomp still compresses (and counts)
            self._register_hooks()

    # --- what users read ---
    @property
    def comm_state(self) -> HookState:
        """The compression state (GradiVeQState or QuantizerState flavour): options, step, codecs."""
        return self._traffic.state

    @property
    def stats(self) -> CommStats:
        """Bytes handed to Horovod by this rank (and what fp32 would have been), per step and in total."""
        return self._traffic.state.stats

    # --- Horovod's per-parameter send, called from the backward hooks ---
    def _allreduce_grad_async(self, p: torch.Tensor) -> tuple[InFlight[HorovodPending], None]:
        if p.grad is None:  # as Horovod: a rank without this gradient still sends (zeros)
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse:
            raise TypeError(f"commcomp.horovod: sparse gradients are not supported ({self._parameter_names[p]})")
        if not self._started:
            params = [(self._parameter_names[q], q.shape) for q in self._requires_update]
            self._traffic.begin(params, p.grad)
            self._started = True
        return self._traffic.send(self._parameter_names[p], p.grad), None

    def synchronize(self) -> None:
        missing = sorted(self._requires_update - set(self._handles), key=self._parameter_names.__getitem__)
        for p in missing:  # parameters whose hook did not fire, in the same (name) order on every rank
            self._handles[p] = self._allreduce_grad_async(p)
        items = [item for item, _ in self._handles.values()]
        self._handles.clear()
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = self.backward_passes_per_step
        self._synchronized = True
        self._started = False
        if items:
            self._traffic.finish(items)

    # --- checkpointing: the optimizer's state plus the compression state under "commcomp" ---
    def state_dict(self) -> dict[str, Any]:
        state = super(self.__class__, self).state_dict()  # the user's optimizer class, as Horovod does
        state["commcomp"] = self._traffic.state.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        comm = state_dict.pop("commcomp", None)
        if comm is None:
            raise ValueError("this state_dict has no 'commcomp' entry (was it saved by commcomp.horovod?)")
        self._traffic.state.load_state_dict(comm)
        self._started = False
        _DistributedOptimizer.load_state_dict(self, state_dict)


# `__module__` stays Horovod's: hvd.broadcast_optimizer_state() recognises its optimizers by it (and then
# initialises their state without a communicating step()).
_OVERRIDES = {
    k: v
    for k, v in vars(_CommcompMethods).items()
    if k not in ("__dict__", "__weakref__", "__annotations__", "__module__", "__qualname__", "__doc__")
}


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    compressor: str | Quantizer = "gradiveq",
    *,
    error_feedback: bool = False,
    check_finite: bool = True,
    **options: Any,
) -> torch.optim.Optimizer:
    """Horovod's DistributedOptimizer with a commcomp compressor; per-parameter state keyed by name.

    Args:
        optimizer: the local optimizer (its param_groups are shared, as with Horovod's wrapper).
        named_parameters: `model.named_parameters()`; names key the compressor's state and must be
            the same on every rank.
        compressor: "gradiveq" or a quantizer name (`compressor_names()`), or a Quantizer instance.
        error_feedback: keep what compression dropped and add it to the next step's gradient.
        check_finite: look for NaN/Inf in the gradients; `nonfinite="propagate"` (default, in **options)
            makes every rank's gradients NaN when any rank overflows, "raise" raises on every rank.
        **options: the compressor's options: `GradiVeQState`'s (energy_threshold, warmup_steps, ...)
            or the quantizer's (bits=4 for qsgd, ratio for topk, ...).

    The result also has `stats` (CommStats), `comm_state`, and `state_dict()` carrying the
    compression state under "commcomp". Example::

        hvd.init()
        opt = commcomp.horovod.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                                    model.named_parameters(), "gradiveq")
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if named_parameters is None:
        raise ValueError("named_parameters is required (model.named_parameters()): names key per-parameter state")
    named = list(named_parameters)
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"named_parameters must be (name, parameter) pairs, got {item!r:.80}")
    state = make_state(compressor, error_feedback=error_feedback, check_finite=check_finite, **options)
    traffic = _Traffic(state)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), {**vars(_DistributedOptimizer), **_OVERRIDES})
    return cls(optimizer.param_groups, named, traffic)


HOROVOD_METHODS = {"horovod-fp32": hvd.Compression.none, "horovod-fp16": hvd.Compression.fp16}


def make_optimizer(
    method: str, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, torch.Tensor]], **options: Any
) -> torch.optim.Optimizer:
    """One entry point for scripts and benchmarks: "horovod-fp32" / "horovod-fp16" give Horovod's own
    optimizer (no compression / `hvd.Compression.fp16`), any `compressor_names()` entry gives
    `DistributedOptimizer(optimizer, named_parameters, method, **options)`."""
    if method in HOROVOD_METHODS:
        if options:
            raise ValueError(f"{method} takes no options, got {sorted(options)}")
        return hvd.DistributedOptimizer(
            optimizer, named_parameters=named_parameters, compression=HOROVOD_METHODS[method]
        )
    if method not in compressor_names():
        valid = ", ".join([*HOROVOD_METHODS, *compressor_names()])
        raise ValueError(f"unknown method {method!r}; valid names: {valid}")
    return DistributedOptimizer(optimizer, named_parameters, method, **options)


# ----------------------------------------------------------------------------- plain Horovod compressors


class QuantizerCompressor(hvd.compression.Compressor):
    """A Horovod `Compressor` running a stateless linear commcomp quantizer (identity, fp16, bf16).

    Use as `hvd.DistributedOptimizer(opt, named_parameters=..., compression=QuantizerCompressor("bf16"))`.
    Horovod's allreduce sums (or averages) the payload, which decodes to the sum (or average) because
    the quantizer is linear. Quantizers that keep per-tensor state or are not linear need
    `commcomp.horovod.DistributedOptimizer` instead.
    """

    def __init__(self, quantizer: str | Quantizer, **options: Any) -> None:
        self.quantizer = quantizers.get(quantizer, **options)
        if not self.quantizer.linear:
            raise ValueError(
                f"{self.quantizer.name} is not linear, so Horovod's allreduce cannot sum its payloads; "
                f"use commcomp.horovod.DistributedOptimizer(..., compressor={self.quantizer.name!r})"
            )
        if self.quantizer.state_dict():
            raise ValueError(
                f"{self.quantizer.name} keeps state that a Horovod compressor cannot checkpoint; "
                f"use commcomp.horovod.DistributedOptimizer(..., compressor={self.quantizer.name!r})"
            )

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Payload]:
        payload = self.quantizer.compress(tensor)
        return flatten_summable([payload], tensor.new_empty(0)), payload

    def decompress(self, tensor: torch.Tensor, ctx: Payload) -> torch.Tensor:
        return self.quantizer.decompress(unflatten_summable(tensor, [ctx])[0])

    def __repr__(self) -> str:
        return f"QuantizerCompressor({self.quantizer!r})"


class Compression:
    """commcomp's stateless linear quantizers as Horovod compressors (like `hvd.Compression`)."""

    none = QuantizerCompressor("identity")
    fp16 = QuantizerCompressor("fp16")
