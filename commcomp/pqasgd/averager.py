"""The PQASGD averager: when to average, the collectives, and checkpoints (the update rules are in `rules.py`).

Each rank trains its own copy of the model with its own optimizer (no DDP). Call `averager.step()`
after every `optimizer.step()` (or pass the optimizer and it is called for you), like PyTorch's
`PeriodicModelAverager`:

  1. warm-up (the first `warmup_steps` steps): every rank's model is replaced by the exact average
     of all models (one fp32 all-reduce per step; with plain SGD this is synchronous SGD);
  2. then, every `period` steps, each rank sends Q(x_i - x_bar), the quantized change of its model
     since the last synchronisation x_bar; the packed codes are all-gathered, every rank decodes
     all of them in rank order and sets x_bar <- x_bar + mean_m Q(delta_m), x_i <- x_bar.
     Every rank computes the same numbers in the same order, so the models are bitwise identical
     after each synchronisation;
  3. or, with `density=rho` (sparse parameter averaging): every `period` steps a fraction rho of the
     coordinates of each parameter, drawn from a generator seeded alike on every rank, is averaged
     exactly (all-reduce of those values); the other coordinates stay local.

All communication goes through a `commcomp.comm.Collectives` (default: torch.distributed), so the
Horovod integration can pass its own. Paper: "A Linear Speedup Analysis of Distributed Deep Learning
with Sparse and Quantized Communication" (Jiang & Agrawal, NeurIPS 2018).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from commcomp import quantizers
from commcomp.comm import Collectives, TorchCollectives
from commcomp.consistency import (
    bad_ranks,
    check_saved_options,
    flag_slots,
    has_nonfinite,
    verify_options,
    world_size_error,
)
from commcomp.flat import flatten, unflatten
from commcomp.overflow import GradientWatch, check_nonfinite, gradients_nonfinite
from commcomp.pqasgd.rules import (
    apply_mean_change,
    check_int,
    encode_changes,
    floating_params,
    sample_coordinates,
    write_coordinates,
)
from commcomp.quantizers import Quantizer, pack_payloads, unpack_payloads
from commcomp.quantizers.registry import QUANTIZERS
from commcomp.quantizers.sparse import RandK
from commcomp.stats import CommStats, timer

__all__ = ["PQASGD", "NonFiniteModelError"]


class NonFiniteModelError(FloatingPointError):
    """Some rank's model holds NaN or Inf at a synchronisation; raised on every rank."""


