"""The flatten helper and the cross-rank consistency pieces, in one process (the collectives that use
them are exercised across ranks by the hook, Horovod, PQASGD, gossip and MoE tests)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from commcomp.consistency import (
    bad_ranks,
    check_saved_options,
    flag_slots,
    has_nonfinite,
    joined,
    nonfinite_flag,
    options_digest,
    write_flags,
)
from commcomp.flat import flatten, unflatten


def test_unflatten_inverts_flatten_with_views() -> None:
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 1, 3), torch.randn(0)]
    flat = flatten(tensors)
    assert flat.shape == (sum(t.numel() for t in tensors),)
    back = unflatten(flat, [t.shape for t in tensors])
    for t, b in zip(tensors, back):
        assert torch.equal(t, b)
    flat.zero_()  # the pieces are views of the buffer, not copies
    assert all(int(torch.count_nonzero(b)) == 0 for b in back)
    assert flatten(tensors, torch.float64).dtype == torch.float64


def test_unflatten_refuses_a_wrong_length() -> None:
    with pytest.raises(ValueError, match="cannot cut 7 values"):
        unflatten(torch.zeros(7), [(2, 3)])


def test_digest_depends_on_every_option_but_not_on_key_order() -> None:
    a = {"quantizer": "qsgd", "bits": 4, "shape": (2, 3)}
    assert options_digest(a) == options_digest(dict(reversed(list(a.items()))))
    assert options_digest(a) != options_digest({**a, "bits": 8})
    assert 0 <= options_digest(a) < 2**56  # 7 bytes: fits an int64 tensor


def test_saved_options_name_the_keys_that_differ() -> None:
    check_saved_options("X", {"a": (1, 2), "b": torch.float16}, {"a": [1, 2], "b": "torch.float16"})
    with pytest.raises(ValueError, match=r"X.load_state_dict: .* different options \['b', 'c'\]"):
        check_saved_options("X", {"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0})


def test_flags_mark_the_bad_ranks_after_a_sum() -> None:
    world = 4
    per_rank = [[torch.ones(3)], [torch.tensor([1.0, float("nan")])], [torch.ones(2)], [torch.tensor([float("inf")])]]
    cpu = torch.device("cpu")
    summed = torch.stack([flag_slots(has_nonfinite(t), r, world, torch.float16, cpu) for r, t in enumerate(per_rank)])
    summed = summed.sum(0)
    assert bad_ranks(summed) == [1, 3]
    assert bad_ranks(torch.zeros(world)) == []
    # the flag as a tensor, written as it is into slots of any dtype (what the exchange engine does)
    for dtype in (torch.bfloat16, torch.int32, torch.uint8):
        slots = [
            write_flags(torch.full((world,), 7, dtype=dtype), nonfinite_flag(t), r) for r, t in enumerate(per_rank)
        ]
        assert bad_ranks(torch.stack(slots).sum(0)) == [1, 3]
    assert bad_ranks(write_flags(torch.ones(world), None, 2)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_check_matches_an_element_wise_check(dtype: torch.dtype) -> None:
    """The check agrees with `isfinite` element by element: extreme finite values (no false alarm
    once widened), +inf in one tensor with -inf in another, NaN alone or next to an infinity, mixed
    dtypes, empty tensors and integers."""
    big = torch.finfo(dtype).max
    gen = torch.Generator().manual_seed(0)
    cases = [
        [torch.full((4096,), big, dtype=dtype), torch.full((7,), -big, dtype=dtype)],
        [torch.randn(50, generator=gen).to(dtype), torch.tensor([float("inf")], dtype=dtype)],
        [torch.tensor([float("inf")], dtype=dtype), torch.tensor([float("-inf")], dtype=dtype)],
        [torch.randn(3, 5, generator=gen).to(dtype), torch.tensor([1.0, float("nan")], dtype=dtype)],
        [torch.randn(9, generator=gen).to(dtype), torch.arange(5)],
        [torch.tensor([float("nan")] * 3, dtype=dtype)],
        [torch.tensor([float("-inf"), float("nan"), 1.0], dtype=dtype)],
        [torch.full((3,), big, dtype=dtype), torch.full((2,), 1.0, dtype=torch.float64)],
        [torch.randn(2, 2, generator=gen).to(dtype), torch.tensor([float("nan")], dtype=torch.float32)],
        [torch.empty(0, dtype=dtype)],
        [],
    ]
    for tensors in cases:
        expected = not all(bool(torch.isfinite(t).all()) for t in tensors)
        assert has_nonfinite(tensors) == expected, tensors
        flag = nonfinite_flag(tensors)  # the same, as a tensor (None: nothing floating to check)
        floating = [t for t in tensors if t.is_floating_point() and t.numel()]
        assert (flag is None) == (not floating), tensors
        if flag is not None:
            assert flag.dtype == torch.bool and flag.shape == () and bool(flag) == expected, tensors


def test_joined_checks_keep_every_value_and_its_finiteness() -> None:
    """The step's late checks are read as one stacked tensor: mixed flags (bool) and extremes of any
    floating dtype keep their values, the largest finite ones included, so a finite value is never
    read as NaN/Inf and a flag stays 0 or 1."""
    values = [
        torch.tensor(True),
        torch.tensor(False),
        torch.tensor(torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16),
        torch.tensor(-torch.finfo(torch.float16).max, dtype=torch.float16),
        torch.tensor(torch.finfo(torch.float32).max),
        torch.tensor(1e300, dtype=torch.float64),
        torch.tensor(float("nan"), dtype=torch.bfloat16),
        torch.tensor(float("-inf"), dtype=torch.float16),
    ]
    for size in (1, 2, 3):
        for chosen in itertools.permutations(values, size):
            got = joined(list(chosen), torch.device("cpu")).tolist()
            for value, read in zip(chosen, got):
                want = float(value)
                assert math.isnan(read) if math.isnan(want) else read == want, (chosen, got)
