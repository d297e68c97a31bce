"""The quantizer DDP hook with qsgd, topk, randk, sign and the dense casts on real gloo process groups.

Every step is compared with a plain reference: each rank also trains a copy of the model without DDP,
all-gathers the raw gradients with torch.distributed, and simulates every rank's compression (same
quantizers, same seeds, same order, same error-feedback residuals) itself.
"""

import io
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run
from hook_reference import BUCKETS, ORDER, batch, everyone_grads, rank_quantizers, recording_hook, same_on_all_ranks
from torch import nn

import commcomp
from commcomp import quantizers
from commcomp.exchange import DenseExchange, tiles
from commcomp.hooks.quantized import QuantizerState, quantizer_hook

CONFIGS: list[tuple[str, dict[str, Any], bool]] = [
    ("qsgd", {"bits": 4, "bucket_size": 64}, False),
    ("qsgd", {"bits": 2, "norm": "l2"}, True),
    ("topk", {"ratio": 0.05}, True),
    ("sign", {"bucket_size": 100}, True),
    ("randk", {"ratio": 0.1, "seed": 5}, False),
    ("randk", {"k": 7, "rescale": False}, True),
]
STEPS = 3
DENSE = [("identity", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    )


def _reference_grads(
    grads: list[dict[str, torch.Tensor]], order: list[str], qs: list[Any], residuals: list[dict] | None
) -> dict[str, torch.Tensor]:
    """What the hook must produce: every rank's compression simulated here, in the hook's order."""
    n, out = len(grads), {}
    for key in order:
        decoded = []
        for r in range(n):
            h = grads[r][key] / n if qs[r].linear else grads[r][key]
            if residuals is not None and key in residuals[r]:
                h = h + residuals[r][key]
            if hasattr(qs[r], "set_stream"):
                qs[r].set_stream(key)
            d = qs[r].decompress(qs[r].compress(h))
            if residuals is not None:
                residuals[r][key] = h - d
            decoded.append(d)
        total = torch.stack(decoded).sum(0)
        out[key] = total if qs[0].linear else total.div_(n)
    return out


def _expected_bytes(name: str, options: dict, model: nn.Module, buckets: int, world: int) -> int:
    q = quantizers.get(name, **options)
    payload = sum(q.compress(torch.zeros_like(p)).nbytes for p in model.parameters())
    flags = buckets * world * 4 if q.linear else buckets  # one float per rank vs one byte per bucket
    return payload + flags


def _hook_worker(rank: int, world: int) -> list[dict[str, Any]]:
    results = []
    for name, options, ef in CONFIGS:
        ORDER.clear()
        BUCKETS.clear()
        net, ref = _net(), _net()
        model = nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.002)
        state = QuantizerState(quantizer=name, error_feedback=ef, **options)
        state.bind(model)
        model.register_comm_hook(state, recording_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        qs = rank_quantizers(name, options, world)
        residuals: list[dict] | None = [{} for _ in range(world)] if ef else None
        names = [k for k, _ in ref.named_parameters()]
        max_err, identical, last_bytes, buckets = 0.0, True, [], 0
        for step in range(STEPS):
            x, y = batch(rank, step)
            ORDER.clear()
            BUCKETS.clear()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            # reference: plain local gradients, all-gathered with torch.distributed
            ref_opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            expected = _reference_grads(everyone_grads(ref), list(ORDER), qs, residuals)
            for k, p in ref.named_parameters():
                p.grad.copy_(expected[k])
            ref_opt.step()
            for a, b in zip(net.parameters(), ref.parameters()):
                max_err = max(max_err, float((a - b).detach().abs().max()))
            identical &= same_on_all_ranks(net)
            expected_bytes = _expected_bytes(name, options, net, len(BUCKETS), world)
            last_bytes.append((state.stats.last.bytes_sent, state.stats.last.dense_bytes, expected_bytes))
            buckets = len(BUCKETS)  # after the rebuild at the end of the first step
        results.append(
            {
                "config": (name, options, ef),
                "max_err": max_err,
                "identical": identical,
                "buckets": buckets,
                "bytes": last_bytes,
                "total": state.stats.bytes_sent,
                "dense": sum(p.numel() * 4 for p in net.parameters()),
                "order_complete": sorted(ORDER) == sorted(names),
            }
        )
    return results


def test_hook_matches_reference_on_three_ranks() -> None:
    per_rank = run(_hook_worker, 3, timeout=300)
    for res in (r for ranks in per_rank for r in ranks):
        cfg = res["config"]
        assert res["buckets"] >= 3, cfg
        assert res["order_complete"], cfg
        assert res["identical"], f"{cfg}: parameters differ across ranks"
        assert res["max_err"] < 1e-6, f"{cfg}: DDP result differs from the reference by {res['max_err']}"
        # every step sends exactly the packed payloads plus the NaN flags (one per bucket; DDP rebuilds
        # its buckets after the first step), and the first step also the 16-byte options check
        sent, dense, expected = zip(*res["bytes"])
        assert list(sent) == [expected[0] + 16, *expected[1:]], (cfg, res["bytes"])
        assert set(dense) == {res["dense"]} and max(expected) < res["dense"], cfg
        assert res["total"] == sum(sent), cfg


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range) -> None:
    for step in steps:
        x, y = batch(rank, step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _resume_worker(rank: int, world: int, name: str, options: dict, n: int) -> bool:
    def build(group: dist.ProcessGroup | None) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = nn.parallel.DistributedDataParallel(_net(), bucket_cap_mb=0.002, process_group=group)
        state = commcomp.register(model, name, process_group=group, error_feedback=True, **options)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), state

    straight, opt, _ = build(None)
    _train(straight, opt, rank, range(2 * n))

    first, opt, state = build(None)
    _train(first, opt, rank, range(n))
    buf = io.BytesIO()
    torch.save({"model": first.module.state_dict(), "opt": opt.state_dict(), "comm": state.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed, opt, state = build(dist.new_group(list(range(world))))
    resumed.module.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    state.load_state_dict(ckpt["comm"])
    _train(resumed, opt, rank, range(n, 2 * n))
    return all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


@pytest.mark.parametrize("name,options", [("qsgd", {"bits": 3}), ("topk", {"ratio": 0.05})])
def test_resume_is_exact(name: str, options: dict) -> None:
    assert run(_resume_worker, 2, name, options, 3, timeout=300) == [True, True]


def _errors_worker(rank: int, world: int) -> dict[str, str]:
    out: dict[str, str] = {}
    model = nn.parallel.DistributedDataParallel(_net(), bucket_cap_mb=0.002)
    for key, options in (("unknown", {"bitz": 4}), ("bad_bits", {"bits": 9}), ("bad_ratio", {"ratio": 0.0})):
        try:
            commcomp.register(model, "topk" if key == "bad_ratio" else "qsgd", **options)
        except ValueError as e:
            out[key] = str(e)
    try:
        commcomp.register(model, "qsgdd")
    except ValueError as e:
        out["unknown_method"] = str(e)
    state = commcomp.register(model, "topk", ratio=0.1, error_feedback=True, nonfinite="raise")
    out["state"] = type(state).__name__
    x, y = batch(rank, 0)
    loss = F.cross_entropy(model(x), y) * (float("nan") if rank == 1 else 1.0)
    try:
        loss.backward()
    except Exception as e:
        out["nan"] = f"{type(e).__name__}: {e}"
    # options that differ across ranks: refused on every rank at the first bucket
    model = nn.parallel.DistributedDataParallel(_net(), bucket_cap_mb=0.002)
    commcomp.register(model, "qsgd", bits=4 if rank == 0 else 2)
    try:
        F.cross_entropy(model(x), y).backward()
    except Exception as e:
        out["differ"] = f"{type(e).__name__}: {e}"
    return out


def test_clear_errors() -> None:
    for out in run(_errors_worker, 2, timeout=300):
        assert "unknown option" in out["unknown"] and "bitz" in out["unknown"]
        assert "bits" in out["bad_bits"] and "ratio" in out["bad_ratio"]
        assert "unknown communication method" in out["unknown_method"] and "qsgd" in out["unknown_method"]
        assert out["state"] == "QuantizerState"
        assert "NaN or Inf" in out.get("nan", "") and "rank(s) [1]" in out["nan"], out
        assert "options differ across ranks" in out.get("differ", ""), out


def test_dense_exchange_sends_what_the_quantizer_would_whole_or_per_gradient() -> None:
    """The plain average's encoding of a buffer is bitwise its quantizer's g/N, gradient by gradient,
    laid end to end: sending a bucket's buffer whole puts the same values on the wire. No flag
    slots follow them (the engine adds some only if a rank writes a flag), and in fp32 the buffer
    itself is divided and sent (no copy)."""
    buf = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    grads = [v.view(shape) for v, shape in zip(buf.split([600, 300, 100]), [(20, 30), (300,), (10, 10)])]
    assert tiles(grads, buf)
    assert not tiles(grads[:2], buf) and not tiles(grads[::-1], buf)  # a part, or out of order
    assert not tiles([buf.view(10, 100).t()], buf) and not tiles([buf.double()], buf)  # a layout, a copy
    for name, wire in DENSE:
        codec = DenseExchange(3, None if name == "identity" else wire)
        sent = buf.clone()
        encoded = codec.encode(["bucket0"], [sent])
        whole = encoded.parts[0]
        per_gradient = torch.cat(codec.encode(["a", "b", "c"], [g.clone() for g in grads]).parts)
        quantized = torch.cat([quantizers.get(name).compress(g / 3).tensors[0] for g in grads])
        assert whole.dtype == wire and torch.equal(whole, per_gradient) and torch.equal(whole, quantized), name
        assert encoded.flat is not None and encoded.flat.numel() == buf.numel(), name
        assert (encoded.flat.data_ptr() == sent.data_ptr()) == (name == "identity"), name


def _dense_worker(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, wire in DENSE:
        net, ref = _net(), _net()
        model = nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.002)
        state = QuantizerState(quantizer=name)
        whole: list[bool] = []

        def hook(
            state: QuantizerState, bucket: dist.GradBucket, whole: list[bool] = whole
        ) -> torch.futures.Future[torch.Tensor]:
            whole.append(tiles(bucket.gradients(), bucket.buffer()))
            return quantizer_hook(state, bucket)

        model.register_comm_hook(state, hook)
        worst = 0.0
        for step in range(2):  # DDP rebuilds its buckets after the first step
            x, y = batch(rank, step)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            ref.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            everyone = everyone_grads(ref)
            for k, p in net.named_parameters():
                shares = torch.stack([g[k] / world for g in everyone])
                expected = shares.to(wire).float().sum(0)
                # the wire sums in its own dtype: each of the world - 1 additions rounds once
                bound = world * torch.finfo(wire).eps * shares.abs().sum(0) + 1e-12
                worst = max(worst, float(((p.grad - expected).abs() / bound).max()))
        out[name] = {"whole": whole, "worst": worst, "buckets": state.num_buckets, "same": same_on_all_ranks(net)}
    return out


def test_dense_quantizers_average_whole_buckets_like_a_plain_reference() -> None:
    """identity, fp16 and bf16 send each DDP bucket's buffer whole, and every gradient is the
    average of every rank's g/N rounded to the wire, within the wire's own rounding of the sum."""
    for out in run(_dense_worker, 3, timeout=300):
        for name, res in out.items():
            assert res["buckets"] >= 3 and all(res["whole"]), (name, res)
            assert res["worst"] <= 1.0 and res["same"], (name, res)
