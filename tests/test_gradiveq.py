"""GradiVeQ: the pure codec (slicing, PCA, linearity, schedule) and the DDP hook on real gloo groups."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from harness import WorkerError, run
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from benchmarks.data import CNN1D, accuracy, load_mnist1d, shard
from commcomp.gradiveq import LayerCodec, Schedule, plan_slices

# ---------------------------------------------------------------- pure codec


@pytest.mark.parametrize("shape", [(16, 16, 3, 3), (8, 4, 5), (32, 32, 3), (6, 3, 2, 7)])
def test_conv_layout_is_filter_interleaved_and_invertible(shape):
    plan = plan_slices(shape, target=64, max_len=1024, min_numel=1)
    assert plan is not None and plan.conv
    g = torch.randn(shape)
    v = plan.to_vector(g)
    if len(shape) == 4:  # the paper's layout, as ALGORITHMS.md writes it
        assert torch.equal(v, g.permute(2, 3, 1, 0).reshape(-1))
    f, d = shape[0], shape[1]
    assert plan.K % (f * d) == 0
    # the F filters' entries at one position are adjacent: the first F values are g[:, 0, 0...]
    assert torch.equal(v[:f], g[(slice(None), 0, *([0] * (len(shape) - 2)))])
    assert torch.equal(plan.from_vector(v), g)
    slices, rest = plan.split(g)
    assert slices.shape == (plan.S, plan.K) and rest.numel() == g.numel() - plan.S * plan.K
    assert torch.equal(plan.join(slices, rest), g)


def test_paper_slice_length_for_3x3x16x16():
    plan = plan_slices((16, 16, 3, 3), target=768, max_len=1024)
    assert plan is not None and plan.K == 768 and plan.S == 3


def test_linear_rows_small_and_1d_params():
    plan = plan_slices((64, 100), target=256, max_len=1024, min_numel=1)
    assert plan is not None and not plan.conv and plan.K % 100 == 0
    wide = plan_slices((4, 3000), target=256, max_len=1024, min_numel=1)
    assert wide is not None and 3000 % wide.K == 0 and wide.K <= 1024
    assert plan_slices((1000,), min_numel=1) is None  # biases go uncompressed
    assert plan_slices((8, 8), min_numel=1024) is None  # tiny layers too


def _fitted_codec(k_layers=(64, 48), samples=40, threshold=0.01, seed=0):
    gen = torch.Generator().manual_seed(seed)
    plan = plan_slices(k_layers, target=48, max_len=1024, min_numel=1)
    codec = LayerCodec(plan, fit_slices=1000)
    basis = torch.randn(plan.K, 5, generator=gen)  # gradients near a 5-dim subspace plus noise
    observed = []
    for _ in range(samples):
        g = torch.randn(plan.S, 5, generator=gen) @ basis.T + 0.01 * torch.randn(plan.S, plan.K, generator=gen)
        g = plan.join(g + 0.3, torch.zeros(plan.numel - plan.S * plan.K)).contiguous()
        codec.observe(g)
        observed.append(plan.split(g)[0])
    u, mu = codec.fit(threshold)
    codec.set_basis(u, mu, codec.energy)
    return codec, torch.cat(observed).double(), u, mu


def test_energy_kept_on_fitting_samples():
    for threshold in (0.2, 0.05, 0.01, 0.001):
        codec, x, u, mu = _fitted_codec(threshold=threshold)
        centred = x - mu
        kept = (centred @ u).pow(2).sum() / centred.pow(2).sum()
        assert kept >= 1 - threshold - 1e-9
        assert u.shape[1] < codec.plan.K
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-9)  # orthonormal


def test_linearity_sum_of_compressed_equals_compressed_sum():
    codec, *_ = _fitted_codec()
    n = 4
    grads = [torch.randn(codec.plan.shape) for _ in range(n)]
    summed = sum(codec.compress(g / n, n)[0] for g in grads)
    direct = codec.compress(sum(grads) / n, 1)[0]
    assert torch.allclose(summed, direct, atol=1e-5)
    # decoding the summed coefficients gives the decode of the average
    rest = sum(codec.compress(g / n, n)[1] for g in grads)
    assert torch.allclose(codec.decompress(summed, rest), codec.decompress(direct, rest), atol=1e-5)


def test_round_trip_exact_when_d_equals_k():
    codec, *_ = _fitted_codec(threshold=0.0)
    assert codec.d == codec.plan.K
    g = torch.randn(codec.plan.shape)
    coeffs, rest = codec.compress(g, 1)
    assert torch.allclose(codec.decompress(coeffs, rest), g, atol=1e-4)


def test_schedule_phases():
    s = Schedule(warmup=3, sample=2, compress=4)
    phases = [s.phase(t) for t in range(3 + 2 * 6)]
    assert phases[:3] == ["warmup"] * 3
    assert phases[3:9] == ["sample", "sample", "compress", "compress", "compress", "compress"]
    assert [t for t in range(15) if s.refit(t)] == [5, 11]
    with pytest.raises(ValueError, match="sample_steps"):
        Schedule(0, 0, 1)


# ---------------------------------------------------------------- DDP hook on gloo


class Net(nn.Module):
    """Conv1d + Conv2d-free model with several layers so that small buckets give >= 3 buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)  # 192 values: uncompressed
        self.conv2 = nn.Conv1d(16, 32, 3, padding=1)  # 1536: compressed, unit 512
        self.fc1 = nn.Linear(32 * 8, 64)  # 16384: rows of 256
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 4, 8, generator=g)
    return x, (x.sum((1, 2)) > 0).long() + 2 * (x[:, 0, 0] > 0).long()


