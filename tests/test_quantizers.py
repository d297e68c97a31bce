"""Single-process tests of the qsgd, topk, randk and sign quantizers, bit packing and error feedback."""

from __future__ import annotations

import math

import pytest
import torch

from commcomp import quantizers
from commcomp.error_feedback import ErrorFeedback
from commcomp.quantizers import pack_payloads, unpack_payloads
from commcomp.quantizers.packing import max_abs, pack_bits, packed_nbytes, unpack_bits
from commcomp.quantizers.qsgd import QSGD
from commcomp.quantizers.sparse import RandK

NEW = ["qsgd", "topk", "randk", "sign"]
CONFIGS = [
    ("qsgd", {"bits": 2}),
    ("qsgd", {"bits": 3, "bucket_size": 7}),
    ("qsgd", {"bits": 4, "norm": "l2"}),
    ("qsgd", {"bits": 8}),
    ("topk", {"ratio": 0.1}),
    ("topk", {"k": 3}),
    ("randk", {"ratio": 0.2, "seed": 3}),
    ("randk", {"k": 2, "rescale": False}),
    ("sign", {"bucket_size": 5}),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0,), (1,), (7,), (3, 0, 2), (4, 5), (2, 3, 101)]


def _make(name: str, options: dict) -> quantizers.Quantizer:
    return quantizers.get(name, **options)


def test_registered() -> None:
    assert set(NEW) <= set(quantizers.names())
    assert quantizers.get("qsgd").unbiased and not quantizers.get("qsgd").linear
    assert not quantizers.get("topk").unbiased and not quantizers.get("sign").unbiased
    assert quantizers.get("randk").linear and quantizers.get("randk").unbiased
    assert not quantizers.get("randk", rescale=False).unbiased


