"""Data: synthetic RGB-D streaming scenes (the embedded default) and ESAM's ScanNet-format files.

Both produce the same containers: a `SceneSequence` of `FrameData`, each frame a world-frame
point cloud with colours, semantic classes, scene-global instance ids and superpoints.
"""

from .dataset import (
    SyntheticStreamingDataset,
    sample_window,
    scene_seed,
    train_val_split,
    window,
)
from .raycast import Primitives, cast_rays, look_at, pinhole_intrinsics, pixel_rays
from .scannet import (
    SCANNET_INTRINSICS,
    ScanNetLabelSpace,
    ScanNetMVDataset,
    load_scannet_frame,
    load_scannet_scene,
    read_mask_bin,
    read_points_bin,
    read_pose,
    scannet200_labels,
    scannet20_labels,
    scannet_frame_ids,
)
from .structures import FrameData, SceneSequence, collate_scenes, frame_instances
from .synthetic import (
    CLASS_NAMES,
    SceneLayout,
    SyntheticSceneConfig,
    generate_scene,
    render_depth,
    render_frame,
)

__all__ = [
    "CLASS_NAMES",
    "FrameData",
    "Primitives",
    "SCANNET_INTRINSICS",
    "ScanNetLabelSpace",
    "ScanNetMVDataset",
    "SceneLayout",
    "SceneSequence",
    "SyntheticSceneConfig",
    "SyntheticStreamingDataset",
    "cast_rays",
    "collate_scenes",
    "frame_instances",
    "generate_scene",
    "load_scannet_frame",
    "load_scannet_scene",
    "look_at",
    "pinhole_intrinsics",
    "pixel_rays",
    "read_mask_bin",
    "read_points_bin",
    "read_pose",
    "render_depth",
    "render_frame",
    "sample_window",
    "scannet200_labels",
    "scannet20_labels",
    "scannet_frame_ids",
    "scene_seed",
    "train_val_split",
    "window",
]
