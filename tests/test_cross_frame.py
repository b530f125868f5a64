"""Tests for the cross-frame loss L_tdt (esam.losses.cross_frame)."""
from __future__ import annotations

import math

import pytest
import torch

from esam.losses.cross_frame import (
    CrossFrameCriterion,
    consistency_loss,
    instance_identity_targets,
    mask_iou_targets,
    match_bce_loss,
)
from esam.models.tdt import TimeDividedTransformer

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one intra-op thread is faster and immune to oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- references
def _voxel_set(mask_row: torch.Tensor, points: torch.Tensor, voxel_size: float) -> set[tuple[int, int, int]]:
    voxels = set()
    for n in range(points.shape[0]):
        if float(mask_row[n]) >= 0.0:
            voxels.add(tuple(math.floor(float(c) / voxel_size) for c in points[n]))
    return voxels


def _ref_mask_iou_targets(ma, pa, mb, pb, voxel_size, thr):
    out = torch.zeros(ma.shape[0], mb.shape[0], dtype=torch.bool)
    sets_a = [_voxel_set(ma[i], pa, voxel_size) for i in range(ma.shape[0])]
    sets_b = [_voxel_set(mb[j], pb, voxel_size) for j in range(mb.shape[0])]
    for i, sa in enumerate(sets_a):
        for j, sb in enumerate(sets_b):
            union = len(sa | sb)
            iou = len(sa & sb) / union if union else 0.0
            out[i, j] = iou > thr
    return out


def _log_sigmoid(x: float) -> float:
    # log sigmoid(x) = -log(1 + exp(-x)), written stably for either sign.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _ref_match_bce(logits, targets, reduction="sum", pos_weight=None):
    w = 1.0 if pos_weight is None else pos_weight
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            x, g = float(logits[i, j].detach()), float(targets[i, j])
            total += -(w * g * _log_sigmoid(x) + (1.0 - g) * _log_sigmoid(-x))
            count += 1
    if reduction == "mean":
        return total / count if count else 0.0
    return total


def _ref_consistency(a, b, pairs=None, reduction="sum"):
    if pairs is None:
        pairs = [(i, i) for i in range(a.shape[0])]
    dists = []
    for i, j in pairs:
        dists.append(sum((float(a[i, c].detach()) - float(b[j, c].detach())) ** 2 for c in range(a.shape[1])))
    if not dists:
        return 0.0
    return sum(dists) / len(dists) if reduction == "mean" else sum(dists)


# --------------------------------------------------------------------------- mask_iou_targets
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thr", [0.1, 0.5])
def test_mask_iou_targets_matches_loop(seed, thr):
    g = torch.Generator().manual_seed(seed)
    voxel_size = 0.2
    # A small room (coarse grid, negative coordinates) so that voxel sets overlap often.
    pa = torch.rand(40, 3, generator=g, dtype=DTYPE) * 1.0 - 0.5
    pb = torch.rand(35, 3, generator=g, dtype=DTYPE) * 1.0 - 0.5
    ma = torch.randn(6, 40, generator=g, dtype=DTYPE)
    mb = torch.randn(5, 35, generator=g, dtype=DTYPE)
    # Make query 0 of frame b cover exactly the points of frame a's query 0 (copied points).
    pb[:10] = pa[:10]
    ma[0] = -1.0
    ma[0, :10] = 1.0
    mb[0] = -1.0
    mb[0, :10] = 1.0
    got = mask_iou_targets(ma, pa, mb, pb, voxel_size=voxel_size, iou_threshold=thr)
    ref = _ref_mask_iou_targets(ma, pa, mb, pb, voxel_size, thr)
    assert got.dtype == torch.bool and got.shape == (6, 5)
    assert torch.equal(got, ref)
    assert got[0, 0]
    assert ref.any() and not ref.all()  # the case is not degenerate


