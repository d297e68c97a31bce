"""The Horovod rows of the training benchmark (imported by train_horovod.py, which runs under mpirun).

  hvd-fp32      hvd.DistributedOptimizer, no compression
  hvd-fp16      hvd.DistributedOptimizer with hvd.Compression.fp16
  hvd-gradiveq  commcomp.horovod.DistributedOptimizer(..., "gradiveq")
  hvd-qsgd4     commcomp.horovod.DistributedOptimizer(..., "qsgd", bits=4)

Horovod's own compressors are wrapped so that the bytes of every tensor they hand to Horovod's
allreduce are counted; commcomp's report them in `optimizer.stats`. Importing this module adds the
methods to `benchmarks.methods.METHODS`.
"""

from __future__ import annotations

from typing import Any

import horovod.torch as hvd
import torch
from horovod.torch.compression import Compressor
from torch import nn

from benchmarks.methods import METHODS, Counters, MakeOptimizer, MethodSpec, Setup, grad_bytes, stats_counters

__all__ = ["HOROVOD_METHODS", "CountingCompressor"]


class CountingCompressor(Compressor):
    """A Horovod compressor that counts the bytes of what `inner` hands to the allreduce."""

    def __init__(self, inner: type[Compressor]) -> None:
        self.inner = inner
        self.bytes_sent = 0

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out, ctx = self.inner.compress(tensor)
        self.bytes_sent += out.numel() * out.element_size()
        return out, ctx

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.inner.decompress(tensor, ctx)


def _horovod(compression: type[Compressor]):
    def build(net: nn.Module, options: dict[str, Any], make_opt: MakeOptimizer) -> Setup:
        counter, dense, steps = CountingCompressor(compression), grad_bytes(net), [0]
        opt = hvd.DistributedOptimizer(
            make_opt(net.parameters()), named_parameters=net.named_parameters(), compression=counter
        )
        hvd.broadcast_parameters(net.state_dict(), root_rank=0)

        def step() -> None:
            steps[0] += 1

        zero = {"encode_seconds": float("nan"), "decode_seconds": float("nan")}
        return Setup(net, opt, lambda: Counters(counter.bytes_sent, dense * steps[0], **zero), after_step=step)

    return build


def _commcomp_horovod(compressor: str, **fixed: Any):
    def build(net: nn.Module, options: dict[str, Any], make_opt: MakeOptimizer) -> Setup:
        from benchmarks.methods import gradiveq_options
        from commcomp.horovod import DistributedOptimizer

        kwargs = {**fixed, **(gradiveq_options(options) if compressor == "gradiveq" else {})}
        opt = DistributedOptimizer(make_opt(net.parameters()), net.named_parameters(), compressor, **kwargs)
        hvd.broadcast_parameters(net.state_dict(), root_rank=0)
        return Setup(net, opt, stats_counters(opt.stats), info={"options": kwargs})  # type: ignore[attr-defined]

    return build


HOROVOD_METHODS: dict[str, MethodSpec] = {
    "hvd-fp32": MethodSpec("Horovod fp32", _horovod(hvd.Compression.none)),
    "hvd-fp16": MethodSpec("Horovod Compression.fp16", _horovod(hvd.Compression.fp16)),
    "hvd-gradiveq": MethodSpec("commcomp GradiVeQ on Horovod", _commcomp_horovod("gradiveq")),
    "hvd-qsgd4": MethodSpec("commcomp QSGD 4-bit on Horovod", _commcomp_horovod("qsgd", bits=4)),
}
METHODS.update(HOROVOD_METHODS)
