"""Quantizers on a grid shared by every rank, so an all-reduce sums the codes themselves.

The homomorphic-compression idea of THC (Li et al., NSDI 2024): if every rank quantizes on the same
grid, the integer codes can be summed by the collective and decoded once, instead of all-gathering
N payloads and decoding each. One exchange per bucket becomes two:

  1. agree: each rank computes a small statistic per chunk of B values (`local_stats`), and the
     caller reduces it over ranks with `agree_op` ("max" or "sum"): a tiny all-reduce, 4/B bytes
     per value;
  2. `compress_shared(x, agreed, world_size)`: integer codes on the agreed grid, in the narrowest
     integer dtype whose sum over `world_size` ranks cannot overflow (`wire_dtype`); the caller
     all-reduces them (SUM) and `decompress` turns the summed codes into the average.

Both steps are the caller's: these quantizers are pure tensor code. The DDP hook does both from the
hook body, in bucket order on every rank. Integer dtypes: NCCL sums int8/uint8/int32/int64 (and
more); gloo (checked on torch 2.13 CPU) sums int8, uint8, int32 and int64 but refuses int16, so
int16 is never chosen.

Legend: n = values, B = chunk (bucket) size, s = levels per sign, N = world size.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from commcomp.quantizers.base import Payload
from commcomp.quantizers.checks import check_bits, check_floating, check_positive_int
from commcomp.quantizers.packing import CHUNK_VALUES, bucket_error, bucketize, chunks, max_abs
from commcomp.quantizers.qsgd import stochastic_codes
from commcomp.quantizers.registry import QUANTIZERS
from commcomp.quantizers.stochastic import StochasticQuantizer

__all__ = ["SharedScaleQSGD", "SharedScaleQuantizer", "SignVote", "wire_dtype"]

SUMMABLE = (torch.int8, torch.int32, torch.int64)  # summed by NCCL and gloo alike, narrowest first


def wire_dtype(largest: int, world_size: int) -> torch.dtype:
    """The narrowest integer dtype in which world_size codes of magnitude <= largest can be summed."""
    for dtype in SUMMABLE:
        if world_size * largest <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"{world_size} ranks x {largest} overflows int64")


class SharedScaleQuantizer(StochasticQuantizer):
    """Base of the quantizers whose grid every rank agrees on before compressing (see the module).

    `compress(tensor)` alone is refused: without the agreed statistic the receiver could not decode.
    """

    linear = True  # summed codes decode to the sum (the average, when each rank sends g / N)
    agree_op = "max"  # how `local_stats` combine over ranks: "max" or "sum"

    def __init__(self, bucket_size: int, seed: int) -> None:
        self.bucket_size = check_positive_int(bucket_size, "bucket_size")
        self.seed = int(seed)
        self._rank = 0
        super().__init__(self._seed_text())

    def _seed_text(self) -> str:
        return f"{self.seed}/rank{self._rank}"

    def set_rank(self, rank: int) -> None:
        """Seed this rank's rounding noise with `rank` (independent noise averages out over ranks)."""
        self._rank = int(rank)
        self._generators.reseed(self._seed_text())

    def local_stats(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's float32 statistic per chunk of B values, to be combined with `agree_op`."""
        raise NotImplementedError

    def compress_shared(self, tensor: torch.Tensor, agreed: torch.Tensor, world_size: int) -> Payload:
        """Integer codes of `tensor` on the grid that `agreed` (the combined statistic) defines."""
        raise NotImplementedError

    def compress(self, tensor: torch.Tensor) -> Payload:
        raise RuntimeError(
            f"{self.name} agrees on its grid with the other ranks before compressing (local_stats, a tiny "
            f"all-reduce, compress_shared); only the DDP hook does that: use commcomp.register(model, "
            f"{self.name!r}), or a quantizer without agreement elsewhere"
        )

    def decode_levels(self, levels: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        """Write the values that the summed integer `levels` (flat) stand for into `out` (float32)."""
        raise NotImplementedError

    def decode_sum(self, batch: Payload, out: torch.Tensor) -> torch.Tensor:
        """The decoded sum, written into `out` (float32): the codes of N ranks (usually N = 1: the
        all-reduce has summed them already) are summed, then decoded once on the agreed grid."""
        levels = batch.tensors[0]
        total = levels[0] if levels.shape[0] == 1 else levels.sum(0)
        self.decode_levels(total.reshape(-1), batch.meta["scales"], out)
        return out

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self.decode_alone(payload)

    def stats_bytes(self, n: int) -> int:
        """Bytes of the agreement all-reduce for a tensor of n values."""
        return 4 * -(-n // self.bucket_size)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rank": self._rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rank = int(state["rank"])
        super().load_state_dict(state)


def _scaled_chunks(values: torch.Tensor, scales: torch.Tensor, bucket_size: int, out: torch.Tensor) -> None:
    """out[i] = values[i] * scales[i // bucket_size] (values: integers, out: flat float32), chunk by
    chunk in cache; the integers are promoted inside the multiplication."""
    n, B = values.numel(), bucket_size
    full = n // B * B
    for b0, b1 in chunks(n // B, B):
        torch.mul(
            values[b0 * B : b1 * B].view(b1 - b0, B), scales[b0:b1, None], out=out[b0 * B : b1 * B].view(b1 - b0, B)
        )
    if full < n:  # the last, partial bucket
        torch.mul(values[full:], scales[-1], out=out[full:])


@QUANTIZERS.register("qsgd_ar")
class SharedScaleQSGD(SharedScaleQuantizer):
    """QSGD on a shared grid: the scale of each chunk is the maximum |v| over every rank's chunk.

    Each value becomes a signed level l in {-s, ..., s}, s = 2^(bits-1) - 1, by unbiased stochastic
    rounding of v / S * s (S: the agreed chunk maximum, so |v| <= S everywhere); the levels are
    sent as integers in `wire_dtype(s, N)` (int8 while N * s <= 127: 4 bits up to 18 ranks, 2 bits
    up to 127) and summed by the all-reduce; the sum decodes once to S / s * sum_r l_r. Unbiased,
    with each rank's variance bounded like QSGD's. Bytes handed over per rank: n * itemsize for the
    codes + 4 * ceil(n / B) for the agreement.

    Args:
        bits: from 2 to 8 (levels per sign as in `qsgd`).
        bucket_size: B, values sharing one scale.
        seed: seeds the rounding noise (per rank: `set_rank`).
    """

    name = "qsgd_ar"
    unbiased = True
    agree_op = "max"

    def __init__(self, bits: int = 4, bucket_size: int = 512, seed: int = 0) -> None:
        self.bits = check_bits(bits, 2, 8, "qsgd_ar bits")
        self.levels = 2 ** (bits - 1) - 1
        self.omega = min(bucket_size / self.levels**2, math.sqrt(bucket_size) / self.levels)
        self.contractive = self.omega < 1
        super().__init__(bucket_size, seed)

    def local_stats(self, tensor: torch.Tensor) -> torch.Tensor:
        check_floating(tensor, self.name)
        buckets = bucketize(tensor.detach().reshape(-1).float(), self.bucket_size)
        maxima = torch.empty(buckets.shape[0], device=tensor.device)
        for b0, b1 in chunks(buckets.shape[0], self.bucket_size):  # in cache, no full-size temporary
            max_abs(buckets[b0:b1], maxima[b0:b1])
        return maxima

    def compress_shared(self, tensor: torch.Tensor, agreed: torch.Tensor, world_size: int) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1).float()
        n, s, B = x.numel(), self.levels, self.bucket_size
        buckets = bucketize(x, B)
        safe = torch.where(agreed > 0, agreed, torch.ones_like(agreed)).float().unsqueeze(1)
        levels = torch.empty(n, dtype=wire_dtype(s, world_size), device=x.device)
        gen = self.generator(x.device)
        for b0, b1 in chunks(buckets.shape[0], B):
            v0, v1 = b0 * B, min(b1 * B, n)
            codes = stochastic_codes(buckets[b0:b1], safe[b0:b1], s, gen).view(-1)[: v1 - v0]
            if levels.dtype == torch.int8:  # codes <= 2s <= 126: the same bytes as int8, shifted in place
                torch.sub(codes.view(torch.int8), s, out=levels[v0:v1])  # signed levels in [-s, s]
            else:
                levels[v0:v1] = codes.to(torch.int16).sub_(s)
        return Payload([levels], tensor.shape, tensor.dtype, {"scales": agreed})

    def decode_levels(self, levels: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        """out = S / s * levels per chunk, straight from the integers (no float copy of them)."""
        _scaled_chunks(levels, scales.float().div(self.levels), self.bucket_size, out)

    def options(self) -> dict[str, Any]:
        return {"bits": self.bits, "bucket_size": self.bucket_size, "seed": self.seed}


@QUANTIZERS.register("sign_ar")
class SignVote(SharedScaleQuantizer):
    """signSGD with majority vote (Bernstein et al., ICML 2018), summed by an all-reduce.

    Each rank sends sign(v_i) in {-1, 0, +1} as int8 (int32 beyond 127 ranks); the all-reduce sums
    the votes and every value decodes to m * sign(sum of votes), where m is the chunk's mean
    magnitude averaged over ranks (the agreement: a sum of each rank's mean |v| per chunk; each rank
    sends g / N, so the sum is the average). A tie decodes to 0. Biased (a vote): use error feedback,
    whose residual is what this rank's own vote m * sign(v) missed. Bytes handed over per rank:
    n * 1 for the votes + 4 * ceil(n / B) for the agreement.

    Args:
        bucket_size: B, values sharing one magnitude.
    """

    name = "sign_ar"
    unbiased = False
    contractive = False  # a vote of other ranks may flip a value's sign
    agree_op = "sum"

    def __init__(self, bucket_size: int = 512) -> None:
        super().__init__(bucket_size, 0)

    def local_stats(self, tensor: torch.Tensor) -> torch.Tensor:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1).float()
        n, B = x.numel(), self.bucket_size
        buckets = bucketize(x, B)
        means = torch.empty(buckets.shape[0], device=x.device)
        for b0, b1 in chunks(buckets.shape[0], B):  # mean |v| as the sum of |v| / B: never above max |v|
            torch.sum(buckets[b0:b1].abs().mul_(1.0 / B), 1, out=means[b0:b1])
        if n % B:  # the last bucket averages only its own values
            means[-1] *= B / (n % B)
        return means

    def compress_shared(self, tensor: torch.Tensor, agreed: torch.Tensor, world_size: int) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1)
        votes = torch.empty(x.numel(), dtype=wire_dtype(1, world_size), device=x.device)
        step = CHUNK_VALUES
        for v0 in range(0, x.numel(), step):  # chunk by chunk: no full-size float temporary
            votes[v0 : v0 + step] = x[v0 : v0 + step].sign()
        return Payload([votes], tensor.shape, tensor.dtype, {"scales": agreed})

    def error(self, tensor: torch.Tensor, payload: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        """v - m sign(v) per chunk (this rank's own vote, decoded on the agreed magnitudes m), worked
        out bucket by bucket from `tensor` without a dense decode; the same numbers as the default."""
        means = payload.meta["scales"].float().unsqueeze(1)

        def decoded(part: torch.Tensor, b0: int, b1: int) -> torch.Tensor:  # float32, as decompress computes it
            return part.sign().float().mul_(means[b0:b1]).to(part.dtype)

        return bucket_error(tensor, self.bucket_size, decoded, out)

    def decode_levels(self, levels: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        """out = m * sign(summed votes) per chunk."""
        _scaled_chunks(levels.sign(), scales.float(), self.bucket_size, out)

    def options(self) -> dict[str, Any]:
        return {"bucket_size": self.bucket_size}
