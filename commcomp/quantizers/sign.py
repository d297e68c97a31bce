"""Scaled sign: one bit per value plus the mean magnitude of each bucket (EF-SGD's compressor).

Legend: n = values in the tensor, B = bucket size, N = ranks whose payloads are decoded together.
"""

from __future__ import annotations

from typing import Any

import torch

from commcomp.quantizers.base import Payload, Quantizer
from commcomp.quantizers.checks import check_floating, check_positive_int
from commcomp.quantizers.packing import bucket_error, bucketize, chunks, code_sum, pack_bits, packed_nbytes
from commcomp.quantizers.registry import QUANTIZERS

__all__ = ["Sign"]


@QUANTIZERS.register("sign")
class Sign(Quantizer):
    """Sends sign(v_i) as one bit (1 = negative, 0 = zero or positive) and, per bucket of B values,
    their mean magnitude m = ||v||_1 / B (float32); v_i decodes to m * sign(v_i), zeros to +m.

    Biased (use error feedback) and contractive: ||Q(v) - v||^2 = ||v||^2 - ||v||_1^2 / B per bucket.
    Payload of n values: ceil(n/8) + 4*ceil(n/B) bytes. The mean is taken as the sum of |v_i| / B,
    so it cannot overflow float32 where the values themselves do not.

    Args:
        bucket_size: B, values sharing one magnitude (the last bucket averages only its own values).
    """

    name = "sign"
    linear = False
    unbiased = False
    contractive = True

    def __init__(self, bucket_size: int = 512) -> None:
        self.bucket_size = check_positive_int(bucket_size, "bucket_size")

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1).float()
        n, B = x.numel(), self.bucket_size
        buckets = bucketize(x, B)  # a view when B divides n
        means = torch.empty(buckets.shape[0], device=x.device)
        packed = torch.empty(packed_nbytes(n, 1), dtype=torch.uint8, device=x.device)
        for b0, b1 in chunks(buckets.shape[0], B):  # a few hundred kB at a time: stays in cache
            v0, v1 = b0 * B, min(b1 * B, n)
            part = buckets[b0:b1]
            # the mean as the sum of |v| / B (never above max |v|, so never inf where v is finite)
            means[b0:b1] = part.abs().mul_(1.0 / B).sum(1)
            packed[v0 // 8 : packed_nbytes(v1, 1)] = pack_bits(part.reshape(-1)[: v1 - v0] < 0, 1)
        if n % B:  # the last bucket averages only its own values
            means[-1] *= B / (n % B)
        return Payload([packed, means], tensor.shape, tensor.dtype)

    def error(self, tensor: torch.Tensor, payload: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        """v - m sign(v), worked out bucket by bucket from `tensor` and the means (no unpacking)."""
        means = payload.tensors[1].to(tensor.dtype).unsqueeze(1)  # the decoded magnitudes, in the tensor's dtype
        # the decoded value is +m for v >= 0 (also -0.0: adding +0.0 makes it +0.0), -m for v < 0
        return bucket_error(
            tensor, self.bucket_size, lambda part, b0, b1: torch.copysign(means[b0:b1], part + 0.0), out
        )

    def decode_sum(self, batch: Payload, out: torch.Tensor) -> torch.Tensor:
        """sum_r m_r (1 - 2 c_r) = sum_r m_r - sum_r 2 m_r c_r, per bucket, in one pass."""
        packed, means = batch.tensors  # [N, bytes], [N, buckets]
        means = means.float()
        return code_sum(packed, 1, batch.shape.numel(), means * -2.0, means.sum(0), self.bucket_size, out)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self.decode_alone(payload)

    def options(self) -> dict[str, Any]:
        return {"bucket_size": self.bucket_size}
