"""Procedural RGB-D streaming scenes: the embedded default data.

A room (floor, four walls, a ceiling) is furnished with objects of ten classes built from boxes,
vertical cylinders and spheres; a camera moves smoothly through it. Each frame is rendered by
vectorised ray casting (`esam.data.raycast`), its depth is noised and back-projected through the
intrinsics and the pose into the scene's world frame, and every point gets a semantic class, a
scene-global instance id, a colour, and a superpoint id. Superpoints are made the way ESAM makes
them: 2-D segments of the frame (here each visible part split into patches with noisy borders,
standing in for SAM's masks) lifted to the points through depth. Everything random is drawn from
one seeded `torch.Generator`, so a seed fixes the scene bit for bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .raycast import Primitives, ROOM_FACES, cast_rays, look_at, pinhole_intrinsics, pixel_rays
from .structures import FrameData, SceneSequence

__all__ = [
    "CLASS_NAMES",
    "SyntheticSceneConfig",
    "SceneLayout",
    "CameraPath",
    "make_layout",
    "camera_trajectory",
    "render_depth",
    "render_frame",
    "segment_frame",
    "generate_scene",
]

CLASS_NAMES: tuple[str, ...] = (
    "floor", "wall", "chair", "table", "cabinet", "bed", "sofa", "bookshelf", "lamp", "box",
    "stool", "plant",
)
FLOOR, WALL = 0, 1
_OBJECT_CLASSES = tuple(range(2, len(CLASS_NAMES)))
# Relative frequency of each object class (chairs and boxes are common, beds are not).
_CLASS_WEIGHTS = {2: 3.0, 3: 1.5, 4: 1.2, 5: 0.6, 6: 0.8, 7: 1.0, 8: 0.8, 9: 1.5, 10: 1.0, 11: 1.0}
# Classes that stand with their back (local -y side) against a wall.
_AGAINST_WALL = {4, 5, 6, 7}
# Base RGB of each class: (main part, secondary part).
_CLASS_COLORS = {
    2: ((0.55, 0.35, 0.20), (0.25, 0.18, 0.12)),   # chair: wood seat, dark legs
    3: ((0.62, 0.45, 0.28), (0.35, 0.25, 0.15)),   # table
    4: ((0.80, 0.78, 0.72), (0.50, 0.45, 0.40)),   # cabinet
    5: ((0.45, 0.30, 0.22), (0.90, 0.90, 0.92)),   # bed: frame, mattress
    6: ((0.25, 0.35, 0.55), (0.20, 0.28, 0.45)),   # sofa
    7: ((0.50, 0.32, 0.18), (0.40, 0.26, 0.15)),   # bookshelf
    8: ((0.20, 0.20, 0.22), (0.95, 0.90, 0.70)),   # lamp: pole, shade
    9: ((0.72, 0.55, 0.35), (0.65, 0.50, 0.32)),   # cardboard box
    10: ((0.15, 0.15, 0.15), (0.70, 0.20, 0.15)),  # stool: legs, seat
    11: ((0.60, 0.35, 0.25), (0.20, 0.55, 0.20)),  # plant: pot, foliage
}
_FLOOR_PALETTE = ((0.55, 0.40, 0.28), (0.45, 0.45, 0.47), (0.70, 0.65, 0.55), (0.35, 0.25, 0.18))
_WALL_PALETTE = ((0.90, 0.89, 0.85), (0.85, 0.82, 0.74), (0.78, 0.84, 0.86), (0.88, 0.80, 0.78))


@dataclass
class SyntheticSceneConfig:
    """How synthetic scenes are generated. Lengths in metres, angles in degrees."""

    # rendering
    height: int = 96  # image rows
    width: int = 128  # image columns (96 x 128 gives ~10-12k points per frame)
    hfov_deg: float = 60.0  # horizontal field of view (ScanNet's depth camera: ~58)
    num_frames: int = 10  # V frames per scene
    max_depth: float = 8.0  # the sensor returns nothing beyond this
    depth_noise_base: float = 0.002  # depth noise std = base + quad * depth^2 (Kinect-like)
    depth_noise_quad: float = 0.002
    color_noise: float = 0.02  # std of per-point colour noise
    with_ceiling: bool = True  # ceiling points are kept, labelled unlabeled (ignore_index)
    max_points_per_frame: int | None = None  # random subsample per frame (ESAM keeps 20000)
    render_image: bool = False  # also store the (3, H, W) colour image in each frame
    # room and furniture
    room_min: tuple[float, float, float] = (4.0, 4.0, 2.6)  # smallest (W, D, H)
    room_max: tuple[float, float, float] = (8.0, 8.0, 3.2)  # largest (W, D, H)
    min_objects: int = 5
    max_objects: int = 30
    max_overlap: float = 0.05  # largest footprint overlap, as a fraction of the smaller one
    placement_tries: int = 60  # position draws per object before it is dropped
    # camera path: an arc of an ellipse around the room centre, looking across the room
    camera_height: tuple[float, float] = (1.2, 1.7)
    camera_ring: tuple[float, float] = (0.3, 0.5)  # ellipse radii as fractions of half W, D
    camera_sweep_deg: tuple[float, float] = (90.0, 200.0)  # arc covered by the V frames
    camera_clearance: float = 0.3  # free space kept around the camera path
    # superpoints (2-D segments lifted through depth)
    object_patch_px: int = 40  # object parts are split into patches of about this size
    room_patch_px: int = 24  # floor / wall / ceiling patches
    boundary_noise_px: float = 3.0  # amplitude of the smooth displacement of patch borders
    min_superpoint_px: int = 6  # smaller patches join the largest patch of their part

    def __post_init__(self) -> None:
        if self.height < 2 or self.width < 2:
            raise ValueError(f"height, width: expected >= 2, got {self.height}, {self.width}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1, got {self.num_frames}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"min_objects, max_objects: expected 0 <= min <= max, got {self.min_objects}, "
                f"{self.max_objects}")
        if any(lo > hi or lo <= 1.0 for lo, hi in zip(self.room_min, self.room_max)):
            raise ValueError(
                f"room_min, room_max: expected 1 < min <= max per axis, got {self.room_min}, "
                f"{self.room_max}")
        if self.max_points_per_frame is not None and self.max_points_per_frame < 1:
            raise ValueError(
                f"max_points_per_frame: expected None or >= 1, got {self.max_points_per_frame}")
        if min(self.object_patch_px, self.room_patch_px) < 1:
            raise ValueError("object_patch_px, room_patch_px: expected >= 1")
        if self.max_depth <= 0:
            raise ValueError(f"max_depth: expected > 0, got {self.max_depth}")


@dataclass
class SceneLayout:
    """The static geometry of a scene.

    Attributes:
        room_size: ``(3,)`` (W, D, H); the room is ``[0, W] x [0, D] x [0, H]``.
        primitives: P primitives (boxes, cylinders, spheres, in that global order).
        prim_instance: ``(P,)`` scene-global instance id of each primitive.
        prim_class: ``(P,)`` semantic class of each primitive.
        prim_color: ``(P, 3)`` RGB of each primitive.
        room_color: ``(6, 3)`` RGB of the room faces (order of `ROOM_FACES`).
        instance_labels: ``(K,)`` class of each instance.
    """

    room_size: Tensor
    primitives: Primitives
    prim_instance: Tensor
    prim_class: Tensor
    prim_color: Tensor
    room_color: Tensor
    instance_labels: Tensor
    with_ceiling: bool = True
    class_names: tuple[str, ...] = field(default=CLASS_NAMES)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def hit_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per hit index (P primitives then the 6 room faces): class ``(P + 6,)``, instance
        ``(P + 6,)``, colour ``(P + 6, 3)``. The ceiling is unlabeled (class C)."""
        room_class = torch.tensor([FLOOR, self.num_classes, WALL, WALL, WALL, WALL])
        cls = torch.cat([self.prim_class, room_class])
        inst = torch.cat([self.prim_instance, torch.full((len(ROOM_FACES),), -1)])
        color = torch.cat([self.prim_color, self.room_color])
        return cls, inst, color


