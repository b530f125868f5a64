"""ScanNet-benchmark instance segmentation AP (AP over IoU 0.50:0.95, AP50, AP25).

The protocol is the one of the ScanNet benchmark's ``evaluate_semantic_instance.py`` (itself
adapted from the Cityscapes evaluation), the script that OneFormer3D and ESAM report with. For
every IoU threshold and every class, over all scenes together:

1. GT instances smaller than ``min_region_size`` points are set aside; so are predictions.
2. Each remaining GT instance, in ascending id order, looks at the predictions of its class whose
   IoU with it exceeds the threshold and that no earlier GT instance has claimed. If there are
   any, the GT instance is a true positive scored with the *highest* of their confidences, every
   other one of them is a false positive with its own confidence, and the first of them in
   prediction order is marked as claimed. Otherwise the GT instance is a false negative.
3. A prediction whose IoU exceeds the threshold with no GT instance of its class (small ones
   included) is a false positive, unless more than ``threshold`` of its points are void or lie
   on small GT instances of its class; then it is not counted at all.
4. Precision and recall are taken at every distinct confidence, an artificial point
   (recall 0, precision 1) is appended, and AP is the trapezoidal area under that curve.
5. AP is NaN for a class without GT instances, 0 for a class with GT instances but without
   predictions; means over classes skip NaN.

Shapes: N points of a scene, P predicted masks of a scene, K GT instances of a scene, C classes,
T IoU thresholds, E scored detections (true or false positives).

All per-point work is vectorised: one pass of segment sums gives the (P, K) intersection counts
of a scene. The assignment is vectorised over thresholds, predictions and GT instances; only where
a prediction exceeds the threshold with two GT instances at once (possible below IoU 0.5, so only
at the 0.25 threshold) does the script's claim order matter, and there a loop over that scene's
GT instances follows it. Every AP of the (class, threshold) table comes from one grouped pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IOU_THRESHOLDS",
    "InstanceEvaluator",
    "average_precision",
    "evaluate_instances",
    "precision_recall_curve",
]

# 0.50, 0.55, ..., 0.90 and 0.25, built with numpy's arange so that the float values
# (0.6000000000000001, ...) are exactly the benchmark's own.
IOU_THRESHOLDS: tuple[float, ...] = tuple(
    float(t) for t in np.append(np.arange(0.5, 0.95, 0.05), 0.25))
_AP_COLUMNS = [i for i, t in enumerate(IOU_THRESHOLDS) if not math.isclose(t, 0.25)]
_AP50_COLUMN = next(i for i, t in enumerate(IOU_THRESHOLDS) if math.isclose(t, 0.5))
_AP25_COLUMN = next(i for i, t in enumerate(IOU_THRESHOLDS) if math.isclose(t, 0.25))
_AGNOSTIC_NAME = "object"


# ----------------------------------------------------------------------------------------------
# Precision-recall curve and AP
# ----------------------------------------------------------------------------------------------

def _grouped_pr_points(groups: Tensor, scores: Tensor, is_tp: Tensor, num_fn: Tensor,
                       num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Points of the precision-recall curve of every group, the artificial point excluded.

    Args:
        groups: ``(E,)`` group index in ``[0, G)`` (a class) of every detection.
        scores: ``(E,)`` float64 confidences.
        is_tp: ``(E,)`` bool, true positive or false positive.
        num_fn: ``(G,)`` GT instances of each group that no detection matched.
        num_groups: G.

    Returns:
        ``(U,)`` group, precision and recall of every distinct confidence of every group, sorted
        by group and then by ascending confidence (descending recall).
    """
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, then by score
    g, s, t = groups[order], scores[order], is_tp[order].to(torch.int64)
    n_group = torch.bincount(g, minlength=num_groups)  # (G,)
    tp_group = torch.bincount(g, weights=t.to(torch.float64), minlength=num_groups).long()  # (G,)
    start = torch.cumsum(n_group, 0) - n_group  # (G,) first row of each group
    pos = torch.arange(g.numel()) - start[g]  # (E,) rank within the group
    # True positives strictly before each row within its group.
    tp_before = (torch.cumsum(t, 0) - t) - (torch.cumsum(tp_group, 0) - tp_group)[g]  # (E,)
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = (s[1:] != s[:-1]) | (g[1:] != g[:-1])  # first row of each distinct score
    g, pos, tp_before = g[first], pos[first], tp_before[first]  # (U,)
    # Detections scoring at least this threshold: tp true, fp false; fn = missed GT instances.
    tp = tp_group[g] - tp_before
    fp = n_group[g] - pos - tp
    fn = tp_before + num_fn[g]
    precision = tp.double() / (tp + fp).clamp_min(1).double()
    recall = tp.double() / (tp + fn).clamp_min(1).double()
    return g, precision, recall


