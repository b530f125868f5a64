"""Containers for streaming RGB-D scenes: one `FrameData` per frame, one `SceneSequence` per scene.

Shape vocabulary: V frames, N points of a frame, S superpoints of a frame, K instances of a scene,
C semantic classes. Every frame's points live in one world frame shared by the whole scene, and
instance ids are global within the scene, so the same object keeps its id in every frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["FrameData", "SceneSequence", "frame_instances", "collate_scenes"]

_TENSOR_FIELDS = ("points", "colors", "semantic", "instance", "superpoints", "pose", "intrinsics")
_OPTIONAL_TENSOR_FIELDS = ("image", "pixel_index")


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _require(cond: bool, name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {got}")


@dataclass
class FrameData:
    """One RGB-D frame lifted to a labelled point cloud.

    Attributes:
        points: ``(N, 3)`` float32 world-frame xyz.
        colors: ``(N, 3)`` float32 RGB in [0, 1].
        semantic: ``(N,)`` int64 class in ``[0, C)``; ``C`` (the scene's ``ignore_index``) marks
            unlabeled points.
        instance: ``(N,)`` int64 scene-global instance id in ``[0, K)``; -1 for points of no
            instance (floor, wall, unlabeled).
        superpoints: ``(N,)`` int64 superpoint id in ``[0, S)``, every id used at least once.
        pose: ``(4, 4)`` float32 camera-to-world transform (OpenCV camera: x right, y down,
            z forward).
        intrinsics: ``(3, 3)`` float32 pinhole matrix.
        frame_index: position of the frame in its source stream.
        image: optional ``(3, H, W)`` float32 rendered colour image in [0, 1].
        pixel_index: optional ``(N,)`` int64 flat index ``v * W + u`` of the pixel each point
            comes from.
    """

    points: Tensor
    colors: Tensor
    semantic: Tensor
    instance: Tensor
    superpoints: Tensor
    pose: Tensor
    intrinsics: Tensor
    frame_index: int = 0
    image: Tensor | None = None
    pixel_index: Tensor | None = None

    def __post_init__(self) -> None:
        for name in _TENSOR_FIELDS:
            _require(isinstance(getattr(self, name), Tensor), name, "a torch.Tensor",
                     type(getattr(self, name)).__name__)
        n = self.points.shape[0] if self.points.dim() == 2 else -1
        _require(self.points.dim() == 2 and self.points.shape[1] == 3, "points", "shape (N, 3)",
                 _shape(self.points))
        _require(self.colors.shape == (n, 3), "colors", f"shape (N={n}, 3)", _shape(self.colors))
        for name in ("semantic", "instance", "superpoints"):
            t = getattr(self, name)
            _require(t.shape == (n,), name, f"shape (N={n},)", _shape(t))
            _require(t.dtype == torch.int64, name, "dtype torch.int64", t.dtype)
        _require(self.pose.shape == (4, 4), "pose", "shape (4, 4)", _shape(self.pose))
        _require(self.intrinsics.shape == (3, 3), "intrinsics", "shape (3, 3)",
                 _shape(self.intrinsics))
        if self.pixel_index is not None:
            _require(self.pixel_index.shape == (n,), "pixel_index", f"shape (N={n},)",
                     _shape(self.pixel_index))
        if self.image is not None:
            _require(self.image.dim() == 3 and self.image.shape[0] == 3, "image",
                     "shape (3, H, W)", _shape(self.image))

    @property
    def num_points(self) -> int:
        """N."""
        return int(self.points.shape[0])

    @property
    def num_superpoints(self) -> int:
        """S (ids are contiguous, so the largest id + 1)."""
        return int(self.superpoints.max()) + 1 if self.superpoints.numel() else 0

    @property
    def num_instances(self) -> int:
        """Number of distinct instances visible in this frame."""
        ids = self.instance[self.instance >= 0]
        return int(torch.unique(ids).numel())

    @property
    def device(self) -> torch.device:
        return self.points.device

    def to(self, device: torch.device | str) -> FrameData:
        """A copy with every tensor on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        for name in _OPTIONAL_TENSOR_FIELDS:
            value = getattr(self, name)
            moved[name] = None if value is None else value.to(device)
        return replace(self, **moved)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and ints (what `torch.save` stores)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _TENSOR_FIELDS}
        out["frame_index"] = int(self.frame_index)
        for name in _OPTIONAL_TENSOR_FIELDS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrameData:
        return cls(**{k: data[k] for k in (*_TENSOR_FIELDS, "frame_index") if k in data},
                   **{k: data.get(k) for k in _OPTIONAL_TENSOR_FIELDS})


