"""Loss terms, matchers and the total ESAM criterion."""

from esam.losses import functional
from esam.losses.clip import ClipConsCriterion
from esam.losses.criterion import ESAMCriterion
from esam.losses.cross_frame import CrossFrameCriterion
from esam.losses.merge import (MergeCECriterion, ScanNetMergeCriterion_Fast,
                               ScanNetMergeCriterion_Seal)
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
    "CrossFrameCriterion",
    "MergeCECriterion",
    "ScanNetMergeCriterion_Fast",
    "ScanNetMergeCriterion_Seal",
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
