"""Structures helpers: the finite-value check."""

from __future__ import annotations

import pytest
import torch

import esam.structures as structures
from esam.structures import InstanceMasks, check_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_huge_finite_values_whose_sum_overflows_pass(dtype):
    big = torch.finfo(dtype).max
    x = torch.full((64, 100), big, dtype=dtype)
    x[::2] = -big  # mixed signs too: partial sums may hit +inf and -inf
    check_finite([("x", x), ("y", torch.full((10,), big, dtype=dtype))])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_single_non_finite_value_is_named_even_among_huge_ones(dtype, bad):
    big = torch.finfo(dtype).max
    ok = torch.full((50,), big, dtype=dtype)
    x = torch.randn(37, 91).to(dtype)
    x[5, 17] = bad
    with pytest.raises(ValueError, match=r"^x: expected finite values, got 1 NaN/Inf of 3367"):
        check_finite([("ok", ok), ("x", x), ("z", torch.zeros(3, dtype=dtype))])
    check_finite([("ok", ok), ("x", x.nan_to_num(0.0))])


def test_integer_empty_and_none_entries_are_skipped():
    check_finite([("i", torch.arange(3)), ("e", torch.empty(0)), ("n", None)])


def test_tensors_requiring_grad_are_checked_without_touching_the_graph():
    x = torch.randn(4, 5, requires_grad=True)
    check_finite([("x", x)])
    assert x.grad is None
    with pytest.raises(ValueError, match="w: expected finite"):
        check_finite([("w", x * float("inf"))])


def _masks(encoding):
    ids = torch.tensor([2, -1, 0, 2, 1, 0, -1, 2, 4])
    if encoding == "ids":
        return InstanceMasks(ids=ids, num_instances=5), [[2, 5], [4], [0, 3, 7], [], [8]]
    dense = InstanceMasks(ids=ids, num_instances=5).to_dense()
    dense[3, [1, 2]] = True  # overlapping instances: only the dense encoding has them
    return InstanceMasks(dense=dense), [[2, 5], [4], [0, 3, 7], [1, 2], [8]]


@pytest.mark.parametrize("encoding", ["ids", "dense"])
def test_members_list_each_instances_positions_in_order(encoding):
    masks, expected = _masks(encoding)
    positions, starts, counts = masks.members()
    got = [positions[s:s + c].tolist() for s, c in zip(starts.tolist(), counts.tolist())]
    assert got == expected


@pytest.mark.parametrize("encoding", ["ids", "dense"])
def test_pair_positions_enumerate_every_member_of_every_pair(encoding):
    masks, members = _masks(encoding)
    rows, inst = torch.tensor([0, 3, 3, 1, 2]), torch.tensor([2, 0, 3, 3, 1])
    pair, flat = masks.pair_positions(rows, inst, row_stride=9)
    expected = [(a, r * 9 + i) for a, (r, k) in enumerate(zip(rows.tolist(), inst.tolist()))
                for i in members[k]]
    assert list(zip(pair.tolist(), flat.tolist())) == expected
    empty = masks.pair_positions(rows[:0], inst[:0], 9)
    assert empty[0].shape == empty[1].shape == (0,)


@pytest.mark.parametrize("encoding", ["ids", "dense"])
def test_pair_positions_are_the_same_with_int64_indices(encoding, monkeypatch):
    rows, inst = torch.tensor([0, 3, 3, 1, 2]), torch.tensor([2, 0, 3, 3, 1])
    small = _masks(encoding)[0].pair_positions(rows, inst, row_stride=9)
    monkeypatch.setattr(structures, "_INT32_LIMIT", 0)  # as if an index could overflow int32
    masks = _masks(encoding)[0]
    assert masks.members()[0].dtype == torch.int64
    wide = masks.pair_positions(rows, inst, row_stride=9)
    assert wide[0].dtype == wide[1].dtype == torch.int64 and small[0].dtype == torch.int32
    assert torch.equal(wide[0], small[0].long()) and torch.equal(wide[1], small[1])
