"""The quantizer interface: pure tensor code, never a collective.

A quantizer turns a tensor into a `Payload` (the tensors that will actually be sent) and back.
`linear` quantizers produce payloads that can be summed element-wise by an all-reduce and still
decode to the sum of the inputs; the others must be all-gathered and decoded one by one.
`Payload.nbytes` counts exactly the bytes of the tensors it holds, which is what commcomp reports
as sent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Payload", "Quantizer", "check_floating", "pack_payloads", "unpack_payloads"]


@dataclass
class Payload:
    """What a quantizer sends for one tensor.

    tensors: the tensors handed to the collective, in a fixed order.
    shape, dtype: of the original tensor, known to every rank (not sent).
    """

    tensors: list[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def check_floating(tensor: torch.Tensor, who: str) -> None:
    """Raise TypeError unless `tensor` is a floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{who} expects a floating-point tensor (float32/float16/bfloat16), got {tensor.dtype}"
        )


class Quantizer(ABC):
    """compress(tensor) -> Payload; decompress(Payload) -> tensor of the original shape and dtype."""

    name: str = "quantizer"
    linear: bool = False  # payloads can be summed by all-reduce
    unbiased: bool = False  # E[decompress(compress(x))] == x

    @abstractmethod
    def compress(self, tensor: torch.Tensor) -> Payload: ...

    @abstractmethod
    def decompress(self, payload: Payload) -> torch.Tensor: ...

    def options(self) -> dict[str, Any]:
        """The options this quantizer was built with (used to check all ranks agree)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Internal state (e.g. random generator state) needed to resume exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def pack_payloads(payloads: list[Payload]) -> torch.Tensor:
    """Concatenate the bytes of every payload tensor into one flat uint8 tensor (for all-gather)."""
    parts = [t.contiguous().reshape(-1).view(torch.uint8) for p in payloads for t in p.tensors]
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts)


def unpack_payloads(flat: torch.Tensor, templates: list[Payload]) -> list[Payload]:
    """Inverse of `pack_payloads`: cut `flat` into tensors laid out like `templates`' tensors."""
    out: list[Payload] = []
    offset = 0
    for tpl in templates:
        tensors = []
        for t in tpl.tensors:
            n = t.numel() * t.element_size()
            chunk = flat[offset : offset + n]
            if chunk.storage_offset() % t.element_size():  # after an odd-sized tensor: realign by copying
                chunk = chunk.clone()
            tensors.append(chunk.view(t.dtype).view(t.shape))
            offset += n
        out.append(Payload(tensors, tpl.shape, tpl.dtype, dict(tpl.meta)))
    if offset != flat.numel():
        raise ValueError(f"payload bytes do not match their layout: got {flat.numel()}, expected {offset}")
    return out
