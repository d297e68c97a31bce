"""Small character-level transformer language models, and their data: the source text of Python's
own standard library (no download). `MoELM` (MoE feed-forward layers) is the MoE tests' and
benchmarks' workload; `CharLM` (dense feed-forward) is the training benchmark's "lm" workload.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from commcomp.moe import MoE, scale_expert_grads

__all__ = [
    "VOCAB",
    "CharLM",
    "MoELM",
    "batch",
    "encode",
    "evaluate",
    "stdlib_text",
    "train_step",
    "unigram_entropy",
    "windows",
]

VOCAB = 128  # ASCII; anything else becomes "?"


def stdlib_text(max_chars: int = 1_000_000) -> str:
    """The standard library's top-level .py files, in name order, concatenated up to `max_chars`."""
    parts: list[str] = []
    total = 0
    for path in sorted(Path(os.path.dirname(os.__file__)).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def encode(text: str) -> Tensor:
    """Characters -> int64 codes in [0, VOCAB)."""
    return torch.frombuffer(bytearray(text.encode("ascii", errors="replace")), dtype=torch.uint8).long()


def unigram_entropy(codes: Tensor) -> float:
    """Entropy (nats per character) of the character frequencies: the loss of the best unigram model."""
    p = torch.bincount(codes, minlength=VOCAB).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


class Block(nn.Module):
    """Pre-norm transformer block; its feed-forward (an MoE layer, or `Dense`) returns (output, aux loss)."""

    def __init__(self, d_model: int, heads: int, moe: nn.Module) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.moe = moe

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        y, aux = self.moe(self.ln2(x))
        return x + y, aux


class Dense(nn.Module):
    """A dense feed-forward layer (d -> 4d -> d, GELU) with an MoE layer's signature (no aux loss)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.ff(x), x.new_zeros(())


class MoELM(nn.Module):
    """Embedding -> `layers` blocks (causal attention + MoE feed-forward) -> logits over VOCAB.

    `forward(codes (B, T)) -> (logits (B, T, VOCAB), aux loss summed over layers)`. Extra keyword
    arguments go to every `MoE` (num_experts, gate, k, capacity_factor, process_group, ...).
    """

    def __init__(
        self, d_model: int, heads: int, layers: int, context: int, dense: bool = False, **moe_options: object
    ) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(context, d_model) / math.sqrt(d_model))

        def ff() -> nn.Module:
            return Dense(d_model) if dense else MoE(d_model, **moe_options)  # type: ignore[arg-type]

        self.blocks = nn.ModuleList(Block(d_model, heads, ff()) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    @property
    def moes(self) -> list[MoE]:
        return [b.moe for b in self.blocks]  # type: ignore[misc]

    def forward(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        t = codes.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=codes.device).triu(1)  # True: may not attend
        x = self.embed(codes) + self.pos[:t]
        aux = x.new_zeros(())
        for block in self.blocks:
            x, a = block(x, mask)
            aux = aux + a
        return self.head(self.ln(x)), aux


class CharLM(MoELM):
    """`MoELM` with dense feed-forward layers, as a classifier of every position: `forward(codes
    (B, T)) -> logits (B, VOCAB, T)`, classes in dimension 1 as `F.cross_entropy` takes them with
    targets (B, T)."""

    def __init__(self, d_model: int, heads: int = 4, layers: int = 2, context: int = 32) -> None:
        super().__init__(d_model, heads, layers, context, dense=True)

    def forward(self, codes: Tensor) -> Tensor:  # type: ignore[override]
        logits, _ = super().forward(codes)
        return logits.transpose(1, 2)


def windows(codes: Tensor, count: int, context: int, seed: int) -> tuple[Tensor, Tensor]:
    """`count` windows of `codes` at random starts (seeded: the same on every rank), as `batch`."""
    return batch(codes, count, context, torch.Generator().manual_seed(seed))


def batch(codes: Tensor, size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`size` random windows of codes: inputs (size, context) and next-character targets."""
    start = torch.randint(0, codes.numel() - context - 1, (size,), generator=generator)
    idx = start.unsqueeze(1) + torch.arange(context + 1)
    window = codes[idx]
    return window[:, :-1], window[:, 1:]


def evaluate(model: MoELM, windows: tuple[Tensor, Tensor], group: dist.ProcessGroup | None = None) -> float:
    """Mean next-character cross-entropy (nats) on `windows`, averaged over the ranks of `group`."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits, _ = model(windows[0])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), windows[1].reshape(-1))
    model.train(was_training)
    if dist.is_initialized():
        loss = loss.clone()
        dist.all_reduce(loss, group=group)
        loss /= dist.get_world_size(group)
    return loss.item()


def train_step(
    model: MoELM, wrapped: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, world_size: int
) -> float:
    """One step on (x, y) through `wrapped` (the model, or its DDP wrapper); returns the task loss.

    The loss is the next-character cross-entropy plus the MoE aux losses; expert gradients are
    divided by `world_size` to match DDP's averaging of the dense ones (see `scale_expert_grads`).
    """
    logits, aux = wrapped(x)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
    optimizer.zero_grad()
    (loss + aux).backward()
    scale_expert_grads(model, 1 / world_size)
    optimizer.step()
    return loss.item()
