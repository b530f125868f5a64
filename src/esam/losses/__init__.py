"""Loss terms, matchers and the total ESAM criterion."""

from esam.losses import functional
from esam.losses.clip import ClipConsCriterion
from esam.losses.criterion import ESAMCriterion
from esam.losses.instance import InstanceCriterion, InstanceWeights, MixedInstanceCriterion
from esam.losses.matcher import (
    HungarianMatcher,
    MaskBCECost,
    MaskDiceCost,
    QueryClassificationCost,
    SparseMatcher,
)
from esam.losses.semantic import ScanNetSemanticCriterion

__all__ = [
    "functional",
    "ClipConsCriterion",
    "ESAMCriterion",
    "InstanceCriterion",
    "InstanceWeights",
    "MixedInstanceCriterion",
    "HungarianMatcher",
    "SparseMatcher",
    "QueryClassificationCost",
    "MaskBCECost",
    "MaskDiceCost",
    "ScanNetSemanticCriterion",
]
