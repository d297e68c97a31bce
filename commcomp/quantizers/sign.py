"""Scaled sign: one bit per value plus the mean magnitude of each bucket (EF-SGD's compressor).

Legend: n = values in the tensor, B = bucket size.
"""

from __future__ import annotations

from typing import Any

import torch

from commcomp.quantizers.base import Payload, Quantizer, check_floating
from commcomp.quantizers.packing import bucketize, pack_bits, per_value, unpack_bits
from commcomp.quantizers.qsgd import check_positive_int
from commcomp.quantizers.registry import QUANTIZERS

__all__ = ["Sign"]


@QUANTIZERS.register("sign")
class Sign(Quantizer):
    """Sends sign(v_i) as one bit (1 = negative, 0 = zero or positive) and, per bucket of B values,
    their mean magnitude m = ||v||_1 / B (float32); v_i decodes to m * sign(v_i), zeros to +m.

    Biased (use error feedback). Payload of n values: ceil(n/8) + 4*ceil(n/B) bytes.

    Args:
        bucket_size: B, values sharing one magnitude (the last bucket averages only its own values).
    """

    name = "sign"
    linear = False
    unbiased = False

    def __init__(self, bucket_size: int = 512) -> None:
        self.bucket_size = check_positive_int(bucket_size, "bucket_size")

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1).float()
        n = x.numel()
        sums = bucketize(x.abs(), self.bucket_size).sum(1)
        counts = (n - torch.arange(sums.numel(), device=x.device) * self.bucket_size).clamp(max=self.bucket_size)
        return Payload([pack_bits(x < 0, 1), sums / counts], tensor.shape, tensor.dtype)

    def decompress(self, payload: Payload) -> torch.Tensor:
        packed, means = payload.tensors
        n = payload.shape.numel()
        signs = 1.0 - 2.0 * unpack_bits(packed, 1, n).float()
        return (signs * per_value(means, self.bucket_size, n)).to(payload.dtype).view(payload.shape)

    def options(self) -> dict[str, Any]:
        return {"bucket_size": self.bucket_size}
