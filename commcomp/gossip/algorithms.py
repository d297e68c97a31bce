"""D-PSGD, DCD-PSGD, ECD-PSGD and CHOCO-SGD as optimizer wrappers.

Letters: x_i this rank's model, W the mixing matrix (w_ii on the diagonal), N(i) the neighbours,
Delta_i the optimizer's local update (-gamma * g_i for plain SGD), C/Q the quantizer.
Each class stores one weighted neighbour sum instead of a replica per neighbour.

    algo = commcomp.gossip.CHOCO(model, opt, topology="ring", quantizer="sign", consensus_step=0.4)
    loss.backward(); algo.step(); opt.zero_grad()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from commcomp import quantizers
from commcomp.gossip.base import GossipAlgorithm, Tensors

__all__ = ["CHOCO", "DCD", "DPSGD", "ECD"]


class DPSGD(GossipAlgorithm):
    """D-PSGD (Lian et al. 2017): x_i <- sum_j w_ij x_j + Delta_i, exchanging whole models.

    With the default identity quantizer nothing is compressed (the baseline). Any other quantizer
    compresses the models themselves ("naive" compression), which accumulates error and is not
    expected to converge (Tang et al. 2018); it is allowed for comparisons. A rank mixes its own
    exact model, never its compressed copy.
    """

    name = "dpsgd"

    def init_buffers(self) -> dict[str, Tensors]:
        return {}

    def resized_buffers(self, params: Tensors, averaged: dict[str, Tensors]) -> dict[str, Tensors]:
        return {}

    def update(self, previous: Tensors, current: Tensors) -> Tensors:
        _, theirs = self.exchange(previous)
        mixed = self.weighted(previous, theirs)
        return [m + (c - x) for m, c, x in zip(mixed, current, previous)]


class DCD(GossipAlgorithm):
    """DCD-PSGD (Tang et al. 2018, difference compression).

        x_half = w_ii x_i + s_i + Delta_i         s_i = sum_{j in N(i)} w_ij x^_j
        c_i = C(x_half - x_i);  x_i += c_i;  send c_i;  s_i += sum_j w_ij c_j

    The replicas x^_j equal the neighbours' models exactly (all apply the same decoded c_j), so only
    their weighted sum s_i is stored. Needs mild compression (e.g. 8-bit QSGD); coarse quantizers
    make it diverge. The replicas are initialised by one uncompressed exchange of the models.
    """

    name = "dcd"

    def init_buffers(self) -> dict[str, Tensors]:
        theirs = self.exchange_exact(self.params)
        return {"neighbor_sum": self.weighted(None, theirs)}

    def resized_buffers(self, params: Tensors, averaged: dict[str, Tensors]) -> dict[str, Tensors]:
        # every neighbour now holds `params`: s_i = sum_{j in N(i)} w_ij x_j = (1 - w_ii) x
        return {"neighbor_sum": [(1 - self.self_weight) * x for x in params]}

    def update(self, previous: Tensors, current: Tensors) -> Tensors:
        s = self.buffers["neighbor_sum"]
        diff = [self.self_weight * x + sk + (c - x) - x for x, sk, c in zip(previous, s, current)]
        own, theirs = self.exchange(diff)
        for sk, inc in zip(s, self.weighted(None, theirs)):
            sk.add_(inc)
        return [x + d.to(x.dtype) for x, d in zip(previous, own)]


class ECD(GossipAlgorithm):
    """ECD-PSGD (Tang et al. 2018, extrapolation compression), t = 1, 2, ...:

        x_next = S_i + Delta_i                     S_i = sum_{j in N(i) + i} w_ij x~_j
        z_i = (1 - t/2) x_i + (t/2) x_next;  x_i = x_next;  send C(z_i)
        x~_j = (1 - 2/t) x~_j + (2/t) C(z_j)  ->  S_i = (1 - 2/t) S_i + (2/t) sum_j w_ij C(z_j)

    The theory needs compression noise bounded in absolute terms. commcomp's quantizers have noise
    relative to the input's norm and z grows like t, so the estimates' noise does not shrink: ECD
    lags or diverges (as in the CHOCO paper's table); see docs for measured numbers.
    """

    name = "ecd"

    def init_buffers(self) -> dict[str, Tensors]:
        theirs = self.exchange_exact(self.params)
        return {"estimate_sum": self.weighted([p.detach() for p in self.params], theirs)}

    def resized_buffers(self, params: Tensors, averaged: dict[str, Tensors]) -> dict[str, Tensors]:
        # every estimate x~_j is `params`, and the weights of N(i) + i sum to 1
        return {"estimate_sum": [x.clone() for x in params]}

    def update(self, previous: Tensors, current: Tensors) -> Tensors:
        t = self.steps + 1
        S = self.buffers["estimate_sum"]
        x_next = [sk + (c - x) for sk, c, x in zip(S, current, previous)]
        z = [(1 - t / 2) * x + (t / 2) * xn for x, xn in zip(previous, x_next)]
        own, theirs = self.exchange(z)
        for sk, inc in zip(S, self.weighted(own, theirs)):
            sk.mul_(1 - 2 / t).add_(inc, alpha=2 / t)
        return x_next


class CHOCO(GossipAlgorithm):
    """CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019, Algorithm 2) with consensus step gamma.

        x_i = x_i + Delta_i                                  (the optimizer's step)
        x_i += gamma * (s_i - x^_i)                          s_i = sum_{j in N(i) + i} w_ij x^_j
        q_i = a * Q(x_i - x^_i);  send;  x^_i += q_i;  s_i += sum_{j in N(i) + i} w_ij q_j

    The public copies x^ start at 0. The consensus step sums to zero over the network (W is doubly
    stochastic), so the network average of x moves by the average of Delta only, whatever Q is.
    Stores x_i, x^_i and s_i: no snapshot needed.

    CHOCO's theory needs a contractive compressor, E||C(x) - x||^2 <= (1 - delta) ||x||^2, so that
    the public copies catch up with the models. Biased compressors such as sign and top-k are
    contractive as they are (a = 1). An unbiased quantizer with variance bound omega
    (E||Q(x) - x||^2 <= omega ||x||^2, e.g. QSGD) is not when omega >= 1 (coarse QSGD overshoots
    and the public copies blow up); scaled by a = 1 / (1 + omega) it is, with delta = 1 / (1 + omega).
    That is the default. The scale slows the public copies down by the same factor, so coarse
    quantizers need more steps to reach consensus; `compression_scale=1.0` turns it off (outside
    the theory, may diverge).

    Args:
        consensus_step: gamma in (0, 1]; tune it (the authors used 0.4 for sign on a ring of 8;
            with the identity quantizer gamma = 1 gives D-PSGD).
        compression_scale: a in (0, 1], or None (default): 1 / (1 + omega) for an unbiased
            quantizer that declares its variance bound `omega`, 1 otherwise.
    """

    name = "choco"
    needs_previous = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        consensus_step: float,
        compression_scale: float | None = None,
        **options: Any,
    ) -> None:
        self.consensus_step = _unit_interval(consensus_step, "consensus_step")
        scale = compression_scale
        self._scale_option = None if scale is None else _unit_interval(scale, "compression_scale")
        super().__init__(model, optimizer, **options)

    def check_quantizer(self) -> None:
        if self._scale_option is None:  # an unbiased quantizer without a variance bound cannot be scaled
            quantizers.check_error_feedback(self.quantizer, "CHOCO")

    @property
    def compression_scale(self) -> float:
        """a: what every decoded message is multiplied by (see the class docstring)."""
        if self._scale_option is not None:
            return self._scale_option
        omega = getattr(self.quantizer, "omega", None)
        if self.quantizer.unbiased and omega is not None:
            return 1.0 / (1.0 + float(omega))
        return 1.0

    def options(self) -> dict[str, Any]:
        return {**super().options(), "consensus_step": self.consensus_step, "compression_scale": self.compression_scale}

    def init_buffers(self) -> dict[str, Tensors]:
        return {
            "public": [torch.zeros_like(p) for p in self.params],
            "public_sum": [torch.zeros_like(p) for p in self.params],
        }

    def resized_buffers(self, params: Tensors, averaged: dict[str, Tensors]) -> dict[str, Tensors]:
        # every public copy x^_j becomes the old copies' average, so s_i = sum_j w_ij x^_j is that too
        public = averaged["public"]
        return {"public": [h.clone() for h in public], "public_sum": [h.clone() for h in public]}

    def update(self, previous: Tensors, current: Tensors) -> Tensors:
        xhat, s = self.buffers["public"], self.buffers["public_sum"]
        x = [c + self.consensus_step * (sk - h) for c, sk, h in zip(current, s, xhat)]
        own, theirs = self.exchange([xi - h for xi, h in zip(x, xhat)])
        a = self.compression_scale
        for h, sk, q, inc in zip(xhat, s, own, self.weighted(own, theirs)):
            h.add_(q.to(h.dtype), alpha=a)
            sk.add_(inc, alpha=a)
        return x


def _unit_interval(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)
