"""PQASGD and sparse parameter averaging on real gloo process groups, against plain torch.distributed
references, plus the MNIST-1D convergence comparison with fp32 DDP and the top-k hook."""

import io
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run
from torch import nn
from training import train_cosine

import commcomp
from benchmarks.data import CNN1D, accuracy, load_mnist1d, shard
from commcomp.comm import TorchCollectives
from commcomp.pqasgd import PQASGD, NonFiniteModelError
from commcomp.quantizers.qsgd import QSGD
from commcomp.quantizers.sparse import RandK


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def _local_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    # every rank starts from a different model, so sync_start and the averaging both matter
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _same_everywhere(model: nn.Module) -> bool:
    everyone = _gather(_flat(model))
    return all(torch.equal(t, everyone[0]) for t in everyone)


def _perturbed_net(rank: int) -> nn.Module:
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * rank)
    return net


def _identity_worker(rank: int, world: int, steps: int) -> dict[str, Any]:
    """p = 1 + identity vs synchronous SGD; p = 3, warm-up 2 + identity vs periodic averaging."""
    out: dict[str, Any] = {}
    # synchronous SGD reference: all-reduce of the gradients, divided by the world size
    net, ref = _perturbed_net(rank), _net()
    opt, ref_opt = torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    avg = PQASGD(net, opt, period=1, quantizer="identity", collectives=TorchCollectives())
    errs = []
    for step in range(steps):
        _local_step(net, opt, rank, step)  # avg.step() runs as the optimizer's post-step hook
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for p in ref.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        ref_opt.step()
        errs.append(float((_flat(net) - _flat(ref)).abs().max()))
        out.setdefault("identical", True)
        out["identical"] &= _same_everywhere(net)
    out["sync_err"] = max(errs)
    out["steps"] = avg.steps
    # periodic model averaging reference: local SGD, all-reduce of the parameters when due
    period, warmup = 3, 2
    net, ref = _perturbed_net(rank), _net()
    opt, ref_opt = torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    avg = PQASGD(net, period=period, quantizer="identity", warmup_steps=warmup)
    errs, identical_when_due = [], True
    for step in range(1, steps + 1):
        _local_step(net, opt, rank, step)
        avg.step()
        _local_step(ref, ref_opt, rank, step)
        if step <= warmup or (step - warmup) % period == 0:
            with torch.no_grad():
                for p in ref.parameters():
                    dist.all_reduce(p)
                    p.div_(world)
            identical_when_due &= avg.synchronised and _same_everywhere(net)
        else:
            identical_when_due &= not avg.synchronised
        errs.append(float((_flat(net) - _flat(ref)).abs().max()))
    out["periodic_err"] = max(errs)
    out["periodic_identical"] = identical_when_due
    return out


def test_identity_equals_sync_sgd_and_periodic_averaging() -> None:
    for out in run(_identity_worker, 3, 7, timeout=300):
        assert out["steps"] == 7
        assert out["identical"]
        # float rounding only: x_bar + mean(x_i - x_bar) vs x - lr * mean(g)
        assert out["sync_err"] < 1e-6, out
        assert out["periodic_err"] < 1e-6, out
        assert out["periodic_identical"]


def _expected_qsgd_bytes(model: nn.Module, bits: int, bucket: int) -> int:
    return sum(math.ceil(p.numel() * bits / 8) + 4 * math.ceil(p.numel() / bucket) for p in model.parameters()) + 1


def _quantized_worker(rank: int, world: int, steps: int) -> dict[str, Any]:
    """qsgd 4-bit, p = 2: each sync equals x_bar + mean_m Q(x_m - x_bar) simulated here from the
    plainly all-gathered models; identical models after each sync; bytes exactly as packed."""
    bits, bucket, period = 4, 64, 2
    net = _perturbed_net(rank)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    avg = PQASGD(net, period=period, quantizer="qsgd", bits=bits, bucket_size=bucket, seed=3)
    dense = sum(p.numel() * 4 for p in net.parameters())
    names = [n for n, _ in net.named_parameters()]
    replicas = [QSGD(bits=bits, bucket_size=bucket, seed=3) for _ in range(world)]
    for r, q in enumerate(replicas):
        q.set_rank(r)
    out: dict[str, Any] = {"err": 0.0, "identical": True, "bytes": [], "start_same": _same_everywhere(net)}
    for step in range(1, steps + 1):
        _local_step(net, opt, rank, step)
        expected = None
        if step % period == 0:
            x_bar = [xb.clone() for xb in avg.x_bar]
            models = [t.split([p.numel() for p in net.parameters()]) for t in _gather(_flat(net))]
            expected = []
            for i, (name, xb) in enumerate(zip(names, x_bar)):
                decoded = []
                for r in range(world):
                    replicas[r].set_stream(name)
                    delta = models[r][i].view_as(xb) - xb
                    decoded.append(replicas[r].decompress(replicas[r].compress(delta)))
                total = decoded[0].clone()
                for d in decoded[1:]:
                    total += d
                expected.append(xb + total / world)
        avg.step()
        if expected is not None:
            err = max(float((p.detach() - e).abs().max()) for p, e in zip(net.parameters(), expected))
            out["err"] = max(out["err"], err)
            out["identical"] &= _same_everywhere(net)
        out["bytes"].append((avg.stats.last.bytes_sent, avg.stats.last.dense_bytes))
    out["expected_sync"] = _expected_qsgd_bytes(net, bits, bucket)
    out["dense"] = dense
    return out