def _grouped_average_precision(groups: Tensor, scores: Tensor, is_tp: Tensor, num_fn: Tensor,
                               num_groups: int) -> Tensor:
    """AP of every group -> ``(G,)`` float64; a group without detections gets 0."""
    g, precision, recall = _grouped_pr_points(groups, scores, is_tp, num_fn, num_groups)
    # The next point along the curve (towards lower recall); after the last distinct score of a
    # group it is the artificial (recall 0, precision 1) point.
    last = torch.ones_like(g, dtype=torch.bool)
    last[:-1] = g[1:] != g[:-1]
    next_p = torch.where(last, torch.ones_like(precision), precision.roll(-1))
    next_r = torch.where(last, torch.zeros_like(recall), recall.roll(-1))
    area = (recall - next_r) * (precision + next_p) / 2  # (U,) trapezoids
    return torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, area)


def _check_detections(scores: Tensor, is_tp: Tensor, num_false_negatives: int) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        raise ValueError(f"scores: expected a (E,) tensor, got {_describe(scores)}")
    if not isinstance(is_tp, Tensor) or is_tp.shape != scores.shape:
        raise ValueError(f"is_tp: expected a ({scores.shape[0]},) bool tensor like scores, "
                         f"got {_describe(is_tp)}")
    if int(num_false_negatives) < 0:
        raise ValueError(f"num_false_negatives: expected >= 0, got {num_false_negatives}")


def precision_recall_curve(scores: Tensor, is_tp: Tensor,
                           num_false_negatives: int = 0) -> tuple[Tensor, Tensor]:
    """The ScanNet script's precision-recall curve of one class at one IoU threshold.

    Args:
        scores: ``(E,)`` confidences of the scored detections.
        is_tp: ``(E,)`` bool, true positive (a matched GT instance) or false positive.
        num_false_negatives: GT instances that no detection matched.

    Returns:
        ``precision (U+1,)`` and ``recall (U+1,)`` float64: one point per distinct confidence,
        in ascending confidence order (so descending recall), then the artificial point
        (precision 1, recall 0).
    """
    _check_detections(scores, is_tp, num_false_negatives)
    groups = torch.zeros(scores.shape[0], dtype=torch.int64)
    _, precision, recall = _grouped_pr_points(
        groups, scores.detach().cpu().double(), is_tp.detach().cpu().bool(),
        torch.tensor([int(num_false_negatives)]), 1)
    one = torch.ones(1, dtype=torch.float64)
    return torch.cat([precision, one]), torch.cat([recall, one - 1])


def average_precision(scores: Tensor, is_tp: Tensor, num_false_negatives: int = 0) -> float:
    """Area under `precision_recall_curve` by the trapezoidal rule, as the ScanNet script does.

    Args:
        scores: ``(E,)`` confidences; ``is_tp``: ``(E,)`` bool; ``num_false_negatives``: missed
            GT instances. No detections gives 0.
    """
    _check_detections(scores, is_tp, num_false_negatives)
    groups = torch.zeros(scores.shape[0], dtype=torch.int64)
    ap = _grouped_average_precision(
        groups, scores.detach().cpu().double(), is_tp.detach().cpu().bool(),
        torch.tensor([int(num_false_negatives)]), 1)
    return float(ap[0])


# ----------------------------------------------------------------------------------------------
# One scene: overlaps, then detections at every threshold
# ----------------------------------------------------------------------------------------------