SMALL = dict(warmup_steps=2, sample_steps=4, compress_steps=5, fit_slices=64)


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train_worker(rank, world, options, steps, bucket_view, save=None, load=None):
    torch.manual_seed(0)
    net = Net()
    ddp = DDP(net, bucket_cap_mb=0.004, gradient_as_bucket_view=bucket_view)
    state = commcomp.register(ddp, "gradiveq", **options)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    start = 0
    if load:
        ckpt = torch.load(load, weights_only=False)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        state.load_state_dict(torch.load(f"{load}.rank{rank}", weights_only=False))  # residuals are per rank
        start = state.step
    per_step = []
    for step in range(start, start + steps):
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        dims = {k: c.d for k, c in state.codecs.items() if c is not None}
        per_step.append((state.schedule.phase(step), state.stats.last.bytes_sent, state.stats.last.dense_bytes, dims))
        # bitwise-identical parameters on every rank after every step
        p = _params(net)
        everyone = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(everyone, p)
        assert all(torch.equal(e, p) for e in everyone), f"ranks disagree after step {step}"
    if save:
        if rank == 0:
            torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, save)
        torch.save(state.state_dict(), f"{save}.rank{rank}")
        dist.barrier()
    n_buckets = state.num_buckets
    return _params(net), per_step, n_buckets, state.stats.as_dict()


