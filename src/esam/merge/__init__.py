"""Online merging of per-frame instances into global instances."""

from esam.merge.online_merge import FrameInstances, MergeResult, OnlineMerge

__all__ = ["FrameInstances", "MergeResult", "OnlineMerge"]