def test_quantized_averaging_matches_reference() -> None:
    for rank, out in enumerate(run(_quantized_worker, 3, 6, timeout=300)):
        assert out["start_same"] and out["identical"]
        assert out["err"] < 1e-6, out["err"]
        sent, dense = zip(*out["bytes"])
        assert set(dense) == {out["dense"]}
        setup = 8 + (out["dense"] if rank == 0 else 0)  # options digest + rank 0's broadcast
        flags = 4 * 3  # the NaN/Inf flags summed after every backward pass (one float32 per rank)
        sync = out["expected_sync"]
        assert list(sent) == [f + flags for f in (setup, sync, 0, sync, 0, sync)], sent


def _sparse_worker(rank: int, world: int, steps: int) -> dict[str, Any]:
    density = 0.25
    net = _perturbed_net(rank)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    avg = PQASGD(net, period=1, density=density, seed=9, sync_start=False)
    sampler = RandK(ratio=density, seed=9, rescale=False)
    names = [n for n, _ in net.named_parameters()]
    out: dict[str, Any] = {"err": 0.0, "bytes": []}
    for step in range(steps):
        _local_step(net, opt, rank, step)
        models = [t.split([p.numel() for p in net.parameters()]) for t in _gather(_flat(net))]
        mine = [m.clone() for m in models[rank]]
        expected, shared = [], []
        for i, name in enumerate(names):
            sampler.set_stream(name)
            idx = sampler.indices(mine[i].numel(), mine[i].device)
            e = mine[i].clone()
            e[idx] = torch.stack([models[r][i][idx] for r in range(world)]).sum(0) / world
            expected.append(e)
            shared.append(idx)
        avg.step()
        after = [p.detach().reshape(-1) for p in net.parameters()]
        out["err"] = max(out["err"], max(float((a - e).abs().max()) for a, e in zip(after, expected)))
        for i, idx in enumerate(shared):  # averaged coordinates agree across ranks
            everyone = _gather(after[i][idx].contiguous())
            out["shared_same"] = out.get("shared_same", True) and all(torch.equal(t, everyone[0]) for t in everyone)
        out["bytes"].append(avg.stats.last.bytes_sent)
    out["expected"] = sum(max(1, math.ceil(density * p.numel())) * 4 for p in net.parameters()) + world * 4
    return out


def test_sparse_parameter_averaging_matches_reference() -> None:
    for out in run(_sparse_worker, 2, 3, timeout=300):
        assert out["err"] < 1e-6 and out["shared_same"]
        flags = 4 * 2  # the NaN/Inf flags summed after every backward pass (one float32 per rank)
        assert out["bytes"][1:] == [out["expected"] + flags] * 2
        assert out["bytes"][0] == 8 + out["expected"] + flags  # + the options digest


def _resume_worker(rank: int, world: int, n: int) -> bool:
    def build(group: dist.ProcessGroup | None) -> tuple[nn.Module, torch.optim.Optimizer, PQASGD]:
        net = _perturbed_net(rank)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        return net, opt, PQASGD(net, opt, period=2, quantizer="qsgd", bits=3, process_group=group)

    straight, opt, _ = build(None)
    for step in range(2 * n):
        _local_step(straight, opt, rank, step)

    first, opt, avg = build(None)
    for step in range(n):
        _local_step(first, opt, rank, step)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "avg": avg.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed, opt, avg = build(dist.new_group(list(range(world))))  # build first (it broadcasts), then load
    resumed.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    avg.load_state_dict(ckpt["avg"])
    for step in range(n, 2 * n):
        _local_step(resumed, opt, rank, step)
    return torch.equal(_flat(straight), _flat(resumed)) and avg.steps == 2 * n


