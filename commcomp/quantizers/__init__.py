"""Quantizers: pure tensor code with `compress(tensor) -> Payload` and `decompress(Payload) -> tensor`.

`get(name, **options)` builds one by name; `names()` lists them. Quantizers never call collectives
and never ask torch.distributed anything: the rank, where it matters, is given by the caller.
"""

from __future__ import annotations

from typing import Any

from commcomp.quantizers import basic as _basic  # noqa: F401  (registers identity, fp16, bf16)
from commcomp.quantizers import qsgd as _qsgd  # noqa: F401  (registers qsgd)
from commcomp.quantizers import shared as _shared  # noqa: F401  (registers qsgd_ar, sign_ar)
from commcomp.quantizers import sign as _sign  # noqa: F401  (registers sign)
from commcomp.quantizers import sparse as _sparse  # noqa: F401  (registers topk, randk)
from commcomp.quantizers.base import Payload, Quantizer, pack_payloads, relayout, unpack_batch, unpack_payloads
from commcomp.quantizers.checks import check_floating
from commcomp.quantizers.registry import QUANTIZERS
from commcomp.quantizers.shared import SharedScaleQuantizer
from commcomp.quantizers.stochastic import StochasticQuantizer

__all__ = [
    "Payload",
    "Quantizer",
    "SharedScaleQuantizer",
    "StochasticQuantizer",
    "check_error_feedback",
    "check_floating",
    "get",
    "names",
    "pack_payloads",
    "relayout",
    "unpack_batch",
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


def check_error_feedback(quantizer: Quantizer, who: str) -> None:
    """Refuse a quantizer whose error can exceed its input many times over, for `who` (error
    feedback): it keeps what compression dropped and compresses it again, so such an error compounds.

    Refused: quantizers that decode kept values multiplied up (`scales_up`: rand-k with
    rescale=True, whose error is n/k - 1 times its input in expectation; the residual grew about
    that much per step). Allowed: everything else, e.g. QSGD, whose every decoded value stays within
    its bucket's scale.
    """
    if quantizer.scales_up:
        raise ValueError(
            f"{who} needs a contractive quantizer, and {quantizer!r} is not: its error grows the residual "
            f"every step. For rand-k use rescale=False (contractive, delta = k/n)"
        )