# ----------------------------------------------------------------------------- random helpers

def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _choice(g: torch.Generator, weights: list[float]) -> int:
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=g))


# ----------------------------------------------------------------------------- furniture

class _Parts:
    """Primitives of one object in its local frame (origin on the floor, back towards -y)."""

    def __init__(self) -> None:
        self.boxes: list[tuple[tuple[float, float, float], tuple[float, float, float], int]] = []
        self.cylinders: list[tuple[tuple[float, float], tuple[float, float], float, int]] = []
        self.spheres: list[tuple[tuple[float, float, float], float, int]] = []

    def box(self, x0: float, x1: float, y0: float, y1: float, z0: float, z1: float,
            role: int = 0) -> None:
        self.boxes.append((((x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2),
                           ((x1 - x0) / 2, (y1 - y0) / 2, (z1 - z0) / 2), role))

    def cylinder(self, x: float, y: float, z0: float, z1: float, r: float, role: int = 0) -> None:
        self.cylinders.append(((x, y), (z0, z1), r, role))

    def sphere(self, x: float, y: float, z: float, r: float, role: int = 0) -> None:
        self.spheres.append(((x, y, z), r, role))

    def footprint(self) -> tuple[float, float]:
        """Half extents (hx, hy) of the local xy bounding rectangle, centred at the origin."""
        xs = [abs(c[0]) + h[0] for c, h, _ in self.boxes]
        xs += [abs(c[0]) + r for c, _, r, _ in self.cylinders]
        xs += [abs(c[0]) + r for c, r, _ in self.spheres]
        ys = [abs(c[1]) + h[1] for c, h, _ in self.boxes]
        ys += [abs(c[1]) + r for c, _, r, _ in self.cylinders]
        ys += [abs(c[1]) + r for c, r, _ in self.spheres]
        return max(xs), max(ys)


def _legs(p: _Parts, g: torch.Generator, hx: float, hy: float, top: float, inset: float,
          thick: float, role: int) -> None:
    round_legs = _uniform(g, 0, 1) < 0.5
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * (hx - inset), sy * (hy - inset)
            if round_legs:
                p.cylinder(x, y, 0.0, top, thick / 2, role)
            else:
                p.box(x - thick / 2, x + thick / 2, y - thick / 2, y + thick / 2, 0.0, top, role)


def _build(cls: int, g: torch.Generator) -> _Parts:
    """Random dimensions of one object of class ``cls`` (role 0: main, 1: secondary colour)."""
    def u(lo: float, hi: float) -> float:
        return _uniform(g, lo, hi)

    p = _Parts()
    if cls == 2:  # chair: seat + back + 4 legs
        hx, hy, seat = u(0.2, 0.27), u(0.2, 0.27), u(0.42, 0.5)
        p.box(-hx, hx, -hy, hy, seat - 0.05, seat)
        p.box(-hx, hx, -hy, -hy + 0.05, seat, seat + u(0.35, 0.55))
        _legs(p, g, hx, hy, seat - 0.05, 0.03, 0.04, 1)
    elif cls == 3:  # table: top + legs, or a round top on a pedestal
        top = u(0.7, 0.78)
        if u(0, 1) < 0.3:
            r = u(0.4, 0.6)
            p.cylinder(0.0, 0.0, top - 0.04, top, r)
            p.cylinder(0.0, 0.0, 0.03, top - 0.04, 0.05, 1)
            p.cylinder(0.0, 0.0, 0.0, 0.03, 0.25, 1)
        else:
            hx, hy = u(0.4, 0.9), u(0.3, 0.5)
            p.box(-hx, hx, -hy, hy, top - 0.04, top)
            _legs(p, g, hx, hy, top - 0.04, 0.05, u(0.04, 0.07), 1)
    elif cls == 4:  # cabinet: body + top slab
        hx, hy, h = u(0.25, 0.6), u(0.2, 0.3), u(0.6, 1.2)
        p.box(-hx, hx, -hy, hy, 0.0, h - 0.03)
        p.box(-hx - 0.01, hx + 0.01, -hy - 0.01, hy + 0.01, h - 0.03, h, 1)
    elif cls == 5:  # bed: frame + mattress + headboard
        hx, hy = u(0.5, 0.9), u(0.95, 1.05)
        p.box(-hx, hx, -hy, hy, 0.0, 0.3)
        p.box(-hx + 0.03, hx - 0.03, -hy + 0.08, hy - 0.03, 0.3, 0.5, 1)
        p.box(-hx, hx, -hy, -hy + 0.06, 0.0, u(0.9, 1.2))
    elif cls == 6:  # sofa: base + back + two arms
        hx, hy = u(0.75, 1.15), u(0.4, 0.5)
        arm = 0.18
        p.box(-hx + arm, hx - arm, -hy + 0.2, hy, 0.0, 0.42)
        p.box(-hx, hx, -hy, -hy + 0.2, 0.0, u(0.75, 0.9), 1)
        arm_h = u(0.55, 0.65)
        p.box(-hx, -hx + arm, -hy + 0.2, hy, 0.0, arm_h, 1)
        p.box(hx - arm, hx, -hy + 0.2, hy, 0.0, arm_h, 1)
    elif cls == 7:  # bookshelf: two sides, back, bottom, top, shelves
        hx, hy, h, t = u(0.3, 0.6), u(0.14, 0.2), u(1.4, 2.0), 0.03
        p.box(-hx, -hx + t, -hy, hy, 0.0, h)
        p.box(hx - t, hx, -hy, hy, 0.0, h)
        p.box(-hx + t, hx - t, -hy, -hy + 0.02, 0.0, h, 1)
        p.box(-hx + t, hx - t, -hy + 0.02, hy, 0.0, 0.06)
        p.box(-hx + t, hx - t, -hy + 0.02, hy, h - t, h)
        shelves = _randint(g, 2, 4)
        for i in range(1, shelves + 1):
            z = h * i / (shelves + 1)
            p.box(-hx + t, hx - t, -hy + 0.02, hy, z - 0.01, z + 0.01)
    elif cls == 8:  # lamp: base, pole, shade (a cylinder or a globe)
        tall = u(1.2, 1.6)
        p.cylinder(0.0, 0.0, 0.0, 0.03, u(0.12, 0.16))
        p.cylinder(0.0, 0.0, 0.03, tall, 0.015)
        if u(0, 1) < 0.5:
            p.cylinder(0.0, 0.0, tall, tall + 0.25, u(0.15, 0.22), 1)
        else:
            r = u(0.14, 0.2)
            p.sphere(0.0, 0.0, tall + r * 0.8, r, 1)
    elif cls == 9:  # box
        hx, hy, h = u(0.12, 0.3), u(0.12, 0.3), u(0.2, 0.6)
        p.box(-hx, hx, -hy, hy, 0.0, h)
    elif cls == 10:  # stool: round seat on three legs
        r, seat = u(0.15, 0.2), u(0.45, 0.65)
        p.cylinder(0.0, 0.0, seat - 0.04, seat, r, 1)
        for k in range(3):
            a = 2 * math.pi * k / 3
            p.cylinder(0.7 * r * math.cos(a), 0.7 * r * math.sin(a), 0.0, seat - 0.04, 0.015)
    elif cls == 11:  # plant: pot + one or two foliage spheres
        r, h = u(0.12, 0.2), u(0.2, 0.35)
        p.cylinder(0.0, 0.0, 0.0, h, r)
        fr = u(0.2, 0.35)
        p.sphere(0.0, 0.0, h + fr * 0.8, fr, 1)
        if u(0, 1) < 0.5:
            p.sphere(u(-0.1, 0.1), u(-0.1, 0.1), h + fr * 1.6, fr * 0.7, 1)
    else:
        raise ValueError(f"cls: expected an object class in {_OBJECT_CLASSES}, got {cls}")
    return p


def _aabb(x: float, y: float, yaw: float, hx: float, hy: float) -> tuple[float, ...]:
    """World xy bounding rectangle (x0, x1, y0, y1) of a rotated footprint."""
    c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
    ex, ey = c * hx + s * hy, s * hx + c * hy
    return x - ex, x + ex, y - ey, y + ey


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[1], b[1]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[2], b[2])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[1] - a[0]) * (a[3] - a[2]), (b[1] - b[0]) * (b[3] - b[2]))
    return w * h / smaller


