"""Tests of `esam.evaluation`: ScanNet instance AP and semantic mIoU.

Hand cases work the numbers out from the ScanNet benchmark's algorithm; random scenes are
compared with a plain loop re-implementation of that algorithm (sets of point indices, one GT
instance and one prediction at a time, AP by the benchmark's convolution of recall steps).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import esam.evaluation.instance as instance_module
from esam.evaluation import (
    IOU_THRESHOLDS,
    InstanceEvaluator,
    SemanticMeter,
    average_precision,
    confusion_matrix,
    evaluate_instances,
    precision_recall_curve,
    semantic_miou,
)

IGNORE = 255


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------

def make_gt(n: int, instances: dict[int, tuple[list[int], int]],
            semantic_default: int = IGNORE) -> dict:
    """GT of n points; instances: id -> (point indices, class); other points: semantic_default."""
    ids = torch.full((n,), -1, dtype=torch.int64)
    sem = torch.full((n,), semantic_default, dtype=torch.int64)
    labels = torch.full((max(instances, default=-1) + 1,), -1, dtype=torch.int64)
    for gid, (points, cls) in instances.items():
        ids[points] = gid
        sem[points] = cls
        labels[gid] = cls
    return {"instance_ids": ids, "semantic": sem, "instance_labels": labels}


def make_pred(n: int, masks: list[list[int]], labels: list[int], scores: list[float]) -> dict:
    m = torch.zeros(len(masks), n, dtype=torch.bool)
    for j, points in enumerate(masks):
        m[j, points] = True
    return {"masks": m, "labels": torch.tensor(labels, dtype=torch.int64).view(-1),
            "scores": torch.tensor(scores, dtype=torch.float32).view(-1)}


def r(a: int, b: int) -> list[int]:
    return list(range(a, b))


# ----------------------------------------------------------------------------------------------
# Plain re-implementation of the benchmark, loop by loop
# ----------------------------------------------------------------------------------------------

def reference_curve_ap(y_true: list[int], y_score: list[float], hard_fn: int) -> float:
    """The benchmark's PR curve and AP, written out with Python loops and np.convolve."""
    order = np.argsort(np.asarray(y_score, dtype=np.float64), kind="stable")
    scores = np.asarray(y_score, dtype=np.float64)[order]
    trues = np.asarray(y_true, dtype=np.float64)[order]
    total_true = trues.sum()
    precision, recall = [], []
    for i in range(len(scores)):
        if i > 0 and scores[i] == scores[i - 1]:
            continue  # one point per distinct confidence
        before = trues[:i].sum()
        tp = total_true - before
        fp = (len(scores) - i) - tp
        fn = before + hard_fn
        precision.append(tp / (tp + fp))
        recall.append(tp / (tp + fn))
    precision.append(1.0)  # the artificial first point of the curve
    recall.append(0.0)
    recall_padded = np.concatenate([[recall[0]], recall, [0.0]])
    step = np.convolve(recall_padded, [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, step))


