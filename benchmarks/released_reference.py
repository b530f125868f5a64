"""Plain-tensor port of the single-view losses of ESAM's released code.

This module is the *oracle* that ``esam``'s optimised losses are compared
against (parity tests) and the per-sample baseline of ``esam bench``. It
re-implements, on plain tensors and without mmengine / mmdet3d, the algorithm
of the released ``InstanceCriterion``, ``MixedInstanceCriterion`` (with the
label handling of ``ScanNetMixedCriterion``), ``ScanNetSemanticCriterion``,
``HungarianMatcher`` and ``SparseMatcher``, keeping every quirk of the
released behaviour:

* per-sample means summed and divided by the batch size B;
* the final layer's Dice summed over samples without the 1/B the auxiliary
  layers have;
* ``fix_dice_loss_weight``: Dice further divided by B and multiplied by 4;
* ``fix_mean_loss``: BCE and Dice multiplied by B and divided by the number of
  samples with GT rows (not the number with matches);
* score loss only on matched pairs whose mask IoU exceeds 0.5, mean squared
  error per sample, summed over samples and divided by B;
* box loss: box = (query centre + predicted offset, predicted size), mmdet3d's
  ``AxisAlignedIoULoss`` (mean of 1 - IoU per sample), summed and divided by B;
* classification: class weights ``[1] * num_classes + [non_object_weight]``
  with PyTorch's weighted-mean cross-entropy, unmatched queries labelled C;
* a sample with GT rows but no match yields NaN (mean over an empty tensor),
  as the released code does.

It is deliberately straightforward: dense one-hot GT masks, einsum cost
matrices, Python loops over samples and layers, ``linear_sum_assignment`` on
the CPU. It is not library code and is not optimised.

Shape vocabulary: B samples, N points, S superpoints, Q queries, K GT
instances, M matched pairs, C classes (+1 no-object).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "released_match",
    "released_instance_loss",
    "released_instance_terms",
    "released_mixed_instance_loss",
    "released_mixed_instance_terms",
    "released_semantic_loss",
    "batch_sigmoid_bce_cost",
    "batch_dice_cost",
    "query_classification_cost",
    "mask_iou",
    "dice_loss_mean",
    "axis_aligned_iou_loss",
    "box_pred_to_box",
    "box_to_corners",
]

TERM_NAMES = ("cls", "bce", "dice", "score", "bbox")

# SparseMatcher's stand-in for "not allowed"; a finite number, not inf.
_SPARSE_INF = 1e8


# --------------------------------------------------------------------------
# Pairwise costs (the released ``batch_*`` helpers and cost classes)
# --------------------------------------------------------------------------
def batch_sigmoid_bce_cost(mask_logits: Tensor, gt_masks: Tensor) -> Tensor:
    """Mean-over-points sigmoid BCE between every query and every GT mask.

    Args:
        mask_logits: (Q, N) mask logits.
        gt_masks: (K, N) float targets in [0, 1].

    Returns:
        (Q, K) cost; entry (j, k) is (1/N) sum_i BCE(mask_logits[j, i], gt_masks[k, i]).
    """
    pos = F.binary_cross_entropy_with_logits(
        mask_logits, torch.ones_like(mask_logits), reduction="none")  # (Q, N)
    neg = F.binary_cross_entropy_with_logits(
        mask_logits, torch.zeros_like(mask_logits), reduction="none")  # (Q, N)
    pos_cost = torch.einsum("qn,kn->qk", pos, gt_masks)  # (Q, K)
    neg_cost = torch.einsum("qn,kn->qk", neg, 1 - gt_masks)  # (Q, K)
    return (pos_cost + neg_cost) / mask_logits.shape[1]


def batch_dice_cost(mask_logits: Tensor, gt_masks: Tensor) -> Tensor:
    """Released Dice cost ``1 - (2<q,g> + 1) / (sum q + sum g + 1)``.

    Args:
        mask_logits: (Q, N) mask logits.
        gt_masks: (K, N) float targets.

    Returns:
        (Q, K) cost.
    """
    probs = mask_logits.sigmoid()  # (Q, N)
    numerator = 2 * torch.einsum("qn,kn->qk", probs, gt_masks)  # (Q, K)
    denominator = probs.sum(-1)[:, None] + gt_masks.sum(-1)[None, :]  # (Q, K)
    return 1 - (numerator + 1) / (denominator + 1)


def query_classification_cost(cls_logits: Tensor, gt_labels: Tensor) -> Tensor:
    """Released classification cost ``-softmax(c_j)[label_k]``.

    Args:
        cls_logits: (Q, C + 1) class logits.
        gt_labels: (K,) long labels.

    Returns:
        (Q, K) cost.
    """
    return -cls_logits.softmax(-1)[:, gt_labels]


# --------------------------------------------------------------------------
# Matched-pair losses (the released ``get_iou`` / ``dice_loss``, mmdet3d IoU)
# --------------------------------------------------------------------------
def mask_iou(mask_logits: Tensor, gt_masks: Tensor) -> Tensor:
    """IoU of ``sigmoid(mask_logits) >= 0.5`` with ``gt_masks > 0.5``, row by row.

    Computed in float32 as the released ``get_iou`` does (its ``.float()``
    casts), whatever the input dtype; the caller casts the result.

    Args:
        mask_logits: (M, N) mask logits.
        gt_masks: (M, N) bool or float targets.

    Returns:
        (M,) float32 IoU, ``intersection / (union + 1e-6)``.
    """
    binarized = (mask_logits.sigmoid() >= 0.5).float()  # (M, N)
    targets = (gt_masks > 0.5).float()  # (M, N)
    intersection = (binarized * targets).sum(-1)  # (M,)
    union = targets.sum(-1) + binarized.sum(-1) - intersection  # (M,)
    return intersection / (union + 1e-6)


def dice_loss_mean(mask_logits: Tensor, gt_masks: Tensor) -> Tensor:
    """Released ``dice_loss``: mean over rows of ``1 - (2<q,g> + 1) / (sum q + sum g + 1)``.

    Args:
        mask_logits: (M, N) mask logits.
        gt_masks: (M, N) float targets.

    Returns:
        0-d tensor; NaN when M = 0 (mean over an empty tensor), as released.
    """
    probs = mask_logits.sigmoid()  # (M, N)
    numerator = 2 * (probs * gt_masks).sum(-1)  # (M,)
    denominator = probs.sum(-1) + gt_masks.sum(-1)  # (M,)
    return (1 - (numerator + 1) / (denominator + 1)).mean()


def box_pred_to_box(centers: Tensor, box_preds: Tensor) -> Tensor:
    """Released ``_bbox_pred_to_bbox``: (centre + offset, size).

    Args:
        centers: (M, 3) query centres.
        box_preds: (M, 6) predicted (dx, dy, dz offsets, sx, sy, sz sizes).

    Returns:
        (M, 6) boxes (cx, cy, cz, sx, sy, sz); ``box_preds`` itself when M = 0.
    """
    if box_preds.shape[0] == 0:
        return box_preds
    return torch.stack([
        centers[:, 0] + box_preds[:, 0],
        centers[:, 1] + box_preds[:, 1],
        centers[:, 2] + box_preds[:, 2],
        box_preds[:, 3],
        box_preds[:, 4],
        box_preds[:, 5]], -1)  # (M, 6)


def box_to_corners(boxes: Tensor) -> Tensor:
    """Released ``_bbox_to_loss``: (cx, cy, cz, sx, sy, sz) -> (x1, y1, z1, x2, y2, z2).

    Args:
        boxes: (M, 6) centre-size boxes (other widths are returned unchanged).

    Returns:
        (M, 6) corner boxes.
    """
    if boxes.shape[-1] != 6:
        return boxes
    half = boxes[..., 3:6] / 2  # (M, 3)
    return torch.cat([boxes[..., :3] - half, boxes[..., :3] + half], dim=-1)


def axis_aligned_iou_loss(pred_corners: Tensor, gt_corners: Tensor) -> Tensor:
    """mmdet3d ``AxisAlignedIoULoss`` (reduction 'mean', weight 1) on aligned pairs.

    Volumes are not clamped (a negative predicted size gives a negative
    volume); overlap extents are clamped at 0; the union is clamped below
    by 1e-6.

    Args:
        pred_corners: (M, 6) boxes (x1, y1, z1, x2, y2, z2).
        gt_corners: (M, 6) boxes in the same format.

    Returns:
        0-d mean of ``1 - IoU``; NaN when M = 0, as released.
    """
    if pred_corners.shape[0] * gt_corners.shape[0] == 0:
        return pred_corners.new_empty((0,)).mean()
    extent1 = pred_corners[:, 3:] - pred_corners[:, :3]  # (M, 3)
    extent2 = gt_corners[:, 3:] - gt_corners[:, :3]  # (M, 3)
    volume1 = extent1[:, 0] * extent1[:, 1] * extent1[:, 2]  # (M,)
    volume2 = extent2[:, 0] * extent2[:, 1] * extent2[:, 2]  # (M,)
    low = torch.max(pred_corners[:, :3], gt_corners[:, :3])  # (M, 3)
    high = torch.min(pred_corners[:, 3:], gt_corners[:, 3:])  # (M, 3)
    side = (high - low).clamp(min=0)  # (M, 3)
    overlap = side[:, 0] * side[:, 1] * side[:, 2]  # (M,)
    union = volume1 + volume2 - overlap  # (M,)
    union = torch.max(union, union.new_tensor([1e-6]))
    return (1 - overlap / union).mean()


# --------------------------------------------------------------------------
# Matchers
# --------------------------------------------------------------------------
@torch.no_grad()
def released_match(
    cls_logits: Tensor,
    mask_logits: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    *,
    matcher: str,
    topk: int,
    cost_weights: Sequence[float],
    query_masks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Match Q queries to K GT instances as the released matchers do.

    Cost = w_cls * (-softmax class prob) + w_bce * mean BCE + w_dice * Dice.

    ``"hungarian"``: ``linear_sum_assignment`` on the (Q, K) cost (min(Q, K)
    pairs, sorted by query id). ``"sparse"``: cost set to 1e8 where
    ``query_masks.T`` is False; if Q <= topk nothing matches (the released
    code compares the cost with itself, ``cost < cost``); otherwise each GT
    column keeps the queries whose cost is strictly below that column's
    (topk + 1)-th smallest value, so ties at the threshold drop all tied
    queries, a query may match several GTs, and ids come out in row-major
    (query, gt) order.

    Args:
        cls_logits: (Q, C + 1) class logits.
        mask_logits: (Q, N) mask logits (N points or S superpoints).
        gt_labels: (K,) long labels in [0, C].
        gt_masks: (K, N) bool or float GT masks.
        matcher: ``"hungarian"`` or ``"sparse"``.
        topk: SparseMatcher's top-k (unused by the Hungarian matcher).
        cost_weights: (w_cls, w_bce, w_dice).
        query_masks: (K, Q) bool, True where GT k contains query j's seed;
            required by the sparse matcher when K > 0.

    Returns:
        (query ids (M,), gt ids (M,)), both long.
    """
    if matcher not in ("hungarian", "sparse"):
        raise ValueError(
            f"matcher must be 'hungarian' or 'sparse', got {matcher!r}")
    if len(cost_weights) != 3:
        raise ValueError(
            f"cost_weights must hold 3 weights (cls, bce, dice), got {len(cost_weights)}")
    if cls_logits.dim() != 2 or mask_logits.dim() != 2:
        raise ValueError(
            "cls_logits must be (Q, C+1) and mask_logits (Q, N); got "
            f"{tuple(cls_logits.shape)} and {tuple(mask_logits.shape)}")
    if cls_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            f"cls_logits and mask_logits must share Q, got {cls_logits.shape[0]} "
            f"and {mask_logits.shape[0]}")
    n_gts = len(gt_labels)
    if n_gts == 0:
        return gt_labels.new_empty((0,)), gt_labels.new_empty((0,))
    if gt_masks.dim() != 2 or gt_masks.shape != (n_gts, mask_logits.shape[1]):
        raise ValueError(
            f"gt_masks must be (K, N) = ({n_gts}, {mask_logits.shape[1]}), "
            f"got {tuple(gt_masks.shape)}")

    # The released code uses gt_masks.float(); the pred dtype keeps float64 runs in float64.
    targets = gt_masks.to(mask_logits.dtype)  # (K, N)
    w_cls, w_bce, w_dice = cost_weights
    cost = torch.stack([
        query_classification_cost(cls_logits, gt_labels) * w_cls,
        batch_sigmoid_bce_cost(mask_logits, targets) * w_bce,
        batch_dice_cost(mask_logits, targets) * w_dice,
    ]).sum(dim=0)  # (Q, K)

    if matcher == "hungarian":
        query_ids, gt_ids = linear_sum_assignment(cost.cpu().numpy())
        return gt_labels.new_tensor(query_ids), gt_labels.new_tensor(gt_ids)

    if query_masks is None:
        raise ValueError("query_masks (K, Q) is required by the sparse matcher")
    if query_masks.shape != (n_gts, cls_logits.shape[0]):
        raise ValueError(
            f"query_masks must be (K, Q) = ({n_gts}, {cls_logits.shape[0]}), "
            f"got {tuple(query_masks.shape)}")
    cost = torch.where(query_masks.T, cost, _SPARSE_INF)  # (Q, K)
    if len(cost) <= topk:
        threshold = cost  # released quirk: `cost < cost` matches nothing
    else:
        threshold = torch.topk(
            cost, topk + 1, dim=0, sorted=True, largest=False).values[-1:, :]  # (1, K)
    ids = torch.argwhere(cost < threshold)  # (M, 2)
    return ids[:, 0], ids[:, 1]