def _distance_to_rect(px: Tensor, py: Tensor, rect: tuple[float, ...]) -> Tensor:
    dx = torch.clamp(torch.maximum(rect[0] - px, px - rect[1]), min=0.0)
    dy = torch.clamp(torch.maximum(rect[2] - py, py - rect[3]), min=0.0)
    return torch.sqrt(dx * dx + dy * dy)


@dataclass
class CameraPath:
    """An arc of an ellipse around ``center`` at height ``height`` (a small vertical bob added),
    from angle ``start`` over ``sweep`` radians; the camera looks across the room through a point
    near its centre, offset by ``target_offset``."""

    center: tuple[float, float]
    radii: tuple[float, float]
    start: float
    sweep: float
    height: float
    bob_phase: float
    target_offset: tuple[float, float]

    def eyes(self, num: int) -> Tensor:
        """``(num, 3)`` camera centres along the arc."""
        s = torch.linspace(0.0, 1.0, num, dtype=torch.float64) if num > 1 else \
            torch.zeros(1, dtype=torch.float64)
        ang = self.start + self.sweep * s
        x = self.center[0] + self.radii[0] * torch.cos(ang)
        y = self.center[1] + self.radii[1] * torch.sin(ang)
        z = self.height + 0.05 * torch.sin(2 * math.pi * s + self.bob_phase)
        return torch.stack([x, y, z], 1)