def reference_evaluate(preds, gts, *, class_ids, min_region_size, class_agnostic):
    """ScanNet instance AP by the benchmark's loops; returns the (C, T) table and class values."""
    scenes = []
    for s, (pred, gt) in enumerate(zip(preds, gts)):
        ids = gt["instance_ids"].tolist()
        sem = gt["semantic"].tolist()
        inst_labels = gt["instance_labels"].tolist()
        n = len(ids)
        gt_list = []
        for gid in sorted({i for i in ids if i >= 0}):
            cls = inst_labels[gid]
            if class_ids is not None and cls not in class_ids:
                continue
            points = {i for i in range(n) if ids[i] == gid}
            gt_list.append({"label": 0 if class_agnostic else cls, "points": points,
                            "size": len(points), "pairs": []})
        in_instance = set().union(*[g["points"] for g in gt_list]) if gt_list else set()
        if class_ids is not None:
            void = {i for i in range(n) if sem[i] not in class_ids}
        else:
            void = set(range(n)) - in_instance
        pred_list = []
        masks = pred["masks"].tolist()
        for j in range(len(masks)):
            points = {i for i in range(n) if masks[j][i]}
            if len(points) < max(min_region_size, 1):
                continue
            cls = int(pred["labels"][j])
            if not class_agnostic and class_ids is not None and cls not in class_ids:
                continue
            p = {"key": (s, j), "label": 0 if class_agnostic else cls,
                 "score": float(pred["scores"][j]), "size": len(points),
                 "void": len(points & void), "pairs": []}
            for g in gt_list:
                if g["label"] != p["label"]:
                    continue
                inter = len(points & g["points"])
                if inter > 0:
                    p["pairs"].append((g, inter))
                    g["pairs"].append((p, inter))
            pred_list.append(p)
        scenes.append((gt_list, pred_list))

    if class_agnostic:
        classes = [0]
    elif class_ids is not None:
        classes = list(class_ids)
    else:
        classes = sorted({g["label"] for gl, _ in scenes for g in gl}
                         | {p["label"] for _, pl in scenes for p in pl})
    table = np.zeros((len(classes), len(IOU_THRESHOLDS)))
    for ti, th in enumerate(IOU_THRESHOLDS):
        claimed = set()
        for ci, cls in enumerate(classes):
            y_true, y_score, hard_fn = [], [], 0
            has_gt = has_pred = False
            for gt_list, pred_list in scenes:
                big = [g for g in gt_list if g["label"] == cls and g["size"] >= min_region_size]
                mine = [p for p in pred_list if p["label"] == cls]
                has_gt |= bool(big)
                has_pred |= bool(mine)
                for g in big:
                    best = None
                    for p, inter in g["pairs"]:
                        if p["key"] in claimed:
                            continue
                        if inter / (g["size"] + p["size"] - inter) > th:
                            if best is None:
                                best = p["score"]
                                claimed.add(p["key"])
                            else:
                                y_true.append(0)
                                y_score.append(min(best, p["score"]))
                                best = max(best, p["score"])
                    if best is None:
                        hard_fn += 1
                    else:
                        y_true.append(1)
                        y_score.append(best)
                for p in mine:
                    if any(inter / (g["size"] + p["size"] - inter) > th for g, inter in p["pairs"]):
                        continue
                    ignored = p["void"] + sum(inter for g, inter in p["pairs"]
                                              if g["size"] < min_region_size)
                    if ignored / p["size"] <= th:
                        y_true.append(0)
                        y_score.append(p["score"])
            if has_gt and has_pred:
                table[ci, ti] = reference_curve_ap(y_true, y_score, hard_fn) if y_score else 0.0
            elif has_gt:
                table[ci, ti] = 0.0
            else:
                table[ci, ti] = math.nan
    return table, classes


def random_scenes(rng: random.Random, num_scenes: int, class_ids: list[int]):
    preds, gts = [], []
    for _ in range(num_scenes):
        n = rng.randint(30, 70)
        perm = list(range(n))
        rng.shuffle(perm)
        instances, cursor = {}, 0
        gid = rng.randint(0, 2)
        for _ in range(rng.randint(0, 5)):
            size = rng.randint(1, 12)
            if cursor + size > n - 5:
                break
            # Classes outside class_ids (7) make GT instances that are not scored.
            instances[gid] = (sorted(perm[cursor:cursor + size]), rng.choice(class_ids + [7]))
            cursor += size
            gid += rng.randint(1, 2)
        gt = make_gt(n, instances, semantic_default=IGNORE)
        # Some unlabeled points carry a scored class without an instance: not void.
        for i in perm[cursor:]:
            if rng.random() < 0.3:
                gt["semantic"][i] = rng.choice(class_ids)
        masks, labels, scores = [], [], []
        gt_items = list(instances.values())
        for _ in range(rng.randint(0, 8)):
            kind = rng.random()
            if gt_items and kind < 0.5:  # a noisy copy of a GT instance
                points, cls = rng.choice(gt_items)
                pts = {i for i in points if rng.random() < 0.85}
                pts |= {rng.randrange(n) for _ in range(rng.randint(0, 3))}
                label = cls if rng.random() < 0.8 else rng.choice(class_ids + [9])
            elif len(gt_items) >= 2 and kind < 0.7:  # spans two GT instances (ambiguous at 0.25)
                (pa, ca), (pb, _) = rng.sample(gt_items, 2)
                pts = set(pa) | set(pb)
                label = ca
            else:  # anywhere, often on void points
                pts = {rng.randrange(n) for _ in range(rng.randint(0, 12))}
                label = rng.choice(class_ids)
            masks.append(sorted(pts))
            labels.append(label)
            scores.append(rng.choice([0.1, 0.3, 0.5, 0.7, 0.9]))  # ties on purpose
        preds.append(make_pred(n, masks, labels, scores))
        gts.append(gt)
    return preds, gts


