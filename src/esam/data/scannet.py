"""Loader for ESAM's preprocessed ScanNet-format per-frame data.

ESAM's converters (``data/scannet-mv/load_scannet_mv_data*.py`` and ``tools/create_data.py``)
write, for each scene and each kept frame (file stem = the ScanNet frame number, 0, 20, 40, ...):

    <root>/points/<scene>/<frame>.bin         float32 (n, 6): xyz in the ScanNet world frame
                                              (camera pose applied, not axis-aligned) + RGB 0..255
    <root>/semantic_mask/<scene>/<frame>.bin  int64 (n,): raw category id (NYU40 for ScanNet,
                                              ScanNet200 ids for ScanNet200), 0 = unannotated
    <root>/instance_mask/<scene>/<frame>.bin  int64 (n,): ScanNet object id (1-based, the same
                                              object keeps its id in every frame), 0 = none
    <root>/super_points/<scene>/<frame>.bin   int64 (n,): per-frame superpoint id, 0..S-1
    <root>/2D/<scene>/pose/<frame>.txt        4 x 4 camera-to-world pose (text)
    <root>/axis_align_matrix/<scene>.npy      4 x 4 scene alignment
    <root>/meta_data/scannetv2_<split>.txt    scene list of a split

The single-view layout (ScanNet-SV) stores one sample per file instead:
``points/<scene>_<frame>.bin`` (same for the masks) and ``pose_centered/<scene>/<frame>.npy``.

Semantic ids are mapped to class indices ``[0, C)`` through a `ScanNetLabelSpace` (ids outside it
become ``C``, the ignore index), as ESAM's ``PointSegClassMapping`` does. Instance ids become
scene-global ids ``[0, K)``; points of no instance, of an unlabeled class or of a "stuff" class
(wall, floor) get -1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .structures import FrameData, SceneSequence

__all__ = [
    "ScanNetLabelSpace",
    "scannet20_labels",
    "scannet200_labels",
    "SCANNET_INTRINSICS",
    "read_points_bin",
    "read_mask_bin",
    "read_pose",
    "scannet_frame_ids",
    "load_scannet_frame",
    "load_scannet_scene",
    "ScanNetMVDataset",
]

Layout = Literal["mv", "sv"]

# fx, fy, cx, cy of ScanNet's 640 x 480 depth frames, as ESAM's converters use them.
SCANNET_INTRINSICS = (577.870605, 577.870605, 319.5, 239.5)


@dataclass(frozen=True)
class ScanNetLabelSpace:
    """Which raw category ids are classes, in which order.

    Attributes:
        class_names: the C class names.
        valid_class_ids: raw id of each class (same length as ``class_names``).
        stuff_classes: class indices whose points belong to no instance (wall, floor).
    """

    class_names: tuple[str, ...]
    valid_class_ids: tuple[int, ...]
    stuff_classes: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.valid_class_ids):
            raise ValueError(
                f"valid_class_ids: expected one id per class ({len(self.class_names)}), got "
                f"{len(self.valid_class_ids)}")
        if len(set(self.valid_class_ids)) != len(self.valid_class_ids) or \
                min(self.valid_class_ids, default=0) < 0:
            raise ValueError("valid_class_ids: expected distinct non-negative ids")
        if any(not 0 <= c < len(self.class_names) for c in self.stuff_classes):
            raise ValueError(
                f"stuff_classes: expected indices in [0, {len(self.class_names)}), got "
                f"{self.stuff_classes}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def map_semantic(self, raw: Tensor) -> Tensor:
        """Raw ids ``(N,)`` -> class indices ``(N,)`` in ``[0, C]`` (C: not a class)."""
        table = torch.full((max(self.valid_class_ids) + 2,), self.num_classes, dtype=torch.long)
        table[torch.tensor(self.valid_class_ids)] = torch.arange(self.num_classes)
        outside = (raw < 0) | (raw >= table.numel())
        return torch.where(outside, torch.full_like(raw, self.num_classes),
                           table[raw.clamp(0, table.numel() - 1)])


def scannet20_labels() -> ScanNetLabelSpace:
    """The 20 ScanNet classes (NYU40 ids) of ESAM's ScanNet / ScanNet-MV configs."""
    return ScanNetLabelSpace(
        class_names=("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door",
                     "window", "bookshelf", "picture", "counter", "desk", "curtain",
                     "refrigerator", "showercurtrain", "toilet", "sink", "bathtub",
                     "otherfurniture"),
        valid_class_ids=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39),
    )