def _sample_camera_path(room: tuple[float, float, float], cfg: SyntheticSceneConfig,
                        g: torch.Generator) -> CameraPath:
    w, d, _ = room
    frac = _uniform(g, *cfg.camera_ring)
    return CameraPath(
        center=(w / 2, d / 2),
        radii=(frac * w / 2, frac * d / 2),
        start=_uniform(g, 0.0, 2 * math.pi),
        sweep=math.radians(_uniform(g, *cfg.camera_sweep_deg)) * (1 if _uniform(g, 0, 1) < 0.5
                                                                  else -1),
        height=_uniform(g, *cfg.camera_height),
        bob_phase=_uniform(g, 0.0, 2 * math.pi),
        target_offset=(_uniform(g, -0.3, 0.3), _uniform(g, -0.3, 0.3)),
    )


def make_layout(g: torch.Generator, config: SyntheticSceneConfig
                ) -> tuple[SceneLayout, CameraPath]:
    """Draw a furnished room and a camera path through it (kept clear of furniture)."""
    room = tuple(_uniform(g, lo, hi) for lo, hi in zip(config.room_min, config.room_max))
    w, d, h = room
    path = _sample_camera_path(room, config, g)
    path_xy = path.eyes(64)[:, :2]
    num_objects = _randint(g, config.min_objects, config.max_objects)
    classes = list(_OBJECT_CLASSES)
    weights = [_CLASS_WEIGHTS[c] for c in classes]

    placed: list[tuple[int, _Parts, float, float, float]] = []
    rects: list[tuple[float, ...]] = []
    margin = 0.02
    for _ in range(num_objects):
        cls = classes[_choice(g, weights)]
        parts = _build(cls, g)
        hx, hy = parts.footprint()
        for _ in range(config.placement_tries):
            if cls in _AGAINST_WALL:
                # back (local -y) against a random wall, facing the room
                wall = _randint(g, 0, 3)
                yaw = (0.0, math.pi, -math.pi / 2, math.pi / 2)[wall]
                along_x = wall < 2
                span = w if along_x else d
                ext = hx
                if span - 2 * (ext + margin) <= 0:
                    continue
                t = _uniform(g, ext + margin, span - ext - margin)
                if wall == 0:
                    x, y = t, hy + margin
                elif wall == 1:
                    x, y = t, d - hy - margin
                elif wall == 2:
                    x, y = hy + margin, t
                else:
                    x, y = w - hy - margin, t
            else:
                yaw = _uniform(g, 0.0, 2 * math.pi)
                x, y = _uniform(g, 0.0, w), _uniform(g, 0.0, d)
            rect = _aabb(x, y, yaw, hx, hy)
            if rect[0] < margin / 2 or rect[1] > w - margin / 2 or rect[2] < margin / 2 \
                    or rect[3] > d - margin / 2:
                continue
            if any(_overlap(rect, other) > config.max_overlap for other in rects):
                continue
            clear = _distance_to_rect(path_xy[:, 0], path_xy[:, 1], rect)
            if float(clear.min()) < config.camera_clearance:
                continue
            placed.append((cls, parts, x, y, yaw))
            rects.append(rect)
            break

    boxes_c, boxes_h, boxes_yaw, box_meta = [], [], [], []
    cyl_c, cyl_z, cyl_r, cyl_meta = [], [], [], []
    sph_c, sph_r, sph_meta = [], [], []
    colors: dict[tuple[int, int], tuple[float, float, float]] = {}
    for inst, (cls, parts, x, y, yaw) in enumerate(placed):
        cos, sin = math.cos(yaw), math.sin(yaw)
        brightness = _uniform(g, 0.8, 1.15)
        for role in (0, 1):
            base = _CLASS_COLORS[cls][role]
            colors[inst, role] = tuple(min(max(brightness * c + _uniform(g, -0.07, 0.07), 0.0),
                                           1.0) for c in base)

        def world(lx: float, ly: float) -> tuple[float, float]:
            return x + cos * lx - sin * ly, y + sin * lx + cos * ly

        for (lx, ly, lz), half, role in parts.boxes:
            boxes_c.append((*world(lx, ly), lz))
            boxes_h.append(half)
            boxes_yaw.append(yaw)
            box_meta.append((inst, cls, role))
        for (lx, ly), zr, r, role in parts.cylinders:
            cyl_c.append(world(lx, ly))
            cyl_z.append(zr)
            cyl_r.append(r)
            cyl_meta.append((inst, cls, role))
        for (lx, ly, lz), r, role in parts.spheres:
            sph_c.append((*world(lx, ly), lz))
            sph_r.append(r)
            sph_meta.append((inst, cls, role))

    def tensor(rows: list, cols: int | None) -> Tensor:
        shape = (0, cols) if cols else (0,)
        return torch.tensor(rows, dtype=torch.float32) if rows else torch.zeros(shape)

    prims = Primitives(
        box_center=tensor(boxes_c, 3), box_half=tensor(boxes_h, 3), box_yaw=tensor(boxes_yaw, None),
        cyl_center=tensor(cyl_c, 2), cyl_z=tensor(cyl_z, 2), cyl_radius=tensor(cyl_r, None),
        sph_center=tensor(sph_c, 3), sph_radius=tensor(sph_r, None),
    )
    meta = box_meta + cyl_meta + sph_meta
    prim_instance = torch.tensor([m[0] for m in meta], dtype=torch.long)
    prim_class = torch.tensor([m[1] for m in meta], dtype=torch.long)
    prim_color = torch.tensor([colors[m[0], m[2]] for m in meta], dtype=torch.float32) \
        .reshape(-1, 3)

    floor_color = _FLOOR_PALETTE[_randint(g, 0, len(_FLOOR_PALETTE) - 1)]
    wall_color = _WALL_PALETTE[_randint(g, 0, len(_WALL_PALETTE) - 1)]
    room_color = [floor_color, (0.95, 0.95, 0.95)]
    for _ in range(4):
        shade = _uniform(g, 0.9, 1.0)  # each wall lit a little differently
        room_color.append(tuple(shade * c for c in wall_color))
    layout = SceneLayout(
        room_size=torch.tensor(room, dtype=torch.float32),
        primitives=prims,
        prim_instance=prim_instance,
        prim_class=prim_class,
        prim_color=prim_color,
        room_color=torch.tensor(room_color, dtype=torch.float32),
        instance_labels=torch.tensor([p[0] for p in placed], dtype=torch.long),
        with_ceiling=config.with_ceiling,
    )
    return layout, path