def _pack_bits_reference(codes: list[int], bits: int) -> list[int]:
    """The documented convention in plain Python: code i at stream bits i*b.., LSB first."""
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(stream[8 * i + j] << j for j in range(8)) for i in range(len(stream) // 8)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 1001])
def test_pack_bits_convention(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    assert packed.tolist() == _pack_bits_reference(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def _unpack_bits_reference(packed: list[int], bits: int, n: int) -> list[int]:
    """The documented convention read back in plain Python: code i from stream bits i*b.., LSB first."""
    stream = [(byte >> j) & 1 for byte in packed for j in range(8)]
    return [sum(stream[i * bits + j] << j for j in range(bits)) for i in range(n)]


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_bits_every_byte_batched(bits: int) -> None:
    """Every byte value decodes per the convention, also from a strided [N, bytes] slice (the
    all-gathered rows the decoders read)."""
    rows = torch.stack([torch.arange(256, dtype=torch.uint8).roll(r) for r in range(3)])
    packed = torch.cat([rows, rows], 1)[:, 5 : 5 + 251]  # not contiguous, odd offset
    n = 251 * 8 // bits
    got = unpack_bits(packed, bits, n)
    assert got.shape == (3, n)
    for r in range(3):
        assert got[r].tolist() == _unpack_bits_reference(packed[r].tolist(), bits, n)


def test_max_abs_is_abs_amax_bitwise() -> None:
    """max |v| per row, signed zeros, infinities and NaN included, as abs().amax(1) gives it."""
    rows = torch.randn(6, 33)
    rows[1] = -0.0
    rows[2, 5] = float("-inf")
    rows[3, 7] = float("nan")
    rows[4] = -rows[4].abs()
    rows[5, :] = 0.0
    rows[5, 3] = -0.0
    got = max_abs(rows, torch.empty(6))
    want = rows.abs().amax(1)
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert got[ok].tolist() == want[ok].tolist() and not torch.signbit(got[ok]).any()


@pytest.mark.parametrize("name,options", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_shapes_dtypes(name: str, options: dict, dtype: torch.dtype) -> None:
    q = _make(name, options)
    for shape in SHAPES:
        x = torch.randn(shape).to(dtype)
        payload = q.compress(x)
        assert payload.nbytes == sum(t.numel() * t.element_size() for t in payload.tensors)
        flat = pack_payloads([payload, payload])
        assert flat.dtype == torch.uint8 and flat.numel() == 2 * payload.nbytes
        again = unpack_payloads(flat.clone(), [payload, payload])
        for p in again:
            for a, b in zip(p.tensors, payload.tensors):
                assert a.dtype == b.dtype and torch.equal(a, b)
        out = q.decompress(payload)
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.equal(q.decompress(again[1]), out)  # bit-exact after the wire
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NEW)
def test_rejects_integer_tensors(name: str) -> None:
    q = quantizers.get(name)
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        with pytest.raises(TypeError, match="floating-point"):
            q.compress(torch.zeros(4, dtype=dtype))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        q.compress([1.0, 2.0])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("qsgd", {"bits": 1}, "bits"),
        ("qsgd", {"bits": 9}, "bits"),
        ("qsgd", {"bits": 4.0}, "bits"),
        ("qsgd", {"bucket_size": 0}, "bucket_size"),
        ("qsgd", {"norm": "l1"}, "norm"),
        ("topk", {"ratio": 0.0}, "ratio"),
        ("topk", {"ratio": 1.5}, "ratio"),
        ("topk", {"ratio": -0.1}, "ratio"),
        ("topk", {"k": 0}, "k"),
        ("topk", {"ratio": 0.1, "k": 3}, "not both"),
        ("randk", {"ratio": 0.0}, "ratio"),
        ("randk", {"ratio": 2.0}, "ratio"),
        ("sign", {"bucket_size": -1}, "bucket_size"),
        ("qsgd", {"bitz": 4}, "unknown option"),
    ],
)
def test_bad_options(name: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantizers.get(name, **options)


@pytest.mark.parametrize("n", [0, 1, 511, 512, 513, 1001, 5000])
def test_packed_sizes(n: int) -> None:
    x = torch.randn(n)
    for bits in range(2, 9):
        for bucket in (512, 100):
            payload = quantizers.get("qsgd", bits=bits, bucket_size=bucket).compress(x)
            assert payload.nbytes == math.ceil(n * bits / 8) + 4 * math.ceil(n / bucket)
    # the example: 4 bits -> n/2 bytes (rounded up for odd n) + one float32 scale per bucket
    assert quantizers.get("qsgd", bits=4).compress(x).nbytes == (n + 1) // 2 + 4 * math.ceil(n / 512)
    assert quantizers.get("sign").compress(x).nbytes == math.ceil(n / 8) + 4 * math.ceil(n / 512)
    k = 0 if n == 0 else max(1, math.ceil(0.01 * n))
    assert quantizers.get("topk", ratio=0.01).compress(x).nbytes == k * (4 + 4)
    assert quantizers.get("topk", ratio=0.01).compress(x.half()).nbytes == k * (2 + 4)
    assert quantizers.get("randk", ratio=0.01).compress(x).nbytes == k * 4


def test_topk_keeps_largest() -> None:
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0])
    out = quantizers.get("topk", k=2).decompress(quantizers.get("topk", k=2).compress(x))
    assert out.tolist() == [0.0, -5.0, 0.0, 3.0, 0.0, 0.0]


def test_sign_decodes_mean_magnitude() -> None:
    x = torch.tensor([1.0, -3.0, 2.0, -4.0, 0.0])  # buckets of 2: [1,-3] [2,-4] [0]
    q = quantizers.get("sign", bucket_size=2)
    assert q.decompress(q.compress(x)).tolist() == [2.0, -2.0, 3.0, -3.0, 0.0]


