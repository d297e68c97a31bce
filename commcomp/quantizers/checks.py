"""Argument and input validators shared by the quantizers (each raises an error naming the problem)."""

from __future__ import annotations

import torch

__all__ = ["check_bits", "check_floating", "check_positive_int"]


def check_floating(tensor: torch.Tensor, who: str) -> None:
    """Raise TypeError unless `tensor` is a floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor (float32/float16/bfloat16), got {tensor.dtype}")


def check_positive_int(value: int, name: str) -> int:
    """Return `value` if it is an int >= 1; raise ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_bits(bits: int, low: int = 1, high: int = 8, who: str = "bits") -> int:
    """Return `bits` if it is an int in [low, high]; raise ValueError naming it otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"{who} must be an integer in [{low}, {high}], got {bits!r}")
    return bits