def camera_trajectory(path: CameraPath, num_frames: int) -> Tensor:
    """``(V, 4, 4)`` camera-to-world poses along the path. Each camera looks through a point near
    the room centre towards the far side, at a spot 0.8 m above the floor, so the view is mostly
    the room's interior and consecutive views overlap."""
    eyes = path.eyes(num_frames)
    target = torch.tensor([path.center[0] + path.target_offset[0],
                           path.center[1] + path.target_offset[1], 0.8], dtype=torch.float64)
    poses = []
    for eye in eyes:
        # look through the centre towards the far side, so most of the view is the room interior
        far = target + (target - eye) * torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
        poses.append(look_at(eye, far))
    return torch.stack(poses)


# ----------------------------------------------------------------------------- rendering

def render_depth(layout: SceneLayout, pose: Tensor, intrinsics: Tensor, height: int,
                 width: int) -> tuple[Tensor, Tensor]:
    """Noise-free depth of every pixel and what it sees.

    Returns:
        ``depth (H, W)`` float32 (camera-frame z; 0 where nothing is hit) and ``hit (H, W)``
        int64 (a primitive index, ``P + f`` for room face f, -1 for nothing).
    """
    origin, dirs = pixel_rays(pose.float(), intrinsics.float(), height, width)
    t, hit = cast_rays(origin, dirs, layout.primitives, layout.room_size)
    depth = torch.where(hit >= 0, t, torch.zeros_like(t))
    return depth.reshape(height, width), hit.reshape(height, width)


