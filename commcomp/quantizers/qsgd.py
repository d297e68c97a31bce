"""QSGD (Alistarh et al., NIPS 2017): unbiased stochastic rounding to a few levels per bucket.

Paper: https://arxiv.org/abs/1610.02132 (ALGORITHMS.md section 3).

Legend: n = values in the tensor, B = bucket size, s = levels per sign, b = bits per value.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from commcomp.quantizers.base import Payload, Quantizer, check_floating
from commcomp.quantizers.packing import bucketize, check_bits, pack_bits, per_value, unpack_bits
from commcomp.quantizers.registry import QUANTIZERS

__all__ = ["QSGD", "StochasticQuantizer", "StreamGenerators", "check_positive_int"]


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class StreamGenerators:
    """Random generators keyed by (device, stream), created on first use.

    The generator of stream `key` is seeded from sha256(f"{seed}|{key}"), so its numbers depend only
    on the seed and the key, never on which other streams were used before or in which order. The
    DDP hook names the stream after the parameter, which keeps a resumed run exact even though DDP
    regroups parameters into different buckets after its first step. States are checkpointable.
    """

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def reseed(self, seed: str) -> None:
        """Start over from `seed` (drops every generator made so far)."""
        self.seed = seed
        self._generators.clear()

    def get(self, device: torch.device, stream: str = "") -> torch.Generator:
        key = f"{device}|{stream}"
        gen = self._generators.get(key)
        if gen is None:
            digest = hashlib.sha256(f"{self.seed}|{stream}".encode()).digest()
            gen = self._generators[key] = torch.Generator(device=device)
            gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return gen

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "states": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reseed(str(state["seed"]))
        for key, gen_state in state["states"].items():
            device, stream = key.split("|", 1)
            self.get(torch.device(device), stream).set_state(gen_state)


class StochasticQuantizer(Quantizer):
    """A quantizer that draws random numbers from its own generators (never the global RNG).

    `set_stream(key)` picks the random stream of the next `compress` calls (the DDP hook and PQASGD
    pass the parameter's name); its generator state is in `state_dict()`.
    """

    def __init__(self, seed_text: str) -> None:
        self.stream = ""
        self._generators = StreamGenerators(seed_text)

    def set_stream(self, key: str) -> None:
        self.stream = key

    def generator(self, device: torch.device) -> torch.Generator:
        return self._generators.get(device, self.stream)

    def state_dict(self) -> dict[str, Any]:
        return {"generators": self._generators.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generators.load_state_dict(state["generators"])


@QUANTIZERS.register("qsgd")
class QSGD(StochasticQuantizer):
    """QSGD with b bits per value, bucketed, packed into bytes.

    Levels and sign: with b bits, s = 2^(b-1) - 1 levels per sign (b=2: s=1, ternary; b=4: s=7;
    b=8: s=127). Each value v_i of a bucket with scale S is sent as a signed level l_i in
    {-s, ..., s}, l_i = sign(v_i) * xi_i, where xi_i is |v_i| / S * s rounded down or up at random
    with the probabilities that make E[xi_i] = |v_i| / S * s. It decodes to S * l_i / s, so the
    quantizer is unbiased. On the wire l_i is the unsigned code l_i + s in [0, 2s] (b bits, the
    code 2^b - 1 is unused), packed as in `commcomp.quantizers.packing`; each bucket's scale S
    follows as one float32. A payload of n values is ceil(n*b/8) bytes + 4*ceil(n/B) bytes.

    Args:
        bits: b, from 2 to 8.
        bucket_size: B, values sharing one scale (the paper's practice: 512).
        norm: "max" (S = max |v_i|, lower variance, the paper's practice) or "l2" (S = ||v||_2, the
            paper's analysis). Variance per bucket <= min(B/s^2, sqrt(B)/s) * ||v||^2 for both.
        seed: seeds the quantizer's own random generators (never the global RNG).
        seed_per_rank: draw independent rounding noise on every rank (generators seeded from seed and
            the rank), so averaging over N ranks also averages the noise away. The rank is
            torch.distributed's global rank (0 when not initialised) unless `set_rank` says
            otherwise (PQASGD passes its transport's rank). With False every rank rounds with the
            same random numbers (still unbiased, but the noise does not average out).

    Computation runs in float32; the output has the input's dtype. The generators live on the
    input's device, one per stream (see `StochasticQuantizer`). Their states are in `state_dict()`,
    so a resumed run rounds exactly as an uninterrupted one.
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
        self._rank: int | None = None  # resolved on first use
        super().__init__(str(self.seed))

    def set_rank(self, rank: int) -> None:
        """Use `rank` (instead of torch.distributed's) to seed per-rank noise; restarts the generators."""
        self._rank = int(rank)
        self._generators.reseed(self._seed_text())

    def _seed_text(self) -> str:
        return f"{self.seed}/rank{self._rank}" if self.seed_per_rank else str(self.seed)

    def generator(self, device: torch.device) -> torch.Generator:
        if self._rank is None:
            self.set_rank(dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        return super().generator(device)

    def compress(self, tensor: torch.Tensor) -> Payload:
        check_floating(tensor, self.name)
        x = tensor.detach().reshape(-1).float()
        n, s = x.numel(), self.levels
        magnitudes = bucketize(x, self.bucket_size).abs_()  # [n_buckets, B]
        scales = magnitudes.amax(1) if self.norm == "max" else magnitudes.norm(dim=1)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        ratio = magnitudes.div_(safe.unsqueeze(1)).mul_(s).view(-1)[:n]  # |v_i| / S * s, in [0, s]
        level = ratio.floor()
        noise = torch.rand(n, generator=self.generator(x.device), device=x.device)
        level += noise < ratio.sub_(level)  # round up with probability frac(ratio)
        codes = level.clamp_(max=s).copysign_(x).add_(s).to(torch.uint8)  # signed level + s
        return Payload([pack_bits(codes, self.bits), scales], tensor.shape, tensor.dtype)

    def decompress(self, payload: Payload) -> torch.Tensor:
        packed, scales = payload.tensors
        n, s = payload.shape.numel(), self.levels
        levels = unpack_bits(packed, self.bits, n).float() - s
        out = levels * (per_value(scales, self.bucket_size, n) / s)
        return out.to(payload.dtype).view(payload.shape)

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
        self._rank = state["rank"]
        super().load_state_dict(state)