@dataclass
class _SceneResult:
    """Detections of one scene at every IoU threshold (labels are raw class values)."""

    threshold: Tensor  # (E,) int64 index into IOU_THRESHOLDS of each detection
    labels: Tensor  # (E,) int64
    scores: Tensor  # (E,) float64
    is_tp: Tensor  # (E,) bool
    fn_threshold: Tensor  # (F,) int64 threshold index of each unmatched GT instance
    fn_labels: Tensor  # (F,) int64 class of each unmatched GT instance
    gt_labels: Tensor  # (K',) labels of GT instances large enough to be evaluated
    pred_labels: Tensor  # (P,) labels of the predictions kept
    all_gt_labels: Tensor  # (K,) labels of every scored GT instance, small ones included


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _instance_labels(gt: Mapping, name: str, unique_ids: Tensor, inverse: Tensor,
                     semantic: Tensor | None, valid: Tensor) -> Tensor:
    """Class of every GT instance id in ``unique_ids (K,)`` -> ``(K,)`` int64."""
    labels = gt.get("instance_labels")
    if isinstance(labels, Mapping):
        missing = [int(i) for i in unique_ids.tolist() if int(i) not in labels]
        if missing:
            raise ValueError(f"{name}['instance_labels']: no class for instance ids {missing[:8]}")
        return torch.tensor([int(labels[int(i)]) for i in unique_ids.tolist()], dtype=torch.int64)
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dim() != 1 or not _is_integer(labels):
            raise ValueError(f"{name}['instance_labels']: expected a (K,) integer tensor indexed "
                             f"by instance id or a dict id -> class, got {_describe(labels)}")
        if unique_ids.numel() and int(unique_ids[-1]) >= labels.shape[0]:
            raise ValueError(f"{name}['instance_labels']: expected a class for every instance "
                             f"id up to {int(unique_ids[-1])}, got shape {tuple(labels.shape)}")
        return labels.to(torch.int64).cpu()[unique_ids]
    if semantic is None:
        raise ValueError(f"{name}: give 'instance_labels' or 'semantic' to name the class of "
                         "each GT instance")
    # The most frequent semantic label of each instance's points.
    sem_values, sem_idx = torch.unique(semantic[valid], return_inverse=True)
    if unique_ids.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    counts = torch.bincount(inverse * sem_values.numel() + sem_idx,
                            minlength=unique_ids.numel() * sem_values.numel())
    return sem_values[counts.view(unique_ids.numel(), sem_values.numel()).argmax(1)]


