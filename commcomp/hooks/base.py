"""What every commcomp DDP hook shares: the state base class, step bookkeeping, checks, registry.

Ordering rule: every collective is issued from the hook body itself, never from a `.then()`
callback. DDP calls the hook for buckets 0, 1, 2, ... in the same order on every rank, so the
collectives are issued in the same order everywhere even with several buckets in flight (PyTorch's
PowerSGD hook issues some from callbacks and, on gloo, crashes with "Received data size doesn't
match expected size"). Callbacks only decode.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from commcomp.comm import Collectives, TorchCollectives
from commcomp.registry import Registry, check_options
from commcomp.stats import CommStats

__all__ = [
    "METHODS",
    "Hook",
    "HookState",
    "NonFiniteGradientError",
    "register_method",
    "register_simple_method",
]

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


class NonFiniteGradientError(FloatingPointError):
    """Some rank's gradients contain NaN or Inf; raised on every rank."""


class HookState:
    """Base of every hook state: process group, step counter, stats, checks, checkpointing.

    Subclasses add their own fields and extend `options()`, `state_dict()` and `load_state_dict()`.
    The process group is left out of pickling and of `state_dict()`.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, check_finite: bool = True) -> None:
        # --- configuration ---
        self.process_group = process_group
        self.check_finite = check_finite
        # --- internal state ---
        self.step = 0  # finished steps (backward passes)
        self._names: dict[int, str] = {}  # id(param) -> stable name
        self._verified = False  # options checked against the other ranks
        self._pending = 0  # buckets of this step still decoding
        self._last_seen = False
        self._lock = threading.Lock()
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
        return {"class": type(self).__name__, "check_finite": self.check_finite}

    def _verify_options(self, device: torch.device) -> int:
        """All-gather a fingerprint of `options()` and raise on every rank if any rank differs."""
        text = json.dumps(self.options(), sort_keys=True, default=str)
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        mine = torch.tensor([digest, self.world_size], dtype=torch.int64, device=device)
        comm = self.collectives()
        everyone = comm.all_gather(mine)
        odd = [r for r, t in enumerate(everyone) if not torch.equal(t, everyone[0])]
        if odd:
            raise ValueError(
                f"{type(self).__name__}: the options differ across ranks (ranks {odd} differ from rank 0); "
                f"this rank has {text}"
            )
        self._verified = True
        return comm.bytes_sent

    # ----- bucket bookkeeping -----
    def begin_bucket(self, bucket: dist.GradBucket) -> None:
        """Checks at the top of every hook call; verifies options on the very first one."""
        buf = bucket.buffer()
        if not buf.is_floating_point():
            raise TypeError(f"{type(self).__name__}: gradients must be floating point, got {buf.dtype}")
        if not self._verified:
            self.stats.sent(self._verify_options(buf.device))
        if bucket.index() == 0:
            self._last_seen = False
        with self._lock:
            self._pending += 1
        if bucket.is_last():
            self._last_seen = True
            self.num_buckets = bucket.index() + 1

    def end_bucket(self) -> None:
        """Called when a bucket's result is ready; the step ends after the last bucket decodes."""
        with self._lock:
            self._pending -= 1
            done = self._pending == 0 and self._last_seen
            if done:
                self._last_seen = False
                self.step += 1
                self.stats.end_step()

    def finite_flags(self, tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """One slot per rank, 1 in this rank's slot if any of `tensors` holds NaN/Inf (appended to a
        summed collective, so every rank learns which ranks are bad)."""
        flags = torch.zeros(self.world_size, dtype=like.dtype, device=like.device)
        if self.check_finite and not all(bool(torch.isfinite(t).all()) for t in tensors):
            flags[self.rank] = 1
        return flags

    def raise_if_nonfinite(self, flags: torch.Tensor, bucket_index: int) -> None:
        bad = torch.nonzero(flags).flatten().tolist()
        if bad:
            raise NonFiniteGradientError(
                f"{type(self).__name__}: NaN or Inf in the gradients of rank(s) {bad} "
                f"(bucket {bucket_index}, step {self.step}); no update was applied from them"
            )

    # ----- checkpointing -----
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "stats": self.stats.state_dict(), "options": self.options()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("options", {}).get("class") not in (None, type(self).__name__):
            raise ValueError(f"state_dict is for {state['options']['class']}, not {type(self).__name__}")
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
