"""esam: the ESAM training objective for query-based online 3-D instance segmentation."""

from esam.config import ESAMLossConfig, esam_preset, load_config, seed_preset
from esam.losses import ESAMCriterion
from esam.structures import (FramePrediction, FrameTarget, InstanceMasks, LayerOutput,
                             SequencePrediction, SequenceTarget)

__version__ = "0.1.0"

__all__ = [
    "ESAMCriterion",
    "ESAMLossConfig",
    "esam_preset",
    "seed_preset",
    "load_config",
    "FramePrediction",
    "FrameTarget",
    "InstanceMasks",
    "LayerOutput",
    "SequencePrediction",
    "SequenceTarget",
]