def test_resume_is_exact() -> None:
    assert run(_resume_worker, 2, 3, timeout=300) == [True, True]


def test_bad_arguments() -> None:
    net = _net()
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"period": 0}, ValueError, "period"),
        ({"period": 1.5}, ValueError, "period"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"density": 0.0}, ValueError, "density"),
        ({"density": 1.5}, ValueError, "density"),
        ({"density": 0.1, "quantizer": "qsgd"}, ValueError, "quantizer"),
        ({"density": 0.1, "bits": 4}, ValueError, "quantizer"),
        ({"process_group": object(), "collectives": object()}, ValueError, "not both"),
        ({"quantizer": "qsgd", "bitz": 4}, ValueError, "unknown option"),
        ({"quantizer": "nope"}, ValueError, "valid names"),
        ({"quantizer": "qsgd", "bits": 12}, ValueError, "bits"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            PQASGD(net, **kwargs)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        PQASGD("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no floating-point"):
        PQASGD(nn.Sequential(nn.ReLU()))


def _errors_worker(rank: int, world: int) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        PQASGD(_net(), period=2 if rank == 0 else 3)
    except ValueError as e:
        out["differ"] = str(e)
    try:
        PQASGD(nn.parallel.DistributedDataParallel(_net()))
    except TypeError as e:
        out["ddp"] = str(e)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    avg = PQASGD(net, period=1)
    with torch.no_grad():
        if rank == 1:
            next(net.parameters())[0, 0] = float("nan")
    try:
        avg.step()
    except NonFiniteModelError as e:
        out["nan"] = str(e)
    del opt
    return out


def test_clear_errors_on_every_rank() -> None:
    for out in run(_errors_worker, 2, timeout=300):
        assert "differ across ranks" in out.get("differ", ""), out
        assert "plain model" in out.get("ddp", ""), out
        assert "rank(s) [1]" in out.get("nan", ""), out


# ----- convergence on MNIST-1D: PQASGD and the top-k hook against fp32 DDP -----
STEPS, LR, BATCH = 3000, 0.1, 64  # top-k 1% needs the steps: at 1,000 it trailed fp32 by 11 points


def _train_mnist1d(rank: int, world: int, method: str, steps: int = STEPS) -> tuple[float, int]:
    """Same data order, initial model, optimizer (SGD, momentum 0.9, cosine schedule) for every method."""
    x_train, y_train, x_test, y_test = load_mnist1d(5000)
    x, y = shard(x_train, y_train, rank, world)
    torch.manual_seed(0)
    net = CNN1D()
    if method == "pqasgd":
        model: nn.Module = net
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
        stats = PQASGD(net, opt, period=4, quantizer="qsgd", bits=4).stats
    else:
        model = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        if method == "fp32":
            stats = commcomp.register(model, "identity").stats
        else:
            stats = commcomp.register(model, "topk", ratio=0.01, error_feedback=True).stats
    train_cosine(model, opt, x, y, rank, steps, BATCH)
    return accuracy(net, x_test, y_test), stats.bytes_sent


def _convergence_worker(rank: int, world: int) -> dict[str, tuple[float, int]]:
    return {m: _train_mnist1d(rank, world, m) for m in ("fp32", "pqasgd", "topk")}


def test_convergence_mnist1d_four_ranks() -> None:
    results = run(_convergence_worker, 4, timeout=1200)
    (acc32, bytes32), (acc_pq, bytes_pq), (acc_topk, _) = (results[0][m] for m in ("fp32", "pqasgd", "topk"))
    for r in results:  # every rank evaluates the same model
        assert r["fp32"][0] == acc32 and r["pqasgd"][0] == acc_pq and r["topk"][0] == acc_topk
    print(
        f"MNIST-1D test accuracy: fp32 {acc32:.3f}, pqasgd {acc_pq:.3f} ({bytes_pq / bytes32:.2%} of the bytes), "
        f"topk+EF {acc_topk:.3f}"
    )
    assert acc32 > 0.85, "the fp32 baseline did not train"
    assert acc_pq >= acc32 - 0.01
    assert bytes_pq <= 0.05 * bytes32
    # top-k 1% with error feedback: within 3 points. One run's end moves with the CPU's rounding: the
    # same code and seed gave 0.915 against fp32's 0.933 on one 2-core AMD EPYC and within a point on
    # the machines before (after 1,000 steps instead of 3,000 it trailed by 11 points)
    assert acc_topk >= acc32 - 0.03
