"""Semantic segmentation mIoU over a confusion matrix (ScanNet benchmark semantics).

Shapes: N points, C classes. IoU of class c = TP / (TP + FP + FN) over the points whose GT is not
``ignore_index``; a class absent from both GT and prediction has IoU NaN and is left out of the
mean, as the ScanNet semantic evaluation skips it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SemanticMeter", "confusion_matrix", "semantic_miou"]


def _check_labels(pred: Tensor, gt: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Validate ``pred (N,)`` and ``gt (N,)``; return the ``(N,)`` bool mask of scored points."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    for name, t in (("pred", pred), ("gt", gt)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.is_floating_point() \
                or t.is_complex() or t.dtype == torch.bool:
            got = f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, Tensor) \
                else type(t).__name__
            raise ValueError(f"{name}: expected a (N,) integer tensor of class indices, got {got}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred: expected shape {tuple(gt.shape)} like gt, got {tuple(pred.shape)}")
    scored = gt != ignore_index  # (N,)
    gt_bad = scored & ((gt < 0) | (gt >= num_classes))
    if bool(gt_bad.any()):
        raise ValueError(f"gt: expected values in [0, {num_classes}) or ignore_index="
                         f"{ignore_index}, got {int(gt[gt_bad][0])}")
    pred_bad = scored & ((pred < 0) | (pred >= num_classes))
    if bool(pred_bad.any()):
        raise ValueError(f"pred: expected values in [0, {num_classes}) where gt is scored, "
                         f"got {int(pred[pred_bad][0])}")
    return scored


def confusion_matrix(pred: Tensor, gt: Tensor, *, num_classes: int, ignore_index: int) -> Tensor:
    """Counts ``(C, C)`` int64: row = GT class, column = predicted class, over scored points.

    Args:
        pred: ``(N,)`` predicted class in ``[0, C)``.
        gt: ``(N,)`` GT class in ``[0, C)`` or ``ignore_index`` (not scored).
        num_classes: C.
        ignore_index: GT value of unlabeled points.
    """
    scored = _check_labels(pred, gt, num_classes, ignore_index)
    flat = gt[scored].long() * num_classes + pred[scored].long()  # (N_scored,)
    return torch.bincount(flat, minlength=num_classes * num_classes).view(
        num_classes, num_classes).cpu()


def _scores(confusion: Tensor, ignore_index: int) -> dict:
    confusion = confusion.to(torch.float64)
    tp = confusion.diag()  # (C,)
    union = confusion.sum(0) + confusion.sum(1) - tp  # (C,) TP + FP + FN
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    if 0 <= ignore_index < iou.numel():
        iou[ignore_index] = math.nan  # an ignored class that is also a class index is not scored
    total = confusion.sum()
    return {
        "miou": float(torch.nanmean(iou)),
        "iou": iou,
        "acc": float(tp.sum() / total) if total > 0 else math.nan,
    }


def semantic_miou(pred: Tensor, gt: Tensor, *, num_classes: int, ignore_index: int) -> dict:
    """Mean IoU of one point cloud (or of points concatenated over scenes).

    Args:
        pred: ``(N,)`` predicted class in ``[0, C)``.
        gt: ``(N,)`` GT class in ``[0, C)`` or ``ignore_index`` (not scored).
        num_classes: C.
        ignore_index: GT value of unlabeled points; if it is also a class index, that class is
            left out of the mean.

    Returns:
        ``{'miou': float, 'iou': (C,) float64 (NaN: class in neither GT nor prediction),
        'acc': float overall point accuracy, 'confusion': (C, C) int64}``.
    """
    confusion = confusion_matrix(pred, gt, num_classes=num_classes, ignore_index=ignore_index)
    return {**_scores(confusion, ignore_index), "confusion": confusion}


class SemanticMeter:
    """Accumulates the confusion matrix scene by scene; `compute` gives `semantic_miou`'s dict."""

    def __init__(self, *, num_classes: int, ignore_index: int):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Add one scene: ``pred (N,)``, ``gt (N,)``."""
        self.confusion += confusion_matrix(pred, gt, num_classes=self.num_classes,
                                           ignore_index=self.ignore_index)

    def compute(self) -> dict:
        return {**_scores(self.confusion, self.ignore_index), "confusion": self.confusion.clone()}
