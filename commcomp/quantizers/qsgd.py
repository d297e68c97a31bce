"""QSGD (Alistarh et al., NIPS 2017): unbiased stochastic rounding to a few levels per bucket.

Paper: https://arxiv.org/abs/1610.02132.

Legend: n = values in the tensor, B = bucket size, s = levels per sign, b = bits per value,
N = ranks whose payloads are decoded together.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from commcomp.quantizers.base import Payload
from commcomp.quantizers.checks import check_bits, check_floating, check_positive_int
from commcomp.quantizers.packing import bucketize, chunks, code_sum, max_abs, pack_bits, packed_nbytes
from commcomp.quantizers.registry import QUANTIZERS
from commcomp.quantizers.stochastic import NOISE_BITS, StochasticQuantizer, random_int16

__all__ = ["QSGD", "StochasticQuantizer", "check_positive_int", "stochastic_codes"]


def _shifted_levels(
    values: torch.Tensor, scales: torch.Tensor, levels: int, generator: torch.Generator
) -> torch.Tensor:
    """s + s * v / S + u as float32, with u uniform in [0, 1): its floor is the stochastic code.

    v / S is divided first (a value equal to S maps exactly to level s), then scaled and shifted by
    s + 1/2, then 16-bit noise is added as (L + 2^15) / 2^16 - 1/2 for L from `random_int16`
    (exact in float32 below 2^8). The result lies in [0, 2s + 1).
    """
    shifted = torch.div(values, scales).mul_(levels).add_(levels + 0.5)
    noise = random_int16(shifted.numel(), generator, values.device).view_as(shifted)
    return shifted.add_(noise, alpha=2.0**-NOISE_BITS)


def stochastic_codes(
    values: torch.Tensor, scales: torch.Tensor, levels: int, generator: torch.Generator
) -> torch.Tensor:
    """Codes in [0, 2s] (s = `levels`, uint8) of `values` [buckets, B] on the grid of step S/s
    (`scales` [buckets, 1], S >= max |v|): code = floor(s + s * v / S + u), u uniform in [0, 1),
    which rounds s * v / S up with probability its fractional part, so E[code - s] = s * v / S.

    The float-to-integer conversion truncates, which is the floor for these non-negative values;
    it goes through int8 when every code is below 128 (up to 7 bits: the bytes are the same), else
    through int16 (either is several times faster than converting float32 to uint8 on a CPU).
    """
    shifted = _shifted_levels(values, scales, levels, generator)
    if 2 * levels + 1 <= torch.iinfo(torch.int8).max:  # shifted < 2s + 1 <= 127
        return shifted.to(torch.int8).view(torch.uint8).clamp_(max=2 * levels)
    return shifted.to(torch.int16).to(torch.uint8).clamp_(max=2 * levels)


@QUANTIZERS.register("qsgd")
class QSGD(StochasticQuantizer):
    """QSGD with b bits per value, bucketed, packed into bytes.

    Levels and sign: with b bits, s = 2^(b-1) - 1 levels per sign (b=2: s=1, ternary; b=4: s=7;
    b=8: s=127). Each value v_i of a bucket with scale S is sent as a signed level l_i in
    {-s, ..., s}: v_i / S * s rounded down or up at random with the probabilities that make
    E[l_i] = v_i / S * s. It decodes to S * l_i / s, so the quantizer is unbiased. On the wire l_i
    is the unsigned code l_i + s in [0, 2s] (b bits, the code 2^b - 1 is unused), packed as in
    `commcomp.quantizers.packing`; each bucket's scale S follows as one float32. A payload of n
    values is ceil(n*b/8) bytes + 4*ceil(n/B) bytes.

    Variance: E||Q(v) - v||^2 <= omega * ||v||^2 with omega = min(B/s^2, sqrt(B)/s) (`omega`), for
    both norms. So Q(v) / (1 + omega) is contractive with delta = 1 / (1 + omega) (what CHOCO-SGD
    needs); Q itself is contractive only when omega < 1 (e.g. 8 bits with B = 512).

    Args:
        bits: b, from 2 to 8.
        bucket_size: B, values sharing one scale (the paper's practice: 512).
        norm: "max" (S = max |v_i|, lower variance, the paper's practice) or "l2" (S = ||v||_2, the
            paper's analysis).
        seed: seeds the quantizer's own random generators (never the global RNG).
        seed_per_rank: draw independent rounding noise on every rank (generators seeded from seed and
            the rank given with `set_rank`; 0 until then: callers running on several ranks must
            call it), so averaging over N ranks also averages the noise away. With False every
            rank rounds with the same random numbers (still unbiased, but the noise does not average out).

    Computation runs in float32; the output has the input's dtype. Random numbers: 16-bit uniform
    noise (`random_int16`), so a rounding probability is exact to within 2^-16. The generators live
    on the input's device, one per stream (see `StochasticQuantizer`); their states are in
    `state_dict()`, so a resumed run rounds exactly as an uninterrupted one.
    """

    name = "qsgd"
    linear = False
    unbiased = True

    def __init__(
        self, bits: int = 4, bucket_size: int = 512, norm: str = "max", seed: int = 0, seed_per_rank: bool = True
    ) -> None:
        self.bits = check_bits(bits, 2, 8, "qsgd bits")
        self.bucket_size = check_positive_int(bucket_size, "bucket_size")
        if norm not in ("max", "l2"):
            raise ValueError(f"norm must be 'max' or 'l2', got {norm!r}")
        self.norm = norm
        self.seed = int(seed)
        self.seed_per_rank = bool(seed_per_rank)
        self.levels = 2 ** (bits - 1) - 1
        self.omega = min(self.bucket_size / self.levels**2, math.sqrt(self.bucket_size) / self.levels)
        self.contractive = self.omega < 1
        self._rank = 0  # given by the caller (set_rank)
        super().__init__(self._seed_text())

    def set_rank(self, rank: int) -> None:
        """Seed per-rank noise with `rank` (restarts the generators). Callers that run on several
        ranks call it before the first `compress` (the DDP hook, Horovod, PQASGD and gossip do);
        quantizers never ask torch.distributed."""
        self._rank = int(rank)
        self._generators.reseed(self._seed_text())

    def _seed_text(self) -> str:
        return f"{self.seed}/rank{self._rank}" if self.seed_per_rank else str(self.seed)

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1).float()
        n, s, B = x.numel(), self.levels, self.bucket_size
        buckets = bucketize(x, B)  # [n_buckets, B], a view when B divides n
        scales = torch.empty(buckets.shape[0], device=x.device)
        packed = torch.empty(packed_nbytes(n, self.bits), dtype=torch.uint8, device=x.device)
        gen = self.generator(x.device)
        for b0, b1 in chunks(buckets.shape[0], B):  # a few hundred kB at a time: stays in cache
            v0, v1 = b0 * B, min(b1 * B, n)
            part = buckets[b0:b1]
            if self.norm == "max":
                scale = max_abs(part, scales[b0:b1]).clone().unsqueeze(1)
            else:
                scale = part.norm(dim=1, keepdim=True)
                scales[b0:b1] = scale.view(-1)
            codes = stochastic_codes(part, scale.masked_fill_(scale == 0, 1.0), s, gen).view(-1)[: v1 - v0]
            packed[v0 * self.bits // 8 : packed_nbytes(v1, self.bits)] = pack_bits(codes, self.bits)
        return Payload([packed, scales], tensor.shape, tensor.dtype)

    def decode_sum(self, batch: Payload, out: torch.Tensor) -> torch.Tensor:
        """sum_r S_r / s * (c_r - s) = sum_r (S_r / s) c_r - sum_r S_r, per bucket, in one pass."""
        packed, scales = batch.tensors  # [N, bytes], [N, buckets]
        scales = scales.float()
        return code_sum(
            packed, self.bits, batch.shape.numel(), scales / self.levels, -scales.sum(0), self.bucket_size, out
        )

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self.decode_alone(payload)

    def options(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "bucket_size": self.bucket_size,
            "norm": self.norm,
            "seed": self.seed,
            "seed_per_rank": self.seed_per_rank,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rank": self._rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rank = int(state["rank"] or 0)
        super().load_state_dict(state)