def test_mask_iou_targets_hand_cases():
    vs = 0.1
    # Frame a: 4 voxels along x, two points each (voxel k holds x in [0.1k, 0.1k + 0.1)).
    pa = torch.tensor([[0.01 + 0.1 * k + 0.05 * s, 0.02, 0.03] for k in range(4) for s in range(2)], dtype=DTYPE)
    # Frame b: different points, same voxels 0..3, plus voxel 7 (far away).
    pb = torch.tensor([[0.03 + 0.1 * k, 0.07, 0.01] for k in range(4)] + [[0.75, 0.05, 0.05]], dtype=DTYPE)
    ma = torch.full((3, 8), -5.0, dtype=DTYPE)
    ma[0] = 5.0  # voxels {0, 1, 2, 3}
    ma[1, :2] = 0.0  # voxel {0}; logit 0 means probability 0.5, inside the mask
    ma[2, 0:4] = 3.0  # voxels {0, 1}
    mb = torch.full((4, 5), -5.0, dtype=DTYPE)
    mb[0, :4] = 2.0  # voxels {0, 1, 2, 3}: same voxels as a0, other points -> IoU 1
    mb[1, 4] = 2.0  # voxel {7}: disjoint from everything
    mb[2, 0] = 2.0  # voxel {0}: IoU with a2 = 1/2, exactly at the threshold
    # mb[3] is empty
    got = mask_iou_targets(ma, pa, mb, pb, voxel_size=vs, iou_threshold=0.5)
    expected = torch.tensor(
        [
            [True, False, False, False],  # a0 vs b2: 1/4
            [False, False, True, False],  # a1 == b2 == {0}
            [False, False, False, False],  # a2 vs b2: exactly 0.5, strict > -> not positive
        ]
    )
    assert torch.equal(got, expected)
    assert mask_iou_targets(ma, pa, mb, pb, voxel_size=vs, iou_threshold=0.49)[2, 2]
    assert not got.requires_grad


def test_mask_iou_targets_floor_not_truncation():
    # -0.01 and +0.01 lie in different voxels (floor), not both in voxel 0 (truncation).
    pa = torch.tensor([[-0.01, 0.0, 0.0]], dtype=DTYPE)
    pb = torch.tensor([[0.01, 0.0, 0.0]], dtype=DTYPE)
    one = torch.ones(1, 1, dtype=DTYPE)
    assert not mask_iou_targets(one, pa, one, pb, voxel_size=0.05)[0, 0]
    assert mask_iou_targets(one, pa, one, pa + 0.005, voxel_size=0.05)[0, 0]


def test_mask_iou_targets_empty_and_no_grad():
    p = torch.rand(7, 3, dtype=DTYPE)
    m = torch.randn(3, 7, dtype=DTYPE, requires_grad=True)
    assert mask_iou_targets(m, p, torch.zeros(0, 7, dtype=DTYPE), p).shape == (3, 0)
    assert mask_iou_targets(torch.zeros(0, 7, dtype=DTYPE), p, m, p).shape == (0, 3)
    no_points = torch.zeros(0, 3, dtype=DTYPE)
    got = mask_iou_targets(torch.zeros(2, 0, dtype=DTYPE), no_points, torch.zeros(4, 0, dtype=DTYPE), no_points)
    assert got.shape == (2, 4) and not got.any()
    out = mask_iou_targets(m, p, m, p)
    assert not out.requires_grad
    # All-negative masks are empty sets: never positive, even against themselves.
    neg = -torch.ones(3, 7, dtype=DTYPE)
    assert not mask_iou_targets(neg, p, neg, p).any()


def test_mask_iou_targets_errors():
    p = torch.rand(5, 3)
    with pytest.raises(ValueError, match="points_a"):
        mask_iou_targets(torch.zeros(2, 5), torch.rand(5, 2), torch.zeros(2, 5), p)
    with pytest.raises(ValueError, match="mask_logits_b"):
        mask_iou_targets(torch.zeros(2, 5), p, torch.zeros(2, 4), p)
    with pytest.raises(ValueError, match="voxel_size"):
        mask_iou_targets(torch.zeros(2, 5), p, torch.zeros(2, 5), p, voxel_size=0.0)


# --------------------------------------------------------------------------- instance ids
def test_instance_identity_targets_matches_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-1, 4, (9,), generator=g)
    b = torch.randint(-1, 4, (7,), generator=g)
    got = instance_identity_targets(a, b)
    for i in range(9):
        for j in range(7):
            assert bool(got[i, j]) == (int(a[i]) >= 0 and int(a[i]) == int(b[j]))
    minus = torch.full((3,), -1)
    assert not instance_identity_targets(minus, minus).any()
    assert instance_identity_targets(torch.zeros(0, dtype=torch.long), b).shape == (0, 7)
    with pytest.raises(ValueError, match="ids_a"):
        instance_identity_targets(torch.zeros(2, 2, dtype=torch.long), b)