def test_qsgd_levels_and_exact_values() -> None:
    """Values on a level are sent exactly; a bucket's max-magnitude value is always exact."""
    q = QSGD(bits=3, bucket_size=4)  # s = 3 levels per sign
    x = torch.tensor([3.0, -2.0, 1.0, 0.0, -6.0, 4.0, -2.0, 0.0])
    assert q.decompress(q.compress(x)).tolist() == x.tolist()


def _exact_qsgd_variance(x: torch.Tensor, bits: int, bucket: int, norm: str) -> torch.Tensor:
    """Per-value variance of QSGD: (S/s)^2 p (1 - p) with p = frac(|x| / S * s)."""
    s = 2 ** (bits - 1) - 1
    b = x.view(-1, bucket)
    scale = b.abs().amax(1, keepdim=True) if norm == "max" else b.norm(dim=1, keepdim=True)
    r = b.abs() / scale * s
    p = r - r.floor()
    return ((scale / s) ** 2 * p * (1 - p)).reshape(-1)


@pytest.mark.parametrize("bits,norm", [(2, "max"), (4, "max"), (3, "l2")])
def test_qsgd_unbiased_and_variance_bound(bits: int, norm: str) -> None:
    """Monte Carlo: mean of T independent quantizations -> x; variance matches the exact formula and
    stays within the paper's bound min(B/s^2, sqrt(B)/s) * ||v||^2 per bucket."""
    bucket, per, trials = 64, 4, 4000
    x = torch.randn(bucket * per, generator=torch.Generator().manual_seed(bits), dtype=torch.float64).float()
    q = QSGD(bits=bits, bucket_size=bucket, norm=norm, seed=11)
    # T copies in one call: buckets align with the copies, so each copy is an independent draw
    out = q.decompress(q.compress(x.repeat(trials))).view(trials, -1).double()
    var = _exact_qsgd_variance(x.double(), bits, bucket, norm)
    mean_err = (out.mean(0) - x.double()).abs()
    assert (mean_err <= 5 * (var / trials).sqrt() + 1e-6).all(), "QSGD is biased"
    emp_var = ((out - x.double()) ** 2).mean(0)  # per value
    per_bucket = emp_var.view(per, bucket).sum(1)
    exact = var.view(per, bucket).sum(1)
    assert torch.allclose(per_bucket, exact, rtol=0.1), (per_bucket, exact)
    s = 2 ** (bits - 1) - 1
    bound = min(bucket / s**2, math.sqrt(bucket) / s) * x.double().view(per, bucket).pow(2).sum(1)
    assert (per_bucket <= bound).all()


@pytest.mark.parametrize("rescale", [True, False])
def test_randk_unbiased_when_rescaled(rescale: bool) -> None:
    n, k, trials = 40, 4, 4000
    x = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q = RandK(k=k, seed=2, rescale=rescale)
    mean = torch.stack([q.decompress(q.compress(x)) for _ in range(trials)]).mean(0)
    se = x.abs() * math.sqrt((n / k - 1) / trials)
    if rescale:
        assert ((mean - x).abs() <= 5 * se + 1e-9).all()
    else:  # E = (k/n) x: biased
        assert ((mean - x * k / n).abs() <= 5 * se * k / n + 1e-9).all()
        assert not ((mean - x).abs() <= 5 * se).all()


def test_randk_shared_indices_and_generator_state() -> None:
    a, b = RandK(ratio=0.1, seed=7), RandK(ratio=0.1, seed=7)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    pa, pb = a.compress(x), b.compress(y)  # two "ranks": same coordinates from the shared seed
    assert torch.equal(pa.meta["indices"], pb.meta["indices"])
    # linear: the decoded sum is the sum decoded, up to float rounding of the n/k scale (an absolute
    # tolerance too: where x and y nearly cancel, one rounding is a large relative error)
    torch.testing.assert_close(
        a.decompress(pa) + a.decompress(pb),
        a.decompress(type(pa)([pa.tensors[0] + pb.tensors[0]], pa.shape, pa.dtype, pa.meta)),
    )
    state = a.state_dict()
    first = a.compress(x).meta["indices"]
    c = RandK(ratio=0.1, seed=7)
    c.load_state_dict(state)
    assert torch.equal(c.compress(x).meta["indices"], first)


