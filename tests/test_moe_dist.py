"""Multi-rank MoE tests on real gloo process groups, against a single-process reference."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from commcomp.ddp import register
from commcomp.moe import (
    MoE,
    Routing,
    ddp_ignore_experts,
    dense_parameters,
    expert_parameters,
    feed_forward,
    make_gate,
    scale_expert_grads,
)

M, HIDDEN = 6, 8  # model width and expert hidden width in these tests


def reference_moe(x: Tensor, routing: Routing, experts: list[nn.Module]) -> Tensor:
    """out[s] = Σ_c weight[s, c] · experts[index[s, c]](x[s]) over kept picks, expert by expert."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        for c in range(routing.expert_index.shape[1]):
            idx = (routing.kept[:, c] & (routing.expert_index[:, c] == e)).nonzero().squeeze(1)
            out = out.index_add(0, idx, routing.combine_weight[idx, c, None] * expert(x[idx]))
    return out


def init_(module: nn.Module, g: torch.Generator) -> None:
    """Deterministic weights from a generator seeded alike on every rank (not the global RNG)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def close(what: str, got: Tensor, want: Tensor, dtype: torch.dtype | None = None) -> None:
    """Equal up to float32 reordering, or, for a compressed payload `dtype`, within 10 roundings in norm."""
    if dtype is None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
    else:
        error = float((got - want).norm() / want.norm().clamp_min(1e-12))
        assert error <= 10 * torch.finfo(dtype).eps, f"{what}: relative error {error:.2e} with {dtype} payloads"


def load_experts(moe: MoE, experts: list[nn.Module]) -> None:
    for local, e in enumerate(moe.expert_ids):
        moe.experts[local].load_state_dict(experts[e].state_dict())


def _equivalence(rank: int, world: int, configs: list[dict]) -> list[str]:
    done = []
    for cfg in configs:
        gate, E, cf, dtype = cfg["gate"], cfg["experts"], cfg["capacity_factor"], cfg["dispatch_dtype"]
        g = torch.Generator().manual_seed(7)
        sizes = [5 + 4 * r for r in range(world)]  # uneven token counts per rank
        xs = [torch.randn(s, M, generator=g) for s in sizes]
        proj = [torch.randn(s, M, generator=g) for s in sizes]
        experts = [feed_forward(M, HIDDEN) for _ in range(E)]
        gate_kw = {"seed": 0} if gate == "noisy_topk" else {}
        ref_gate = make_gate(gate, M, E, None, cf, **gate_kw)
        for module in [*experts, ref_gate]:
            init_(module, g)

        # single-process reference over every rank's tokens; routing per rank (capacity is per rank)
        ref_x = [x.clone().requires_grad_() for x in xs]
        ref_gates = []
        ref_loss = torch.zeros(())
        ref_out, ref_aux, ref_routing = [], [], []
        for r in range(world):
            gate_r = make_gate(gate, M, E, None, cf, **({"seed": r} if gate == "noisy_topk" else {}))
            gate_r.load_state_dict(ref_gate.state_dict())
            ref_gates.append(gate_r)
            routing = gate_r(ref_x[r])
            out = reference_moe(ref_x[r], routing, experts)
            ref_out.append(out)
            ref_aux.append(routing.aux_loss)
            ref_routing.append(routing)
            ref_loss = ref_loss + (out * proj[r]).sum() + routing.aux_loss
        ref_loss.backward()

        moe = MoE(M, E, expert=lambda: feed_forward(M, HIDDEN), gate=gate, capacity_factor=cf, dispatch_dtype=dtype)
        moe.gate.load_state_dict(ref_gate.state_dict())
        load_experts(moe, experts)
        x = xs[rank].clone().requires_grad_()
        y, aux = moe(x)
        ((y * proj[rank]).sum() + aux).backward()

        where = f"{cfg} rank {rank}"
        close(f"output, {where}", y, ref_out[rank].detach(), dtype)
        close(f"aux loss, {where}", aux, ref_aux[rank].detach())
        close(f"input grad, {where}", x.grad, ref_x[rank].grad, dtype)
        for local, e in enumerate(moe.expert_ids):
            for p, q in zip(moe.experts[local].parameters(), experts[e].parameters(), strict=True):
                want = torch.zeros_like(q) if q.grad is None else q.grad
                got = torch.zeros_like(p) if p.grad is None else p.grad
                close(f"expert {e} grad, {where}", got, want, dtype)
        for p, qs in zip(moe.gate.parameters(), zip(*(gr.parameters() for gr in ref_gates)), strict=True):
            summed = p.grad.clone()
            dist.all_reduce(summed)
            want = sum(q.grad for q in qs)
            close(f"gate grad, {where}", summed, want, dtype)

        # bytes handed to the collectives, from the reference routing: peer check, counts, and
        # T rows out + R rows in, each way, forward and backward
        kept = [torch.bincount(rt.expert_index[rt.kept], minlength=E) for rt in ref_routing]
        local = slice(moe.expert_ids.start, moe.expert_ids.stop)
        sent_rows, recv_rows = int(kept[rank].sum()), sum(int(k[local].sum()) for k in kept)
        row_bytes = M * (4 if dtype is None else 2)
        headers = world if dtype == torch.float16 else 0  # fp16: one scale row per chunk
        expected = 5 * 8 + E * 8 + 2 * (sent_rows + recv_rows + 2 * headers) * row_bytes
        assert moe.stats.last.bytes_sent == expected, (moe.stats.last.bytes_sent, expected, where)
        assert moe.stats.total.steps == 1  # the step closed at the end of the backward
        done.append(f"{cfg['gate']}/{E}/{dtype}")
    return done


def _identity(rank: int, world: int) -> None:
    moe = MoE(M, 2 * world, expert=nn.Identity, gate="gshard", capacity_factor=0.5)
    x = torch.randn(11 + rank, M, generator=torch.Generator().manual_seed(rank))
    y, _ = moe(x)
    routing = moe.gate(x)
    assert not bool(routing.kept.all())  # capacity 0.5 drops picks
    torch.testing.assert_close(y, routing.combine_weight.sum(1, keepdim=True) * x)


def _layer_checks(rank: int, world: int, configs: list[dict]) -> list[str]:
    _identity(rank, world)
    return _equivalence(rank, world, configs)


def test_multi_rank_layer_equals_single_process_reference() -> None:
    """Outputs, aux loss, input/expert/gate gradients and bytes sent match a single-process
    reference, for each gate, with uneven token counts, capacity drops and compressed dispatch
    (up to the payload's rounding); identity experts return the gate-weighted input."""
    world = 2
    configs = [
        {"gate": "gshard", "experts": 2 * world, "capacity_factor": 0.75, "dispatch_dtype": None},
        {"gate": "switch", "experts": world, "capacity_factor": 1.0, "dispatch_dtype": None},
        {"gate": "noisy_topk", "experts": 2 * world, "capacity_factor": None, "dispatch_dtype": None},
        {"gate": "gshard", "experts": 4, "capacity_factor": 1.0, "dispatch_dtype": torch.float16},
        {"gate": "noisy_topk", "experts": 4, "capacity_factor": 1.25, "dispatch_dtype": torch.bfloat16},
    ]
    results = run(_layer_checks, world, configs)
    assert all(len(r) == len(configs) for r in results)


def _bad_input(rank: int, world: int) -> dict[str, str]:
    seen: dict[str, str] = {}

    def expect(name: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except ValueError as err:
            seen[name] = str(err)
        else:
            seen[name] = "no error"

    expect("not divisible", MoE, M, 3)
    moe = MoE(M, 4, gate="gshard")
    # rank 1 alone passes a wrong feature size: every rank must raise, none may hang
    expect("one bad rank", moe, torch.randn(5, M + 1 if rank == 1 else M))
    other = MoE(M, 4 if rank == 0 else 2, gate="gshard")
    expect("expert count differs", other, torch.randn(5, M))
    half = MoE(M, 4, gate="gshard", dispatch_dtype=torch.float16 if rank == 0 else None)
    expect("payload differs", half, torch.randn(5, M))
    # the collectives are still aligned afterwards: a good call works on every rank, even one
    # where rank 1 has no tokens at all
    y, aux = moe(torch.randn(5 if rank == 0 else 0, M))
    seen["after"] = f"{tuple(y.shape)} {bool(torch.isfinite(aux))}"
    return seen


def test_bad_input_raises_on_every_rank_without_hanging() -> None:
    r0, r1 = run(_bad_input, 2, timeout=60)
    for r in (r0, r1):
        assert "positive multiple of the world size 2" in r["not divisible"]
        assert "num_experts: rank 0 has 4, rank 1 has 2" in r["expert count differs"]
        assert "payload dtype: rank 0 has torch.float16, rank 1 has torch.float32" in r["payload differs"]
    assert r0["after"] == f"(5, {M}) True" and r1["after"] == f"(0, {M}) True"
    assert "last dimension d_model=6" in r1["one bad rank"]
    assert "rejected on rank(s) [1]" in r0["one bad rank"]


class TinyNet(nn.Module):
    """Dense input layer -> MoE (residual) -> dense head; returns (prediction, aux loss)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.inp, self.moe, self.head = nn.Linear(M, M), moe, nn.Linear(M, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.inp(x))
        y, aux = self.moe(h)
        return self.head(h + y), aux


class ReferenceMoE(nn.Module):
    """All experts in one process; routes with one gate per rank's tokens (capacity is per rank)."""

    def __init__(self, gate: nn.Module, experts: list[nn.Module]) -> None:
        super().__init__()
        self.gate, self.experts = gate, nn.ModuleList(experts)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        routing = self.gate(h)
        return reference_moe(h, routing, list(self.experts)), routing.aux_loss


def _ddp(rank: int, world: int, method: str | None, steps: int) -> dict[str, float]:
    E = 2 * world
    g = torch.Generator().manual_seed(3)
    experts = [feed_forward(M, HIDDEN) for _ in range(E)]
    ref = TinyNet(ReferenceMoE(make_gate("gshard", M, E, None, 1.0), experts))
    init_(ref, g)
    data = [(torch.randn(8, M, generator=g), torch.randn(8, 1, generator=g)) for _ in range(steps * world)]

    moe = MoE(M, E, expert=lambda: feed_forward(M, HIDDEN), gate="gshard", capacity_factor=1.0)
    net = TinyNet(moe)
    net.inp.load_state_dict(ref.inp.state_dict())
    net.head.load_state_dict(ref.head.state_dict())
    moe.gate.load_state_dict(ref.moe.gate.state_dict())
    load_experts(moe, experts)
    ignored = ddp_ignore_experts(net)
    assert sorted(ignored) == sorted(n for n, p in net.named_parameters() if p in set(expert_parameters(net)))
    ddp = DistributedDataParallel(net)
    state = register(ddp, method) if method else None
    # DDP broadcast rank 0's dense weights, but must have left this rank's experts alone
    load_check = copy.deepcopy(net.moe)
    load_experts(load_check, experts)
    for p, q in zip(net.moe.experts.parameters(), load_check.experts.parameters(), strict=True):
        assert torch.equal(p, q)

    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(steps):
        batches = data[step * world : (step + 1) * world]
        x, t = batches[rank]
        pred, aux = ddp(x)
        opt.zero_grad()
        (F.mse_loss(pred, t) + aux).backward()
        scale_expert_grads(net, 1 / world)
        opt.step()
        # reference: mean over ranks of each rank's loss, every expert in one process
        ref_opt.zero_grad()
        ref_loss = torch.zeros(())
        for xb, tb in batches:
            ref_pred, ref_aux = ref(xb)
            ref_loss = ref_loss + (F.mse_loss(ref_pred, tb) + ref_aux) / world
        ref_loss.backward()
        ref_opt.step()

    worst = 0.0
    for name, p in net.named_parameters():
        if name.startswith("moe.experts."):
            local, rest = name.removeprefix("moe.experts.").split(".", 1)
            q = ref.get_parameter(f"moe.experts.{moe.expert_ids[int(local)]}.{rest}")
        else:
            q = ref.get_parameter(name)
        close(f"{name} after {steps} steps ({method})", p, q, None if method is None else torch.float16)
        worst = max(worst, float((p - q).abs().max()))
    for p in dense_parameters(net):  # dense weights identical on every rank
        other = p.detach().clone()
        dist.broadcast(other, 0)
        assert torch.equal(other, p.detach())
    out = {"worst": worst, "dense_values": sum(p.numel() for p in dense_parameters(net))}
    if state is not None:
        stats = state.stats
        out |= {"sent": stats.total.bytes_sent, "dense": stats.total.dense_bytes, "buckets": state.num_buckets}
        out |= {"last_sent": stats.last.bytes_sent, "last_dense": stats.last.dense_bytes, "steps": stats.total.steps}
    return out


def _ddp_both(rank: int, world: int, steps: int) -> list[dict[str, float]]:
    return [_ddp(rank, world, method, steps) for method in (None, "fp16")]


def test_ddp_on_dense_part_with_experts_ignored() -> None:
    """DDP (plain, then with the commcomp fp16 hook) on the dense part + expert-parallel MoE, on the
    same process group, follows single-process training on the global batch; the hook's traffic is
    exactly the dense gradients in fp16 (the experts never reach DDP)."""
    world, steps = 2, 3
    results = run(_ddp_both, world, steps)
    for _, fp16 in results:
        values = fp16["dense_values"]  # gradients DDP reduces: everything but this rank's experts
        assert fp16["steps"] == steps
        assert (fp16["last_dense"], fp16["dense"]) == (4 * values, steps * 4 * values)  # an fp32 all-reduce of them
        assert fp16["last_sent"] == 2 * values  # no NaN/Inf slots: the dense sum shows them itself
        fingerprint = 2 * 8  # once, at the first bucket: the options digest and world size (int64)
        assert fp16["sent"] == steps * 2 * values + fingerprint