# --------------------------------------------------------------------------- match BCE
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("pos_weight", [None, 3.0])
def test_match_bce_matches_loop(reduction, pos_weight):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, generator=g, dtype=DTYPE) * 4
    targets = torch.rand(5, 4, generator=g, dtype=DTYPE) > 0.6
    got = match_bce_loss(logits, targets, reduction=reduction, pos_weight=pos_weight)
    ref = _ref_match_bce(logits, targets, reduction, pos_weight)
    assert got.item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    none = match_bce_loss(logits, targets, reduction="none", pos_weight=pos_weight)
    assert none.shape == (5, 4)
    assert none[2, 1].item() == pytest.approx(_ref_match_bce(logits[2:3, 1:2], targets[2:3, 1:2], "sum", pos_weight))


def test_match_bce_ordering_and_huge_logits():
    targets = torch.eye(3, dtype=torch.bool)
    good = torch.where(targets, 5.0, -5.0).double()
    assert match_bce_loss(good, targets) < match_bce_loss(-good, targets)
    huge = (torch.where(targets, 1e4, -1e4).double() * torch.tensor([[1.0], [-1.0], [1.0]], dtype=DTYPE))
    huge.requires_grad_(True)
    loss = match_bce_loss(huge, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(huge.grad).all()
    # Row 1 is confidently wrong on all three entries: about 3e4.
    assert loss.item() == pytest.approx(3e4, rel=1e-6)


def test_match_bce_empty_keeps_graph():
    for shape in [(0, 4), (3, 0), (0, 0)]:
        logits = torch.zeros(shape, dtype=DTYPE, requires_grad=True)
        for reduction in ("sum", "mean"):
            loss = match_bce_loss(logits, torch.zeros(shape, dtype=torch.bool), reduction=reduction)
            assert loss.item() == 0.0 and loss.requires_grad
            loss.backward()
            assert logits.grad is not None and logits.grad.shape == shape


def test_match_bce_errors():
    with pytest.raises(ValueError, match="targets"):
        match_bce_loss(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="match_logits"):
        match_bce_loss(torch.zeros(6), torch.zeros(6))
    with pytest.raises(ValueError, match="reduction"):
        match_bce_loss(torch.zeros(2, 2), torch.zeros(2, 2), reduction="avg")


# --------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_consistency_matches_loop(reduction):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 3, generator=g, dtype=DTYPE)
    b = torch.randn(5, 3, generator=g, dtype=DTYPE)
    assert consistency_loss(a, b, reduction=reduction).item() == pytest.approx(
        _ref_consistency(a, b, None, reduction), rel=1e-12
    )
    c = torch.randn(4, 3, generator=g, dtype=DTYPE)
    pairs = [(0, 3), (4, 0), (2, 2)]
    got = consistency_loss(a, c, pairs=torch.tensor(pairs), reduction=reduction)
    assert got.item() == pytest.approx(_ref_consistency(a, c, pairs, reduction), rel=1e-12)


def test_consistency_empty_and_errors():
    a = torch.randn(3, 4, dtype=DTYPE, requires_grad=True)
    b = torch.randn(2, 4, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="Q_a == Q_b"):
        consistency_loss(a, b)
    loss = consistency_loss(a, b, pairs=torch.zeros(0, 2, dtype=torch.long), reduction="mean")
    assert loss.item() == 0.0
    loss.backward()
    assert a.grad is not None and b.grad is not None
    with pytest.raises(ValueError, match="pairs"):
        consistency_loss(a, b, pairs=torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="pairs"):
        consistency_loss(a, b, pairs=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same d"):
        consistency_loss(a, torch.randn(3, 5))
    empty = torch.zeros(0, 4, dtype=DTYPE, requires_grad=True)
    assert consistency_loss(empty, empty).item() == 0.0


# --------------------------------------------------------------------------- criterion
def _sequence(q_per_frame, d=4, seed=3, positive_rate=0.3):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(q, d, generator=g, dtype=DTYPE, requires_grad=True) for q in q_per_frame]
    logits = [
        (torch.randn(a, b, generator=g, dtype=DTYPE) * 3).requires_grad_(True)
        for a, b in zip(q_per_frame[:-1], q_per_frame[1:])
    ]
    targets = [torch.rand(a, b, generator=g) < positive_rate for a, b in zip(q_per_frame[:-1], q_per_frame[1:])]
    return logits, feats, targets


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("consistency", ["slot", "matched"])
def test_criterion_matches_loop(reduction, consistency):
    qs = [4, 4, 4, 4] if consistency == "slot" else [4, 3, 5, 2]
    logits, feats, targets = _sequence(qs)
    crit = CrossFrameCriterion(
        match_weight=0.7, cons_weight=0.2, reduction=reduction, pos_weight=2.0, consistency=consistency
    )
    out = crit(logits, feats, targets)
    v = len(feats)
    ref_match = sum(_ref_match_bce(logits[t], targets[t], reduction, 2.0) for t in range(v - 1)) / (v - 1)
    ref_cons = 0.0
    for t in range(v - 1):
        pairs = None
        if consistency == "matched":
            pairs = [(i, j) for i in range(qs[t]) for j in range(qs[t + 1]) if targets[t][i, j]]
        ref_cons += _ref_consistency(feats[t], feats[t + 1], pairs, reduction)
    ref_cons /= v - 1
    assert out["loss_match"].item() == pytest.approx(ref_match, rel=1e-12)
    assert out["loss_cons"].item() == pytest.approx(ref_cons, rel=1e-12)
    assert out["loss"].item() == pytest.approx(0.7 * ref_match + 0.2 * ref_cons, rel=1e-12)
    # function == module for one pair
    assert crit(logits[:1], feats[:2], targets[:1])["loss_match"].item() == pytest.approx(
        match_bce_loss(logits[0], targets[0], reduction=reduction, pos_weight=2.0).item(), rel=1e-12
    )


def test_criterion_gradcheck():
    logits, feats, targets = _sequence([3, 3, 3], d=2)
    crit = CrossFrameCriterion(match_weight=0.5, cons_weight=1.5, pos_weight=2.0)

    def fn(l0, l1, f0, f1, f2):
        return crit([l0, l1], [f0, f1, f2], targets)["loss"]

    assert torch.autograd.gradcheck(fn, (*logits, *feats))
    crit_matched = CrossFrameCriterion(consistency="matched", reduction="mean")

    def fn_matched(*x):
        return crit_matched(list(x[:2]), list(x[2:]), targets)["loss"]

    assert torch.autograd.gradcheck(fn_matched, (*logits, *feats))


def test_criterion_single_frame_zero_with_graph():
    f = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    out = CrossFrameCriterion()([], [f], [])
    for key in ("loss", "loss_match", "loss_cons"):
        assert out[key].item() == 0.0 and out[key].requires_grad
    out["loss"].backward()
    assert f.grad is not None and torch.equal(f.grad, torch.zeros_like(f))


def test_criterion_empty_frame():
    logits, feats, targets = _sequence([3, 0, 2], d=4)
    crit = CrossFrameCriterion(consistency="matched", reduction="mean")
    out = crit(logits, feats, targets)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)
    # Pairs with an empty frame contribute 0 to the sums but still count in 1/(V-1).
    assert out["loss_match"].item() == pytest.approx(0.0)


