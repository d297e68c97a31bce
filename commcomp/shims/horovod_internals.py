"""Horovod private names commcomp uses, all in this module (checked on Horovod 0.28.1).

`commcomp.horovod.DistributedOptimizer` is Horovod's own `hvd.DistributedOptimizer` with the
per-gradient send replaced, so it keeps Horovod's backward hooks, overlap and `synchronize()`.
Horovod exposes that machinery only privately:

- `horovod.torch.optimizer._DistributedOptimizer`: its `__init__` (called here with keyword
  arguments only), its `load_state_dict`, and its methods, copied into a new class built on the
  user's optimizer class, as Horovod's `DistributedOptimizer` factory does;
- the two methods Horovod's backward hooks and `step()` call, `_allreduce_grad_async(p)` and
  `synchronize()`, overridden by `OptimizerBase` below;
- its attributes `_parameter_names`, `_requires_update`, `_handles`, `_allreduce_delay`,
  `_synchronized`, `backward_passes_per_step` and method `_register_hooks()`.

Importing this module checks the Horovod version and raises RuntimeError on an untested one.
"""

from __future__ import annotations

from typing import Any

import horovod
import horovod.torch as hvd
import torch
from horovod.torch.optimizer import _DistributedOptimizer

__all__ = ["TESTED_VERSIONS", "OptimizerBase", "build_optimizer", "check_version"]

TESTED_VERSIONS = ("0.28.1",)


def check_version(version: str) -> None:
    """Raise RuntimeError unless `version` is a Horovod release this module was checked against."""
    if version not in TESTED_VERSIONS:
        raise RuntimeError(
            f"commcomp.horovod is tested with Horovod {', '.join(TESTED_VERSIONS)} but found {version}: it builds "
            "on Horovod's private optimizer API (commcomp/shims/horovod_internals.py), which may have changed"
        )


check_version(horovod.__version__)


class OptimizerBase(torch.optim.Optimizer):
    """Horovod's private optimizer protocol, turned into public methods for a subclass to implement.

    - `send_gradient(name, grad)`: called from Horovod's backward hooks once per parameter and step
      (and from `synchronize()` for parameters whose hook did not fire, in name order); returns a
      handle for `finish_step`.
    - `finish_step(handles)`: called from `synchronize()` with the step's handles in send order.

    Never instantiated itself: `build_optimizer` copies its methods into the optimizer's class.
    Methods here use `super(self.__class__, self)`, not `super()`, because they are copied.
    """

    # set by _DistributedOptimizer.__init__
    _parameter_names: dict[torch.Tensor, str]
    _requires_update: set[torch.Tensor]
    _handles: dict[torch.Tensor, Any]
    _allreduce_delay: dict[torch.Tensor, int]
    _synchronized: bool
    backward_passes_per_step: int
    _register_hooks: Any

    def init_horovod(self, params: Any, named_parameters: list[tuple[str, torch.Tensor]]) -> None:
        """Horovod's own set-up (hooks, names) with no compression, summing, the global process set."""
        _DistributedOptimizer.__init__(
            self,
            params=params,
            named_parameters=named_parameters,
            compression=hvd.Compression.none,
            backward_passes_per_step=1,
            op=hvd.Sum,
            gradient_predivide_factor=1.0,
            groups=None,
            sparse_as_dense=False,
            process_set=hvd.global_process_set,
        )
        if hvd.size() == 1:  # Horovod skips its hooks on one rank; commcomp still compresses (and counts)
            self._register_hooks()

    def parameter_shapes(self) -> list[tuple[str, torch.Size]]:
        """(name, shape) of every parameter that is sent each step."""
        return [(self._parameter_names[p], p.shape) for p in self._requires_update]

    def load_horovod_state_dict(self, state_dict: dict[str, Any]) -> None:
        _DistributedOptimizer.load_state_dict(self, state_dict)

    def send_gradient(self, name: str, grad: torch.Tensor) -> Any:
        raise NotImplementedError

    def finish_step(self, handles: list[Any]) -> None:
        raise NotImplementedError

    # --- Horovod's private protocol ---
    def _allreduce_grad_async(self, p: torch.Tensor) -> tuple[Any, None]:
        if p.grad is None:  # as Horovod: a rank without this gradient still sends (zeros)
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse:
            raise TypeError(f"commcomp.horovod: sparse gradients are not supported ({self._parameter_names[p]})")
        return self.send_gradient(self._parameter_names[p], p.grad), None

    def synchronize(self) -> None:
        missing = sorted(self._requires_update - set(self._handles), key=self._parameter_names.__getitem__)
        for p in missing:  # parameters whose hook did not fire, in the same (name) order on every rank
            self._handles[p] = self._allreduce_grad_async(p)
        handles = [handle for handle, _ in self._handles.values()]
        self._handles.clear()
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = self.backward_passes_per_step
        self._synchronized = True
        if handles:
            self.finish_step(handles)


_NOT_COPIED = ("__dict__", "__weakref__", "__annotations__", "__module__", "__qualname__", "__doc__")


def build_optimizer(optimizer: torch.optim.Optimizer, methods: type[OptimizerBase], *args: Any) -> Any:
    """An optimizer sharing `optimizer`'s param_groups, built as Horovod builds its own: a class
    named like the user's, based on the user's optimizer class, holding `_DistributedOptimizer`'s
    methods with `methods`' (and its `OptimizerBase` bases') on top; `methods.__init__` gets
    `(optimizer.param_groups, *args)`. `__module__` stays Horovod's, because
    `hvd.broadcast_optimizer_state()` recognises Horovod optimizers by it."""
    namespace = dict(vars(_DistributedOptimizer))
    for cls in reversed(methods.__mro__):
        if issubclass(cls, OptimizerBase):
            namespace.update({k: v for k, v in vars(cls).items() if k not in _NOT_COPIED})
    user_cls = optimizer.__class__
    return type(user_cls.__name__, (user_cls,), namespace)(optimizer.param_groups, *args)