_SCANNET200_NAMES = (
    "wall", "floor", "chair", "table", "door", "couch", "cabinet", "shelf", "desk",
    "office chair", "bed", "pillow", "sink", "picture", "window", "toilet", "bookshelf", "monitor",
    "curtain", "book", "armchair", "coffee table", "box", "refrigerator", "lamp",
    "kitchen cabinet", "towel", "clothes", "tv", "nightstand", "counter", "dresser", "stool",
    "cushion", "plant", "ceiling", "bathtub", "end table", "dining table", "keyboard", "bag",
    "backpack", "toilet paper", "printer", "tv stand", "whiteboard", "blanket", "shower curtain",
    "trash can", "closet", "stairs", "microwave", "stove", "shoe", "computer tower", "bottle",
    "bin", "ottoman", "bench", "board", "washing machine", "mirror", "copier", "basket",
    "sofa chair", "file cabinet", "fan", "laptop", "shower", "paper", "person",
    "paper towel dispenser", "oven", "blinds", "rack", "plate", "blackboard", "piano",
    "suitcase", "rail", "radiator", "recycling bin", "container", "wardrobe", "soap dispenser",
    "telephone", "bucket", "clock", "stand", "light", "laundry basket", "pipe", "clothes dryer",
    "guitar", "toilet paper holder", "seat", "speaker", "column", "bicycle", "ladder",
    "bathroom stall", "shower wall", "cup", "jacket", "storage bin", "coffee maker",
    "dishwasher", "paper towel roll", "machine", "mat", "windowsill", "bar", "toaster",
    "bulletin board", "ironing board", "fireplace", "soap dish", "kitchen counter", "doorframe",
    "toilet paper dispenser", "mini fridge", "fire extinguisher", "ball", "hat",
    "shower curtain rod", "water cooler", "paper cutter", "tray", "shower door", "pillar",
    "ledge", "toaster oven", "mouse", "toilet seat cover dispenser", "furniture", "cart",
    "storage container", "scale", "tissue box", "light switch", "crate", "power outlet",
    "decoration", "sign", "projector", "closet door", "vacuum cleaner", "candle", "plunger",
    "stuffed animal", "headphones", "dish rack", "broom", "guitar case", "range hood", "dustpan",
    "hair dryer", "water bottle", "handicap bar", "purse", "vent", "shower floor",
    "water pitcher", "mailbox", "bowl", "paper bag", "alarm clock", "music stand",
    "projector screen", "divider", "laundry detergent", "bathroom counter", "object",
    "bathroom vanity", "closet wall", "laundry hamper", "bathroom stall door", "ceiling light",
    "trash bin", "dumbbell", "stair rail", "tube", "bathroom cabinet", "cd case", "closet rod",
    "coffee kettle", "structure", "shower head", "keyboard piano", "case of water bottles",
    "coat rack", "storage organizer", "folded chair", "fire alarm", "power strip", "calendar",
    "poster", "potted plant", "luggage", "mattress",
)
_SCANNET200_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 26, 27, 28,
    29, 31, 32, 33, 34, 35, 36, 38, 39, 40, 41, 42, 44, 45, 46, 47, 48, 49, 50, 51, 52, 54, 55,
    56, 57, 58, 59, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    82, 84, 86, 87, 88, 89, 90, 93, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107,
    110, 112, 115, 116, 118, 120, 121, 122, 125, 128, 130, 131, 132, 134, 136, 138, 139, 140,
    141, 145, 148, 154, 155, 156, 157, 159, 161, 163, 165, 166, 168, 169, 170, 177, 180, 185,
    188, 191, 193, 195, 202, 208, 213, 214, 221, 229, 230, 232, 233, 242, 250, 261, 264, 276,
    283, 286, 300, 304, 312, 323, 325, 331, 342, 356, 370, 392, 395, 399, 408, 417, 488, 540,
    562, 570, 572, 581, 609, 748, 776, 1156, 1163, 1164, 1165, 1166, 1167, 1168, 1169, 1170,
    1171, 1172, 1173, 1174, 1175, 1176, 1178, 1179, 1180, 1181, 1182, 1183, 1184, 1185, 1186,
    1187, 1188, 1189, 1190, 1191,
)