def test_criterion_huge_logits_finite():
    logits, feats, targets = _sequence([3, 3])
    big = (torch.sign(logits[0].detach()) * 1e4).requires_grad_(True)
    out = CrossFrameCriterion(reduction="mean")([big], feats, targets)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(big.grad).all()


def test_criterion_validation():
    logits, feats, targets = _sequence([3, 3, 3])
    crit = CrossFrameCriterion()
    with pytest.raises(ValueError, match="V - 1"):
        crit(logits[:1], feats, targets)
    with pytest.raises(ValueError, match="V - 1"):
        crit(logits, feats, targets[:1])
    with pytest.raises(ValueError, match=r"match_logits\[1\]"):
        crit([logits[0], logits[1].T[:2]], feats, targets)
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        crit(logits, feats, [targets[0][:2], targets[1]])
    with pytest.raises(ValueError, match=r"features\[2\]"):
        crit(logits, [feats[0], feats[1], torch.randn(3, 5, dtype=DTYPE)], targets)
    with pytest.raises(ValueError, match="V >= 1"):
        crit([], [], [])
    with pytest.raises(ValueError, match="Q_a == Q_b"):
        crit(*_sequence([3, 2])[:2], _sequence([3, 2])[2])
    for kwargs in ({"reduction": "none"}, {"consistency": "all"}, {"gt_source": "boxes"}, {"voxel_size": -1.0}):
        with pytest.raises(ValueError):
            CrossFrameCriterion(**kwargs)


