"""The quantizer interface: pure tensor code, never a collective.

A quantizer turns a tensor into a `Payload` (the tensors that will actually be sent) and back.
`linear` quantizers produce payloads that can be summed element-wise by an all-reduce and still
decode to the sum of the inputs; the others must be all-gathered and decoded one by one.
`Payload.nbytes` counts exactly the bytes of the tensors it holds, which is what commcomp reports
as sent.

Decoding many ranks at once: after an all-gather, `unpack_batch` cuts the [N, L] bytes received
into one *batched* payload per tensor (every payload tensor with a leading rank dimension N), and
`decode_sum(batch, out)` writes the sum of the N decoded tensors into a float32 buffer in one
vectorised pass (float32 so that N half-precision tensors cannot overflow before the average).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from commcomp.flat import unflatten
from commcomp.quantizers.checks import check_floating

__all__ = ["Payload", "Quantizer", "check_floating", "pack_payloads", "relayout", "unpack_batch", "unpack_payloads"]


@dataclass
class Payload:
    """What a quantizer sends for one tensor.

    tensors: the tensors handed to the collective, in a fixed order.
    shape, dtype: of the original tensor, known to every rank (not sent).
    """

    tensors: list[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def batched(self) -> Payload:
        """This one payload as a batch of one rank (every tensor with a leading dimension of 1)."""
        return Payload([t.unsqueeze(0) for t in self.tensors], self.shape, self.dtype, self.meta)


class Quantizer(ABC):
    """compress(tensor) -> Payload; decompress(Payload) -> tensor of the original shape and dtype."""

    name: str = "quantizer"
    linear: bool = False  # payloads can be summed by all-reduce
    unbiased: bool = False  # E[decompress(compress(x))] == x
    # E||Q(x) - x||^2 <= (1 - delta) ||x||^2 for some delta > 0: what error feedback and CHOCO need
    contractive: bool = False
    # decodes kept values multiplied up (rand-k's n/k): its error can be many times its input
    scales_up: bool = False

    @abstractmethod
    def compress(self, tensor: torch.Tensor) -> Payload: ...

    @abstractmethod
    def decompress(self, payload: Payload) -> torch.Tensor: ...

    def error(self, tensor: torch.Tensor, payload: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        """What compressing `tensor` into `payload` dropped: tensor - decompress(payload) (the
        error-feedback residual), as a new tensor or written into `out` (same shape and dtype).
        Sparsifiers and sign compute it without a dense decode."""
        decoded = self.decompress(payload).to(tensor.dtype)
        return torch.sub(tensor.detach(), decoded, out=out) if out is not None else (tensor - decoded).detach()

    def decode_sum(self, batch: Payload, out: torch.Tensor) -> torch.Tensor:
        """Write the sum over ranks of the decoded payloads in `batch` into `out` and return it.

        batch: a batched payload (each tensor with a leading rank dimension N, see `unpack_batch`).
        out: a flat float32 tensor with one slot per value of the original tensor (overwritten).
        This default decodes rank by rank; the quantizers that travel by all-gather override it
        with one vectorised pass.
        """
        out.zero_()
        for r in range(batch.tensors[0].shape[0] if batch.tensors else 0):
            one = Payload([t[r] for t in batch.tensors], batch.shape, batch.dtype, batch.meta)
            out += self.decompress(one).reshape(-1)
        return out

    def decode_alone(self, payload: Payload) -> torch.Tensor:
        """`decompress` through `decode_sum` with a batch of one rank, for the quantizers whose
        `decode_sum` is their one decoding routine (they must override `decode_sum`)."""
        out = torch.empty(payload.shape.numel(), device=payload.tensors[0].device)
        return self.decode_sum(payload.batched(), out).to(payload.dtype).view(payload.shape)

    def options(self) -> dict[str, Any]:
        """The options this quantizer was built with (used to check all ranks agree)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Internal state (e.g. random generator state) needed to resume exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def pack_payloads(payloads: list[Payload]) -> torch.Tensor:
    """Concatenate the bytes of every payload tensor into one flat uint8 tensor (for all-gather)."""
    parts = [t.contiguous().reshape(-1).view(torch.uint8) for p in payloads for t in p.tensors]
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts)


def _byte_sizes(templates: list[Payload], got: int) -> list[int]:
    """Bytes of every payload tensor of `templates`, in order; `got` bytes must be exactly their sum."""
    sizes = [t.numel() * t.element_size() for tpl in templates for t in tpl.tensors]
    if sum(sizes) != got:
        raise ValueError(f"payload bytes do not match their layout: got {got}, expected {sum(sizes)}")
    return sizes


def relayout(pieces: list[torch.Tensor], templates: list[Payload]) -> list[Payload]:
    """Payloads laid out like `templates`, holding `pieces` (one per template tensor, in order)."""
    it = iter(pieces)
    return [Payload([next(it) for _ in tpl.tensors], tpl.shape, tpl.dtype, dict(tpl.meta)) for tpl in templates]


def unpack_payloads(flat: torch.Tensor, templates: list[Payload]) -> list[Payload]:
    """Inverse of `pack_payloads`: cut `flat` into tensors laid out like `templates`' tensors."""
    cuts = unflatten(flat, [(n,) for n in _byte_sizes(templates, flat.numel())])
    tensors = []
    for chunk, t in zip(cuts, (t for tpl in templates for t in tpl.tensors)):
        if chunk.storage_offset() % t.element_size():  # after an odd-sized tensor: realign by copying
            chunk = chunk.clone()
        tensors.append(chunk.view(t.dtype).view(t.shape))
    return relayout(tensors, templates)


def unpack_batch(received: torch.Tensor, templates: list[Payload]) -> list[Payload]:
    """Batched `unpack_payloads`: the rows of `received` ([N, L] uint8, one row per rank, each laid
    out like `pack_payloads(templates)`) as one payload per template whose tensors have a leading
    rank dimension N. uint8 tensors are views; others are copied (to align them), which is cheap
    for what quantizers send besides their packed codes (scales, indices, kept values)."""
    rows = received.shape[0]
    cuts = received.split(_byte_sizes(templates, received.shape[1]), dim=1)
    tensors = []
    for cols, t in zip(cuts, (t for tpl in templates for t in tpl.tensors)):
        if t.dtype != torch.uint8:  # a fresh, aligned copy that can be viewed as wider values
            cols = cols.clone(memory_format=torch.contiguous_format).view(-1).view(t.dtype)
        tensors.append(cols.view(rows, *t.shape))
    return relayout(tensors, templates)
