"""Evaluation: ScanNet-benchmark instance AP (AP, AP50, AP25) and semantic mIoU."""

from __future__ import annotations

from esam.evaluation.instance import (
    IOU_THRESHOLDS,
    InstanceEvaluator,
    average_precision,
    evaluate_instances,
    precision_recall_curve,
)
from esam.evaluation.semantic import SemanticMeter, confusion_matrix, semantic_miou

__all__ = [
    "IOU_THRESHOLDS",
    "InstanceEvaluator",
    "SemanticMeter",
    "average_precision",
    "confusion_matrix",
    "evaluate_instances",
    "precision_recall_curve",
    "semantic_miou",
]
