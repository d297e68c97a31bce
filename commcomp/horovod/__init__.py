"""Horovod integration: commcomp's compressors inside Horovod, and Horovod as a commcomp transport.

- `DistributedOptimizer(optimizer, named_parameters, compressor="gradiveq", **options)` is Horovod's
  own `hvd.DistributedOptimizer` (same backward hooks, same overlap of communication with the
  backward pass, same `synchronize()` / `skip_synchronize()`), with one change: each parameter's
  gradient goes through a commcomp compressor whose state (GradiVeQ bases and PCA sums,
  error-feedback residuals, quantizer generators) is keyed by the parameter's name. Linear
  payloads (GradiVeQ coefficients, fp16, identity) are summed by Horovod's allreduce (op=Sum) and
  decoded after; other quantizers (qsgd, topk, sign) are packed into bytes and all-gathered. The
  per-gradient rules are the DDP hooks' own (`GradiVeQState`, `QuantizerState`), so a run gives the
  same parameters on Horovod as under DDP.
- `Compression.fp16` / `.none` and `QuantizerCompressor(name)`: Horovod `Compressor`s for
  stateless linear quantizers, for `hvd.DistributedOptimizer(..., compression=...)`.
- `HorovodCollectives`: the `commcomp.comm.Collectives` protocol on Horovod, so PQASGD and the
  GradiVeQ refit run on Horovod as they do on torch.distributed.

Modules: `optimizer`, `collectives`, `compression`; Horovod's private API only in
`commcomp.shims.horovod_internals` (which checks the Horovod version). Only the global process set
is supported. Call `hvd.init()` before building any of these.
"""

from commcomp.horovod.collectives import HorovodCollectives, HorovodPending, HorovodWire
from commcomp.horovod.compression import Compression, QuantizerCompressor
from commcomp.horovod.optimizer import (
    DistributedOptimizer,
    HorovodGradiVeQState,
    HorovodQuantizerState,
    compressor_names,
    make_state,
)

__all__ = [
    "Compression",
    "DistributedOptimizer",
    "HorovodCollectives",
    "HorovodGradiVeQState",
    "HorovodPending",
    "HorovodQuantizerState",
    "HorovodWire",
    "QuantizerCompressor",
    "compressor_names",
    "make_state",
]