def assert_table_close(result: dict, reference: np.ndarray) -> None:
    table = result["ap_table"].numpy()
    assert table.shape == reference.shape
    assert np.array_equal(np.isnan(table), np.isnan(reference))
    np.testing.assert_allclose(np.nan_to_num(table), np.nan_to_num(reference), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Thresholds and the curve
# ----------------------------------------------------------------------------------------------

def test_thresholds_are_the_benchmarks():
    # np.arange(0.5, 0.95, 0.05) stops before 0.95: nine thresholds 0.50..0.90, then 0.25.
    assert len(IOU_THRESHOLDS) == 10
    np.testing.assert_allclose(IOU_THRESHOLDS[:9], [0.5 + 0.05 * i for i in range(9)])
    assert IOU_THRESHOLDS[9] == 0.25


def test_high_score_false_positive_gives_precision_half():
    # One GT; a true positive at 0.5 and a false positive at 0.9. At the lowest threshold both
    # count: precision 1/2, recall 1. At 0.9 only the false positive: precision 0, recall 0.
    precision, recall = precision_recall_curve(torch.tensor([0.5, 0.9]),
                                               torch.tensor([True, False]))
    torch.testing.assert_close(precision, torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(recall, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    # Trapezoids: (1 - 0) * (0.5 + 0) / 2 + (0 - 0) * (0 + 1) / 2 = 0.25.
    assert average_precision(torch.tensor([0.5, 0.9]), torch.tensor([True, False])) == 0.25
    # Swapped scores: the false positive comes after full recall; AP 1.
    assert average_precision(torch.tensor([0.9, 0.5]), torch.tensor([True, False])) == 1.0


def test_curve_counts_missed_instances_and_ties():
    # Two detections tied at 0.5 (one true) and 1 missed GT: a single point p = 1/2, r = 1/2.
    precision, recall = precision_recall_curve(torch.tensor([0.5, 0.5]),
                                               torch.tensor([False, True]), 1)
    torch.testing.assert_close(precision, torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(recall, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([False, True]), 1) == 0.375
    assert average_precision(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 3) == 0.0


def test_average_precision_matches_convolution_reference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        e = int(torch.randint(1, 30, (1,), generator=gen))
        scores = torch.randint(0, 6, (e,), generator=gen).double() / 5  # many ties
        is_tp = torch.rand(e, generator=gen, dtype=torch.float64) < 0.5
        fn = int(torch.randint(0, 4, (1,), generator=gen))
        if int(is_tp.sum()) + fn == 0:
            fn = 1
        expected = reference_curve_ap(is_tp.long().tolist(), scores.tolist(), fn)
        assert average_precision(scores, is_tp, fn) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Instance AP: hand cases
# ----------------------------------------------------------------------------------------------

def two_instance_gt() -> dict:
    # 30 points: instance 0 (class 3) on 0..9, instance 1 (class 4) on 10..19, 20..29 void.
    return make_gt(30, {0: (r(0, 10), 3), 1: (r(10, 20), 4)})


def test_perfect_predictions():
    pred = make_pred(30, [r(0, 10), r(10, 20)], [3, 4], [0.9, 0.8])
    out = evaluate_instances([pred], [two_instance_gt()], class_ids=[3, 4], min_region_size=1,
                             class_names=["chair", "table"])
    assert (out["ap"], out["ap50"], out["ap25"]) == (1.0, 1.0, 1.0)
    assert out["per_class"] == {"chair": {"ap": 1.0, "ap50": 1.0, "ap25": 1.0},
                                "table": {"ap": 1.0, "ap50": 1.0, "ap25": 1.0}}
    # 0/1 integer masks are read as membership, like the benchmark's mask files.
    as_int = {**pred, "masks": pred["masks"].to(torch.int32)}
    assert evaluate_instances([as_int], [two_instance_gt()], class_ids=[3, 4],
                              min_region_size=1)["ap"] == 1.0


def test_no_predictions():
    pred = make_pred(30, [], [], [])
    out = evaluate_instances([pred], [two_instance_gt()], class_ids=[3, 4], min_region_size=1)
    assert (out["ap"], out["ap50"], out["ap25"]) == (0.0, 0.0, 0.0)


def test_iou_point_six():
    # The prediction covers 6 of instance 0's 10 points: IoU 6/10 = 0.6. The benchmark needs
    # IoU > threshold, so it is a true positive at 0.50 and 0.55 (AP 1) and at 0.25, and at
    # 0.60..0.90 a false positive with instance 0 missed (AP 0). AP averages the nine
    # thresholds 0.50..0.90: 2/9 (not 2/10: np.arange(0.5, 0.95, 0.05) has no 0.95).
    gt = make_gt(30, {0: (r(0, 10), 3)})
    pred = make_pred(30, [r(0, 6)], [3], [0.7])
    out = evaluate_instances([pred], [gt], class_ids=[3, 4], min_region_size=1)
    assert out["ap50"] == 1.0 and out["ap25"] == 1.0
    assert out["ap"] == pytest.approx(2 / 9, abs=1e-15)
    assert math.isnan(out["per_class"]["4"]["ap"])  # no GT, no prediction: NaN, not averaged
    # IoU exactly 0.5 is not above 0.5: AP50 0, AP25 1.
    out = evaluate_instances([make_pred(30, [r(0, 5)], [3], [0.7])], [gt], class_ids=[3],
                             min_region_size=1)
    assert (out["ap50"], out["ap25"], out["ap"]) == (0.0, 1.0, 0.0)


def test_duplicate_is_a_false_positive():
    # GT instances 0 and 1. A (0.9) and its duplicate B (0.8) on instance 0, C (0.7) on 1.
    # Ascending scores: C true, B false, A true.
    #   >= 0.7: tp 2, fp 1 -> p 2/3, r 1;  >= 0.8: tp 1, fp 1 -> p 1/2, r 1/2;
    #   >= 0.9: tp 1, fp 0 -> p 1, r 1/2;  artificial p 1, r 0.
    # AP = (1 - 1/2)(2/3 + 1/2)/2 + 0 + (1/2 - 0)(1 + 1)/2 = 7/24 + 1/2 = 19/24.
    gt = make_gt(30, {0: (r(0, 10), 3), 1: (r(10, 20), 3)})
    with_dup = make_pred(30, [r(0, 10), r(0, 10), r(10, 20)], [3, 3, 3], [0.9, 0.8, 0.7])
    without = make_pred(30, [r(0, 10), r(10, 20)], [3, 3], [0.9, 0.7])
    out = evaluate_instances([with_dup], [gt], class_ids=[3], min_region_size=1)
    assert out["ap50"] == pytest.approx(19 / 24, abs=1e-15)
    assert out["ap"] == pytest.approx(19 / 24, abs=1e-15)
    assert evaluate_instances([without], [gt], class_ids=[3], min_region_size=1)["ap50"] == 1.0
    # The duplicate's lower score is what counts as the false positive, whichever comes first:
    # the GT instance keeps the best score, the same 19/24.
    swapped = make_pred(30, [r(0, 10), r(0, 10), r(10, 20)], [3, 3, 3], [0.8, 0.9, 0.7])
    assert evaluate_instances([swapped], [gt], class_ids=[3],
                              min_region_size=1)["ap50"] == pytest.approx(19 / 24, abs=1e-15)


def test_wrong_class_per_class_vs_agnostic():
    gt = make_gt(30, {0: (r(0, 10), 3)})
    pred = make_pred(30, [r(0, 10)], [4], [0.9])
    out = evaluate_instances([pred], [gt], class_ids=[3, 4], min_region_size=1)
    # Class 3: GT but no prediction -> 0. Class 4: prediction but no GT -> NaN, left out.
    assert out["per_class"]["3"] == {"ap": 0.0, "ap50": 0.0, "ap25": 0.0}
    assert all(math.isnan(v) for v in out["per_class"]["4"].values())
    assert (out["ap"], out["ap50"], out["ap25"]) == (0.0, 0.0, 0.0)
    agnostic = evaluate_instances([pred], [gt], class_ids=[3, 4], min_region_size=1,
                                  class_agnostic=True)
    assert (agnostic["ap"], agnostic["ap50"], agnostic["ap25"]) == (1.0, 1.0, 1.0)
    assert list(agnostic["per_class"]) == ["object"]


def test_small_gt_instances_are_ignored():
    gt = make_gt(30, {0: (r(0, 10), 3), 1: (r(10, 13), 3)})  # instance 1 has 3 points
    pred = make_pred(30, [r(0, 10)], [3], [0.9])
    # min_region_size 5: instance 1 is not scored, so nothing is missed.
    assert evaluate_instances([pred], [gt], class_ids=[3], min_region_size=5)["ap"] == 1.0
    # min_region_size 1: instance 1 is missed; recall 1/2 at precision 1 -> AP 1/2.
    assert evaluate_instances([pred], [gt], class_ids=[3], min_region_size=1)["ap"] == 0.5
    # A high-score prediction made of the small instance and 3 void points: it overlaps only
    # ignored points, so it is no false positive.
    pred2 = make_pred(30, [r(0, 10), r(10, 13) + r(20, 23)], [3, 3], [0.5, 0.9])
    assert evaluate_instances([pred2], [gt], class_ids=[3], min_region_size=5)["ap"] == 1.0
    # Predictions below min_region_size are dropped too, as the benchmark drops them.
    pred3 = make_pred(30, [r(0, 10), r(25, 28)], [3, 3], [0.5, 0.9])
    assert evaluate_instances([pred3], [gt], class_ids=[3], min_region_size=5)["ap"] == 1.0


def test_predictions_on_void_points():
    # Points 20..29 have the ignore label (void); 30..39 a scored class (3) but no instance.
    gt = make_gt(40, {0: (r(0, 10), 3)})
    gt["semantic"][30:40] = 3
    tp = r(0, 10)
    # Entirely on void, higher score than the true positive: not counted.
    out = evaluate_instances([make_pred(40, [tp, r(20, 30)], [3, 3], [0.5, 0.9])], [gt],
                             class_ids=[3], min_region_size=1)
    assert out["ap"] == 1.0
    # Entirely on non-void points: a false positive before the true positive, AP 0.25 at
    # every threshold.
    out = evaluate_instances([make_pred(40, [tp, r(30, 40)], [3, 3], [0.5, 0.9])], [gt],
                             class_ids=[3], min_region_size=1)
    assert out["ap"] == 0.25 and out["ap50"] == 0.25 and out["ap25"] == 0.25
    # 6 of 10 points void: ignored while 0.6 > threshold (0.25, 0.50, 0.55), a false positive
    # from 0.60 on. AP over 0.50..0.90 = (1 + 1 + 7 * 0.25) / 9.
    out = evaluate_instances([make_pred(40, [tp, r(20, 26) + r(30, 34)], [3, 3], [0.5, 0.9])],
                             [gt], class_ids=[3], min_region_size=1)
    assert out["ap50"] == 1.0 and out["ap25"] == 1.0
    assert out["ap"] == pytest.approx((2 + 7 * 0.25) / 9, abs=1e-15)
    torch.testing.assert_close(out["ap_table"][0], torch.tensor(
        [1, 1] + [0.25] * 7 + [1], dtype=torch.float64))


def test_score_ordering_end_to_end():
    gt = make_gt(40, {0: (r(0, 10), 3)}, semantic_default=3)  # nothing is void
    fp_first = make_pred(40, [r(0, 10), r(20, 30)], [3, 3], [0.5, 0.9])
    tp_first = make_pred(40, [r(0, 10), r(20, 30)], [3, 3], [0.9, 0.5])
    assert evaluate_instances([fp_first], [gt], class_ids=[3], min_region_size=1)["ap"] == 0.25
    assert evaluate_instances([tp_first], [gt], class_ids=[3], min_region_size=1)["ap"] == 1.0


def test_scenes_pool_their_detections():
    # Scene 1 perfect; scene 2 misses its instance. Pooled: recall 1/2 at precision 1 -> 1/2,
    # not the mean of per-scene APs (1 and 0).
    gt = make_gt(30, {0: (r(0, 10), 3)})
    out = evaluate_instances([make_pred(30, [r(0, 10)], [3], [0.9]), make_pred(30, [], [], [])],
                             [gt, gt], class_ids=[3], min_region_size=1)
    assert out["ap"] == 0.5


def test_prediction_spanning_two_instances_at_iou_025():
    # Instances 0 (points 0..3) and 1 (4..7). A (score 0.2) spans both: IoU 4/8 = 1/2 with each,
    # above 0.25 for both. B (0.9) is instance 1 plus two void points: IoU 4/6.
    # At 0.25: instance 0 claims A, its only candidate (true positive 0.2); instance 1 skips the
    # claimed A and takes B (0.9). AP25 = 1.
    # At 0.50: instance 0 is missed, instance 1 takes B, and A (IoU 1/2, not above 0.5, no void)
    # is a false positive at 0.2: points (p 1/2, r 1/2), (p 1, r 1/2), (1, 0) -> AP50 = 1/2.
    gt = make_gt(12, {0: (r(0, 4), 3), 1: (r(4, 8), 3)})
    pred = make_pred(12, [r(0, 8), r(4, 8) + [8, 9]], [3, 3], [0.2, 0.9])
    out = evaluate_instances([pred], [gt], class_ids=[3], min_region_size=1)
    assert out["ap25"] == 1.0
    assert out["ap50"] == 0.5


def test_claim_order_follows_prediction_order():
    # The benchmark claims the *first* candidate in prediction order, not the best one. C (0.9)
    # spans instances 0 and 1 (IoU 1/2 with each); A (0.2) is exactly instance 0.
    # Order [A, C] at 0.25: instance 0 claims A but is scored 0.9 (A's 0.2 is a false
    # positive); C stays unclaimed and instance 1 takes it too -> trues 0.9, 0.9, false 0.2:
    # (p 2/3, r 1), (p 1, r 1), (1, 0) -> AP25 = 1.
    # Order [C, A]: instance 0 claims C (scored 0.9, A false positive), instance 1 finds C
    # claimed and is missed -> (p 1/2, r 1/2), (p 1, r 1/2), (1, 0) -> AP25 = 1/2.
    gt = make_gt(8, {0: (r(0, 4), 3), 1: (r(4, 8), 3)})
    a_first = make_pred(8, [r(0, 4), r(0, 8)], [3, 3], [0.2, 0.9])
    c_first = make_pred(8, [r(0, 8), r(0, 4)], [3, 3], [0.9, 0.2])
    assert evaluate_instances([a_first], [gt], class_ids=[3], min_region_size=1)["ap25"] == 1.0
    assert evaluate_instances([c_first], [gt], class_ids=[3], min_region_size=1)["ap25"] == 0.5


def test_instance_label_encodings_agree():
    rng = random.Random(3)
    preds, gts = random_scenes(rng, 3, [1, 2, 5])
    base = evaluate_instances(preds, gts, class_ids=[1, 2, 5], min_region_size=3)
    as_dict, from_semantic = [], []
    for gt in gts:
        ids = torch.unique(gt["instance_ids"][gt["instance_ids"] >= 0]).tolist()
        as_dict.append({**gt, "instance_labels": {i: int(gt["instance_labels"][i]) for i in ids}})
        from_semantic.append({k: v for k, v in gt.items() if k != "instance_labels"})
    for variant in (as_dict, from_semantic):
        out = evaluate_instances(preds, variant, class_ids=[1, 2, 5], min_region_size=3)
        assert_table_close(out, base["ap_table"].numpy())


def test_evaluator_accumulates_like_the_function():
    rng = random.Random(4)
    preds, gts = random_scenes(rng, 4, [1, 2])
    ev = InstanceEvaluator(class_ids=[1, 2], min_region_size=2)
    for p, g in zip(preds, gts):
        ev.update(p, g)
    assert len(ev) == 4
    out = ev.compute()
    ref = evaluate_instances(preds, gts, class_ids=[1, 2], min_region_size=2)
    assert_table_close(out, ref["ap_table"].numpy())
    ev.reset()
    assert len(ev) == 0 and math.isnan(ev.compute()["ap"])


def test_empty_scene_and_no_classes():
    gt = make_gt(5, {})
    out = evaluate_instances([make_pred(5, [], [], [])], [gt], class_ids=[1], min_region_size=1)
    assert math.isnan(out["ap"]) and math.isnan(out["per_class"]["1"]["ap50"])
    out = evaluate_instances([make_pred(5, [], [], [])], [gt], class_ids=None, min_region_size=1)
    assert math.isnan(out["ap"]) and out["per_class"] == {}
    out = evaluate_instances([], [], class_ids=[1, 2])
    assert math.isnan(out["ap25"])


# ----------------------------------------------------------------------------------------------
# Instance AP: random scenes against the loop reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("use_class_ids", [True, False])
def test_matches_loop_reference_on_random_scenes(monkeypatch, class_agnostic, use_class_ids):
    calls = {"ordered": 0}
    ordered = instance_module._assign_in_order

    def counting(*args):
        calls["ordered"] += 1
        return ordered(*args)

    monkeypatch.setattr(instance_module, "_assign_in_order", counting)
    rng = random.Random(1000 + 2 * class_agnostic + use_class_ids)
    class_ids = [1, 2, 5]
    for _ in range(150):
        preds, gts = random_scenes(rng, rng.randint(1, 3), class_ids)
        min_region_size = rng.choice([0, 1, 3, 5])
        ids = class_ids if use_class_ids else None
        out = evaluate_instances(preds, gts, class_ids=ids, min_region_size=min_region_size,
                                 class_agnostic=class_agnostic)
        table, classes = reference_evaluate(preds, gts, class_ids=ids,
                                            min_region_size=min_region_size,
                                            class_agnostic=class_agnostic)
        assert_table_close(out, table)
        ap_cols = table[:, :9]
        if not np.isnan(table).all():
            assert out["ap"] == pytest.approx(np.nanmean(ap_cols), abs=1e-12)
            assert out["ap50"] == pytest.approx(np.nanmean(table[:, 0]), abs=1e-12)
            assert out["ap25"] == pytest.approx(np.nanmean(table[:, 9]), abs=1e-12)
        if not class_agnostic:
            assert out["class_names"] == [str(c) for c in classes]
    assert calls["ordered"] > 0  # the order-dependent 0.25 path was exercised


# ----------------------------------------------------------------------------------------------
# Instance AP: errors and devices
# ----------------------------------------------------------------------------------------------

def test_instance_errors_name_the_argument():
    gt = two_instance_gt()
    good = make_pred(30, [r(0, 10)], [3], [0.9])
    with pytest.raises(ValueError, match=r"predictions\[0\]\['masks'\].*\(P, N=30\)"):
        evaluate_instances([{**good, "masks": good["masks"][:, :29]}], [gt], class_ids=[3])
    with pytest.raises(ValueError, match=r"masks.*bool"):
        evaluate_instances([{**good, "masks": good["masks"].float()}], [gt], class_ids=[3])
    with pytest.raises(ValueError, match=r"\['labels'\].*\(P=1,\)"):
        evaluate_instances([{**good, "labels": torch.tensor([3, 4])}], [gt], class_ids=[3])
    with pytest.raises(ValueError, match=r"\['scores'\].*float"):
        evaluate_instances([{**good, "scores": torch.tensor([1])}], [gt], class_ids=[3])
    with pytest.raises(ValueError, match=r"\['scores'\].*finite"):
        evaluate_instances([{**good, "scores": torch.tensor([math.nan])}], [gt], class_ids=[3])
    with pytest.raises(ValueError, match=r"ground_truths\[0\]\['instance_ids'\]"):
        evaluate_instances([good], [{**gt, "instance_ids": gt["instance_ids"].float()}],
                           class_ids=[3])
    with pytest.raises(ValueError, match=r"instance_labels"):
        evaluate_instances([good], [{**gt, "instance_labels": torch.tensor([3])}], class_ids=[3])
    with pytest.raises(ValueError, match=r"instance_labels.*\[1\]"):
        evaluate_instances([good], [{**gt, "instance_labels": {0: 3}}], class_ids=[3])
    with pytest.raises(ValueError, match=r"'instance_labels' or 'semantic'"):
        evaluate_instances([good], [{"instance_ids": gt["instance_ids"]}], class_ids=[3])
    with pytest.raises(ValueError, match=r"predictions: expected one entry per scene"):
        evaluate_instances([good, good], [gt], class_ids=[3])
    with pytest.raises(ValueError, match=r"class_ids: expected distinct"):
        evaluate_instances([good], [gt], class_ids=[3, 3])
    with pytest.raises(ValueError, match=r"class_names"):
        evaluate_instances([good], [gt], class_ids=[3], class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"min_region_size"):
        evaluate_instances([good], [gt], class_ids=[3], min_region_size=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_instance_cuda_matches_cpu():
    rng = random.Random(7)
    preds, gts = random_scenes(rng, 3, [1, 2, 5])
    cpu = evaluate_instances(preds, gts, class_ids=[1, 2, 5], min_region_size=2)
    def to(d: dict) -> dict:
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in d.items()}

    gpu = evaluate_instances([to(p) for p in preds], [to(g) for g in gts], class_ids=[1, 2, 5],
                             min_region_size=2)
    assert_table_close(gpu, cpu["ap_table"].numpy())


# ----------------------------------------------------------------------------------------------
# Semantic mIoU
# ----------------------------------------------------------------------------------------------

def reference_miou(pred: list[int], gt: list[int], num_classes: int, ignore_index: int):
    ious = []
    for c in range(num_classes):
        tp = sum(1 for p, g in zip(pred, gt) if g != ignore_index and p == c and g == c)
        fp = sum(1 for p, g in zip(pred, gt) if g != ignore_index and p == c and g != c)
        fn = sum(1 for p, g in zip(pred, gt) if g != ignore_index and p != c and g == c)
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    return ious


def test_miou_hand_case():
    # Class 0: tp 2, fn 1 (a 0 predicted 1) -> 2/3. Class 1: tp 1, fp 1 -> 1/2. Class 2: only
    # predicted on an ignored point -> absent -> NaN. The 255 points never count.
    gt = torch.tensor([0, 0, 0, 1, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 1])
    out = semantic_miou(pred, gt, num_classes=3, ignore_index=255)
    assert out["iou"][0] == pytest.approx(2 / 3) and out["iou"][1] == 0.5
    assert math.isnan(out["iou"][2])
    assert out["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert out["acc"] == 0.75
    assert out["confusion"].tolist() == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]
    # A class predicted but absent from GT has IoU 0 and lowers the mean.
    out = semantic_miou(torch.tensor([0, 2]), torch.tensor([0, 0]), num_classes=3,
                        ignore_index=255)
    assert out["iou"][2] == 0.0 and out["miou"] == pytest.approx(0.25)


def test_miou_ignore_index_inside_the_class_range():
    # ignore_index = 0: points labelled 0 are not scored and class 0 is left out of the mean.
    gt = torch.tensor([0, 1, 1, 2])
    pred = torch.tensor([1, 1, 0, 2])
    out = semantic_miou(pred, gt, num_classes=3, ignore_index=0)
    assert math.isnan(out["iou"][0])
    assert out["iou"][1] == 0.5 and out["iou"][2] == 1.0
    assert out["miou"] == 0.75


def test_miou_matches_loop_reference_and_meter():
    gen = torch.Generator().manual_seed(0)
    meter = SemanticMeter(num_classes=5, ignore_index=-1)
    all_pred, all_gt = [], []
    for _ in range(6):
        n = int(torch.randint(0, 60, (1,), generator=gen))
        gt = torch.randint(-1, 5, (n,), generator=gen)
        pred = torch.randint(0, 5, (n,), generator=gen)
        out = semantic_miou(pred, gt, num_classes=5, ignore_index=-1)
        ref = reference_miou(pred.tolist(), gt.tolist(), 5, -1)
        np.testing.assert_allclose(out["iou"].numpy(), ref, atol=1e-12)
        if not all(math.isnan(v) for v in ref):
            assert out["miou"] == pytest.approx(np.nanmean(ref), abs=1e-12)
        meter.update(pred, gt)
        all_pred.append(pred)
        all_gt.append(gt)
    pooled = semantic_miou(torch.cat(all_pred), torch.cat(all_gt), num_classes=5, ignore_index=-1)
    got = meter.compute()
    torch.testing.assert_close(got["iou"], pooled["iou"], equal_nan=True)
    assert got["miou"] == pooled["miou"]
    assert torch.equal(got["confusion"], confusion_matrix(torch.cat(all_pred), torch.cat(all_gt),
                                                          num_classes=5, ignore_index=-1))
    meter.reset()
    assert int(meter.confusion.sum()) == 0


def test_miou_empty_and_errors():
    out = semantic_miou(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                        num_classes=3, ignore_index=255)
    assert math.isnan(out["miou"]) and math.isnan(out["acc"])
    with pytest.raises(ValueError, match=r"pred: expected shape \(4,\)"):
        semantic_miou(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                      num_classes=3, ignore_index=255)
    with pytest.raises(ValueError, match=r"pred: expected a \(N,\) integer"):
        semantic_miou(torch.zeros(4), torch.zeros(4, dtype=torch.long), num_classes=3,
                      ignore_index=255)
    with pytest.raises(ValueError, match=r"gt: expected values in \[0, 3\)"):
        semantic_miou(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]), num_classes=3,
                      ignore_index=255)
    with pytest.raises(ValueError, match=r"pred: expected values in \[0, 3\)"):
        semantic_miou(torch.tensor([0, 3]), torch.tensor([0, 1]), num_classes=3,
                      ignore_index=255)
    # A prediction out of range on an ignored point is fine.
    semantic_miou(torch.tensor([0, 9]), torch.tensor([0, 255]), num_classes=3, ignore_index=255)
    with pytest.raises(ValueError, match=r"num_classes"):
        SemanticMeter(num_classes=0, ignore_index=255)