def test_qsgd_generator_state_and_ranks() -> None:
    x = torch.randn(3000)
    q = QSGD(bits=2, seed=4)
    q.set_rank(0)
    q.compress(x)
    state = q.state_dict()
    expected = q.compress(x)
    resumed = QSGD(bits=2, seed=4)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.compress(x).tensors, expected.tensors))
    # per-rank noise differs across ranks; shared noise (seed_per_rank=False) does not
    r0, r1 = QSGD(bits=2, seed=4), QSGD(bits=2, seed=4)
    r0.set_rank(0)
    r1.set_rank(1)
    assert not torch.equal(r0.compress(x).tensors[0], r1.compress(x).tensors[0])
    s0, s1 = QSGD(bits=2, seed=4, seed_per_rank=False), QSGD(bits=2, seed=4, seed_per_rank=False)
    s0.set_rank(0)
    s1.set_rank(1)
    assert torch.equal(s0.compress(x).tensors[0], s1.compress(x).tensors[0])


@pytest.mark.parametrize("name,options", CONFIGS)
def test_error_feedback_invariant(name: str, options: dict) -> None:
    """input + old residual == decompressed + new residual, every step; summed over steps, what was
    sent plus the final residual is everything that came in."""
    q, memory = _make(name, options), ErrorFeedback()
    gen = torch.Generator().manual_seed(0)
    inputs_sum = torch.zeros(6, 50, dtype=torch.float64)
    sent_sum = torch.zeros_like(inputs_sum)
    for _ in range(5):
        g = torch.randn(6, 50, generator=gen)
        old = memory.residuals.get("w", torch.zeros_like(g))
        compensated = memory.compensate("w", g)
        assert torch.equal(compensated, g + old)
        decoded = q.decompress(q.compress(compensated))
        memory.update("w", compensated, decoded)
        new = memory.residuals["w"]
        lhs, rhs = g + old, decoded + new
        assert torch.allclose(lhs, rhs, rtol=0, atol=1e-6 * float(lhs.abs().max()))
        inputs_sum += g.double()
        sent_sum += decoded.double()
    total = sent_sum + memory.residuals["w"].double()
    assert torch.allclose(total, inputs_sum, rtol=0, atol=1e-5 * float(inputs_sum.abs().max()))
    restored = ErrorFeedback()
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.residuals["w"], memory.residuals["w"])


# ----- decoding many ranks at once, cheap selection, and the review's numeric bugs -----

GATHERED = [
    ("qsgd", {"bits": 2}),
    ("qsgd", {"bits": 3, "bucket_size": 7}),
    ("qsgd", {"bits": 8, "norm": "l2"}),
    ("topk", {"ratio": 0.1}),
    ("sign", {"bucket_size": 5}),
    ("sign", {}),
]


