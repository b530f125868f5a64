"""Reference model and its parts."""

from esam.models.reference import (ESAMReferenceModel, FrameInput, InferenceConfig,
                                   ReferenceModelConfig, frame_target, prepare_frame,
                                   with_query_masks)
from esam.models.tdt import TDTOutput, TimeDividedTransformer

__all__ = [
    "ESAMReferenceModel",
    "FrameInput",
    "InferenceConfig",
    "ReferenceModelConfig",
    "frame_target",
    "prepare_frame",
    "with_query_masks",
    "TDTOutput",
    "TimeDividedTransformer",
]