# --------------------------------------------------------------------------
# Instance criteria
# --------------------------------------------------------------------------
def _check_batch(pred: dict[str, Any], insts: list[dict[str, Tensor]], name: str) -> int:
    if not isinstance(insts, (list, tuple)) or len(insts) == 0:
        raise ValueError(f"insts must be a non-empty list of per-sample dicts, got {type(insts)}")
    n_samples = len(insts)
    for key in ("cls_preds", "masks"):
        if key not in pred:
            raise ValueError(f"{name} is missing key {key!r}")
        if len(pred[key]) != n_samples:
            raise ValueError(
                f"{name}[{key!r}] must hold B = {n_samples} tensors (one per sample), "
                f"got {len(pred[key])}")
    for b, inst in enumerate(insts):
        for key in ("labels_3d",):
            if key not in inst:
                raise ValueError(f"insts[{b}] is missing key {key!r}")
    return n_samples


def _per_sample(layer: dict[str, Any], key: str, n_samples: int) -> list[Any]:
    values = layer.get(key)
    if values is None:
        return [None] * n_samples
    if len(values) != n_samples:
        raise ValueError(f"pred[{key!r}] must hold B = {n_samples} entries, got {len(values)}")
    return list(values)


def _match_layer(
    layer: dict[str, Any],
    insts: list[dict[str, Tensor]],
    gt_key: str,
    match_kwargs: dict[str, Any],
) -> list[tuple[Tensor, Tensor]]:
    return [
        released_match(
            layer["cls_preds"][b], layer["masks"][b], inst["labels_3d"], inst[gt_key],
            query_masks=inst.get("query_masks"), **match_kwargs)
        for b, inst in enumerate(insts)
    ]