def _smooth_field(g: torch.Generator, height: int, width: int, amplitude: float) -> Tensor:
    """``(2, H, W)`` smooth random displacement (pixels), bilinear from a coarse grid."""
    coarse = torch.randn(1, 2, max(2, height // 16 + 2), max(2, width // 16 + 2), generator=g)
    up = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)
    return amplitude * up[0]


def segment_frame(region: Tensor, is_room: Tensor, height: int, width: int,
                  config: SyntheticSceneConfig, g: torch.Generator) -> Tensor:
    """2-D segments standing in for SAM's masks, as one id per valid pixel.

    Each region (a visible primitive part or room face) is cut into patches by a grid on the
    pixel coordinates whose lines are displaced by a smooth random field; patches smaller than
    ``config.min_superpoint_px`` join the largest patch of the same region. Segments never cross
    regions.

    Args:
        region: ``(H * W,)`` region id per pixel (-1: invalid pixel).
        is_room: ``(H * W,)`` bool, the pixel sees a room face (patched more finely).

    Returns:
        ``(H * W,)`` int64 segment id per pixel, contiguous in ``[0, S)``; -1 on invalid pixels.
    """
    disp = _smooth_field(g, height, width, config.boundary_noise_px).reshape(2, -1)  # (2, H*W)
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                          torch.arange(width, dtype=torch.float32), indexing="ij")
    u = u.reshape(-1) + disp[0]
    v = v.reshape(-1) + disp[1]
    cell = torch.where(is_room, torch.tensor(float(config.room_patch_px)),
                       torch.tensor(float(config.object_patch_px)))
    smallest = min(config.room_patch_px, config.object_patch_px)
    cols, rows = width // smallest + 3, height // smallest + 3
    # one spare cell on each side takes the displaced border pixels; clamping keeps every key
    # inside its region's block, so segments can never cross regions
    cu = (torch.floor(u / cell).long() + 1).clamp(0, cols - 1)
    cv = (torch.floor(v / cell).long() + 1).clamp(0, rows - 1)
    valid = region >= 0
    cells_total = cols * rows
    key = region.clamp_min(0) * cells_total + cv * cols + cu  # (H*W,)
    pieces, piece = torch.unique(key[valid], return_inverse=True)  # (S0,), (N,)
    counts = torch.bincount(piece, minlength=pieces.numel())  # (S0,)
    piece_region = pieces // cells_total  # (S0,)
    # largest piece of every region (ties to the smallest piece id)
    _, regions = torch.unique(piece_region, return_inverse=True)  # (S0,)
    score = counts * (pieces.numel() + 1) - torch.arange(pieces.numel())
    best_score = torch.full((int(regions.max()) + 1 if regions.numel() else 0,), -1,
                            dtype=torch.long).scatter_reduce(0, regions, score, "amax")
    best_piece = torch.zeros_like(best_score)
    is_best = score == best_score[regions]
    best_piece[regions[is_best]] = torch.arange(pieces.numel())[is_best]
    target = torch.where(counts < config.min_superpoint_px, best_piece[regions],
                         torch.arange(pieces.numel()))  # (S0,)
    _, seg = torch.unique(target[piece], return_inverse=True)
    out = torch.full_like(region, -1)
    out[valid] = seg
    return out