def test_hook_three_buckets_identical_params_and_exact_byte_counts():
    steps = 2 + 4 + 5 + 4 + 3  # two refits
    results = run(_train_worker, 3, SMALL, steps, False, timeout=180)
    params, per_step, n_buckets, _ = results[0]
    assert n_buckets >= 3
    assert all(torch.equal(params, r[0]) for r in results)
    sched = Schedule(2, 4, 5)
    n_values = sum(p.numel() for p in Net().parameters())
    net = Net()
    shapes = {f"{n}": p.shape for n, p in net.named_parameters()}
    for step, (phase, sent, dense, dims) in enumerate(per_step):
        assert phase == sched.phase(step)
        assert dense == 4 * n_values
        if phase == "compress" and not sched.refit(step):
            # floats sent per compressed step = per compressed layer S*d + leftovers, plus raw small layers
            expect = 0
            for name, shape in shapes.items():
                plan = plan_slices(shape, 256, 256, 1024)
                if plan is None:
                    expect += math.prod(shape)
                else:
                    expect += (plan.numel // plan.K) * dims[name] + plan.numel % plan.K  # (M/K)*d + leftovers
            flags = 3 * n_buckets  # one NaN flag slot per rank per bucket
            assert sent == 4 * (expect + flags)
            assert sent * 4 <= dense
        elif (
            phase != "compress" and step > 0
        ):  # step 0 also carries the options fingerprint, and DDP has not rebuilt its buckets yet
            assert sent == 4 * (n_values + 3 * n_buckets)


def _reference_worker(rank, world, steps):
    """The same training with plain DDP (built-in all-reduce) and with GradiVeQ at lambda = 0."""
    out = []
    for use_hook in (False, True):
        torch.manual_seed(0)
        net = Net()
        ddp = DDP(net, bucket_cap_mb=0.004)
        if use_hook:
            commcomp.register(ddp, "gradiveq", energy_threshold=0.0, **SMALL)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        for step in range(steps):
            x, y = _batch(rank, step)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        out.append(_params(net))
    return out


def test_lambda_zero_matches_plain_allreduce():
    results = run(_reference_worker, 2, 16, timeout=180)
    plain, hooked = results[0]
    assert torch.allclose(plain, hooked, atol=1e-4, rtol=1e-4)
    assert not torch.equal(plain, _params(Net()))  # training moved the weights


def test_sampling_steps_can_be_sent_as_4bit_qsgd():
    options = {**SMALL, "sample_quantizer": "qsgd", "sample_quantizer_options": {"bits": 4}}
    results = run(_train_worker, 2, options, 2 + 4 + 5, False, timeout=180)
    assert torch.equal(results[0][0], results[1][0])
    for phase, sent, dense, dims in results[0][1]:
        if phase == "sample":  # 4 bits a value + one float per 512-value bucket, all-gathered
            assert sent < dense / 6
        if phase == "compress":
            assert dims and all(d > 0 for d in dims.values())  # the PCA was fitted on the decoded samples


def test_gradient_as_bucket_view_and_world_size_one():
    run(_train_worker, 2, SMALL, 13, True, timeout=180)
    run(_train_worker, 1, SMALL, 13, False, timeout=120)


def test_checkpoint_resume_is_exact(tmp_path):
    options = {**SMALL, "error_feedback": True}
    straight = run(_train_worker, 2, options, 16, False, timeout=180)
    ckpt = str(tmp_path / "ckpt.pt")
    run(_train_worker, 2, options, 8, False, ckpt, timeout=180)  # N steps, save (mid-cycle)
    resumed = run(_train_worker, 2, options, 8, False, None, ckpt, timeout=180)  # new group, load, N more
    assert torch.equal(straight[0][0], resumed[0][0])
    assert torch.equal(straight[1][0], resumed[1][0])


def _nan_worker(rank, world):
    torch.manual_seed(0)
    ddp = DDP(Net(), bucket_cap_mb=0.004)
    commcomp.register(ddp, "gradiveq", nonfinite="raise", **SMALL)
    x, y = _batch(rank, 0)
    if rank == 1:
        x[0, 0, 0] = float("nan")
    try:
        nn.functional.cross_entropy(ddp(x), y).backward()
    except Exception as e:
        return str(e)
    return "no error"


def test_nan_gradients_raise_on_every_rank():
    messages = run(_nan_worker, 2, timeout=120)
    for m in messages:
        assert "NaN or Inf" in m and "rank(s) [1]" in m


def _mismatch_worker(rank, world):
    ddp = DDP(Net(), bucket_cap_mb=0.004)
    commcomp.register(ddp, "gradiveq", energy_threshold=0.01 if rank == 0 else 0.02)
    x, y = _batch(rank, 0)
    nn.functional.cross_entropy(ddp(x), y).backward()


def test_options_differing_across_ranks_raise_everywhere():
    with pytest.raises(WorkerError) as err:
        run(_mismatch_worker, 2, timeout=120)
    assert str(err.value).count("options differ across ranks") >= 2  # on both ranks, no hang


def _bad_options_worker(rank, world):
    ddp = DDP(Net())
    errors = []
    for method, options in [("gradiveq", {"energy": 0.1}), ("gradivec", {}), ("gradiveq", {"energy_threshold": 1.5})]:
        try:
            commcomp.register(ddp, method, **options)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_bad_options_are_named():
    errors = run(_bad_options_worker, 1, timeout=60)[0]
    assert "unknown option(s) ['energy']" in errors[0] and "energy_threshold" in errors[0]
    assert "unknown communication method 'gradivec'" in errors[1] and "gradiveq" in errors[1]
    assert "energy_threshold must be in [0, 1)" in errors[2]


# ---------------------------------------------------------------- convergence on real data

CONVERGENCE_STEPS = int(os.environ.get("COMMCOMP_TEST_STEPS", "1500"))


def _mnist_worker(rank, world, steps):
    x, y, xt, yt = load_mnist1d()
    xs, ys = shard(x, y, rank, world)
    out = {}
    for method in ("fp32", "gradiveq"):
        torch.manual_seed(0)
        net = CNN1D()
        ddp = DDP(net)
        state = None
        if method == "gradiveq":
            state = commcomp.register(ddp, "gradiveq", error_feedback=True, max_components=48)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(rank)
        compressed = []
        for step in range(steps):
            idx = torch.randint(0, len(xs), (32,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(xs[idx]), ys[idx]).backward()
            opt.step()
            schedule.step()
            if state is not None and state.schedule.phase(step) == "compress" and not state.schedule.refit(step):
                compressed.append(state.stats.last.compression_ratio)
        out[method] = (accuracy(net, xt, yt), compressed)
    return out


@pytest.mark.timeout(1800)
def test_mnist1d_accuracy_within_one_point_and_4x_fewer_bytes():
    results = run(_mnist_worker, 4, CONVERGENCE_STEPS, timeout=900)
    fp32_acc, _ = results[0]["fp32"]
    gvq_acc, ratios = results[0]["gradiveq"]
    print(
        f"MNIST-1D test accuracy: fp32 {fp32_acc:.4f}, gradiveq {gvq_acc:.4f}; "
        f"compressed-step ratio min {min(ratios):.1f}x"
    )
    assert fp32_acc > 0.85  # the reference really trained
    assert gvq_acc >= fp32_acc - 0.01
    assert ratios and min(ratios) >= 4.0