def scannet200_labels() -> ScanNetLabelSpace:
    """The 200 ScanNet200 classes in the order and with the ids of ESAM's ScanNet200(-MV)
    dataset classes, which put wall and floor first (stuff) — their names at indices 1 and 2
    follow ESAM's table, whose note says floor and chair are swapped relative to ScanNet200."""
    return ScanNetLabelSpace(class_names=_SCANNET200_NAMES, valid_class_ids=_SCANNET200_IDS)


# ----------------------------------------------------------------------------- file readers

def _read_raw(path: Path, dtype: np.dtype, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    size = path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise ValueError(
            f"{path}: {what} file of {size} bytes is not a whole number of "
            f"{np.dtype(dtype).name} values ({itemsize} bytes each)")
    return np.fromfile(path, dtype=dtype)


def read_points_bin(path: str | Path, load_dim: int = 6) -> Tensor:
    """Read a float32 ``(n, load_dim)`` point file (xyz + RGB in 0..255) -> ``(n, load_dim)``.

    Raises:
        ValueError naming the file when its size is not ``n * load_dim`` float32 values, or its
        values are not finite / its colours not in 0..255 (a file of another dtype).
    """
    path = Path(path)
    raw = _read_raw(path, np.float32, "points")
    if raw.size % load_dim:
        raise ValueError(
            f"{path}: expected float32 points of shape (n, {load_dim}), got {raw.size} values, "
            f"not a multiple of {load_dim}")
    pts = torch.from_numpy(raw.reshape(-1, load_dim).copy())
    if not bool(torch.isfinite(pts).all()):
        raise ValueError(f"{path}: expected finite float32 values, found NaN or Inf "
                         f"(is the file float32?)")
    if load_dim >= 6 and pts.shape[0]:
        lo, hi = float(pts[:, 3:6].min()), float(pts[:, 3:6].max())
        if lo < -1e-3 or hi > 255.001:
            raise ValueError(f"{path}: expected RGB in [0, 255] in columns 3..5, got range "
                             f"[{lo:.4g}, {hi:.4g}] (is the file float32 (n, {load_dim})?)")
    return pts


def read_mask_bin(path: str | Path, num_points: int | None = None, what: str = "mask") -> Tensor:
    """Read an int64 per-point mask file -> ``(n,)`` int64.

    Raises:
        ValueError naming the file when its size is not a whole number of int64 values, when
        ``num_points`` is given and differs from n, or when a value is negative.
    """
    path = Path(path)
    raw = _read_raw(path, np.int64, what)
    if num_points is not None and raw.size != num_points:
        raise ValueError(
            f"{path}: expected an int64 {what} of shape ({num_points},) to match the points, got "
            f"({raw.size},) (is the file int64?)")
    mask = torch.from_numpy(raw.copy())
    if mask.numel() and int(mask.min()) < 0:
        raise ValueError(f"{path}: expected non-negative {what} values, got minimum "
                         f"{int(mask.min())} (is the file int64?)")
    return mask


def read_pose(path: str | Path) -> Tensor:
    """Read a 4 x 4 matrix from a ``.txt`` (whitespace separated) or ``.npy`` file -> float32.

    Raises:
        ValueError naming the file when it is not a finite 4 x 4 numeric matrix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pose file not found: {path}")
    try:
        mat = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: expected a numeric 4 x 4 matrix ({err})") from err
    mat = np.asarray(mat)
    if mat.shape != (4, 4) or not np.issubdtype(mat.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric matrix of shape (4, 4), got shape "
                         f"{mat.shape} and dtype {mat.dtype}")
    if not np.isfinite(mat).all():
        raise ValueError(f"{path}: expected a finite 4 x 4 matrix, found NaN or Inf")
    return torch.from_numpy(mat.astype(np.float32))


# ----------------------------------------------------------------------------- paths

def _paths(root: Path, scene_id: str, frame: str, layout: Layout) -> dict[str, Path]:
    if layout == "mv":
        rel = Path(scene_id) / f"{frame}.bin"
        poses = [root / "2D" / scene_id / "pose" / f"{frame}.txt",
                 root / "2D" / scene_id / "pose" / f"{frame}.npy"]
    elif layout == "sv":
        rel = Path(f"{scene_id}_{frame}.bin")
        poses = [root / "pose_centered" / scene_id / f"{frame}.npy",
                 root / "2D" / scene_id / "pose" / f"{frame}.txt"]
    else:
        raise ValueError(f"layout: expected 'mv' or 'sv', got {layout!r}")
    out = {name: root / folder / rel for name, folder in (
        ("points", "points"), ("semantic", "semantic_mask"), ("instance", "instance_mask"),
        ("superpoints", "super_points"))}
    out["pose"] = next((p for p in poses if p.is_file()), poses[0])
    return out


def scannet_frame_ids(root: str | Path, scene_id: str, *, frame_id_multiple: int | None = None
                      ) -> list[str]:
    """Frame stems of a ScanNet-MV scene, in numeric order.

    Args:
        frame_id_multiple: keep only frames whose number is a multiple of this (ESAM's infos
            keep multiples of 40).
    """
    folder = Path(root) / "points" / scene_id
    if not folder.is_dir():
        raise FileNotFoundError(f"scene folder not found: {folder}")
    stems = [p.stem for p in folder.glob("*.bin")]
    bad = [s for s in stems if not s.isdigit()]
    if bad:
        raise ValueError(f"{folder}: expected files named <frame number>.bin, got {bad[:3]}")
    stems.sort(key=int)
    if frame_id_multiple is not None:
        stems = [s for s in stems if int(s) % frame_id_multiple == 0]
    return stems


def _intrinsics(intrinsics: Tensor | Sequence[float] | None) -> Tensor:
    if intrinsics is None:
        intrinsics = SCANNET_INTRINSICS
    if isinstance(intrinsics, Tensor):
        if intrinsics.shape != (3, 3):
            raise ValueError(f"intrinsics: expected shape (3, 3), got {tuple(intrinsics.shape)}")
        return intrinsics.float()
    fx, fy, cx, cy = intrinsics
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float32)


def load_scannet_frame(root: str | Path, scene_id: str, frame: str | int, *,
                       labels: ScanNetLabelSpace | None = None, layout: Layout = "mv",
                       intrinsics: Tensor | Sequence[float] | None = None,
                       axis_align: bool = False, require_pose: bool = True) -> FrameData:
    """Load one preprocessed frame.

    Instance ids stay ScanNet object ids (global within the scene, not contiguous): the raw id,
    or -1 for points of no object, of an unlabeled class, or of a stuff class.
    `load_scannet_scene` renumbers them to ``[0, K)``.

    Args:
        root: dataset root (the folder holding ``points/``, ``super_points/``, ...).
        scene_id: e.g. ``"scene0000_00"``.
        frame: the frame number (file stem), e.g. ``40``.
        labels: label space (default `scannet20_labels()`).
        layout: ``"mv"`` (per-scene folders) or ``"sv"`` (one ``<scene>_<frame>.bin`` per sample).
        intrinsics: ``(3, 3)`` or (fx, fy, cx, cy); default `SCANNET_INTRINSICS`.
        axis_align: apply ``axis_align_matrix/<scene>.npy`` to points and pose.
        require_pose: raise if the pose file is missing; otherwise use the identity.

    Raises:
        FileNotFoundError for a missing file; ValueError naming the file for a wrong size,
        dtype or shape.
    """
    root = Path(root)
    labels = scannet20_labels() if labels is None else labels
    frame = str(frame)
    paths = _paths(root, scene_id, frame, layout)
    pts = read_points_bin(paths["points"])  # (N, 6)
    n = pts.shape[0]
    raw_sem = read_mask_bin(paths["semantic"], n, "semantic mask")
    raw_inst = read_mask_bin(paths["instance"], n, "instance mask")
    sp_raw = read_mask_bin(paths["superpoints"], n, "superpoint mask")
    if paths["pose"].is_file() or require_pose:
        pose = read_pose(paths["pose"])
    else:
        pose = torch.eye(4)
    xyz = pts[:, :3]
    if axis_align:
        align = read_pose(root / "axis_align_matrix" / f"{scene_id}.npy")
        xyz = xyz @ align[:3, :3].T + align[:3, 3]
        pose = align @ pose
    semantic = labels.map_semantic(raw_sem)
    stuff = torch.zeros(labels.num_classes + 1, dtype=torch.bool)
    stuff[list(labels.stuff_classes)] = True
    stuff[labels.num_classes] = True  # unlabeled points belong to no instance either
    instance = torch.where((raw_inst == 0) | stuff[semantic], torch.full_like(raw_inst, -1),
                           raw_inst)
    _, superpoints = torch.unique(sp_raw, return_inverse=True)  # contiguous [0, S)
    return FrameData(
        points=xyz.contiguous(),
        colors=(pts[:, 3:6] / 255.0).clamp(0.0, 1.0),
        semantic=semantic,
        instance=instance,
        superpoints=superpoints.reshape(-1),
        pose=pose,
        intrinsics=_intrinsics(intrinsics),
        frame_index=int(frame) if frame.isdigit() else 0,
    )


def load_scannet_scene(root: str | Path, scene_id: str, *,
                       frames: Sequence[str | int] | None = None,
                       frame_id_multiple: int | None = None, max_frames: int | None = None,
                       labels: ScanNetLabelSpace | None = None, **frame_kwargs) -> SceneSequence:
    """Load a ScanNet-MV scene as a `SceneSequence`.

    Instance ids are renumbered to ``[0, K)`` in increasing ScanNet object id over all loaded
    frames; each instance's class is the most frequent class of its points.

    Args:
        frames: frame stems to load (default: every frame of the scene, in numeric order).
        frame_id_multiple: keep only frame numbers divisible by this (ESAM: 40).
        max_frames: keep at most this many frames (the first ones).
        labels: label space (default `scannet20_labels()`).
        frame_kwargs: passed on to `load_scannet_frame` (intrinsics, axis_align, require_pose).
    """
    labels = scannet20_labels() if labels is None else labels
    if frames is None:
        frames = scannet_frame_ids(root, scene_id, frame_id_multiple=frame_id_multiple)
    frames = list(frames)
    if max_frames is not None:
        frames = frames[:max_frames]
    loaded = [load_scannet_frame(root, scene_id, f, labels=labels, layout="mv", **frame_kwargs)
              for f in frames]
    raw = torch.cat([f.instance for f in loaded]) if loaded else torch.zeros(0, dtype=torch.long)
    sem = torch.cat([f.semantic for f in loaded]) if loaded else torch.zeros(0, dtype=torch.long)
    has = raw >= 0
    object_ids, inverse = torch.unique(raw[has], return_inverse=True)  # (K,), (N_obj,)
    k, c = object_ids.numel(), labels.num_classes
    # majority class of every instance (instances hold labelled, non-stuff points only)
    votes = torch.bincount(inverse * (c + 1) + sem[has], minlength=k * (c + 1)).reshape(k, c + 1)
    instance_labels = votes.argmax(1)
    renumbered = []
    for f in loaded:
        ids = torch.full_like(f.instance, -1)
        sel = f.instance >= 0
        ids[sel] = torch.searchsorted(object_ids, f.instance[sel])
        renumbered.append(replace(f, instance=ids))
    return SceneSequence(scene_id=scene_id, frames=renumbered,
                         class_names=list(labels.class_names),
                         instance_labels=instance_labels)


class ScanNetMVDataset(Dataset):
    """ESAM-format ScanNet-MV scenes; item i is the `SceneSequence` of scene i.

    Args:
        root: dataset root.
        split: read the scene list from ``meta_data/scannetv2_<split>.txt``; ignored when
            ``scene_ids`` is given.
        scene_ids: explicit scene list.
        frame_id_multiple, max_frames, labels, frame_kwargs: as in `load_scannet_scene`.
    """

    def __init__(self, root: str | Path, split: str | None = "val", *,
                 scene_ids: Sequence[str] | None = None, frame_id_multiple: int | None = None,
                 max_frames: int | None = None, labels: ScanNetLabelSpace | None = None,
                 **frame_kwargs):
        self.root = Path(root)
        if scene_ids is None:
            if split is None:
                raise ValueError("split, scene_ids: give a split name or a scene list")
            listing = self.root / "meta_data" / f"scannetv2_{split}.txt"
            if not listing.is_file():
                raise FileNotFoundError(f"scene list not found: {listing}")
            scene_ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        self.scene_ids = list(scene_ids)
        self.frame_id_multiple = frame_id_multiple
        self.max_frames = max_frames
        self.labels = scannet20_labels() if labels is None else labels
        self.frame_kwargs = frame_kwargs

    def __len__(self) -> int:
        return len(self.scene_ids)

    def __getitem__(self, index: int) -> SceneSequence:
        if not 0 <= index < len(self.scene_ids):
            raise IndexError(f"index: expected in [0, {len(self.scene_ids)}), got {index}")
        return load_scannet_scene(self.root, self.scene_ids[index],
                                  frame_id_multiple=self.frame_id_multiple,
                                  max_frames=self.max_frames, labels=self.labels,
                                  **self.frame_kwargs)
