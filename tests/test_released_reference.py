"""Tests of the plain-tensor port of ESAM's released single-view losses.

Hand-computed values for each piece, loop-over-the-definition references on
random float64 inputs, the released quirks (normalisations, sparse matcher
thresholds, NaN on GT rows without matches) and gradcheck.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from benchmarks.released_reference import (
    axis_aligned_iou_loss,
    batch_dice_cost,
    batch_sigmoid_bce_cost,
    box_pred_to_box,
    box_to_corners,
    dice_loss_mean,
    mask_iou,
    query_classification_cost,
    released_instance_loss,
    released_instance_terms,
    released_match,
    released_mixed_instance_loss,
    released_mixed_instance_terms,
    released_semantic_loss,
)

DT = torch.float64


# --------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------
def make_inst(gen: torch.Generator, *, K: int, S: int, N: int, Q: int, C: int) -> dict:
    """Superpoint-level instances lifted to points; queries seeded on superpoints."""
    sp_of_point = torch.randint(0, S, (N,), generator=gen)  # (N,)
    sp_owner = torch.randint(-1, K, (S,), generator=gen)  # (S,) -1 = background
    sp_masks = sp_owner[None, :] == torch.arange(K)[:, None]  # (K, S)
    p_masks = sp_masks[:, sp_of_point]  # (K, N)
    query_sp = torch.randint(0, S, (Q,), generator=gen)  # (Q,)
    query_masks = sp_masks[:, query_sp]  # (K, Q)
    centre = torch.rand(K, 3, generator=gen, dtype=DT) * 4
    size = torch.rand(K, 3, generator=gen, dtype=DT) + 0.5
    return {
        "labels_3d": torch.randint(0, C, (K,), generator=gen),
        "sp_masks": sp_masks,
        "p_masks": p_masks,
        "bboxes_3d": torch.cat([centre, size], 1),
        "query_masks": query_masks,
    }


def make_layer(gen: torch.Generator, insts: list[dict], *, Q: int, C: int, level: str,
               with_scores: bool = True, with_boxes: bool = True) -> dict:
    """Logits loosely aligned with the GT so some matched IoUs exceed 0.5."""
    layer = {"cls_preds": [], "scores": [], "masks": [], "bboxes": [], "centers": []}
    for inst in insts:
        gt = inst["sp_masks"] if level == "SP" else inst["p_masks"]  # (K, n)
        K, n = gt.shape
        owner = torch.randint(0, max(K, 1), (Q,), generator=gen)
        base = torch.full((Q, n), -2.0, dtype=DT)
        if K:
            base = torch.where(gt[owner], 2.0, -2.0).to(DT)
        noise = torch.randn(Q, n, generator=gen, dtype=DT)
        layer["masks"].append(base + 1.5 * noise)
        layer["cls_preds"].append(torch.randn(Q, C + 1, generator=gen, dtype=DT))
        layer["scores"].append(torch.rand(Q, 1, generator=gen, dtype=DT) if with_scores else None)
        # Boxes near the owner's GT box so most matched pairs overlap partially.
        gt_box = inst["bboxes_3d"][owner] if K else torch.ones(Q, 6, dtype=DT)  # (Q, 6)
        offsets = 0.15 * torch.randn(Q, 3, generator=gen, dtype=DT)
        sizes = gt_box[:, 3:] * (0.7 + 0.6 * torch.rand(Q, 3, generator=gen, dtype=DT))
        layer["bboxes"].append(torch.cat([offsets, sizes], 1) if with_boxes else None)
        layer["centers"].append(gt_box[:, :3] + 0.15 * torch.randn(Q, 3, generator=gen, dtype=DT))
    return layer


def make_batch(seed: int, *, B: int = 2, K=(3, 2), S: int = 7, N: int = 12, Q: int = 6,
               C: int = 3, modes=("SP", "P"), with_scores: bool = True, with_boxes: bool = True):
    gen = torch.Generator().manual_seed(seed)
    insts = [make_inst(gen, K=K[b], S=S, N=N, Q=Q, C=C) for b in range(B)]
    pred = make_layer(gen, insts, Q=Q, C=C, level="P", with_scores=with_scores, with_boxes=with_boxes)
    pred["aux_outputs"] = [
        make_layer(gen, insts, Q=Q, C=C, level=mode, with_scores=with_scores, with_boxes=with_boxes)
        for mode in modes]
    return pred, insts, list(modes)


# --------------------------------------------------------------------------
# Loop-over-the-definition reference (Python floats, pair by pair, point by point)
# --------------------------------------------------------------------------
def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _bce(x: float, g: float) -> float:
    return max(x, 0.0) - x * g + math.log1p(math.exp(-abs(x)))


def _box_iou_loop(a: list[float], b: list[float]) -> float:
    """a, b: (cx, cy, cz, sx, sy, sz)."""
    overlap, vol_a, vol_b = 1.0, 1.0, 1.0
    for axis in range(3):
        lo_a, hi_a = a[axis] - a[axis + 3] / 2, a[axis] + a[axis + 3] / 2
        lo_b, hi_b = b[axis] - b[axis + 3] / 2, b[axis] + b[axis + 3] / 2
        overlap *= max(min(hi_a, hi_b) - max(lo_a, lo_b), 0.0)
        vol_a *= hi_a - lo_a
        vol_b *= hi_b - lo_b
    return overlap / max(vol_a + vol_b - overlap, 1e-6)


def loop_layer_terms(layer, insts, indices, gt_key, *, num_classes, non_object_weight,
                     final_layer, fix_dice, fix_mean, with_boxes=True):
    B = len(insts)
    weights = [1.0] * num_classes + [non_object_weight]
    cls_sum = 0.0
    bce_list, dice_list, score_list, box_list = [], [], [], []
    for b in range(B):
        logits = layer["cls_preds"][b].tolist()
        Q = len(logits)
        target = [num_classes] * Q
        q_ids, g_ids = indices[b]
        for q, g in zip(q_ids.tolist(), g_ids.tolist()):
            target[q] = int(insts[b]["labels_3d"][g])
        num = den = 0.0
        for j in range(Q):
            lse = math.log(sum(math.exp(v) for v in logits[j]))
            num += weights[target[j]] * (lse - logits[j][target[j]])
            den += weights[target[j]]
        cls_sum += num / den
        if len(insts[b]["labels_3d"]) == 0:
            continue
        masks = layer["masks"][b].tolist()
        gts = insts[b][gt_key].to(DT).tolist()
        pairs = list(zip(q_ids.tolist(), g_ids.tolist()))
        n = len(masks[0])
        bce = sum(_bce(masks[q][i], gts[g][i]) for q, g in pairs for i in range(n))
        bce_list.append(bce / (len(pairs) * n) if pairs else float("nan"))
        dice = []
        for q, g in pairs:
            p = [_sigmoid(v) for v in masks[q]]
            inter = sum(pi * gi for pi, gi in zip(p, gts[g]))
            dice.append(1 - (2 * inter + 1) / (sum(p) + sum(gts[g]) + 1))
        dice_list.append(sum(dice) / len(dice) if dice else float("nan"))
        if with_boxes and layer["bboxes"][b] is not None:
            boxes = []
            for q, g in pairs:
                off = layer["bboxes"][b][q].tolist()
                ctr = layer["centers"][b][q].tolist()
                pred_box = [ctr[0] + off[0], ctr[1] + off[1], ctr[2] + off[2]] + off[3:6]
                boxes.append(1 - _box_iou_loop(pred_box, insts[b]["bboxes_3d"][g].tolist()))
            box_list.append(sum(boxes) / len(boxes) if boxes else float("nan"))
        if layer["scores"][b] is not None:
            sq = []
            for q, g in pairs:
                pred_bin = [1.0 if v >= 0 else 0.0 for v in masks[q]]
                inter = sum(pb * gi for pb, gi in zip(pred_bin, gts[g]))
                union = sum(pred_bin) + sum(gts[g]) - inter
                # The released get_iou computes in float32 whatever the input dtype.
                iou = float(np.float32(inter) / (np.float32(union) + np.float32(1e-6)))
                if iou > 0.5:
                    sq.append((float(layer["scores"][b][q, 0]) - iou) ** 2)
            if sq:
                score_list.append(sum(sq) / len(sq))
    terms = {"cls": cls_sum / B, "score": sum(score_list) / B, "bbox": sum(box_list) / B}
    if bce_list:
        bce = sum(bce_list) / B
        dice = sum(dice_list) / (B if not final_layer else 1)
        if fix_dice:
            dice = dice / B * 4
        if fix_mean:
            bce = bce * B / len(bce_list)
            dice = dice * B / len(dice_list)
    else:
        bce = dice = 0.0
    terms.update(bce=bce, dice=dice)
    if not with_boxes:
        del terms["bbox"]
    return terms


def _match(layer, insts, gt_key, **kw):
    return [released_match(layer["cls_preds"][b], layer["masks"][b], inst["labels_3d"], inst[gt_key],
                           query_masks=inst["query_masks"], **kw) for b, inst in enumerate(insts)]


def _assert_terms_close(got: dict, want: dict, tol: float = 1e-9):
    assert set(got) == set(want)
    for name in want:
        assert float(got[name]) == pytest.approx(want[name], rel=tol, abs=tol), name


# --------------------------------------------------------------------------
# Pairwise costs
# --------------------------------------------------------------------------
def test_bce_cost_equals_triple_loop():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 9, generator=gen, dtype=DT)
    targets = torch.rand(4, 9, generator=gen, dtype=DT)
    targets[:2] = (targets[:2] > 0.5).to(DT)  # binary and soft rows
    cost = batch_sigmoid_bce_cost(logits, targets)
    assert cost.shape == (5, 4)
    for q in range(5):
        for k in range(4):
            want = sum(_bce(float(logits[q, i]), float(targets[k, i])) for i in range(9)) / 9
            assert float(cost[q, k]) == pytest.approx(want, rel=1e-12)


def test_dice_and_class_costs_equal_loops():
    gen = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(4, 7, generator=gen, dtype=DT)
    targets = (torch.rand(3, 7, generator=gen) > 0.4).to(DT)
    cost = batch_dice_cost(logits, targets)
    for q in range(4):
        p = [_sigmoid(float(v)) for v in logits[q]]
        for k in range(3):
            g = targets[k].tolist()
            want = 1 - (2 * sum(a * b for a, b in zip(p, g)) + 1) / (sum(p) + sum(g) + 1)
            assert float(cost[q, k]) == pytest.approx(want, rel=1e-12)
    cls_logits = torch.randn(4, 3, generator=gen, dtype=DT)
    labels = torch.tensor([2, 0, 2])
    cls_cost = query_classification_cost(cls_logits, labels)
    for q in range(4):
        z = sum(math.exp(v) for v in cls_logits[q].tolist())
        for k, lab in enumerate(labels.tolist()):
            assert float(cls_cost[q, k]) == pytest.approx(-math.exp(float(cls_logits[q, lab])) / z)


# --------------------------------------------------------------------------
# Matched-pair pieces, hand values
# --------------------------------------------------------------------------
def test_perfect_mask_gives_near_zero_bce_and_dice():
    gt = torch.tensor([[True, False, True, True, False, False]])
    logits = torch.where(gt, 30.0, -30.0).to(DT)
    assert float(torch.nn.functional.binary_cross_entropy_with_logits(logits, gt.to(DT))) < 1e-12
    huge = torch.where(gt, 1e4, -1e4).to(DT)
    dice = dice_loss_mean(huge, gt.to(DT))
    assert torch.isfinite(dice) and abs(float(dice)) < 1e-12
    assert float(mask_iou(huge, gt)) == pytest.approx(1.0, abs=1e-6)


def test_perfect_query_is_matched_and_bce_term_is_near_zero():
    gt = torch.tensor([[True, True, False, False, True, False, False, False]])
    masks = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), dtype=DT)
    masks[1] = torch.where(gt[0], 30.0, -30.0)
    inst = {"labels_3d": torch.tensor([0]), "sp_masks": gt, "p_masks": gt,
            "bboxes_3d": torch.tensor([[0.0, 0, 0, 1, 1, 1]], dtype=DT)}
    pred = {"cls_preds": [torch.zeros(3, 2, dtype=DT)], "scores": [None], "masks": [masks],
            "bboxes": [None], "centers": [torch.zeros(3, 3, dtype=DT)]}
    terms = released_mixed_instance_terms(pred, [inst], [], matcher="hungarian")[-1]
    assert float(terms["bce"]) < 1e-12
    assert float(terms["dice"]) < 1e-12
    q_ids, g_ids = released_match(pred["cls_preds"][0], masks, inst["labels_3d"], gt,
                                  matcher="hungarian", topk=1, cost_weights=(0.5, 1, 1))
    assert q_ids.tolist() == [1] and g_ids.tolist() == [0]


def test_quarter_size_box_inside_another_has_iou_quarter():
    outer = torch.tensor([[0.0, 0, 0, 2, 2, 2]], dtype=DT)
    inner = torch.tensor([[0.0, 0, 0, 1, 1, 2]], dtype=DT)
    assert float(axis_aligned_iou_loss(inner, outer)) == pytest.approx(0.75)
    # Through the released box parametrisation: centre + offset, size.
    centre = torch.tensor([[0.25, 0.5, 1.0]], dtype=DT)
    box_pred = torch.tensor([[0.25, 0.0, 0.0, 1.0, 1.0, 2.0]], dtype=DT)
    pred_box = box_pred_to_box(centre, box_pred)
    assert pred_box.tolist() == [[0.5, 0.5, 1.0, 1.0, 1.0, 2.0]]
    gt_box = torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]], dtype=DT)
    assert box_to_corners(gt_box).tolist() == outer.tolist()
    assert float(axis_aligned_iou_loss(box_to_corners(pred_box), box_to_corners(gt_box))) == pytest.approx(0.75)


def test_box_iou_disjoint_and_empty():
    a = torch.tensor([[0.0, 0, 0, 1, 1, 1]], dtype=DT)
    b = torch.tensor([[2.0, 2, 2, 3, 3, 3]], dtype=DT)
    assert float(axis_aligned_iou_loss(a, b)) == 1.0
    empty = torch.zeros(0, 6, dtype=DT)
    assert torch.isnan(axis_aligned_iou_loss(empty, empty))
    assert box_pred_to_box(torch.zeros(0, 3), empty) is empty


def test_mask_iou_hand_value():
    logits = torch.tensor([[5.0, 5.0, -5.0, 5.0]])
    gt = torch.tensor([[True, False, False, True]])
    # intersection 2, union 3
    assert float(mask_iou(logits, gt)) == pytest.approx(2 / 3, rel=1e-6)


# --------------------------------------------------------------------------
# Matchers
# --------------------------------------------------------------------------
def test_hungarian_equals_brute_force():
    gen = torch.Generator().manual_seed(3)
    for trial in range(5):
        Q, K, N = 4, 3, 6
        cls_logits = torch.randn(Q, 3, generator=gen, dtype=DT)
        masks = torch.randn(Q, N, generator=gen, dtype=DT)
        gt = torch.rand(K, N, generator=gen) > 0.5
        labels = torch.randint(0, 2, (K,), generator=gen)
        q_ids, g_ids = released_match(cls_logits, masks, labels, gt, matcher="hungarian",
                                      topk=1, cost_weights=(0.5, 1.0, 1.0))
        assert q_ids.dtype == torch.long and g_ids.dtype == torch.long
        cost = (0.5 * query_classification_cost(cls_logits, labels)
                + batch_sigmoid_bce_cost(masks, gt.to(DT)) + batch_dice_cost(masks, gt.to(DT)))
        best = min(sum(float(cost[perm[k], k]) for k in range(K))
                   for perm in itertools.permutations(range(Q), K))
        got = sum(float(cost[q, k]) for q, k in zip(q_ids.tolist(), g_ids.tolist()))
        assert len(q_ids) == K and got == pytest.approx(best, rel=1e-12)
        assert q_ids.tolist() == sorted(q_ids.tolist())  # scipy returns rows in order


def _cls_only_case(probs_label0: list[float]):
    """Queries whose class-0 probability is given; cost_weights (1, 0, 0) so cost = -prob."""
    p = torch.tensor(probs_label0, dtype=DT)
    cls_logits = torch.stack([torch.log(p), torch.log(1 - p)], 1)  # (Q, 2)
    masks = torch.zeros(len(p), 4, dtype=DT)
    return cls_logits, masks


def test_sparse_top1_picks_cheapest_allowed_query_per_gt():
    cls_logits, masks = _cls_only_case([0.9, 0.6, 0.8, 0.3])
    labels = torch.tensor([0, 0])
    gt = torch.zeros(2, 4, dtype=torch.bool)
    # GT 0 may use queries 1, 2, 3 (not the globally cheapest query 0); GT 1 only queries 0, 3.
    query_masks = torch.tensor([[False, True, True, True], [True, False, False, True]])
    q_ids, g_ids = released_match(cls_logits, masks, labels, gt, matcher="sparse", topk=1,
                                  cost_weights=(1.0, 0.0, 0.0), query_masks=query_masks)
    assert sorted(zip(q_ids.tolist(), g_ids.tolist())) == [(0, 1), (2, 0)]
    # topk = 2 keeps the two cheapest allowed queries of each GT, row-major order.
    q_ids, g_ids = released_match(cls_logits, masks, labels, gt, matcher="sparse", topk=2,
                                  cost_weights=(1.0, 0.0, 0.0), query_masks=query_masks)
    assert list(zip(q_ids.tolist(), g_ids.tolist())) == [(0, 1), (1, 0), (2, 0), (3, 1)]


def test_sparse_quirks_ties_no_allowed_and_shared_query():
    labels = torch.tensor([0, 0])
    gt = torch.zeros(2, 4, dtype=torch.bool)
    # Tie at the minimum: (topk+1)-th smallest equals the minimum, nothing is strictly below.
    cls_logits, masks = _cls_only_case([0.7, 0.7, 0.2, 0.1])
    qm = torch.tensor([[True, True, True, True], [False, False, False, False]])
    q_ids, g_ids = released_match(cls_logits, masks, labels, gt, matcher="sparse", topk=1,
                                  cost_weights=(1.0, 0.0, 0.0), query_masks=qm)
    assert q_ids.numel() == 0 and g_ids.numel() == 0  # GT 0 tied, GT 1 has no allowed query
    # One query may match several GTs.
    cls_logits, masks = _cls_only_case([0.9, 0.2, 0.1, 0.3])
    qm = torch.ones(2, 4, dtype=torch.bool)
    q_ids, g_ids = released_match(cls_logits, masks, labels, gt, matcher="sparse", topk=1,
                                  cost_weights=(1.0, 0.0, 0.0), query_masks=qm)
    assert q_ids.tolist() == [0, 0] and g_ids.tolist() == [0, 1]


def test_sparse_q_not_above_topk_matches_nothing():
    labels = torch.tensor([0])
    gt = torch.zeros(1, 4, dtype=torch.bool)
    for probs, topk in (([0.9], 1), ([0.9, 0.1], 2), ([0.9, 0.1], 5)):
        cls_logits, masks = _cls_only_case(probs)
        qm = torch.ones(1, len(probs), dtype=torch.bool)
        q_ids, _ = released_match(cls_logits, masks, labels, gt, matcher="sparse", topk=topk,
                                  cost_weights=(1.0, 0.0, 0.0), query_masks=qm)
        assert q_ids.numel() == 0
    cls_logits, masks = _cls_only_case([0.9, 0.1])
    q_ids, _ = released_match(cls_logits, masks, labels, gt, matcher="sparse", topk=1,
                              cost_weights=(1.0, 0.0, 0.0), query_masks=torch.ones(1, 2, dtype=torch.bool))
    assert q_ids.tolist() == [0]


def test_match_with_no_gt_is_empty_long():
    for matcher in ("hungarian", "sparse"):
        q_ids, g_ids = released_match(torch.randn(4, 3), torch.randn(4, 5), torch.zeros(0, dtype=torch.long),
                                      torch.zeros(0, 5, dtype=torch.bool), matcher=matcher, topk=1,
                                      cost_weights=(0.5, 1, 1))
        assert q_ids.shape == (0,) and g_ids.shape == (0,) and q_ids.dtype == torch.long


# --------------------------------------------------------------------------
# Full criteria against the loop reference
# --------------------------------------------------------------------------
@pytest.mark.parametrize("matcher", ["hungarian", "sparse"])
@pytest.mark.parametrize("iter_matcher", [True, False])
@pytest.mark.parametrize("fixes", [(True, True), (False, False), (True, False)])
def test_mixed_terms_equal_loop_reference(matcher, iter_matcher, fixes):
    fix_dice, fix_mean = fixes
    pred, insts, modes = make_batch(10, B=3, K=(3, 0, 2), C=2)
    kw = dict(num_classes=2, non_object_weight=0.1, fix_dice_loss_weight=fix_dice,
              iter_matcher=iter_matcher, fix_mean_loss=fix_mean, matcher=matcher, topk=1,
              cost_weights=(0.5, 1.0, 1.0))
    layers = released_mixed_instance_terms(pred, insts, modes, **kw)
    assert len(layers) == len(modes) + 1
    mkw = dict(matcher=matcher, topk=1, cost_weights=(0.5, 1.0, 1.0))
    final_idx = _match(pred, insts, "p_masks", **mkw)
    ref = dict(num_classes=2, non_object_weight=0.1, fix_dice=fix_dice, fix_mean=fix_mean)
    want_final = loop_layer_terms(pred, insts, final_idx, "p_masks", final_layer=True, **ref)
    if not any(math.isnan(v) for v in want_final.values()):
        _assert_terms_close(layers[-1], want_final)
    else:
        assert all(math.isnan(float(layers[-1][k])) == math.isnan(v) for k, v in want_final.items())
    for i, mode in enumerate(modes):
        key = "sp_masks" if mode == "SP" else "p_masks"
        idx = _match(pred["aux_outputs"][i], insts, key, **mkw) if iter_matcher else final_idx
        want = loop_layer_terms(pred["aux_outputs"][i], insts, idx, key, final_layer=False, **ref)
        got = layers[i]
        for name, value in want.items():
            if math.isnan(value):
                assert math.isnan(float(got[name])), name
            else:
                assert float(got[name]) == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_total_is_sum_of_weighted_terms_and_four_weights_drop_bbox():
    pred, insts, modes = make_batch(11, B=2, K=(3, 2), C=1)
    weights = (0.5, 1.0, 1.0, 0.5, 0.5)
    kw = dict(matcher="hungarian", num_classes=1)
    total = released_mixed_instance_loss(pred, insts, modes, loss_weight=weights, **kw)
    layers = released_mixed_instance_terms(pred, insts, modes, loss_weight=weights, **kw)
    want = sum(w * float(t[n]) for t in layers for w, n in zip(weights, ("cls", "bce", "dice", "score", "bbox")))
    assert float(total) == pytest.approx(want, rel=1e-12)
    assert all(float(t["bbox"]) > 0 for t in layers)
    four = released_mixed_instance_loss(pred, insts, modes, loss_weight=weights[:4], **kw)
    zero_box = released_mixed_instance_loss(pred, insts, modes, loss_weight=weights[:4] + (0.0,), **kw)
    assert float(four) == pytest.approx(float(zero_box), rel=1e-12)
    assert float(four) < float(total)


def test_final_dice_lacks_the_aux_one_over_b():
    """An aux layer identical to the final one (mode "P") has Dice = final Dice / B."""
    for B in (2, 3):
        pred, insts, _ = make_batch(12, B=B, K=(2, 3, 1)[:B], modes=())
        pred["aux_outputs"] = [{k: v for k, v in pred.items() if k != "aux_outputs"}]
        for fix_dice, fix_mean in ((True, True), (False, False)):
            layers = released_mixed_instance_terms(pred, insts, ["P"], matcher="hungarian",
                                                   fix_dice_loss_weight=fix_dice, fix_mean_loss=fix_mean,
                                                   num_classes=3)
            aux, final = layers
            assert float(aux["dice"]) * B == pytest.approx(float(final["dice"]), rel=1e-12)
            for name in ("cls", "bce", "score", "bbox"):
                assert float(aux[name]) == pytest.approx(float(final[name]), rel=1e-12)


def test_fix_mean_loss_divides_by_samples_with_gt_rows():
    pred, insts, _ = make_batch(13, B=2, K=(3, 0), modes=(), C=2)
    common = dict(matcher="hungarian", num_classes=2, fix_dice_loss_weight=False)
    fixed = released_mixed_instance_terms(pred, insts, [], fix_mean_loss=True, **common)[-1]
    plain = released_mixed_instance_terms(pred, insts, [], fix_mean_loss=False, **common)[-1]
    assert float(fixed["bce"]) == pytest.approx(2 * float(plain["bce"]), rel=1e-12)
    assert float(fixed["dice"]) == pytest.approx(2 * float(plain["dice"]), rel=1e-12)
    # fix_dice_loss_weight: / B * 4 on top.
    dice4 = released_mixed_instance_terms(pred, insts, [], fix_mean_loss=False, matcher="hungarian",
                                          num_classes=2, fix_dice_loss_weight=True)[-1]["dice"]
    assert float(dice4) == pytest.approx(float(plain["dice"]) / 2 * 4, rel=1e-12)


def test_sample_with_gt_rows_but_no_match_is_nan():
    pred, insts, modes = make_batch(14, B=2, K=(2, 2), C=1)
    insts[1]["query_masks"] = torch.zeros_like(insts[1]["query_masks"])
    layers = released_mixed_instance_terms(pred, insts, modes, matcher="sparse", num_classes=1)
    for terms in layers:
        assert math.isnan(float(terms["bce"])) and math.isnan(float(terms["dice"]))
        assert math.isnan(float(terms["bbox"]))
        assert math.isfinite(float(terms["cls"])) and math.isfinite(float(terms["score"]))
    assert math.isnan(float(released_mixed_instance_loss(pred, insts, modes, num_classes=1)))
    # No GT rows at all is not NaN: the released Python-int 0 fallbacks.
    empty = [dict(inst, labels_3d=inst["labels_3d"][:0], sp_masks=inst["sp_masks"][:0],
                  p_masks=inst["p_masks"][:0], bboxes_3d=inst["bboxes_3d"][:0],
                  query_masks=inst["query_masks"][:0]) for inst in insts]
    layers = released_mixed_instance_terms(pred, empty, modes, num_classes=1)
    for terms in layers:
        assert float(terms["cls"]) > 0
        assert all(float(terms[n]) == 0.0 for n in ("bce", "dice", "score", "bbox"))


def test_unmatched_queries_get_no_object_class_with_weighted_mean_ce():
    cls = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 3.0]], dtype=DT)
    gt = torch.tensor([[True, False, True, False]])
    masks = torch.tensor([[9.0, -9, 9, -9], [-9.0, 9, -9, 9], [-9.0, -9, -9, -9]], dtype=DT)
    inst = {"labels_3d": torch.tensor([1]), "sp_masks": gt, "p_masks": gt,
            "bboxes_3d": torch.zeros(1, 6, dtype=DT)}
    pred = {"cls_preds": [cls], "scores": [None], "masks": [masks], "bboxes": [None],
            "centers": [torch.zeros(3, 3, dtype=DT)]}
    terms = released_mixed_instance_terms(pred, [inst], [], matcher="hungarian", num_classes=2,
                                          non_object_weight=0.1)[-1]
    ce = [-torch.log_softmax(cls[j], 0)[t].item() for j, t in enumerate((1, 2, 2))]
    want = (ce[0] + 0.1 * ce[1] + 0.1 * ce[2]) / 1.2
    assert float(terms["cls"]) == pytest.approx(want, rel=1e-12)


def test_class_agnostic_labels_are_zeroed():
    pred, insts, modes = make_batch(15, B=2, K=(2, 3), C=1)
    shifted = [dict(inst, labels_3d=inst["labels_3d"] + 7) for inst in insts]
    a = released_mixed_instance_loss(pred, insts, modes, num_classes=1)
    b = released_mixed_instance_loss(pred, shifted, modes, num_classes=1)
    assert float(a) == float(b)


def test_score_term_only_uses_pairs_with_iou_above_half():
    gt = torch.tensor([[True, True, False, False], [False, False, True, True]])
    # Query 0 reproduces GT 0 (IoU 1); query 1 hits one of GT 1's two points plus one wrong one (IoU 1/3).
    masks = torch.tensor([[5.0, 5, -5, -5], [-5.0, 5, 5, -5]], dtype=DT)
    scores = torch.tensor([[0.25], [0.0]], dtype=DT)
    inst = {"labels_3d": torch.tensor([0, 0]), "sp_masks": gt, "p_masks": gt,
            "bboxes_3d": torch.zeros(2, 6, dtype=DT)}
    pred = {"cls_preds": [torch.zeros(2, 2, dtype=DT)], "scores": [scores], "masks": [masks],
            "bboxes": [None], "centers": [torch.zeros(2, 3, dtype=DT)]}
    terms = released_mixed_instance_terms(pred, [inst], [], matcher="hungarian")[-1]
    assert float(terms["score"]) == pytest.approx((0.25 - 1.0) ** 2, rel=1e-5)


def test_instance_criterion_equals_loop_reference():
    pred, insts, _ = make_batch(16, B=2, K=(3, 2), C=2, modes=("SP", "SP"), with_boxes=False)
    # InstanceCriterion scores every layer against superpoint masks: use SP-level final masks.
    gen = torch.Generator().manual_seed(99)
    final = make_layer(gen, insts, Q=6, C=2, level="SP", with_boxes=False)
    final["aux_outputs"] = pred["aux_outputs"]
    layers = released_instance_terms(final, insts, num_classes=2, matcher="hungarian")
    mkw = dict(matcher="hungarian", topk=1, cost_weights=(0.5, 1.0, 1.0))
    ref = dict(num_classes=2, non_object_weight=0.1, fix_dice=True, fix_mean=False, with_boxes=False)
    for i, layer in enumerate(final["aux_outputs"] + [final]):
        idx = _match(layer, insts, "sp_masks", **mkw)
        want = loop_layer_terms(layer, insts, idx, "sp_masks", final_layer=(i == 2), **ref)
        _assert_terms_close(layers[i], want)
    total = released_instance_loss(final, insts, num_classes=2)
    weights = (0.5, 1.0, 1.0, 0.5)
    assert float(total) == pytest.approx(
        sum(w * float(t[n]) for t in layers for w, n in zip(weights, ("cls", "bce", "dice", "score"))))


def test_mixed_loss_gradcheck():
    pred, insts, modes = make_batch(17, B=2, K=(2, 1), S=3, N=4, Q=3, C=1, modes=("SP",))
    leaves = []

    def collect(layer):
        for key in ("cls_preds", "masks", "scores", "bboxes"):
            layer[key] = [t.clone().requires_grad_(True) for t in layer[key]]
            leaves.extend(layer[key])

    collect(pred)
    for layer in pred["aux_outputs"]:
        collect(layer)

    def fn(*tensors):
        it = iter(tensors)
        def rebuild(layer):
            out = dict(layer)
            for key in ("cls_preds", "masks", "scores", "bboxes"):
                out[key] = [next(it) for _ in layer[key]]
            return out
        new = rebuild(pred)
        new["aux_outputs"] = [rebuild(layer) for layer in pred["aux_outputs"]]
        return released_mixed_instance_loss(new, insts, modes, matcher="hungarian", num_classes=1)

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-5, fast_mode=True)


def test_float32_and_float64_agree():
    pred, insts, modes = make_batch(18, B=2, K=(2, 3), C=1)
    f64 = released_mixed_instance_loss(pred, insts, modes, num_classes=1)

    def to32(layer):
        return {k: ([t.float() if t is not None else None for t in v] if k != "aux_outputs" else v)
                for k, v in layer.items()}

    pred32 = to32(pred)
    pred32["aux_outputs"] = [to32(layer) for layer in pred["aux_outputs"]]
    insts32 = [dict(inst, bboxes_3d=inst["bboxes_3d"].float()) for inst in insts]
    f32 = released_mixed_instance_loss(pred32, insts32, modes, num_classes=1)
    assert f32.dtype == torch.float32
    assert float(f32) == pytest.approx(float(f64), rel=1e-4)


# --------------------------------------------------------------------------
# Semantic criterion
# --------------------------------------------------------------------------
def test_semantic_loss_equals_loop_and_drops_last_column():
    gen = torch.Generator().manual_seed(20)
    C, weight = 4, 0.5
    preds, masks, per_sample = [], [], []
    for S in (6, 5):
        logits = torch.randn(S, C + 1, generator=gen, dtype=DT)
        counts = torch.randint(0, 5, (C + 1, S), generator=gen)
        counts[:, 0] = 0
        counts[C, 0] = 3  # superpoint 0 is unlabeled -> ignored
        preds.append(logits)
        masks.append(counts)
        total = n = 0.0
        for s in range(S):
            target = int(torch.argmax(counts[:, s].float()))
            if target == C:
                continue
            row = logits[s, :C].tolist()
            total += math.log(sum(math.exp(v) for v in row)) - row[target]
            n += 1
        per_sample.append(total / n)
    got = released_semantic_loss(preds, masks, ignore_index=C, loss_weight=weight)
    assert float(got) == pytest.approx(weight * sum(per_sample) / 2, rel=1e-12)
    # ignore_index < 0 keeps all C + 1 columns and ignores nothing.
    full = released_semantic_loss(preds, masks, ignore_index=-100, loss_weight=1.0)
    want = sum(torch.nn.functional.cross_entropy(p, m.float().argmax(0)).item()
               for p, m in zip(preds, masks)) / 2
    assert float(full) == pytest.approx(want, rel=1e-12)


def test_semantic_all_ignored_sample_is_nan():
    logits = torch.randn(3, 3, dtype=DT)
    masks = torch.zeros(3, 3)
    masks[2] = 1  # every superpoint unlabeled
    assert math.isnan(float(released_semantic_loss([logits], [masks], ignore_index=2)))


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
def test_clear_errors():
    pred, insts, modes = make_batch(21, B=2, K=(2, 1))
    with pytest.raises(ValueError, match="mask_pred_mode"):
        released_mixed_instance_loss(pred, insts, ["SP", "X"])
    with pytest.raises(ValueError, match="mask_pred_mode"):
        released_mixed_instance_loss(pred, insts, ["SP"])
    with pytest.raises(ValueError, match="B = 1"):
        released_mixed_instance_loss(pred, insts[:1], modes)
    with pytest.raises(ValueError, match="loss_weight"):
        released_mixed_instance_loss(pred, insts, modes, loss_weight=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="query_masks"):
        released_mixed_instance_loss(pred, [{k: v for k, v in i.items() if k != "query_masks"}
                                            for i in insts], modes)
    with pytest.raises(ValueError, match="p_masks"):
        released_mixed_instance_loss(pred, [{k: v for k, v in i.items() if k != "p_masks"}
                                            for i in insts], modes)
    with pytest.raises(ValueError, match="matcher"):
        released_match(torch.randn(2, 2), torch.randn(2, 3), torch.tensor([0]),
                       torch.ones(1, 3, dtype=torch.bool), matcher="greedy", topk=1, cost_weights=(1, 1, 1))
    with pytest.raises(ValueError, match="gt_masks"):
        released_match(torch.randn(2, 2), torch.randn(2, 3), torch.tensor([0]),
                       torch.ones(1, 4, dtype=torch.bool), matcher="hungarian", topk=1, cost_weights=(1, 1, 1))
    with pytest.raises(ValueError, match="sem_preds"):
        released_semantic_loss([torch.randn(3, 4)], [torch.zeros(4, 2)], ignore_index=3)
