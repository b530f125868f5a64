import itertools

import pytest
import torch

from esam.losses import (HungarianMatcher, MaskBCECost, MaskDiceCost, QueryClassificationCost,
                         SparseMatcher)
from esam.losses import functional as LF
from esam.losses import matcher as matcher_module
from esam.structures import InstanceMasks


@pytest.fixture(params=["gemm", "pairs"])
def inside_sums(request, monkeypatch):
    """Run a sparse-matcher test with inside sums by GEMM and by gathering the allowed pairs."""
    monkeypatch.setattr(matcher_module, "_PAIR_MODE_MIN_WORK",
                        0 if request.param == "pairs" else float("inf"))
    return request.param


def _costs():
    return [QueryClassificationCost(0.5), MaskBCECost(1.0), MaskDiceCost(1.0)]


def _sample(q, k, p=30, seed=0, c=3):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(q, c + 1, generator=g)
    masks = torch.randn(q, p, generator=g) * 2
    ids = torch.randint(-1, k, (p,), generator=g) if k else torch.full((p,), -1)
    labels = torch.randint(0, c, (k,), generator=g)
    return cls, masks, labels, InstanceMasks(ids=ids, num_instances=k)


def _total_cost(cls, masks, labels, gt):
    return (0.5 * LF.class_cost(cls, labels) + LF.mask_bce_cost(masks, gt)
            + LF.mask_dice_cost(masks, gt))


@pytest.mark.parametrize("q,k", [(5, 3), (3, 5), (4, 4)])
def test_hungarian_is_minimum_cost(q, k):
    cls, masks, labels, gt = _sample(q, k, seed=q * 10 + k)
    (qi, ki), = HungarianMatcher(_costs())([cls], [masks], [labels], [gt])
    assert len(qi) == min(q, k)
    assert len(set(qi.tolist())) == len(qi) and len(set(ki.tolist())) == len(ki)
    cost = _total_cost(cls, masks, labels, gt)
    got = cost[qi, ki].sum().item()
    # brute force over every injective assignment
    best = float("inf")
    if q >= k:
        for perm in itertools.permutations(range(q), k):
            best = min(best, sum(cost[perm[j], j].item() for j in range(k)))
    else:
        for perm in itertools.permutations(range(k), q):
            best = min(best, sum(cost[j, perm[j]].item() for j in range(q)))
    assert got == pytest.approx(best, rel=1e-6)


def test_batched_equals_per_sample_and_empty_targets():
    samples = [_sample(6, 3, seed=1), _sample(4, 0, seed=2), _sample(5, 5, seed=3)]
    m = HungarianMatcher(_costs())
    batched = m(*[[s[i] for s in samples] for i in range(4)])
    for s, (qi, ki) in zip(samples, batched):
        (qi1, ki1), = m([s[0]], [s[1]], [s[2]], [s[3]])
        assert torch.equal(qi, qi1) and torch.equal(ki, ki1)
    assert batched[1][0].numel() == 0 and batched[1][0].dtype == torch.long


def test_matcher_runs_fp32_under_autocast():
    cls, masks, labels, gt = _sample(6, 3, seed=4)
    m = HungarianMatcher(_costs())
    cls, masks = cls.bfloat16(), masks.bfloat16()
    # the cost of bf16 inputs under autocast is the fp32 cost of the same (rounded) values
    ref = m._cost(cls.float(), masks.float(), labels, gt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m._cost(cls, masks, labels, gt)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_sparse_matcher_matches_loop(inside_sums):
    q, k = 12, 4
    cls, masks, labels, gt = _sample(q, k, seed=5)
    g = torch.Generator().manual_seed(6)
    qm = torch.rand(k, q, generator=g) > 0.5
    qm[0] = False  # an instance no query may match
    for topk in (1, 2):
        (qi, ki), = SparseMatcher(_costs(), topk=topk)([cls], [masks], [labels], [gt], [qm])
        cost = _total_cost(cls, masks, labels, gt)
        expected = set()
        for kk in range(k):
            allowed = sorted((cost[j, kk].item(), j) for j in range(q) if qm[kk, j])
            allowed = allowed + [(float("inf"), -1)] * (topk + 1)
            thresh = allowed[topk][0]
            expected |= {(j, kk) for c, j in allowed if j >= 0 and c < thresh}
        assert set(zip(qi.tolist(), ki.tolist())) == expected
        assert 0 not in ki.tolist()


def test_sparse_matcher_requires_query_masks_with_clear_error():
    cls, masks, labels, gt = _sample(5, 2)
    m = SparseMatcher(_costs())
    with pytest.raises(ValueError, match="query_masks"):
        m([cls], [masks], [labels], [gt])
    with pytest.raises(ValueError, match=r"query_masks\[0\]"):
        m([cls], [masks], [labels], [gt], [torch.ones(3, 5, dtype=torch.bool)])


def test_matcher_shape_errors():
    cls, masks, labels, gt = _sample(5, 2, p=30)
    m = HungarianMatcher(_costs())
    with pytest.raises(ValueError, match="mask_logits"):
        m([cls], [masks[:, :10]], [labels], [gt])
    with pytest.raises(ValueError, match="gt_labels"):
        m([cls], [masks], [labels[:1]], [gt])
    with pytest.raises(ValueError, match="costs"):
        HungarianMatcher([])


def test_sparse_matcher_skips_uncontested_rows_without_changing_the_result(inside_sums):
    q, k = 16, 5
    cls, masks, labels, gt = _sample(q, k, seed=9)
    qm = torch.zeros(k, q, dtype=torch.bool)
    qm[0, [0, 1, 2]] = True  # contested
    qm[1, 3] = True  # a single candidate: matched without a cost
    qm[2, [4, 5]] = True  # contested for topk=1, not for topk=2
    qm[4, [1, 6]] = True  # shares query 1 with instance 0
    for topk in (1, 2):
        m = SparseMatcher(_costs(), topk=topk)
        got = m([cls], [masks], [labels], [gt], [qm])[0]
        # the same matcher forced to cost every row (all instances contested)
        cost = _total_cost(cls, masks, labels, gt).masked_fill(~qm.T, float("inf"))
        kth = torch.topk(cost, topk + 1, dim=0, largest=False).values[-1:]
        ref = torch.argwhere(cost < kth)
        assert torch.equal(got[0], ref[:, 0]) and torch.equal(got[1], ref[:, 1])
    assert (3, 1) in set(zip(got[0].tolist(), got[1].tolist()))


def test_sparse_matcher_gathers_allowed_pairs_only_where_cheaper(monkeypatch):
    monkeypatch.setattr(matcher_module, "_PAIR_MODE_MIN_WORK", 0)
    q, k = 16, 5
    cls, masks, labels, gt = _sample(q, k, seed=9)
    one = torch.zeros(k, q, dtype=torch.bool)
    one[torch.arange(q) % k, torch.arange(q)] = True  # each query allowed for one instance
    _, sums = SparseMatcher(_costs())([cls], [masks], [labels], [gt], [one], return_sums=True)
    assert sums[0].pairs is not None and len(sums[0].pairs[0]) == q
    every = torch.ones(k, q, dtype=torch.bool)  # every pair allowed: a pass per pair costs more
    _, sums = SparseMatcher(_costs())([cls], [masks], [labels], [gt], [every], return_sums=True)
    assert sums[0].pairs is None
