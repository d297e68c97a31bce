"""Quantizers: pure tensor code with `compress(tensor) -> Payload` and `decompress(Payload) -> tensor`.

`get(name, **options)` builds one by name; `names()` lists them.
"""

from __future__ import annotations

from typing import Any

from commcomp.quantizers import basic as _basic  # noqa: F401  (registers identity, fp16, bf16)
from commcomp.quantizers import qsgd as _qsgd  # noqa: F401  (registers qsgd)
from commcomp.quantizers import sign as _sign  # noqa: F401  (registers sign)
from commcomp.quantizers import sparse as _sparse  # noqa: F401  (registers topk, randk)
from commcomp.quantizers.base import Payload, Quantizer, check_floating, pack_payloads, unpack_payloads
from commcomp.quantizers.qsgd import StochasticQuantizer
from commcomp.quantizers.registry import QUANTIZERS

__all__ = [
    "Payload",
    "Quantizer",
    "StochasticQuantizer",
    "check_floating",
    "get",
    "names",
    "pack_payloads",
    "unpack_payloads",
]


def get(name: str | Quantizer, **options: Any) -> Quantizer:
    """Build the quantizer registered as `name` (a Quantizer instance is returned as it is)."""
    if isinstance(name, Quantizer):
        if options:
            raise ValueError("options cannot be given together with a quantizer instance")
        return name
    return QUANTIZERS.get(name, **options)


def names() -> list[str]:
    return QUANTIZERS.names()