@pytest.mark.parametrize("name,options", GATHERED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_sum_matches_rank_by_rank(name: str, options: dict, dtype: torch.dtype) -> None:
    """decode_sum over the gathered bytes of N ranks == the float32 sum of each rank's decompress."""
    ranks = 3
    for shape in [(0,), (1,), (4, 5), (2, 3, 101), (70_000,)]:
        qs = [_make(name, options) for _ in range(ranks)]
        for r, q in enumerate(qs):
            if isinstance(q, QSGD):
                q.set_rank(r)
        payloads = [q.compress(torch.randn(shape).to(dtype)) for q in qs]
        received = torch.stack([pack_payloads([p, p]) for p in payloads])  # [N, L]: two tensors per rank
        for batch in quantizers.unpack_batch(received, [payloads[0], payloads[0]]):
            out = qs[0].decode_sum(batch, torch.full((math.prod(shape),), float("nan")))
            expected = torch.as_tensor(sum(q.decompress(p).float().reshape(-1) for q, p in zip(qs, payloads)))
            tol = 1e-5 if dtype == torch.float32 else 3 * torch.finfo(dtype).eps  # the reference rounds per rank
            assert out.dtype == torch.float32
            scale = max(1.0, float(expected.abs().amax()) if expected.numel() else 1.0)
            assert torch.allclose(out, expected, rtol=tol, atol=tol * scale), shape


def test_unpack_batch_layout_errors() -> None:
    p = _make("qsgd", {}).compress(torch.randn(10))
    with pytest.raises(ValueError, match="layout"):
        quantizers.unpack_batch(torch.zeros(2, p.nbytes + 1, dtype=torch.uint8), [p])


@pytest.mark.parametrize("name", ["qsgd", "topk", "sign"])
def test_half_precision_ranks_sum_in_float32(name: str) -> None:
    """Four fp16 ranks of about 40,000 each: their sum (160,000) is beyond fp16, their average is not."""
    q = _make(name, {"k": 10} if name == "topk" else {})
    x = torch.full((10,), 40_000.0, dtype=torch.float16)
    payloads = [q.compress(x) for _ in range(4)]
    batch = quantizers.unpack_batch(torch.stack([pack_payloads([p]) for p in payloads]), payloads[:1])[0]
    average = q.decode_sum(batch, torch.empty(10)).div_(4)
    assert torch.isfinite(average).all() and torch.allclose(average, x.float(), rtol=1e-3)


def test_randk_scales_at_decode_not_in_the_input_dtype() -> None:
    """The review's case: ratio 0.001, |g| about 100, fp16. The n/k scale in fp16 made the sent values
    inf; now the values go out as they are and the scale is applied in float32 at decode."""
    n = 100_000
    x = (100 + torch.rand(n, generator=torch.Generator().manual_seed(0))).half()
    q = RandK(ratio=0.001, seed=1)
    payload = q.compress(x)
    idx = payload.meta["indices"]
    assert torch.equal(payload.tensors[0], x[idx])  # finite, unscaled
    batch = quantizers.unpack_batch(pack_payloads([payload]).unsqueeze(0), [payload])[0]
    batch.meta["indices"] = idx
    decoded = q.decode_sum(batch, torch.empty(n))
    assert torch.isfinite(decoded).all()
    assert torch.allclose(decoded[idx], x[idx].float() * (n / idx.numel()))


def test_sign_mean_does_not_overflow_float32() -> None:
    """512 values of 1e37: their L1 sum (5e39) overflows float32; their mean does not."""
    x = torch.full((1024,), 1e37)
    x[::3] *= -1
    q = quantizers.get("sign")
    out = q.decompress(q.compress(x))
    assert torch.isfinite(out).all() and torch.allclose(out, x, rtol=1e-6)


def test_top_indices_exact_and_fallbacks() -> None:
    from commcomp.quantizers.sparse import top_indices

    gen = torch.Generator().manual_seed(3)
    for n, k in [(100_000, 1000), (100_000, 1), (50_000, 5000), (1000, 10)]:
        m = torch.randn(n, generator=gen).abs()
        for sampled in (None, True, False):  # a CPU samples; a GPU's plain topk (no host sync) alike
            assert set(top_indices(m, k, sampled).tolist()) == set(m.topk(k).indices.tolist())
    # adversarial: the strided sample sees only small values (c < k: exact fallback) ...
    m = torch.zeros(100_000)
    m[1::7] = torch.arange(1, 14_287).float()
    assert set(top_indices(m, 500).tolist()) == set(m.topk(500).indices.tolist())
    # ... or only ties (c >> k): still exactly k values, all of them maximal
    m = torch.ones(100_000)
    picked = top_indices(m, 300)
    assert picked.numel() == picked.unique().numel() == 300


def test_random_subset_distinct_and_uniform() -> None:
    from commcomp.quantizers.sparse import random_subset

    gen = torch.Generator().manual_seed(0)
    n, k, trials = 50, 5, 4000
    hits = torch.zeros(n)
    for _ in range(trials):
        idx = random_subset(n, k, gen, torch.device("cpu"))
        assert idx.numel() == idx.unique().numel() == k and 0 <= int(idx.min()) and int(idx.max()) < n
        hits[idx] += 1
    p = k / n  # every coordinate is kept with probability k/n
    assert ((hits / trials - p).abs() <= 5 * math.sqrt(p * (1 - p) / trials)).all()
    big = random_subset(10**7, 1000, gen, torch.device("cpu"))
    assert big.numel() == big.unique().numel() == 1000


def test_random_int16_uniform() -> None:
    from commcomp.quantizers.stochastic import random_int16

    lanes = random_int16(400_001, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert lanes.numel() == 400_001 and lanes.dtype == torch.int16
    u = (lanes.double() + 2**15) / 2**16  # every one of the four lanes of a word uniform on [0, 1)
    for lane in range(4):
        v = u[lane::4]
        assert abs(float(v.mean()) - 0.5) < 0.005 and abs(float(v.var()) - 1 / 12) < 0.002, lane


def test_contractive_and_omega() -> None:
    assert QSGD(bits=8).contractive and not QSGD(bits=4).contractive
    assert QSGD(bits=4, bucket_size=512).omega == pytest.approx(min(512 / 49, math.sqrt(512) / 7))
    assert RandK(rescale=False).contractive and not RandK().contractive
    assert all(quantizers.get(q).contractive for q in ("identity", "fp16", "bf16", "topk", "sign"))


def test_error_feedback_refuses_rescaled_randk() -> None:
    """Rescaled rand-k under error feedback: the residual grows about n/k - 1 times per step (the
    review measured 4.7e3 x |g| at step 10). It is refused; the unscaled form stays bounded."""
    with pytest.raises(ValueError, match="rescale=False"):
        quantizers.check_error_feedback(RandK(ratio=0.1), "error feedback")
    for q in (RandK(ratio=0.1, rescale=False), QSGD(bits=2), quantizers.get("topk"), quantizers.get("sign")):
        quantizers.check_error_feedback(q, "error feedback")
    q, memory = RandK(ratio=0.1, rescale=False), ErrorFeedback()
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        g = torch.randn(1000, generator=gen)
        h = memory.compensate("w", g)
        memory.update("w", h, q.decompress(q.compress(h)))
    assert float(memory.residuals["w"].norm()) < 20 * float(g.norm())  # about (n/k) |g|, not growing


def test_quantizers_never_import_torch_distributed() -> None:
    import ast
    import pathlib

    for path in pathlib.Path(quantizers.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("torch.distributed" in n for n in names), path


# ----- quantizers on a shared grid (summed by an all-reduce) -----


def _agree_and_sum(name: str, inputs: list[torch.Tensor], options: dict, seed_rounds: int = 0) -> torch.Tensor:
    """What the DDP hook does with N ranks, in one process: agree on the statistic, compress on the
    shared grid, sum the integer codes (in their wire dtype, as the all-reduce would) and decode."""
    from commcomp.quantizers.shared import SharedScaleQuantizer

    world = len(inputs)
    qs = [_make(name, options) for _ in range(world)]
    for r, q in enumerate(qs):
        assert isinstance(q, SharedScaleQuantizer)
        q.set_rank(r + 1000 * seed_rounds)
    stats = torch.stack([q.local_stats(x) for q, x in zip(qs, inputs)])
    agreed = stats.amax(0) if qs[0].agree_op == "max" else stats.sum(0)
    payloads = [q.compress_shared(x, agreed, world) for q, x in zip(qs, inputs)]
    summed = payloads[0].tensors[0].clone()
    for p in payloads[1:]:
        summed += p.tensors[0]  # wraps around on overflow, like the collective would
    return qs[0].decompress(quantizers.Payload([summed], payloads[0].shape, payloads[0].dtype, payloads[0].meta))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_ar_unbiased_average(bits: int) -> None:
    """Monte Carlo over the rounding noise: the decoded sum of N ranks' g_r / N is avg_r g_r."""
    world, n, trials = 4, 300, 1500
    gen = torch.Generator().manual_seed(bits)
    inputs = [torch.randn(n, generator=gen) * (r + 1) / world for r in range(world)]  # each rank sends g_r / N
    # T trials in one call per rank: tile the inputs so that every trial gets its own rounding noise
    tiled = [x.repeat(trials) for x in inputs]
    out = _agree_and_sum("qsgd_ar", tiled, {"bits": bits, "bucket_size": 100}).view(trials, n).double()
    target = sum(x.double() for x in inputs)
    s = 2 ** (bits - 1) - 1
    step = torch.stack(inputs).abs().view(world, -1, 100).amax((0, 2)).repeat_interleave(100).double() / s
    se = step * math.sqrt(world / 4 / trials)  # each rank's rounding: variance <= step^2 / 4
    assert ((out.mean(0) - target).abs() <= 5 * se + 1e-6).all()
    assert (out - target).abs().max() <= world * step.max() + 1e-5  # never more than one step per rank


@pytest.mark.parametrize(
    "world,bits,dtype",
    [
        (2, 8, torch.int32),
        (8, 4, torch.int8),
        (18, 4, torch.int8),
        (19, 4, torch.int32),
        (127, 2, torch.int8),
        (128, 2, torch.int32),
    ],
)
def test_shared_wire_dtype_is_the_narrowest_that_cannot_overflow(world: int, bits: int, dtype: torch.dtype) -> None:
    q = _make("qsgd_ar", {"bits": bits})
    x = torch.full((512,), 1.0)  # every value at the top level: the largest sum
    p = q.compress_shared(x, q.local_stats(x), world)
    assert p.tensors[0].dtype == dtype and p.nbytes == 512 * dtype.itemsize
    assert q.stats_bytes(1025) == 4 * 3
    summed = (p.tensors[0].long() * world).to(dtype)
    assert int(summed.max()) == world * q.levels  # no wrap-around


def test_sign_ar_is_a_majority_vote() -> None:
    inputs = [
        torch.tensor([1.0, -2.0, 3.0, 0.5]),
        torch.tensor([2.0, -1.0, -3.0, 0.5]),
        torch.tensor([-1.0, -1.0, -1.0, 1.0]),
    ]
    inputs = [x / 3 for x in inputs]  # each rank sends g / N
    out = _agree_and_sum("sign_ar", inputs, {"bucket_size": 4})
    m = sum(float(x.abs().mean()) for x in inputs)  # the ranks' mean magnitudes, averaged (summed g / N)
    assert torch.allclose(out, torch.tensor([m, -m, -m, m]))  # votes: +1, -3, -1, +3
    tie = _agree_and_sum("sign_ar", [torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 1.0])], {"bucket_size": 2})
    assert tie[0] == 0 and tie[1] > 0


def test_shared_quantizers_refuse_compress_without_agreement() -> None:
    for name in ("qsgd_ar", "sign_ar"):
        q = _make(name, {})
        assert q.linear
        with pytest.raises(RuntimeError, match="agrees on its grid"):
            q.compress(torch.randn(10))


@pytest.mark.parametrize("name,options", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_is_what_decompress_dropped(name: str, options: dict, dtype: torch.dtype) -> None:
    q = _make(name, options)
    x = torch.randn(3, 101).to(dtype)
    payload = q.compress(x)
    err = q.error(x, payload)
    assert err.dtype == dtype and err.shape == x.shape
    assert torch.equal(err, x - q.decompress(payload).to(dtype))


@pytest.mark.parametrize("name", ["qsgd_ar", "sign_ar"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_error_is_what_decompress_dropped(name: str, dtype: torch.dtype) -> None:
    """Also sign_ar's own chunked error: a partial last bucket, zeros and -0.0 votes included."""
    q = _make(name, {"bucket_size": 64})
    x = torch.randn(3, 101).to(dtype)
    x[0, :70] = 0.0
    x[1, 3] = -0.0
    payload = q.compress_shared(x, q.local_stats(x), 4)
    err = q.error(x, payload)
    assert err.dtype == dtype and err.shape == x.shape
    assert torch.equal(err, x - q.decompress(payload).to(dtype))


def _choco_consensus(scale: float, steps: int = 200, gamma: float = 0.05) -> float:
    """CHOCO-SGD's consensus (no gradients) on a ring of 4 with rescaled 10% rand-k, written out:
    x_i += gamma (s_i - x^_i); x^_i += a Q(x_i - x^_i). Returns the final distance to the average
    relative to the initial one."""
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(1000, generator=gen) for _ in range(4)]
    mean = sum(x) / 4
    xhat = [torch.zeros(1000) for _ in range(4)]
    qs = [RandK(ratio=0.1, seed=i) for i in range(4)]
    start = max(float((xi - mean).norm()) for xi in x)
    for _ in range(steps):
        s = [(xhat[i - 1] + xhat[i] + xhat[(i + 1) % 4]) / 3 for i in range(4)]
        x = [xi + gamma * (si - hi) for xi, si, hi in zip(x, s, xhat)]
        xhat = [h + scale * q.decompress(q.compress(xi - h)) for h, q, xi in zip(xhat, qs, x)]
    return max(float((xi - mean).norm()) for xi in x) / start


def test_randk_omega_makes_choco_contractive() -> None:
    """The review's case: rescaled rand-k inside CHOCO blows up (NaN within 200 steps). Its variance
    factor omega = 1/ratio - 1 lets CHOCO scale by 1 / (1 + omega), the unscaled form, which converges."""
    q = RandK(ratio=0.1)
    assert q.omega == pytest.approx(9.0) and RandK(k=5).omega is None and RandK(rescale=False).omega is None
    plain = _choco_consensus(1.0)
    assert not math.isfinite(plain) or plain > 1e6
    assert _choco_consensus(1.0 / (1.0 + q.omega)) < 0.05


def test_sign_treats_negative_zero_as_non_negative() -> None:
    x = torch.tensor([-0.0, 0.0, -1.0, 2.0])
    q = quantizers.get("sign", bucket_size=4)
    payload = q.compress(x)
    assert q.decompress(payload).tolist() == [0.75, 0.75, -0.75, 0.75]
    assert torch.equal(q.error(x, payload), x - q.decompress(payload))


@pytest.mark.parametrize("name,options", [("qsgd", {"bits": 8}), ("topk", {"ratio": 1.0}), ("sign", {})])
def test_hook_average_of_half_precision_ranks_does_not_overflow(name: str, options: dict) -> None:
    """The hook's own codec, as rank 0 of 4 without a process group: four fp16 gradients of about
    40,000 each decode to their average (the sum, 160,000, is beyond fp16; it was inf when the
    decoded fp16 tensors were summed before dividing)."""
    from benchmarks.codecs import _sim_state
    from commcomp.hooks.quantized import QuantizedExchange

    codecs = [QuantizedExchange(_sim_state(name, options, r, 4)) for r in range(4)]
    grads = [torch.full((64,), 40_000.0, dtype=torch.float16) + r for r in range(4)]
    sent = [c.encode(["w"], [g]) for c, g in zip(codecs, grads)]
    out = codecs[0].decode([e.parts[0] for e in sent], sent[0])[0]
    average = torch.stack([g.float() for g in grads]).mean(0)
    assert torch.isfinite(out).all() and torch.allclose(out.float(), average, rtol=2e-3), out[:4]
