"""`DistributedOptimizer`: Horovod's own optimizer with each gradient sent through a commcomp compressor.

Same backward hooks, overlap of communication with the backward pass, `synchronize()` and
`skip_synchronize()` as `hvd.DistributedOptimizer` (the Horovod internals it needs are in
`commcomp.shims.horovod_internals`). Each step is one group of the exchange engine
(`commcomp.exchange`) on `HorovodWire`: every parameter's gradient is encoded and handed to Horovod
from its backward hook, and `synchronize()` waits, checks flags, decodes and commits; the step
counter advances through `HookState.end_bucket` as under DDP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import horovod.torch as hvd
import torch

from commcomp import quantizers
from commcomp.comm import Collectives
from commcomp.exchange import ExchangeCodec, InFlight, finish, nbytes, send
from commcomp.gradiveq import GradiVeQState
from commcomp.gradiveq.pipeline import TrackedCoefficients, finish_tracked
from commcomp.hooks.base import HookState
from commcomp.hooks.quantized import QuantizerState
from commcomp.horovod.collectives import HorovodCollectives, HorovodPending, HorovodWire
from commcomp.quantizers import Quantizer
from commcomp.registry import check_options
from commcomp.shims.horovod_internals import OptimizerBase, build_optimizer
from commcomp.stats import CommStats

__all__ = [
    "DistributedOptimizer",
    "HorovodGradiVeQState",
    "HorovodQuantizerState",
    "compressor_names",
    "make_state",
]


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
    """`GradiVeQState` (same options, schedule and checkpoints) whose collectives run on Horovod.

    The tracked basis's payloads default to float32 here: Horovod's CPU build has no bfloat16
    collectives (pass wire_dtype="bf16" on a build that has them)."""

    default_wire_dtype = "fp32"


class HorovodQuantizerState(_OnHorovod, QuantizerState):
    """`QuantizerState` (same options and checkpoints) whose collectives run on Horovod."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if isinstance(self.quantizer, quantizers.SharedScaleQuantizer):
            raise ValueError(f"{self.quantizer.name} (shared grid) works with the DDP hook only, not on Horovod yet")
        if hasattr(self.quantizer, "set_rank"):  # per-rank rounding noise follows Horovod's rank
            self.quantizer.set_rank(self.rank)


def compressor_names() -> list[str]:
    """Every name `DistributedOptimizer` accepts as `compressor`."""
    return sorted({"gradiveq", *quantizers.names()})


def make_state(
    compressor: str | Quantizer, *, error_feedback: bool | None = None, check_finite: bool = True, **options: Any
) -> HookState:
    """The per-parameter compression state for `compressor` (a name or a Quantizer instance)."""
    if isinstance(compressor, Quantizer):
        return HorovodQuantizerState(
            quantizer=compressor, error_feedback=bool(error_feedback), check_finite=check_finite, **options
        )
    if compressor == "gradiveq":
        check_options("compressor 'gradiveq'", GradiVeQState, options)
        if options.get("sample_quantizer") is not None:
            raise ValueError("sample_quantizer is supported by the DDP GradiVeQ hook only, not on Horovod yet")
        return HorovodGradiVeQState(error_feedback=error_feedback, check_finite=check_finite, **options)
    if compressor in quantizers.names():
        return HorovodQuantizerState(
            quantizer=compressor, error_feedback=bool(error_feedback), check_finite=check_finite, **options
        )
    raise ValueError(f"unknown compressor {compressor!r}; valid names: {', '.join(compressor_names())}")


# ----------------------------------------------------------------------------- one step's traffic


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
        codec, self.codec = self.codec, None
        if isinstance(codec, TrackedCoefficients) and isinstance(self.state, GradiVeQState):  # two exchanges
            finish_tracked(self.state, list(items), self.wire, f"commcomp.basis.{self.state.step}")
        else:
            finish(self.state, list(items))


# ----------------------------------------------------------------------------- the optimizer


class _CommcompMethods(OptimizerBase):
    """The optimizer's own methods, laid over Horovod's by `build_optimizer` (never instantiated by
    itself): a step's gradients go through `_Traffic`; checkpoints carry the compression state."""

    def __init__(self, params: Any, named_parameters: list[tuple[str, torch.Tensor]], traffic: _Traffic) -> None:
        self._traffic = traffic
        self._started = False
        self.init_horovod(params, named_parameters)

    # --- what users read ---
    @property
    def comm_state(self) -> HookState:
        """The compression state (GradiVeQState or QuantizerState flavour): options, step, codecs."""
        return self._traffic.state

    @property
    def stats(self) -> CommStats:
        """Bytes handed to Horovod by this rank (and what fp32 would have been), per step and in total."""
        return self._traffic.state.stats

    # --- one step: the first gradient begins it, synchronize() finishes it ---
    def send_gradient(self, name: str, grad: torch.Tensor) -> InFlight[HorovodPending]:
        if not self._started:
            self._traffic.begin(self.parameter_shapes(), grad)
            self._started = True
        return self._traffic.send(name, grad)

    def finish_step(self, handles: list[InFlight[HorovodPending]]) -> None:
        self._started = False
        self._traffic.finish(handles)

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
        self.load_horovod_state_dict(state_dict)


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    compressor: str | Quantizer = "gradiveq",
    *,
    error_feedback: bool | None = None,
    check_finite: bool = True,
    **options: Any,
) -> torch.optim.Optimizer:
    """Horovod's DistributedOptimizer with a commcomp compressor; per-parameter state keyed by name.

    Args:
        optimizer: the local optimizer (its param_groups are shared, as with Horovod's wrapper).
        named_parameters: `model.named_parameters()`; names key the compressor's state and must be
            the same on every rank.
        compressor: "gradiveq" or a quantizer name (`compressor_names()`), or a Quantizer instance.
        error_feedback: keep what compression dropped and add it to the next step's gradient (None:
            the compressor's default: on for GradiVeQ's tracked basis, off for the quantizers).
        check_finite: look for NaN/Inf in the gradients; `nonfinite="propagate"` (default, in **options)
            makes every rank's gradients NaN when any rank overflows, "raise" raises on every rank.
        **options: the compressor's options: `GradiVeQState`'s (rank, warmup_steps, basis, ...)
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
    return build_optimizer(optimizer, _CommcompMethods, named, _Traffic(state))
