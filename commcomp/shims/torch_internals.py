"""PyTorch private names commcomp uses (checked on torch 2.1 to 2.13).

DistributedDataParallel has no public way to skip some parameters; its class method
`_set_params_and_buffers_to_ignore_for_model` is what PyTorch's own tests and libraries use. DDP then
neither broadcasts those tensors at construction, nor buckets them, nor all-reduces their gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ddp_ignored_names", "set_ddp_ignored_names"]

_SETTER = "_set_params_and_buffers_to_ignore_for_model"
_ATTRIBUTE = "_ddp_params_and_buffers_to_ignore"  # where the setter stores the names on the model


def ddp_ignored_names(model: nn.Module) -> list[str]:
    """The parameter and buffer names DDP has been told to skip for `model` (empty if none)."""
    return list(getattr(model, _ATTRIBUTE, ()))


def set_ddp_ignored_names(model: nn.Module, names: list[str]) -> None:
    """Tell DistributedDataParallel to skip these parameter and buffer names of `model` (call before
    wrapping it). Raises RuntimeError naming the torch version if the private API is gone."""
    setter = getattr(DistributedDataParallel, _SETTER, None)
    if setter is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no DistributedDataParallel.{_SETTER}, which commcomp uses to keep "
            "expert parameters out of DDP (checked on torch 2.1 to 2.13); see commcomp/shims/torch_internals.py"
        )
    setter(model, names)