def test_build_targets():
    g = torch.Generator().manual_seed(5)
    points = [torch.rand(20, 3, generator=g, dtype=DTYPE) for _ in range(3)]
    masks = [torch.randn(q, 20, generator=g, dtype=DTYPE) for q in (3, 4, 2)]
    crit = CrossFrameCriterion(voxel_size=0.3, iou_threshold=0.2)
    targets = crit.build_targets(mask_logits=masks, points=points)
    assert [tuple(t.shape) for t in targets] == [(3, 4), (4, 2)]
    for t in range(2):
        ref = _ref_mask_iou_targets(masks[t], points[t], masks[t + 1], points[t + 1], 0.3, 0.2)
        assert torch.equal(targets[t], ref)
    ids = [torch.tensor([0, 1, -1]), torch.tensor([1, 1, 2, -1]), torch.tensor([2, 0])]
    inst = CrossFrameCriterion(gt_source="instance").build_targets(instance_ids=ids)
    assert torch.equal(inst[0], instance_identity_targets(ids[0], ids[1]))
    assert torch.equal(inst[1], instance_identity_targets(ids[1], ids[2]))
    with pytest.raises(ValueError, match="mask_logits and points"):
        crit.build_targets(instance_ids=ids)
    with pytest.raises(ValueError, match="instance_ids"):
        CrossFrameCriterion(gt_source="instance").build_targets(mask_logits=masks, points=points)


# --------------------------------------------------------------------------- with the transformer
def _tiny_tdt(seed=0):
    torch.manual_seed(seed)
    return TimeDividedTransformer(d_model=4, num_heads=2, num_layers=2, ffn_dim=6, geometry_hidden=3).double().eval()


def _tdt_inputs(q_per_frame, d=4, seed=7):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(q, d, generator=g, dtype=DTYPE) for q in q_per_frame]
    boxes = []
    for q in q_per_frame:
        centre = torch.rand(q, 3, generator=g, dtype=DTYPE) * 2
        size = torch.rand(q, 3, generator=g, dtype=DTYPE) * 0.5 + 0.1
        boxes.append(torch.cat([centre, size], dim=1))
    return feats, boxes


def test_loss_through_transformer_reaches_every_parameter():
    model = _tiny_tdt()
    feats, boxes = _tdt_inputs([3, 3, 3])
    updated, logits = model.forward_sequence(feats, boxes)
    targets = [torch.eye(3, dtype=torch.bool), torch.rand(3, 3, generator=torch.Generator().manual_seed(1)) < 0.5]
    loss = CrossFrameCriterion()(logits, updated, targets)["loss"]
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


class _Sequence(torch.nn.Module):
    """Exposes forward_sequence as forward so that functional_call can swap the parameters."""

    def __init__(self, tdt: TimeDividedTransformer) -> None:
        super().__init__()
        self.tdt = tdt

    def forward(self, features, geometry):
        return self.tdt.forward_sequence(features, geometry)


def test_gradcheck_through_transformer_parameters():
    wrapper = _Sequence(_tiny_tdt())
    feats, boxes = _tdt_inputs([2, 3, 2])
    targets = [torch.tensor([[True, False, False], [False, False, True]]), torch.tensor([[1, 0], [0, 0], [0, 1]]) > 0]
    crit = CrossFrameCriterion(consistency="matched", pos_weight=2.0)
    names = [n for n, _ in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in wrapper.parameters())
    feats_in = tuple(f.clone().requires_grad_(True) for f in feats)

    def fn(*args):
        param_values = dict(zip(names, args[: len(names)]))
        updated, logits = torch.func.functional_call(wrapper, param_values, (list(args[len(names):]), boxes))
        return crit(logits, updated, targets)["loss"]

    # Every parameter tensor in fast mode (a random directional derivative), the inputs in full.
    assert torch.autograd.gradcheck(fn, (*params, *feats_in), fast_mode=True)
    assert torch.autograd.gradcheck(lambda *f: fn(*params, *f), feats_in)
