"""Expert-parallel Mixture-of-Experts layer.

Dimension legend:
    W  ranks in the process group          L  experts held by each rank (E = W·L)
    E  experts in total                    S  tokens on this rank (all leading dims flattened)
    M  model width (d_model)               K  experts chosen per token
    T  kept picks this rank sends (<= S·K) R  rows this rank receives for its L experts

Global expert e lives on rank e // L as local expert e % L. A forward pass on every rank:
    1. check peers: config and input health of every rank          (all_gather, 1 + 4 ints)
    2. gate: (S, M) -> expert index, combine weight, kept          (S, K) each, + aux loss
    3. sort the kept picks by expert: rows (T, M), counts (E,) = (W, L)
    4. exchange counts, so each rank knows its receive splits       (all_to_all, W·L ints)
    5. dispatch: (T, M) -> (R, M), rows for rank j's experts go to j (all_to_all, uneven)
    6. each local expert runs once, on its rows from every rank      (R, M) -> (R, M)
    7. combine: (R, M) -> (T, M), outputs go back to their tokens   (all_to_all, uneven)
    8. out[s] = Σ_k weight[s, k] · y[s, k]; a dropped pick adds nothing
The backward of 5 and 7 is the reverse all-to-all. World size 1 skips 1, 4, 5 and 7.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from commcomp.moe.alltoall import DTYPES, Route, all_to_all, check_peers, exchange_counts, group_rank_and_size
from commcomp.moe.gates import make_gate
from commcomp.moe.params import mark_experts
from commcomp.stats import CommStats

__all__ = ["MoE", "feed_forward"]

DISPATCH_DTYPES = (None, torch.float16, torch.bfloat16)


def feed_forward(d_model: int, hidden: int) -> nn.Module:
    """The default expert: Linear(M, hidden) -> GELU -> Linear(hidden, M)."""
    return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))


class MoE(nn.Module):
    """Sparsely-gated Mixture-of-Experts with experts spread over the ranks of a process group.

    `forward(x)` takes (..., d_model) and returns `(y, aux_loss)`: y has x's shape and is
    Σ_k gate_k(x) · expert_k(x) over the picks that fit the capacity (dropped picks add nothing,
    so use it inside a residual connection); add `aux_loss` (a scalar, balancing the experts'
    load over this rank's tokens) to your loss. Every rank of the group must call forward (and
    backward) the same number of times; ranks may hold different numbers of tokens.

    Args:
        d_model: feature size M of the input and output.
        num_experts: experts in total, a multiple of the group's world size W; each rank holds
            num_experts // W of them.
        expert: factory called once per local expert, returning a module (R, M) -> (R, M); None
            means `feed_forward(d_model, 4 * d_model)`.
        k: experts per token; None means the gate's own (1 for "switch", 2 otherwise).
        capacity_factor: each expert accepts ceil(capacity_factor · S · k / E) picks from each
            rank's S tokens (GShard's per-group capacity); None means no limit.
        gate: "noisy_topk" (Shazeer 2017), "switch" (top-1) or "gshard" (top-2).
        gate_options: extra keyword arguments of the gate (e.g. w_importance, aux_weight); the
            noisy gate's noise `seed` defaults to the rank. The dict is not modified.
        process_group: ranks the experts are spread over; None: the default group (or a single
            process when torch.distributed is not initialised).
        dispatch_dtype: None (send the input's dtype), torch.float16 or torch.bfloat16: the
            dtype of both all-to-all payloads and of their gradients, halving the bytes.

    Attributes: `experts` (the local experts, global ids `expert_ids`), `gate`, `stats`
    (a CommStats: bytes this rank handed to the collectives; a step closes at the end of the
    backward, or after a forward without autograd), `last_load` (E,) kept picks per expert from
    this rank's last forward and `last_routed` (E,) the picks before capacity drops.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        expert: Callable[[], nn.Module] | None = None,
        k: int | None = None,
        capacity_factor: float | None = 1.25,
        gate: str = "noisy_topk",
        gate_options: dict[str, Any] | None = None,
        process_group: dist.ProcessGroup | None = None,
        dispatch_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(f"dispatch_dtype must be one of {DISPATCH_DTYPES}, got {dispatch_dtype!r}")
        if expert is not None and not callable(expert):
            raise TypeError(f"expert must be a factory returning a module, got {type(expert).__name__}")
        self.rank, self.world_size = group_rank_and_size(process_group)
        if not isinstance(num_experts, int) or num_experts < 1 or num_experts % self.world_size:
            raise ValueError(
                f"num_experts must be a positive multiple of the world size {self.world_size}, got {num_experts!r}"
            )
        self.d_model, self.num_experts = d_model, num_experts
        self.num_local = num_experts // self.world_size
        self.expert_ids = range(self.rank * self.num_local, (self.rank + 1) * self.num_local)
        self.process_group, self.dispatch_dtype = process_group, dispatch_dtype

        options = dict(gate_options or {})
        if gate == "noisy_topk":
            options.setdefault("seed", self.rank)
        self.gate = make_gate(gate, d_model, num_experts, k, capacity_factor, **options)
        self.k: int = self.gate.k  # type: ignore[assignment]

        factory = expert or (lambda: feed_forward(d_model, 4 * d_model))
        experts = [factory() for _ in range(self.num_local)]
        for module in experts:
            if not isinstance(module, nn.Module):
                raise TypeError(f"the expert factory returned {type(module).__name__}, not an nn.Module")
        self.experts = nn.ModuleList(experts)
        self._check_expert_shapes()
        mark_experts(self.experts)

        self.stats = CommStats()
        self.last_load: Tensor | None = None
        self.last_routed: Tensor | None = None

    def _check_expert_shapes(self) -> None:
        """Fail at construction, not mid-forward (where the other ranks would wait), on a bad expert."""
        for i, module in enumerate(self.experts):
            param = next(module.parameters(), None)
            probe = torch.zeros(2, self.d_model) if param is None else param.new_zeros(2, self.d_model)
            modes = [m.training for m in module.modules()]
            module.eval()  # so the probe leaves running statistics alone
            with torch.no_grad():
                out = module(probe)
            for m, mode in zip(module.modules(), modes, strict=True):
                m.training = mode
            if not isinstance(out, Tensor) or out.shape != probe.shape:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"expert {i} maps (2, {self.d_model}) to {shape}; experts must keep the shape")

    def _input_problem(self, x: Any) -> Exception | None:
        if not isinstance(x, Tensor):
            return TypeError(f"MoE input must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            return TypeError(f"MoE input must be floating point, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            return ValueError(f"MoE input must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            return TypeError(f"MoE input dtype must be one of {DTYPES}, got {x.dtype}")
        return None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        W, L, E, M = self.world_size, self.num_local, self.num_experts, self.d_model
        problem = self._input_problem(x)
        if W > 1:
            payload = self.dispatch_dtype or (x.dtype if problem is None else torch.float32)
            fields = {"num_experts": E, "d_model": M, "k": self.k, "payload dtype": DTYPES.index(payload)}
            device = x.device if isinstance(x, Tensor) else torch.device("cpu")
            check_peers(self.process_group, fields, problem, device, self.stats)
        elif problem is not None:
            raise problem

        tokens = x.reshape(-1, M)  # (S, M)
        routing = self.gate(tokens)
        K = routing.expert_index.shape[1]
        pick = routing.kept.reshape(-1).nonzero().squeeze(1)  # (T,) kept picks, index into S·K
        expert_of_pick = routing.expert_index.reshape(-1)[pick]
        order = expert_of_pick.argsort(stable=True)
        pick, expert_of_pick = pick[order], expert_of_pick[order]  # sorted by expert
        token = pick // K  # (T,) token of each pick
        weight = routing.combine_weight.reshape(-1)[pick]  # (T,)
        counts = torch.bincount(expert_of_pick, minlength=E)  # (E,)
        self.last_load = counts.detach()
        self.last_routed = torch.bincount(routing.expert_index.reshape(-1), minlength=E).detach()

        rows = tokens[token]  # (T, M)
        if W == 1:
            y = self._run_experts(rows, counts.view(1, L))
        else:
            recv_counts = exchange_counts(self.process_group, counts.view(W, L), self.stats)  # (W, L)
            send_splits, recv_splits = counts.view(W, L).sum(1).tolist(), recv_counts.sum(1).tolist()
            route = Route(send_splits, recv_splits, self.process_group, self.dispatch_dtype, self.stats)
            received = all_to_all(rows, route, ends_step=True)  # (R, M)
            y = all_to_all(self._run_experts(received, recv_counts), route.reversed())  # (T, M)
            if not y.requires_grad:  # no backward will follow: the step ends here
                self.stats.end_step()
        weighted = (y * weight.unsqueeze(1).to(y.dtype)).to(tokens.dtype)  # experts may run in another dtype
        out = tokens.new_zeros(tokens.shape).index_add(0, token, weighted)
        return out.reshape(x.shape), routing.aux_loss

    def _run_experts(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows (R, M) in (source rank, local expert) order, counts (W, L) -> expert outputs (R, M)."""
        if self.num_local == 1:
            return self.experts[0](rows) if rows.shape[0] else rows
        # Regroup expert-major so each expert runs once on the rows of every rank.
        local = torch.arange(self.num_local, device=rows.device).repeat(counts.shape[0])
        order = local.repeat_interleave(counts.reshape(-1)).argsort(stable=True)  # (R,)
        chunks = rows[order].split(counts.sum(0).tolist())
        y = torch.cat([e(c) if c.shape[0] else c for e, c in zip(self.experts, chunks, strict=True)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return y[inverse]

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"world_size={self.world_size}, local_experts={list(self.expert_ids)}, "
            f"dispatch_dtype={self.dispatch_dtype}"
        )