def render_frame(layout: SceneLayout, pose: Tensor, intrinsics: Tensor,
                 config: SyntheticSceneConfig, g: torch.Generator,
                 frame_index: int = 0) -> FrameData:
    """Render one frame and lift it to a labelled world-frame point cloud.

    Pixels that see nothing, lie beyond ``config.max_depth``, or see the ceiling when
    ``config.with_ceiling`` is off give no point.
    """
    height, width = config.height, config.width
    origin, dirs = pixel_rays(pose.float(), intrinsics.float(), height, width)  # (3,), (H*W, 3)
    t, hit = cast_rays(origin, dirs, layout.primitives, layout.room_size)  # (H*W,) each
    num_prims = len(layout.primitives)
    valid = (hit >= 0) & (t <= config.max_depth)
    if not layout.with_ceiling:
        valid &= hit != num_prims + ROOM_FACES.index("ceiling")
    hit = torch.where(valid, hit, torch.full_like(hit, -1))
    cls_table, inst_table, color_table = layout.hit_tables()

    region = hit
    segments = segment_frame(region, hit >= num_prims, height, width, config, g)

    noise = torch.randn(t.shape, generator=g)
    sigma = config.depth_noise_base + config.depth_noise_quad * t.clamp(max=config.max_depth) ** 2
    depth = torch.where(valid, t + sigma * noise, torch.zeros_like(t))
    color_noise = config.color_noise * torch.randn(height * width, 3, generator=g)
    pixel_colors = color_table[hit.clamp_min(0)] + color_noise  # (H*W, 3)
    pixel_colors = pixel_colors.clamp(0.0, 1.0)
    pixel_colors[~valid] = 0.0

    pixel_index = valid.nonzero().squeeze(1)  # (N,)
    limit = config.max_points_per_frame
    if limit is not None and pixel_index.numel() > limit:
        keep = torch.randperm(pixel_index.numel(), generator=g)[:limit]
        pixel_index = pixel_index[keep.sort().values]
    h = hit[pixel_index]
    points = origin + depth[pixel_index, None] * dirs[pixel_index]  # (N, 3)
    _, superpoints = torch.unique(segments[pixel_index], return_inverse=True)  # (N,)
    image = pixel_colors.T.reshape(3, height, width).contiguous() if config.render_image else None
    return FrameData(
        points=points.float(),
        colors=pixel_colors[pixel_index].contiguous(),
        semantic=cls_table[h],
        instance=inst_table[h],
        superpoints=superpoints,
        pose=pose.float(),
        intrinsics=intrinsics.float(),
        frame_index=frame_index,
        image=image,
        pixel_index=pixel_index,
    )


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def generate_scene(seed: int, config: SyntheticSceneConfig | None = None, *,
                   scene_id: str | None = None, num_threads: int | None = 1) -> SceneSequence:
    """One synthetic scene: ``config.num_frames`` frames of a furnished room.

    The same ``seed`` and ``config`` give identical tensors.

    Args:
        seed: integer seed in ``[0, 2**32)``.
        config: generation options (defaults: `SyntheticSceneConfig()`).
        scene_id: name of the scene (default ``f"synthetic_{seed}"``).
        num_threads: torch intra-op threads while generating (restored afterwards). The work is
            many small tensor ops, which extra threads slow down on a busy machine; ``None``
            leaves torch's setting alone.
    """
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        # torch's CPU generator keeps only the low 32 bits: larger seeds would alias
        raise ValueError(f"seed: expected an int in [0, 2**32), got {seed!r}")
    config = SyntheticSceneConfig() if config is None else config
    with _torch_threads(num_threads):
        return _generate(seed, config, scene_id)


def _generate(seed: int, config: SyntheticSceneConfig, scene_id: str | None) -> SceneSequence:
    g = torch.Generator().manual_seed(seed)
    layout, path = make_layout(g, config)
    intrinsics = pinhole_intrinsics(config.height, config.width, config.hfov_deg)
    poses = camera_trajectory(path, config.num_frames)
    frames = [render_frame(layout, pose, intrinsics, config, g, frame_index=i)
              for i, pose in enumerate(poses)]
    return SceneSequence(scene_id=scene_id or f"synthetic_{seed}", frames=frames,
                         class_names=list(layout.class_names),
                         instance_labels=layout.instance_labels.clone())
