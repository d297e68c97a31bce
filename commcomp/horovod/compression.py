"""commcomp's stateless linear quantizers as Horovod `Compressor`s (for `hvd.DistributedOptimizer`)."""

from __future__ import annotations

from typing import Any

import horovod.torch as hvd
import torch

from commcomp import quantizers
from commcomp.hooks.quantized import flatten_summable, unflatten_summable
from commcomp.quantizers import Payload, Quantizer

__all__ = ["Compression", "QuantizerCompressor"]


class QuantizerCompressor(hvd.compression.Compressor):
    """A Horovod `Compressor` running a stateless linear commcomp quantizer (identity, fp16, bf16).

    Use as `hvd.DistributedOptimizer(opt, named_parameters=..., compression=QuantizerCompressor("bf16"))`.
    Horovod's allreduce sums (or averages) the payload, which decodes to the sum (or average) because
    the quantizer is linear. Quantizers that keep per-tensor state or are not linear need
    `commcomp.horovod.DistributedOptimizer` instead.
    """

    def __init__(self, quantizer: str | Quantizer, **options: Any) -> None:
        self.quantizer = quantizers.get(quantizer, **options)
        if not self.quantizer.linear:
            raise ValueError(
                f"{self.quantizer.name} is not linear, so Horovod's allreduce cannot sum its payloads; "
                f"use commcomp.horovod.DistributedOptimizer(..., compressor={self.quantizer.name!r})"
            )
        if self.quantizer.state_dict():
            raise ValueError(
                f"{self.quantizer.name} keeps state that a Horovod compressor cannot checkpoint; "
                f"use commcomp.horovod.DistributedOptimizer(..., compressor={self.quantizer.name!r})"
            )

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Payload]:
        payload = self.quantizer.compress(tensor)
        return flatten_summable([payload], tensor.new_empty(0)), payload

    def decompress(self, tensor: torch.Tensor, ctx: Payload) -> torch.Tensor:
        return self.quantizer.decompress(unflatten_summable(tensor, [ctx])[0])

    def __repr__(self) -> str:
        return f"QuantizerCompressor({self.quantizer!r})"


class Compression:
    """commcomp's stateless linear quantizers as Horovod compressors (like `hvd.Compression`)."""

    none = QuantizerCompressor("identity")
    fp16 = QuantizerCompressor("fp16")