class PQASGD:
    """Periodic quantized model averaging, called after each optimizer step.

    Args:
        model: the local model (not wrapped in DDP). Its floating-point parameters are averaged
            (buffers such as BatchNorm statistics stay local); they must share one dtype.
        optimizer: optional; if given, `step()` runs automatically after each `optimizer.step()`
            (through a post-step hook; `close()` removes it). Otherwise call `step()` yourself.
        period: p, local steps between synchronisations (p = 1 synchronises after every step).
        quantizer: a registered quantizer name or instance for the model changes (default "qsgd";
            it should be unbiased). Not allowed together with `density`.
        warmup_steps: steps of exact full averaging before the periodic phase starts.
        process_group: torch.distributed group (None: the world); not with `collectives`.
        collectives: a `commcomp.comm.Collectives` to use instead (e.g. Horovod's).
        density: rho in (0, 1]: sparse parameter averaging instead of quantized averaging.
        seed: seeds the shared coordinate generator (density) and the quantizer's default seed.
        sync_start: broadcast rank 0's parameters at construction so every rank starts alike.
        check_finite: refuse to synchronise NaN/Inf, raising NonFiniteModelError on every rank.
        nonfinite: "propagate" (default) or "raise": after each backward pass the ranks sum one NaN/Inf
            flag each (`commcomp.overflow.GradientWatch`); on an overflow "propagate" makes every rank's
            gradients NaN (a GradScaler then skips the step everywhere, and `step()` skips a step whose
            gradients are non-finite without counting it), "raise" raises on every rank.
        **quantizer_options: for the quantizer, e.g. bits=4, bucket_size=512.

    Example::

        model = CNN1D()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        avg = commcomp.PQASGD(model, opt, period=4, quantizer="qsgd", bits=4)
        for x, y in batches:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()  # avg.step() runs here
        print(avg.stats.as_dict())

    Bytes: `stats` counts the bytes of every tensor this rank hands to a collective;
    `dense_bytes` is what an all-reduce of the gradients would hand over every step (the parameters'
    bytes), so `stats.compression_ratio` compares with plain data-parallel SGD.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        period: int = 4,
        quantizer: str | Quantizer | None = None,
        warmup_steps: int = 0,
        process_group: Any = None,
        collectives: Collectives | None = None,
        density: float | None = None,
        seed: int = 0,
        sync_start: bool = True,
        check_finite: bool = True,
        nonfinite: str = "propagate",
        **quantizer_options: Any,
    ) -> None:
        check_int(period, "period", 1)
        check_int(warmup_steps, "warmup_steps", 0)
        if collectives is not None and process_group is not None:
            raise ValueError("give process_group or collectives, not both")
        self.names, self.params = floating_params(model)
        # --- configuration ---
        self.period = period
        self.warmup_steps = warmup_steps
        self.density = density
        self.seed = int(seed)
        self.check_finite = check_finite
        self.nonfinite_policy = check_nonfinite(nonfinite)
        self.quantizer: Quantizer | None = None
        self.coordinate_sampler: RandK | None = None  # density: picks the coordinates averaged
        if density is not None:
            if quantizer is not None or quantizer_options:
                raise ValueError("density (sparse parameter averaging) sends exact values: do not pass a quantizer")
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
                raise ValueError(f"density must be in (0, 1], got {density!r}")
            self.coordinate_sampler = RandK(ratio=float(density), seed=self.seed, rescale=False)
        else:
            quantizer = "qsgd" if quantizer is None else quantizer
            if isinstance(quantizer, str) and "seed" in inspect.signature(QUANTIZERS.factory(quantizer)).parameters:
                quantizer_options.setdefault("seed", self.seed)
            self.quantizer = quantizers.get(quantizer, **quantizer_options)
        self.comm = collectives if collectives is not None else TorchCollectives(process_group)
        if self.quantizer is not None and hasattr(self.quantizer, "set_rank"):
            self.quantizer.set_rank(self.comm.rank)  # per-rank rounding noise on any transport
        # --- internal state ---
        self.steps = 0  # finished calls of step()
        self.stats = CommStats()
        self._dense = sum(p.numel() * p.element_size() for p in self.params)
        self._check_same_everywhere()
        if sync_start:
            self._broadcast_params()
        self.x_bar = [p.detach().clone() for p in self.params]  # last synchronised model
        self._hook = optimizer.register_step_post_hook(lambda *_: self.step()) if optimizer is not None else None
        self.watch = GradientWatch(self.params, self.comm, self.nonfinite_policy, "PQASGD", self.stats)

    # ----- the algorithm -----
    @torch.no_grad()
    def step(self) -> None:
        """Count one local step; average (exactly, quantized or sparsely) when this step is due. A step
        whose gradients are non-finite (an overflow, on every rank alike) is skipped and not counted."""
        if gradients_nonfinite(self.params):
            return
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self._average_exactly()
        elif (self.steps - self.warmup_steps) % self.period == 0:
            if self.coordinate_sampler is not None:
                self._average_sparsely(self.coordinate_sampler)
            elif self.quantizer is not None:
                self._average_quantized(self.quantizer)
        self.stats.sent(0, self._dense, kind="allreduce", world_size=self.comm.world_size)
        self.stats.end_step()

    @property
    def synchronised(self) -> bool:
        """True if the last step ended with a synchronisation (all models identical)."""
        done = self.steps - self.warmup_steps
        return self.steps > 0 and (done <= 0 or (self.coordinate_sampler is None and done % self.period == 0))

    def _average_exactly(self) -> None:
        flat = flatten([p.detach() for p in self.params])
        total = self._all_reduce_checked(flat)
        for p, xb, avg in zip(self.params, self.x_bar, self._split(total.div_(self.comm.world_size))):
            p.copy_(avg)
            xb.copy_(avg)

    def _average_quantized(self, q: Quantizer) -> None:
        with timer(self.x_bar[0]) as enc:
            payloads = encode_changes(q, self.names, self.params, self.x_bar)
            device = self.params[0].device
            flag = torch.tensor([self._nonfinite(self.params)], dtype=torch.uint8, device=device)
            flat = flatten([pack_payloads(payloads).to(device), flag])
        self.stats.encoded(enc.seconds)
        self.stats.sent(flat.numel() * flat.element_size(), kind="allgather", world_size=self.comm.world_size)
        gathered = self.comm.all_gather(flat)
        with timer(self.x_bar[0]) as dec:
            self._raise_if_nonfinite(torch.stack([t[-1] for t in gathered]))
            per_rank = [unpack_payloads(t[:-1], payloads) for t in gathered]
            apply_mean_change(q, per_rank, self.params, self.x_bar)
        self.stats.decoded(dec.seconds)

    def _average_sparsely(self, sampler: RandK) -> None:
        payloads = sample_coordinates(sampler, self.names, self.params)
        values = flatten([pl.tensors[0] for pl in payloads])
        total = self._all_reduce_checked(values).div_(self.comm.world_size)
        averaged = unflatten(total, [pl.tensors[0].shape for pl in payloads])
        write_coordinates(self.params, self.x_bar, payloads, averaged)

    # ----- collectives with a NaN/Inf check riding along -----
    def _all_reduce_checked(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum `flat` over ranks with one slot per rank appended that flags non-finite values."""
        flags = flag_slots(self._nonfinite([flat]), self.comm.rank, self.comm.world_size, flat.dtype, flat.device)
        buf = flatten([flat, flags])
        self.stats.sent(buf.numel() * buf.element_size(), kind="allreduce", world_size=self.comm.world_size)
        total = self.comm.all_reduce_sum(buf)
        self._raise_if_nonfinite(total[-self.comm.world_size :])
        return total[: flat.numel()]

    def _nonfinite(self, tensors: Sequence[torch.Tensor]) -> bool:
        return self.check_finite and has_nonfinite(tensors)

    def _raise_if_nonfinite(self, flags: torch.Tensor) -> None:
        bad = bad_ranks(flags)
        if bad:
            raise NonFiniteModelError(
                f"PQASGD: NaN or Inf in the model of rank(s) {bad} at step {self.steps}; nothing was averaged"
            )

    # ----- setup -----
    def options(self) -> dict[str, Any]:
        """What must agree on every rank (also checked against a loaded state_dict)."""
        return {
            "period": self.period,
            "warmup_steps": self.warmup_steps,
            "density": self.density,
            "seed": self.seed,
            "check_finite": self.check_finite,
            "nonfinite": self.nonfinite_policy,
            "quantizer": None if self.quantizer is None else self.quantizer.name,
            "quantizer_options": None if self.quantizer is None else self.quantizer.options(),
            "params": [[list(p.shape), str(p.dtype)] for p in self.params],
        }

    def _check_same_everywhere(self) -> None:
        """Raise on every rank if the options or parameter shapes differ across ranks."""
        nbytes = verify_options("PQASGD", self.options(), self.comm, self.params[0].device)
        self.stats.sent(nbytes, kind="allgather", world_size=self.comm.world_size)

    @torch.no_grad()
    def _broadcast_params(self) -> None:
        flat = flatten([p.detach() for p in self.params])
        if self.comm.rank == 0:
            self.stats.sent(flat.numel() * flat.element_size(), kind="broadcast", world_size=self.comm.world_size)
        flat = self.comm.broadcast(flat, 0)
        for p, v in zip(self.params, self._split(flat)):
            p.copy_(v)

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return unflatten(flat, [p.shape for p in self.params])

    def close(self) -> None:
        """Remove the optimizer post-step hook (if one was installed) and the gradient watch."""
        self.watch.remove()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ----- checkpointing -----
    def state_dict(self) -> dict[str, Any]:
        """Steps, the last synchronised model, generator states and stats (the model itself is not
        included: save `model.state_dict()` too)."""
        return {
            "steps": self.steps,
            "x_bar": [xb.detach().cpu().clone() for xb in self.x_bar],
            "quantizer": None if self.quantizer is None else self.quantizer.state_dict(),
            "coordinate_sampler": None if self.coordinate_sampler is None else self.coordinate_sampler.state_dict(),
            "stats": self.stats.state_dict(),
            "options": self.options(),
            "world_size": self.comm.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world_size", self.comm.world_size) != self.comm.world_size:
            raise world_size_error("PQASGD", state["world_size"], self.comm.world_size)
        check_saved_options("PQASGD", state["options"], self.options())
        self.steps = int(state["steps"])
        for xb, saved in zip(self.x_bar, state["x_bar"]):
            xb.copy_(saved)
        if self.quantizer is not None:
            self.quantizer.load_state_dict(state["quantizer"])
        if self.coordinate_sampler is not None:
            self.coordinate_sampler.load_state_dict(state["coordinate_sampler"])
        self.stats.load_state_dict(state["stats"])
