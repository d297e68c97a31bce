"""Randomness for quantizers: per-stream generators seeded from text, never the global RNG.

`StochasticQuantizer` is the base of every quantizer that draws random numbers (QSGD's rounding,
random-k's coordinates, the all-reduce quantizers' rounding). Which rank a quantizer runs on is
given by the caller (`set_rank`): quantizers never ask torch.distributed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from commcomp.quantizers.base import Quantizer

__all__ = ["NOISE_BITS", "StochasticQuantizer", "StreamGenerators", "random_int16"]

NOISE_BITS = 16  # bits of the noise for stochastic rounding (`random_int16`)


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


def random_int16(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n int16 values uniform on [-2^15, 2^15): the four 16-bit lanes of n/4 random 64-bit words
    (several times cheaper than `torch.rand` on a CPU core). (L + 2^15) / 2^16 is uniform on
    {0, 1, ..., 2^16 - 1} / 2^16, in [0, 1): stochastic rounding floor(v + u) with it rounds v up
    with probability ceil(frac(v) * 2^16) / 2^16, frac(v) to within 2^-16 of one step."""
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    return words.random_(-(2**63), None, generator=generator).view(torch.int16)[:n]


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