def _layer_terms(
    layer: dict[str, Any],
    insts: list[dict[str, Tensor]],
    indices: list[tuple[Tensor, Tensor]],
    gt_key: str,
    *,
    class_weight: list[float],
    final_layer: bool,
    fix_dice_loss_weight: bool,
    fix_mean_loss: bool,
    with_boxes: bool,
) -> dict[str, Tensor]:
    """One decoder layer's terms after the released normalisations, before weights."""
    cls_preds = layer["cls_preds"]
    pred_masks = layer["masks"]
    n_samples = len(pred_masks)
    pred_scores = _per_sample(layer, "scores", n_samples)
    pred_boxes = _per_sample(layer, "bboxes", n_samples) if with_boxes else [None] * n_samples
    centers = _per_sample(layer, "centers", n_samples) if with_boxes else [None] * n_samples

    # Classification: weighted-mean CE per sample, mean over samples.
    cls_losses = []
    for cls_pred, inst, (idx_q, idx_gt) in zip(cls_preds, insts, indices):
        no_object = cls_pred.shape[1] - 1
        cls_target = cls_pred.new_full((len(cls_pred),), no_object, dtype=torch.long)  # (Q,)
        # Duplicate query ids (sparse matcher) resolve as torch's index_put does.
        cls_target[idx_q] = inst["labels_3d"][idx_gt]
        cls_losses.append(F.cross_entropy(cls_pred, cls_target, cls_pred.new_tensor(class_weight)))
    cls_loss = torch.mean(torch.stack(cls_losses))
    zero = cls_loss.new_zeros(())  # stands for the released Python-int 0 fallbacks

    score_losses, box_losses, bce_losses, dice_losses = [], [], [], []
    for mask, score, box, center, inst, (idx_q, idx_gt) in zip(
            pred_masks, pred_scores, pred_boxes, centers, insts, indices):
        # Guard on GT rows, not matches: K > 0 with M = 0 gives NaN below (released behaviour).
        if len(inst["labels_3d"]) == 0:
            continue
        pred_mask = mask[idx_q]  # (M, N)
        gt_mask = inst[gt_key][idx_gt]  # (M, N) bool
        gt_mask_float = gt_mask.to(pred_mask.dtype)  # released: .float()
        bce_losses.append(F.binary_cross_entropy_with_logits(pred_mask, gt_mask_float))
        dice_losses.append(dice_loss_mean(pred_mask, gt_mask_float))

        if box is not None:
            pred_box = box_pred_to_box(center[idx_q], box[idx_q])  # (M, 6)
            gt_box = inst["bboxes_3d"][idx_gt, :6]  # (M, 6)
            box_losses.append(axis_aligned_iou_loss(box_to_corners(pred_box), box_to_corners(gt_box)))

        if score is not None:
            pred_score = score[idx_q]  # (M, 1)
            with torch.no_grad():
                gt_score = mask_iou(pred_mask, gt_mask).unsqueeze(1)  # (M, 1) float32
            keep, _ = torch.where(gt_score > 0.5)
            if keep.numel():
                score_losses.append(F.mse_loss(
                    pred_score[keep], gt_score[keep].to(pred_score.dtype)))

    box_loss = torch.stack(box_losses).sum() / n_samples if box_losses else zero
    score_loss = torch.stack(score_losses).sum() / n_samples if score_losses else zero
    if bce_losses:
        bce_loss = torch.stack(bce_losses).sum() / n_samples
        dice_loss = torch.stack(dice_losses).sum()
        if not final_layer:
            # Auxiliary layers divide Dice by B; the final layer does not (released drift).
            dice_loss = dice_loss / n_samples
        if fix_dice_loss_weight:
            dice_loss = dice_loss / n_samples * 4
        if fix_mean_loss:
            # Divides by samples with GT rows, not samples with matches.
            bce_loss = bce_loss * n_samples / len(bce_losses)
            dice_loss = dice_loss * n_samples / len(dice_losses)
    else:
        bce_loss = zero
        dice_loss = zero

    terms = {"cls": cls_loss, "bce": bce_loss, "dice": dice_loss, "score": score_loss}
    if with_boxes:
        terms["bbox"] = box_loss
    return terms


