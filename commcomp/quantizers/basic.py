"""Lossless and cast quantizers: identity, fp16, bf16 (all linear)."""

from __future__ import annotations

import torch

from commcomp.quantizers.base import Payload, Quantizer
from commcomp.quantizers.checks import check_floating
from commcomp.quantizers.registry import QUANTIZERS

__all__ = ["Cast", "Identity"]


@QUANTIZERS.register("identity")
class Identity(Quantizer):
    """Sends the tensor as it is."""

    name = "identity"
    linear = True
    unbiased = True
    contractive = True

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        return Payload([tensor.reshape(-1)], tensor.shape, tensor.dtype)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload.tensors[0].view(payload.shape)


class Cast(Quantizer):
    """Sends the tensor cast to a narrower floating type (summable, but rounding is biased)."""

    linear = True
    unbiased = False
    contractive = True  # relative error about 2^-11 (fp16) or 2^-8 (bf16), while in range

    def __init__(self, wire_dtype: torch.dtype) -> None:
        self.wire_dtype = wire_dtype

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        return Payload([tensor.reshape(-1).to(self.wire_dtype)], tensor.shape, tensor.dtype)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload.tensors[0].to(payload.dtype).view(payload.shape)


@QUANTIZERS.register("fp16")
class FP16(Cast):
    """IEEE half precision on the wire (2 bytes a value). Large values overflow to inf: scale first."""

    name = "fp16"

    def __init__(self) -> None:
        super().__init__(torch.float16)


@QUANTIZERS.register("bf16")
class BF16(Cast):
    """bfloat16 on the wire (2 bytes a value): float32's range, 8 bits of mantissa."""

    name = "bf16"

    def __init__(self) -> None:
        super().__init__(torch.bfloat16)
