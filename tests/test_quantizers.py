"""Single-process tests of the qsgd, topk, randk and sign quantizers, bit packing and error feedback."""

from __future__ import annotations

import math

import pytest
import torch

from commcomp import quantizers
from commcomp.error_feedback import ErrorFeedback
from commcomp.quantizers import pack_payloads, unpack_payloads
from commcomp.quantizers.packing import pack_bits, packed_nbytes, unpack_bits
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
    x, y = torch.randn(100), torch.randn(100)
    pa, pb = a.compress(x), b.compress(y)  # two "ranks": same coordinates from the shared seed
    assert torch.equal(pa.meta["indices"], pb.meta["indices"])
    assert torch.equal(
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