def _weighted_total(terms: dict[str, Tensor], loss_weight: Sequence[float]) -> Tensor:
    """``w0*cls + w1*bce + w2*dice + w3*score [+ w4*bbox]``, left to right as released."""
    total = loss_weight[0] * terms["cls"]
    for weight, name in zip(loss_weight[1:], TERM_NAMES[1:]):
        total = total + weight * terms[name]
    return total


def _check_common(loss_weight: Sequence[float], allowed_lengths: tuple[int, ...],
                  matcher: str, topk: int, cost_weights: Sequence[float]) -> None:
    if len(loss_weight) not in allowed_lengths:
        raise ValueError(
            f"loss_weight must hold {' or '.join(map(str, allowed_lengths))} weights, "
            f"got {len(loss_weight)}")
    if matcher not in ("hungarian", "sparse"):
        raise ValueError(f"matcher must be 'hungarian' or 'sparse', got {matcher!r}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if len(cost_weights) != 3:
        raise ValueError(
            f"cost_weights must hold 3 weights (cls, bce, dice), got {len(cost_weights)}")


def released_mixed_instance_terms(
    pred: dict[str, Any],
    insts: list[dict[str, Tensor]],
    mask_pred_mode: Sequence[str],
    *,
    loss_weight: Sequence[float] = (0.5, 1.0, 1.0, 0.5, 0.5),
    non_object_weight: float = 0.1,
    num_classes: int = 1,
    fix_dice_loss_weight: bool = True,
    iter_matcher: bool = True,
    fix_mean_loss: bool = True,
    matcher: str = "sparse",
    topk: int = 1,
    cost_weights: Sequence[float] = (0.5, 1.0, 1.0),
) -> list[dict[str, Tensor]]:
    """Per-layer terms of the released ``MixedInstanceCriterion``.

    Same inputs as :func:`released_mixed_instance_loss`. Returns one dict per
    decoder layer in decoder order, ``[aux_0, ..., aux_{L-1}, final]``, each
    holding ``'cls', 'bce', 'dice', 'score', 'bbox'`` after the released
    normalisations and before ``loss_weight``. Absent terms (no GT in the
    batch, no scores, no boxes) are zero tensors, standing for the released
    Python-int 0. ``loss_weight`` is only validated here.
    """
    _check_common(loss_weight, (4, 5), matcher, topk, cost_weights)
    n_samples = _check_batch(pred, insts, "pred")
    aux_layers = list(pred.get("aux_outputs", []))
    if len(mask_pred_mode) < len(aux_layers):
        raise ValueError(
            f"mask_pred_mode must name a mode for each of the {len(aux_layers)} aux layers, "
            f"got {len(mask_pred_mode)}")
    for i, mode in enumerate(mask_pred_mode[:len(aux_layers)]):
        if mode not in ("SP", "P"):
            raise ValueError(f"mask_pred_mode[{i}] must be 'SP' or 'P', got {mode!r}")
    for i, layer in enumerate(aux_layers):
        _check_batch(layer, insts, f"pred['aux_outputs'][{i}]")
    needed = {"p_masks"} | ({"sp_masks"} if "SP" in mask_pred_mode[:len(aux_layers)] else set())
    for b, inst in enumerate(insts):
        missing = needed - set(inst)
        if missing:
            raise ValueError(f"insts[{b}] is missing GT masks {sorted(missing)}")

    # ScanNetMixedCriterion: with 2 class logits (class-agnostic) every label becomes 0.
    agnostic_insts = []
    for b, inst in enumerate(insts):
        inst = dict(inst)
        if pred["cls_preds"][b].shape[1] == 2:
            inst["labels_3d"] = torch.zeros_like(inst["labels_3d"])
        agnostic_insts.append(inst)
    insts = agnostic_insts

    class_weight = [1.0] * num_classes + [non_object_weight]
    match_kwargs = {"matcher": matcher, "topk": topk, "cost_weights": tuple(cost_weights)}
    options = {"class_weight": class_weight, "fix_dice_loss_weight": fix_dice_loss_weight,
               "fix_mean_loss": fix_mean_loss, "with_boxes": True}

    # The final layer is matched and scored against point masks.
    final_indices = _match_layer(pred, insts, "p_masks", match_kwargs)
    final_terms = _layer_terms(pred, insts, final_indices, "p_masks", final_layer=True, **options)

    layer_terms = []
    for i, layer in enumerate(aux_layers):
        gt_key = "sp_masks" if mask_pred_mode[i] == "SP" else "p_masks"
        indices = _match_layer(layer, insts, gt_key, match_kwargs) if iter_matcher else final_indices
        layer_terms.append(_layer_terms(layer, insts, indices, gt_key, final_layer=False, **options))
    return layer_terms + [final_terms]


def released_mixed_instance_loss(
    pred: dict[str, Any],
    insts: list[dict[str, Tensor]],
    mask_pred_mode: Sequence[str],
    *,
    loss_weight: Sequence[float] = (0.5, 1.0, 1.0, 0.5, 0.5),
    non_object_weight: float = 0.1,
    num_classes: int = 1,
    fix_dice_loss_weight: bool = True,
    iter_matcher: bool = True,
    fix_mean_loss: bool = True,
    matcher: str = "sparse",
    topk: int = 1,
    cost_weights: Sequence[float] = (0.5, 1.0, 1.0),
) -> Tensor:
    """Released ``ScanNetMixedCriterion`` instance loss (``MixedInstanceCriterion``).

    Args:
        pred: ``{'cls_preds': [(Q, C+1)] * B, 'scores': [(Q, 1) or None] * B,
            'masks': [(Q, N) or (Q, S)] * B, 'bboxes': [(Q, 6) or None] * B,
            'centers': [(Q, 3)] * B, 'aux_outputs': [dict with the same keys]}``.
            Missing 'scores' / 'bboxes' / 'centers' / 'aux_outputs' count as None / none.
        insts: per sample ``{'labels_3d': (K,) long, 'sp_masks': (K, S) bool,
            'p_masks': (K, N) bool, 'bboxes_3d': (K, 6) (cx, cy, cz, dx, dy, dz),
            'query_masks': (K, Q) bool (optional)}``.
        mask_pred_mode: ``mask_pred_mode[i]`` ("SP" or "P") is aux layer i's
            mask level; extra trailing entries (the released config lists the
            final layer's "P" too) are ignored. The final layer always uses
            ``p_masks``.
        loss_weight: (cls, bce, dice, score, bbox); 4 weights drop the bbox term.
        non_object_weight: class weight of the no-object class C.
        num_classes: C, so the class weight is ``[1] * C + [non_object_weight]``.
        fix_dice_loss_weight: Dice divided by B and multiplied by 4.
        iter_matcher: re-match every aux layer; otherwise reuse the final layer's indices.
        fix_mean_loss: BCE and Dice times B over the number of samples with GT rows.
        matcher: ``"sparse"`` (SparseMatcher) or ``"hungarian"``.
        topk: SparseMatcher's top-k.
        cost_weights: matcher cost weights (cls, bce, dice).

    Returns:
        0-d total: final layer's weighted terms plus each aux layer's. NaN where
        a sample has GT rows but no match (released behaviour).
    """
    layers = released_mixed_instance_terms(
        pred, insts, mask_pred_mode, loss_weight=loss_weight,
        non_object_weight=non_object_weight, num_classes=num_classes,
        fix_dice_loss_weight=fix_dice_loss_weight, iter_matcher=iter_matcher,
        fix_mean_loss=fix_mean_loss, matcher=matcher, topk=topk, cost_weights=cost_weights)
    # Released order: final layer first, then `loss += aux` in decoder order.
    total = _weighted_total(layers[-1], loss_weight)
    for terms in layers[:-1]:
        total = total + _weighted_total(terms, loss_weight)
    return total


def released_instance_terms(
    pred: dict[str, Any],
    insts: list[dict[str, Tensor]],
    *,
    loss_weight: Sequence[float] = (0.5, 1.0, 1.0, 0.5),
    non_object_weight: float = 0.1,
    num_classes: int,
    fix_dice_loss_weight: bool = True,
    iter_matcher: bool = True,
    fix_mean_loss: bool = False,
    matcher: str = "hungarian",
    topk: int = 1,
    cost_weights: Sequence[float] = (0.5, 1.0, 1.0),
) -> list[dict[str, Tensor]]:
    """Per-layer terms of the released ``InstanceCriterion`` (no boxes).

    Same inputs as :func:`released_instance_loss`; returns
    ``[aux_0, ..., aux_{L-1}, final]`` dicts with ``'cls', 'bce', 'dice', 'score'``.
    """
    _check_common(loss_weight, (4,), matcher, topk, cost_weights)
    _check_batch(pred, insts, "pred")
    aux_layers = list(pred.get("aux_outputs", []))
    for i, layer in enumerate(aux_layers):
        _check_batch(layer, insts, f"pred['aux_outputs'][{i}]")
    for b, inst in enumerate(insts):
        if "sp_masks" not in inst:
            raise ValueError(f"insts[{b}] is missing GT masks ['sp_masks']")

    class_weight = [1.0] * num_classes + [non_object_weight]
    match_kwargs = {"matcher": matcher, "topk": topk, "cost_weights": tuple(cost_weights)}
    options = {"class_weight": class_weight, "fix_dice_loss_weight": fix_dice_loss_weight,
               "fix_mean_loss": fix_mean_loss, "with_boxes": False}

    final_indices = _match_layer(pred, insts, "sp_masks", match_kwargs)
    final_terms = _layer_terms(pred, insts, final_indices, "sp_masks", final_layer=True, **options)
    layer_terms = []
    for layer in aux_layers:
        indices = _match_layer(layer, insts, "sp_masks", match_kwargs) if iter_matcher else final_indices
        layer_terms.append(_layer_terms(layer, insts, indices, "sp_masks", final_layer=False, **options))
    return layer_terms + [final_terms]


def released_instance_loss(
    pred: dict[str, Any],
    insts: list[dict[str, Tensor]],
    *,
    loss_weight: Sequence[float] = (0.5, 1.0, 1.0, 0.5),
    non_object_weight: float = 0.1,
    num_classes: int,
    fix_dice_loss_weight: bool = True,
    iter_matcher: bool = True,
    fix_mean_loss: bool = False,
    matcher: str = "hungarian",
    topk: int = 1,
    cost_weights: Sequence[float] = (0.5, 1.0, 1.0),
) -> Tensor:
    """Released ``InstanceCriterion``: every layer matched and scored against ``sp_masks``.

    Args:
        pred: ``{'cls_preds': [(Q, C+1)] * B, 'scores': [(Q, 1) or None] * B,
            'masks': [(Q, S)] * B, 'aux_outputs': [dict with the same keys]}``.
        insts: per sample ``{'labels_3d': (K,), 'sp_masks': (K, S) bool,
            'query_masks': (K, Q) bool (optional)}``.
        Other arguments as in :func:`released_mixed_instance_loss`.

    Returns:
        0-d total over the final and aux layers.
    """
    layers = released_instance_terms(
        pred, insts, loss_weight=loss_weight, non_object_weight=non_object_weight,
        num_classes=num_classes, fix_dice_loss_weight=fix_dice_loss_weight,
        iter_matcher=iter_matcher, fix_mean_loss=fix_mean_loss, matcher=matcher,
        topk=topk, cost_weights=cost_weights)
    total = _weighted_total(layers[-1], loss_weight)
    for terms in layers[:-1]:
        total = total + _weighted_total(terms, loss_weight)
    return total


# --------------------------------------------------------------------------
# Semantic criterion
# --------------------------------------------------------------------------
def released_semantic_loss(
    sem_preds: list[Tensor],
    sem_sp_masks: list[Tensor],
    *,
    ignore_index: int,
    loss_weight: float = 0.5,
) -> Tensor:
    """Released ``ScanNetSemanticCriterion``.

    Args:
        sem_preds: per sample (S, C+1) logits; the last column is dropped when
            ``ignore_index >= 0``.
        sem_sp_masks: per sample (C+1, S) per-class counts or one-hot; the
            target is ``argmax`` over classes (first maximum on ties).
        ignore_index: target value left out of the cross-entropy.
        loss_weight: multiplier of the batch mean.

    Returns:
        0-d ``loss_weight * mean_b CE_b``; a sample whose targets are all
        ignored gives NaN (PyTorch's 0/0), as released.
    """
    if len(sem_preds) != len(sem_sp_masks) or len(sem_preds) == 0:
        raise ValueError(
            "sem_preds and sem_sp_masks must be non-empty lists of equal length B, got "
            f"{len(sem_preds)} and {len(sem_sp_masks)}")
    losses = []
    for b, (logits, masks) in enumerate(zip(sem_preds, sem_sp_masks)):
        if logits.dim() != 2 or masks.dim() != 2 or masks.shape[1] != logits.shape[0]:
            raise ValueError(
                f"sem_preds[{b}] must be (S, C+1) and sem_sp_masks[{b}] (C+1, S), got "
                f"{tuple(logits.shape)} and {tuple(masks.shape)}")
        if ignore_index >= 0:
            logits = logits[:, :-1]  # (S, C)
        target = masks.float().argmax(0)  # (S,)
        losses.append(F.cross_entropy(logits, target, ignore_index=ignore_index))
    return loss_weight * torch.mean(torch.stack(losses))