@dataclass
class SceneSequence:
    """A scene seen through a stream of V frames.

    Attributes:
        scene_id: name of the scene.
        frames: the V frames, in stream order.
        class_names: the C semantic class names; class ``C`` (``ignore_index``) is "unlabeled".
        instance_labels: ``(K,)`` int64 semantic class of each scene-global instance id.
    """

    scene_id: str
    frames: list[FrameData]
    class_names: list[str]
    instance_labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def __post_init__(self) -> None:
        _require(isinstance(self.instance_labels, Tensor) and self.instance_labels.dim() == 1,
                 "instance_labels", "a (K,) tensor", _shape(self.instance_labels))
        _require(self.instance_labels.dtype == torch.int64, "instance_labels", "dtype torch.int64",
                 self.instance_labels.dtype)
        _require(all(isinstance(f, FrameData) for f in self.frames), "frames",
                 "a list of FrameData", [type(f).__name__ for f in self.frames])
        if self.instance_labels.numel():
            lo, hi = int(self.instance_labels.min()), int(self.instance_labels.max())
            _require(lo >= 0 and hi < self.num_classes, "instance_labels",
                     f"classes in [0, C={self.num_classes})", f"range [{lo}, {hi}]")

    @property
    def num_frames(self) -> int:
        """V."""
        return len(self.frames)

    @property
    def num_classes(self) -> int:
        """C."""
        return len(self.class_names)

    @property
    def ignore_index(self) -> int:
        """Semantic label of unlabeled points (= C)."""
        return len(self.class_names)

    @property
    def num_points(self) -> int:
        """Total number of points over all frames."""
        return sum(f.num_points for f in self.frames)

    @property
    def num_instances(self) -> int:
        """K: number of scene-global instances (visible in some frame or not)."""
        return int(self.instance_labels.shape[0])

    def __len__(self) -> int:
        return len(self.frames)

    def to(self, device: torch.device | str) -> SceneSequence:
        """A copy with every tensor on ``device``."""
        return replace(self, frames=[f.to(device) for f in self.frames],
                       instance_labels=self.instance_labels.to(device))

    def window(self, start: int, length: int) -> SceneSequence:
        """The ``length`` consecutive frames beginning at frame ``start`` (a V-frame clip)."""
        if length < 1 or start < 0 or start + length > self.num_frames:
            raise ValueError(
                f"window: expected 0 <= start and start + length <= V={self.num_frames} with "
                f"length >= 1, got start={start}, length={length}")
        return replace(self, frames=self.frames[start:start + length])

    def to_dict(self) -> dict[str, Any]:
        return {
            "scene_id": self.scene_id,
            "class_names": list(self.class_names),
            "instance_labels": self.instance_labels,
            "frames": [f.to_dict() for f in self.frames],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneSequence:
        return cls(scene_id=data["scene_id"], class_names=list(data["class_names"]),
                   instance_labels=data["instance_labels"],
                   frames=[FrameData.from_dict(f) for f in data["frames"]])


def frame_instances(frame: FrameData, instance_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-frame instance targets from scene-global ids.

    Args:
        frame: a frame whose ``instance`` holds scene-global ids in ``[-1, K)``.
        instance_labels: ``(K,)`` class of each scene-global instance.

    Returns:
        ``(instance_ids (N,), labels (K_f,), global_ids (K_f,))``: frame-local ids in
        ``[-1, K_f)`` over the K_f instances present in the frame (sorted by global id), their
        classes and their scene-global ids.
    """
    inst = frame.instance
    visible = inst >= 0
    global_ids, local = torch.unique(inst[visible], return_inverse=True)  # (K_f,), (N_vis,)
    instance_ids = torch.full_like(inst, -1)
    instance_ids[visible] = local
    labels = instance_labels.to(inst.device)[global_ids]
    return instance_ids, labels, global_ids


def collate_scenes(batch: list[SceneSequence]) -> list[SceneSequence]:
    """`DataLoader` collate function: keep the scenes as a list (N and K vary per frame)."""
    return list(batch)
