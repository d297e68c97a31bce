"""GradiVeQ's schedule: which steps are sent uncompressed, sampled for the PCA, or compressed."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """Warm-up steps sent uncompressed, then cycles of `sample` uncompressed steps whose averaged
    gradients feed the PCA and `compress` compressed steps (a refit at the start of each)."""

    warmup: int
    sample: int
    compress: int

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.sample < 1 or self.compress < 0:
            raise ValueError(f"schedule needs warmup_steps >= 0, sample_steps >= 1, compress_steps >= 0; got {self}")

    def phase(self, step: int) -> str:
        """'warmup', 'sample' or 'compress' for a 0-based step."""
        if step < self.warmup:
            return "warmup"
        t = (step - self.warmup) % (self.sample + self.compress)
        return "sample" if t < self.sample else "compress"

    def refit(self, step: int) -> bool:
        """True on the first compressed step of a cycle."""
        return step >= self.warmup and (step - self.warmup) % (self.sample + self.compress) == self.sample
