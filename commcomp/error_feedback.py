"""Error feedback: remember what compression dropped and add it to the next input.

For each tensor key: `compensated = input + residual`; after compressing it,
`residual = compensated - decompress(compress(compensated))`, so
`input + old residual == decompressed + new residual` holds exactly (up to float rounding of the
one subtraction). Usable under any quantizer, in the DDP hooks, Horovod and the gossip algorithms.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Residual memory keyed by tensor name (parameter names in the hooks)."""

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, key: str, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`tensor + residual[key]` as a new tensor, or written into `out` (a buffer reused from step
        to step saves a fresh allocation; `out` may be `tensor` itself, compensated in place). The
        input is not modified unless it is `out`."""
        residual = self.residuals.get(key)
        if out is None:
            return tensor.clone() if residual is None else tensor + residual.to(tensor.device, tensor.dtype)
        return (
            out.copy_(tensor)
            if residual is None
            else torch.add(tensor, residual.to(tensor.device, tensor.dtype), out=out)
        )

    def residual_of(self, compensated: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """What compression dropped from `compensated` (to be stored with `set`)."""
        return (compensated - decoded.to(compensated.dtype)).detach()

    def set(self, key: str, residual: torch.Tensor) -> None:
        self.residuals[key] = residual

    def update(self, key: str, compensated: torch.Tensor, decoded: torch.Tensor) -> None:
        """Store `compensated - decoded` as the residual of `key`."""
        self.set(key, self.residual_of(compensated, decoded))

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu().clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.residuals = {k: v.to(device) if device is not None else v.clone() for k, v in state.items()}