def _check_scene(pred: Mapping, gt: Mapping, index: int
                 ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """Validate one scene; return ``instance_ids (N,)``, ``semantic (N,)`` or None,
    ``masks (P, N)`` bool, ``labels (P,)``, ``scores (P,)``."""
    pname, gname = f"predictions[{index}]", f"ground_truths[{index}]"
    if not isinstance(pred, Mapping):
        raise ValueError(f"{pname}: expected a dict with 'masks', 'labels', 'scores', "
                         f"got {type(pred).__name__}")
    if not isinstance(gt, Mapping):
        raise ValueError(f"{gname}: expected a dict with 'instance_ids' and 'semantic' or "
                         f"'instance_labels', got {type(gt).__name__}")
    ids = gt.get("instance_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 1 or not _is_integer(ids):
        raise ValueError(f"{gname}['instance_ids']: expected a (N,) integer tensor, "
                         f"got {_describe(ids)}")
    n = ids.shape[0]
    semantic = gt.get("semantic")
    if semantic is not None and (not isinstance(semantic, Tensor) or semantic.shape != (n,)
                                 or not _is_integer(semantic)):
        raise ValueError(f"{gname}['semantic']: expected a (N={n},) integer tensor, "
                         f"got {_describe(semantic)}")
    masks, labels, scores = pred.get("masks"), pred.get("labels"), pred.get("scores")
    if not isinstance(masks, Tensor) or masks.dim() != 2 or masks.shape[1] != n:
        raise ValueError(f"{pname}['masks']: expected a (P, N={n}) bool tensor, "
                         f"got {_describe(masks)}")
    if masks.dtype != torch.bool:
        if not _is_integer(masks):
            raise ValueError(f"{pname}['masks']: expected a bool (or 0/1 integer) tensor, "
                             f"got dtype {masks.dtype}")
        masks = masks != 0
    p = masks.shape[0]
    if not isinstance(labels, Tensor) or labels.shape != (p,) or not _is_integer(labels):
        raise ValueError(f"{pname}['labels']: expected a (P={p},) integer tensor, "
                         f"got {_describe(labels)}")
    if not isinstance(scores, Tensor) or scores.shape != (p,) or not scores.is_floating_point():
        raise ValueError(f"{pname}['scores']: expected a (P={p},) float tensor, "
                         f"got {_describe(scores)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{pname}['scores']: expected finite confidences")
    return ids, semantic, masks, labels, scores


def _evaluate_scene(pred: Mapping, gt: Mapping, *, index: int, class_ids: Tensor | None,
                    min_region_size: int, class_agnostic: bool) -> _SceneResult:
    """Match one scene's predictions with its GT instances at every IoU threshold."""
    ids, semantic, masks, labels, scores = _check_scene(pred, gt, index)
    n = ids.shape[0]
    device = masks.device
    ids = ids.to(device=device, dtype=torch.int64)
    semantic = None if semantic is None else semantic.to(device=device, dtype=torch.int64)

    # GT instances: ascending id, the order in which the benchmark visits them.
    valid = ids >= 0  # (N,)
    unique_ids, inverse = torch.unique(ids[valid], return_inverse=True)  # (K0,), (N_valid,)
    gt_labels = _instance_labels(gt, f"ground_truths[{index}]", unique_ids.cpu(), inverse.cpu(),
                                 None if semantic is None else semantic.cpu(), valid.cpu())
    keep_gt = (torch.ones_like(gt_labels, dtype=torch.bool) if class_ids is None
               else torch.isin(gt_labels, class_ids))  # (K0,)
    gt_labels = gt_labels[keep_gt]
    k = gt_labels.numel()
    # Column of every point's GT instance; column K collects points outside evaluated instances.
    column = torch.where(keep_gt, torch.cumsum(keep_gt, 0) - 1, k).to(device)  # (K0,)
    point_column = torch.full((n,), k, dtype=torch.int64, device=device)
    point_column[valid] = column[inverse]
    gt_sizes = torch.bincount(point_column, minlength=k + 1)[:k].cpu()  # (K,)
    if class_ids is not None and semantic is not None:
        void = ~torch.isin(semantic, class_ids.to(device))  # (N,) as the benchmark defines void
    else:
        void = point_column == k  # (N,) points of no evaluated GT instance

    # Predictions: the benchmark drops masks under min_region_size and classes it does not score.
    pred_sizes = masks.sum(1)  # (P,)
    keep_pred = pred_sizes >= max(int(min_region_size), 1)
    labels = labels.to(device=device, dtype=torch.int64)
    if class_agnostic:
        labels = torch.zeros_like(labels)
        gt_labels = torch.zeros_like(gt_labels)
    elif class_ids is not None:
        keep_pred &= torch.isin(labels, class_ids.to(device))
    masks, labels = masks[keep_pred], labels[keep_pred].cpu()
    scores = scores.detach().to(device)[keep_pred].cpu().double()
    pred_sizes = pred_sizes[keep_pred].cpu()
    p = masks.shape[0]

    # Intersections of every prediction with every GT instance and with the void points: one
    # segment sum over the (prediction, point) pairs of all masks.
    pred_idx, point_idx = masks.nonzero(as_tuple=True)
    inter = torch.bincount(pred_idx * (k + 1) + point_column[point_idx], minlength=p * (k + 1))
    inter = inter.view(p, k + 1)[:, :k].cpu()  # (P, K)
    void_inter = torch.bincount(pred_idx[void[point_idx]], minlength=p).cpu()  # (P,)

    same_class = labels[:, None] == gt_labels[None, :]  # (P, K)
    inter = inter * same_class  # the benchmark only pairs masks of the same class
    union = pred_sizes[:, None] + gt_sizes[None, :] - inter  # (P, K), >= 1
    iou = inter.double() / union.double()  # (P, K)
    gt_big = gt_sizes >= int(min_region_size)  # (K,)
    ignored = void_inter + (inter * ~gt_big[None, :]).sum(1)  # (P,) void or on small instances
    ignored_fraction = ignored.double() / pred_sizes.clamp_min(1).double()  # (P,)

    thresholds = torch.tensor(IOU_THRESHOLDS, dtype=torch.float64)  # (T,)
    overlap = iou[None] > thresholds[:, None, None]  # (T, P, K)
    candidate = overlap & gt_big[None, None, :]  # (T, P, K)
    matched, tp_score, duplicate = _assign_unique(candidate, scores)
    # Where a prediction is a candidate of two GT instances, the benchmark's claim order decides.
    for t in (candidate.sum(2) > 1).any(1).nonzero(as_tuple=True)[0].tolist():
        matched[t], tp_score[t], duplicate[t] = _assign_in_order(candidate[t], scores)
    # Predictions above the threshold with no GT instance of their class are false positives
    # unless more than the threshold of their points is void or on small GT instances.
    unmatched = ~overlap.any(2) & (ignored_fraction[None, :] <= thresholds[:, None])  # (T, P)

    tp_t, tp_k = matched.nonzero(as_tuple=True)  # (T, K) -> true positives
    fp_count = duplicate + unmatched  # (T, P); above 1 only through the claim order
    fp_t, fp_p = _repeated_nonzero(fp_count)  # false positives
    fn_t, fn_k = (~matched & gt_big[None, :]).nonzero(as_tuple=True)  # (T, K) -> missed
    return _SceneResult(
        threshold=torch.cat([tp_t, fp_t]),
        labels=torch.cat([gt_labels[tp_k], labels[fp_p]]),
        scores=torch.cat([tp_score[tp_t, tp_k], scores[fp_p]]),
        is_tp=torch.cat([torch.ones_like(tp_t, dtype=torch.bool),
                         torch.zeros_like(fp_t, dtype=torch.bool)]),
        fn_threshold=fn_t, fn_labels=gt_labels[fn_k],
        gt_labels=gt_labels[gt_big], pred_labels=labels, all_gt_labels=gt_labels)


def _repeated_nonzero(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column of every nonzero entry of ``counts (R, C)``, repeated ``count`` times."""
    top = int(counts.max()) if counts.numel() else 0
    pairs = [(counts >= i).nonzero() for i in range(1, top + 1)]  # top is 1 but for claim order
    pairs = torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.int64)
    return pairs[:, 0], pairs[:, 1]


def _assign_unique(candidate: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Assignment at every threshold, exact where each prediction has at most one candidate GT.

    Each GT instance with candidates is a true positive scored with its best candidate; every
    other candidate is a false positive.

    Args:
        candidate: ``(T, P, K)`` bool, IoU above the threshold with an evaluated GT instance.
        scores: ``(P,)`` float64.

    Returns:
        ``(T, K)`` bool matched GT instances, ``(T, K)`` float64 their scores, ``(T, P)`` int64
        false positives per prediction (candidates beaten by a better one).
    """
    matched = candidate.any(1)  # (T, K)
    masked = torch.where(candidate, scores[None, :, None],
                         torch.tensor(-math.inf, dtype=torch.float64))  # (T, P, K)
    # A row of -inf keeps the argmax defined without predictions; only unmatched GTs pick it.
    t, _, k = masked.shape
    masked = torch.cat([masked, masked.new_full((t, 1, k), -math.inf)], dim=1)  # (T, P+1, K)
    best = masked.argmax(1, keepdim=True)  # (T, 1, K) first best prediction
    tp_score = masked.gather(1, best).squeeze(1)  # (T, K)
    winner = torch.zeros_like(masked, dtype=torch.bool).scatter_(1, best, True)[:, :-1]
    duplicate = (candidate & ~winner).sum(2)  # (T, P)
    return matched, tp_score, duplicate


def _assign_in_order(candidate: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The benchmark's greedy claim order at one threshold, for predictions that are
    candidates of several GT instances (possible only below IoU 0.5).

    GT instances are visited in ascending id order; each takes the candidates no earlier GT
    instance has claimed, scores itself with their best confidence, counts the others as false
    positives, and claims the first of them in prediction order. A prediction beaten on one GT
    instance stays free for later ones, as in the benchmark, so it may be counted more than once.

    Args:
        candidate: ``(P, K)`` bool; scores: ``(P,)`` float64.

    Returns:
        ``(K,)`` bool matched, ``(K,)`` float64 scores, ``(P,)`` int64 false positives.
    """
    p, k = candidate.shape
    claimed = torch.zeros(p, dtype=torch.bool)
    duplicate = torch.zeros(p, dtype=torch.int64)
    matched = torch.zeros(k, dtype=torch.bool)
    tp_score = torch.full((k,), -math.inf, dtype=torch.float64)
    for j in range(k):  # over GT instances; everything per point is already summed
        rows = (candidate[:, j] & ~claimed).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        claimed[rows[0]] = True
        best = rows[scores[rows].argmax()]
        matched[j] = True
        tp_score[j] = scores[best]
        duplicate[rows] += 1
        duplicate[best] -= 1
    return matched, tp_score, duplicate


# ----------------------------------------------------------------------------------------------
# Accumulation over scenes
# ----------------------------------------------------------------------------------------------

def _cat(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat(tensors) if tensors else torch.zeros(0, dtype=dtype)


class InstanceEvaluator:
    """Accumulates scenes one at a time and computes ScanNet instance AP at the end.

    Args:
        class_ids: the class values to score (the benchmark's ``VALID_CLASS_IDS``), in the
            same value space as the predictions' ``labels`` and the GT classes. Points whose
            ``semantic`` label is not among them are void. ``None`` scores every class that
            occurs (GT instances or predictions) and treats the points of no GT instance as void.
        class_names: names of ``class_ids`` for the per-class results (default: the ids).
        min_region_size: GT instances and predictions with fewer points are set aside (ScanNet:
            100 mesh vertices; small synthetic frames want less).
        class_agnostic: every GT instance (of ``class_ids`` when given) and every prediction,
            whatever its label, is one class named ``"object"``.

    Each ``update(prediction, ground_truth)`` takes one scene:

    * ``prediction``: ``{'masks': (P, N) bool, 'labels': (P,) int, 'scores': (P,) float}``.
    * ``ground_truth``: ``{'instance_ids': (N,) int}`` (-1: no instance) with ``'semantic':
      (N,) int`` (its ignore value, like any class outside ``class_ids``, marks void points)
      and/or ``'instance_labels'``: a ``(K,)`` int tensor indexed by instance id, or a dict
      ``{instance id: class}``. Without ``instance_labels`` an instance's class is the most
      frequent ``semantic`` label of its points.

    ``compute()`` returns ``{'ap', 'ap50', 'ap25', 'per_class': {name: {'ap', 'ap50', 'ap25'}},
    'ap_table': (C, T) float64 tensor over `IOU_THRESHOLDS`, 'class_names': [C names]}``.
    """

    def __init__(self, *, class_ids: Sequence[int] | None, class_names: Sequence[str] | None = None,
                 min_region_size: int = 100, class_agnostic: bool = False):
        if class_ids is not None:
            ids = [int(c) for c in class_ids]
            if len(set(ids)) != len(ids):
                raise ValueError(f"class_ids: expected distinct values, got {ids}")
            self.class_ids: Tensor | None = torch.tensor(ids, dtype=torch.int64)
        else:
            self.class_ids = None
        if class_names is not None:
            if class_ids is None or len(class_names) != len(class_ids):
                raise ValueError(
                    f"class_names: expected one name per class id "
                    f"({'no class_ids given' if class_ids is None else len(class_ids)}), "
                    f"got {len(class_names)}")
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        if int(min_region_size) < 0:
            raise ValueError(f"min_region_size: expected >= 0, got {min_region_size}")
        self.min_region_size = int(min_region_size)
        self.class_agnostic = bool(class_agnostic)
        self._scenes: list[_SceneResult] = []

    def reset(self) -> None:
        self._scenes.clear()

    def __len__(self) -> int:
        return len(self._scenes)

    @torch.no_grad()
    def update(self, prediction: Mapping, ground_truth: Mapping) -> None:
        """Add one scene (see the class docstring for the two dicts)."""
        self._scenes.append(_evaluate_scene(
            prediction, ground_truth, index=len(self._scenes), class_ids=self.class_ids,
            min_region_size=self.min_region_size, class_agnostic=self.class_agnostic))

    def _classes(self) -> tuple[Tensor, list[str]]:
        if self.class_agnostic:
            return torch.zeros(1, dtype=torch.int64), [_AGNOSTIC_NAME]
        if self.class_ids is not None:
            names = self.class_names or [str(int(c)) for c in self.class_ids]
            return self.class_ids, names
        seen = [s.all_gt_labels for s in self._scenes] + [s.pred_labels for s in self._scenes]
        values = torch.unique(_cat(seen, torch.int64))
        return values, [str(int(c)) for c in values]

    @torch.no_grad()
    def compute(self) -> dict:
        values, names = self._classes()
        c = values.numel()
        sorted_values, perm = torch.sort(values)

        def index_of(labels: Tensor) -> Tensor:  # class value -> row of the table
            return perm[torch.searchsorted(sorted_values, labels).clamp_max(max(c - 1, 0))]

        def count(labels: list[Tensor]) -> Tensor:  # (C,) occurrences of each class
            return torch.bincount(index_of(_cat(labels, torch.int64)), minlength=c)

        has_gt = count([s.gt_labels for s in self._scenes]) > 0  # (C,)
        has_pred = count([s.pred_labels for s in self._scenes]) > 0  # (C,)
        num_t = len(IOU_THRESHOLDS)
        table = torch.full((c, num_t), math.nan, dtype=torch.float64)  # (C, T)
        if c:
            # One group per (threshold, class): every AP of the table in one pass.
            scenes = self._scenes
            groups = (_cat([s.threshold for s in scenes], torch.int64) * c
                      + index_of(_cat([s.labels for s in scenes], torch.int64)))  # (E,)
            fn_groups = (_cat([s.fn_threshold for s in scenes], torch.int64) * c
                         + index_of(_cat([s.fn_labels for s in scenes], torch.int64)))  # (F,)
            ap = _grouped_average_precision(
                groups, _cat([s.scores for s in scenes], torch.float64),
                _cat([s.is_tp for s in scenes], torch.bool),
                torch.bincount(fn_groups, minlength=num_t * c), num_t * c).view(num_t, c).T
            zero = torch.zeros_like(ap)
            table = torch.where(has_gt[:, None], torch.where(has_pred[:, None], ap, zero),
                                torch.full_like(ap, math.nan))  # (C, T)
        ap_mean = table[:, _AP_COLUMNS].mean(1)  # (C,) NaN for classes without GT
        return {
            "ap": float(torch.nanmean(table[:, _AP_COLUMNS])) if c else math.nan,
            "ap50": float(torch.nanmean(table[:, _AP50_COLUMN])) if c else math.nan,
            "ap25": float(torch.nanmean(table[:, _AP25_COLUMN])) if c else math.nan,
            "per_class": {
                name: {"ap": float(ap_mean[i]), "ap50": float(table[i, _AP50_COLUMN]),
                       "ap25": float(table[i, _AP25_COLUMN])}
                for i, name in enumerate(names)
            },
            "ap_table": table,
            "class_names": list(names),
        }


def evaluate_instances(predictions: Sequence[Mapping], ground_truths: Sequence[Mapping], *,
                       class_ids: Sequence[int] | None, class_names: Sequence[str] | None = None,
                       min_region_size: int = 100, class_agnostic: bool = False) -> dict:
    """ScanNet instance AP of a list of scenes (see `InstanceEvaluator` for every argument).

    Args:
        predictions: per scene ``{'masks': (P, N) bool, 'labels': (P,) int, 'scores': (P,)}``.
        ground_truths: per scene ``{'instance_ids': (N,) int (-1: none), 'semantic': (N,) int,
            'instance_labels': (K,) int indexed by instance id, or dict id -> class}``.

    Returns:
        ``{'ap': float, 'ap50': float, 'ap25': float, 'per_class': {name: {'ap', 'ap50',
        'ap25'}}, 'ap_table': (C, T), 'class_names': [...]}``; AP over IoU 0.50:0.95, and means
        over classes that skip classes without GT instances (NaN).
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"predictions: expected one entry per scene of ground_truths "
                         f"({len(ground_truths)}), got {len(predictions)}")
    evaluator = InstanceEvaluator(class_ids=class_ids, class_names=class_names,
                                  min_region_size=min_region_size, class_agnostic=class_agnostic)
    for prediction, ground_truth in zip(predictions, ground_truths):
        evaluator.update(prediction, ground_truth)
    return evaluator.compute()
