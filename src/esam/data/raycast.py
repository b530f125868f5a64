"""Vectorised ray casting against boxes, vertical cylinders, spheres and the inside of a room.

Every ray is tested against every primitive at once as ``(R, P)`` tensor ops (R rays, P
primitives of one kind); the nearest hit wins. Directions need not be unit length: a hit at
parameter ``t`` lies at ``origin + t * direction``, so with camera rays whose camera-frame z
component is 1, ``t`` is the depth.

Primitive order (the global primitive index used by `cast_rays`): boxes, then cylinders, then
spheres. Room faces follow the primitives: index ``P + f`` with f in `ROOM_FACES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["Primitives", "ROOM_FACES", "cast_rays", "pinhole_intrinsics", "look_at", "pixel_rays"]

# Faces of the room box [0, W] x [0, D] x [0, H], seen from inside.
ROOM_FACES = ("floor", "ceiling", "wall_x0", "wall_x1", "wall_y0", "wall_y1")

_TINY = 1e-12


def _empty(*shape: int) -> Tensor:
    return torch.zeros(*shape, dtype=torch.float32)


@dataclass
class Primitives:
    """Solid primitives in world coordinates (z up).

    Attributes:
        box_center: ``(Pb, 3)`` box centres.
        box_half: ``(Pb, 3)`` half extents along the box's own axes.
        box_yaw: ``(Pb,)`` rotation of the box about the world z axis (radians).
        cyl_center: ``(Pc, 2)`` xy of the vertical cylinders' axes.
        cyl_z: ``(Pc, 2)`` bottom and top heights.
        cyl_radius: ``(Pc,)`` radii.
        sph_center: ``(Ps, 3)`` sphere centres.
        sph_radius: ``(Ps,)`` radii.
    """

    box_center: Tensor = field(default_factory=lambda: _empty(0, 3))
    box_half: Tensor = field(default_factory=lambda: _empty(0, 3))
    box_yaw: Tensor = field(default_factory=lambda: _empty(0))
    cyl_center: Tensor = field(default_factory=lambda: _empty(0, 2))
    cyl_z: Tensor = field(default_factory=lambda: _empty(0, 2))
    cyl_radius: Tensor = field(default_factory=lambda: _empty(0))
    sph_center: Tensor = field(default_factory=lambda: _empty(0, 3))
    sph_radius: Tensor = field(default_factory=lambda: _empty(0))

    def __post_init__(self) -> None:
        pb, pc, ps = self.box_center.shape[0], self.cyl_center.shape[0], self.sph_center.shape[0]
        expected = {
            "box_center": (pb, 3), "box_half": (pb, 3), "box_yaw": (pb,),
            "cyl_center": (pc, 2), "cyl_z": (pc, 2), "cyl_radius": (pc,),
            "sph_center": (ps, 3), "sph_radius": (ps,),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {got}")

    @property
    def num_boxes(self) -> int:
        return int(self.box_center.shape[0])

    @property
    def num_cylinders(self) -> int:
        return int(self.cyl_center.shape[0])

    @property
    def num_spheres(self) -> int:
        return int(self.sph_center.shape[0])

    def __len__(self) -> int:
        return self.num_boxes + self.num_cylinders + self.num_spheres

    def to(self, dtype: torch.dtype) -> Primitives:
        return replace(self, **{k: getattr(self, k).to(dtype) for k in self.__dataclass_fields__})


def _safe(d: Tensor) -> Tensor:
    """Directions with exact zeros nudged, so slab divisions never give 0/0."""
    return torch.where(d.abs() < _TINY, torch.full_like(d, _TINY), d)


def _inf_unless(ok: Tensor, t: Tensor) -> Tensor:
    return torch.where(ok, t, torch.full_like(t, float("inf")))


# The exact tests below take one ray per row: ``d (E, 3)`` against primitive parameters gathered
# to ``(E, ...)``, so they serve both the dense (every ray x every primitive) and the culled
# (candidate pairs only) evaluation.

def _box_t(o: Tensor, d: Tensor, center: Tensor, half: Tensor, yaw: Tensor,
           near: float) -> Tensor:
    """Entry distance into oriented boxes (slab test in the box frame), ``inf`` on a miss."""
    cos, sin = torch.cos(yaw), torch.sin(yaw)  # (E,)
    rel = o - center  # (E, 3)
    o_local = (cos * rel[:, 0] + sin * rel[:, 1], cos * rel[:, 1] - sin * rel[:, 0], rel[:, 2])
    d_local = (cos * d[:, 0] + sin * d[:, 1], cos * d[:, 1] - sin * d[:, 0], d[:, 2])
    t_enter = t_exit = None
    for axis in range(3):
        inv = 1.0 / _safe(d_local[axis])  # (E,)
        t1 = (-half[:, axis] - o_local[axis]) * inv
        t2 = (half[:, axis] - o_local[axis]) * inv
        lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
        t_enter = lo if t_enter is None else torch.maximum(t_enter, lo)
        t_exit = hi if t_exit is None else torch.minimum(t_exit, hi)
    return _inf_unless((t_exit >= t_enter) & (t_enter > near), t_enter)


def _cylinder_t(o: Tensor, d: Tensor, center: Tensor, z_range: Tensor, radius: Tensor,
                near: float) -> Tensor:
    """Entry distance into vertical capped cylinders (side quadratic + two caps)."""
    rel = o[:2] - center  # (E, 2)
    a = (d[:, :2] ** 2).sum(1)  # (E,)
    b = 2.0 * (d[:, :2] * rel).sum(1)
    rel2 = (rel ** 2).sum(1)  # squared distance of the origin to the axis
    r2 = radius ** 2
    disc = b * b - 4.0 * a * (rel2 - r2)
    t_side = (-b - torch.sqrt(disc.clamp_min(0.0))) / (2.0 * a.clamp_min(_TINY))
    z_side = o[2] + t_side * d[:, 2]
    side_ok = (disc >= 0) & (a > _TINY) & (t_side > near) & (z_side >= z_range[:, 0]) \
        & (z_side <= z_range[:, 1])
    best = _inf_unless(side_ok, t_side)
    inv_dz = 1.0 / _safe(d[:, 2])
    for cap in range(2):
        t_cap = (z_range[:, cap] - o[2]) * inv_dz  # (E,)
        # squared distance to the axis at t: |rel + t d_xy|^2 = |rel|^2 + t b + t^2 a
        cap_ok = (t_cap > near) & (rel2 + t_cap * b + t_cap * t_cap * a <= r2) & (t_cap < best)
        best = torch.where(cap_ok, t_cap, best)
    return best


def _sphere_t(o: Tensor, d: Tensor, center: Tensor, radius: Tensor, near: float) -> Tensor:
    """Entry distance into spheres."""
    rel = o - center  # (E, 3)
    a = (d ** 2).sum(1)  # (E,)
    b = 2.0 * (d * rel).sum(1)
    disc = b * b - 4.0 * a * ((rel ** 2).sum(1) - radius ** 2)
    t = (-b - torch.sqrt(disc.clamp_min(0.0))) / (2.0 * a)
    return _inf_unless((disc >= 0) & (t > near), t)


def _bounding_spheres(prims: Primitives) -> tuple[Tensor, Tensor]:
    """Centre ``(P, 3)`` and radius ``(P,)`` of a sphere enclosing each primitive."""
    cyl_mid = prims.cyl_z.mean(1, keepdim=True)  # (Pc, 1)
    cyl_half_h = (prims.cyl_z[:, 1] - prims.cyl_z[:, 0]) / 2
    center = torch.cat([prims.box_center, torch.cat([prims.cyl_center, cyl_mid], 1),
                        prims.sph_center])
    radius = torch.cat([prims.box_half.norm(dim=1),
                        torch.sqrt(prims.cyl_radius ** 2 + cyl_half_h ** 2), prims.sph_radius])
    # a little slack so rounding never culls a true hit
    return center, radius * 1.001 + 1e-4


def _room_exit(o: Tensor, d: Tensor, room_size: Tensor) -> tuple[Tensor, Tensor]:
    """Where each ray leaves the room box from inside -> ``t (R,)``, face index ``(R,)``."""
    inv = 1.0 / _safe(d)  # (R, 3)
    t_low = (0.0 - o) * inv  # (R, 3) planes x=0, y=0, z=0
    t_high = (room_size - o) * inv  # (R, 3) planes x=W, y=D, z=H
    leaves_high = t_high >= t_low
    t_exit_axis = torch.where(leaves_high, t_high, t_low)  # (R, 3)
    t_exit, axis = t_exit_axis.min(dim=1)  # (R,)
    high = leaves_high.gather(1, axis[:, None]).squeeze(1).long()
    # axis 0 -> walls x0/x1 (faces 2/3), axis 1 -> walls y0/y1 (4/5), axis 2 -> floor/ceiling
    face = torch.where(axis == 2, high, 2 + 2 * axis + high)
    return t_exit, face


def _pair_hits(o: Tensor, d: Tensor, ray: Tensor, prim: Tensor, prims: Primitives,
               near: float) -> Tensor:
    """Exact hit distance of candidate pairs (``ray (E,)``, ``prim (E,)``) -> ``(E,)``."""
    pb, pc = prims.num_boxes, prims.num_cylinders
    t = d.new_full(ray.shape, float("inf"))
    kinds = (prim < pb, (prim >= pb) & (prim < pb + pc), prim >= pb + pc)
    for kind, sel in enumerate(kinds):
        idx = sel.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        dr, p = d[ray[idx]], prim[idx]
        if kind == 0:
            t[idx] = _box_t(o, dr, prims.box_center[p], prims.box_half[p], prims.box_yaw[p], near)
        elif kind == 1:
            p = p - pb
            t[idx] = _cylinder_t(o, dr, prims.cyl_center[p], prims.cyl_z[p], prims.cyl_radius[p],
                                 near)
        else:
            p = p - pb - pc
            t[idx] = _sphere_t(o, dr, prims.sph_center[p], prims.sph_radius[p], near)
    return t


def cast_rays(origin: Tensor, directions: Tensor, primitives: Primitives,
              room_size: Tensor | None = None, *, near: float = 1e-4,
              cull: bool = True) -> tuple[Tensor, Tensor]:
    """Nearest hit of rays from one origin against all primitives and the room's inner faces.

    All rays are tested at once. With ``cull`` (default) every ray is first tested against every
    primitive's bounding sphere — one ``(R, P)`` matmul and a few comparisons — and the exact
    box / cylinder / sphere tests run on the surviving (ray, primitive) pairs only; without it
    the exact tests run on all R x P pairs. Both give the same result.

    Args:
        origin: ``(3,)`` ray origin (inside the room when ``room_size`` is given).
        directions: ``(R, 3)`` ray directions (any positive length).
        primitives: P solid primitives.
        room_size: ``(3,)`` extent (W, D, H) of the room box ``[0, W] x [0, D] x [0, H]``;
            ``None`` for no room.
        near: hits closer than this are ignored.
        cull: test bounding spheres first.

    Returns:
        ``t (R,)`` hit parameter (``inf`` on a miss) and ``hit (R,)`` int64: a primitive index in
        ``[0, P)`` (boxes, cylinders, spheres), ``P + f`` for room face f of `ROOM_FACES`, -1 for
        a miss.
    """
    if origin.shape != (3,):
        raise ValueError(f"origin: expected shape (3,), got {tuple(origin.shape)}")
    if directions.dim() != 2 or directions.shape[1] != 3:
        raise ValueError(f"directions: expected shape (R, 3), got {tuple(directions.shape)}")
    if room_size is not None and room_size.shape != (3,):
        raise ValueError(f"room_size: expected shape (3,), got {tuple(room_size.shape)}")
    dtype = directions.dtype
    o, d = origin.to(dtype), directions
    prims = primitives.to(dtype)
    r, num_prims = d.shape[0], len(prims)

    t_best = d.new_full((r,), float("inf"))
    hit = torch.full((r,), -1, dtype=torch.long)
    if num_prims:
        if cull:
            center, radius = _bounding_spheres(prims)
            rel = o - center  # (P, 3)
            b = d @ rel.T  # (R, P), half the usual linear coefficient
            c = (rel ** 2).sum(1) - radius ** 2  # (P,)
            a = (d ** 2).sum(1, keepdim=True)  # (R, 1)
            # the ray meets the bounding sphere ahead of the origin (or starts inside it)
            candidate = (b * b >= a * c) & ((b < 0) | (c < 0))  # (R, P)
            ray, prim = candidate.nonzero(as_tuple=True)  # (E,), (E,)
        else:
            ray = torch.arange(r).repeat_interleave(num_prims)
            prim = torch.arange(num_prims).repeat(r)
        t_pair = _pair_hits(o, d, ray, prim, prims, near)  # (E,)
        t_best = t_best.scatter_reduce(0, ray, t_pair, "amin")
        winner = torch.isfinite(t_pair) & (t_pair == t_best[ray])
        # ties go to the smallest primitive index
        hit = torch.full((r,), num_prims, dtype=torch.long).scatter_reduce(
            0, ray[winner], prim[winner], "amin")
        hit = torch.where(torch.isfinite(t_best), hit, torch.full_like(hit, -1))
    if room_size is not None:
        t_room, face = _room_exit(o, d, room_size.to(dtype))
        room_wins = (t_room > near) & (t_room < t_best)
        t_best = torch.where(room_wins, t_room, t_best)
        hit = torch.where(room_wins, num_prims + face, hit)
    return t_best, hit


def pinhole_intrinsics(height: int, width: int, hfov_deg: float) -> Tensor:
    """``(3, 3)`` float32 pinhole matrix with square pixels and the principal point at the image
    centre ``((W - 1) / 2, (H - 1) / 2)`` (the ScanNet convention, pixel centres at integers)."""
    if height < 1 or width < 1:
        raise ValueError(f"height, width: expected >= 1, got {height}, {width}")
    if not 0.0 < hfov_deg < 180.0:
        raise ValueError(f"hfov_deg: expected in (0, 180), got {hfov_deg}")
    f = width / (2.0 * torch.tan(torch.deg2rad(torch.tensor(hfov_deg / 2.0, dtype=torch.float64))))
    k = torch.eye(3, dtype=torch.float64)
    k[0, 0] = k[1, 1] = f
    k[0, 2], k[1, 2] = (width - 1) / 2.0, (height - 1) / 2.0
    return k.float()


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """``(4, 4)`` camera-to-world pose of an OpenCV camera (x right, y down, z forward) at ``eye``
    looking at ``target``; ``up`` is the world up direction (default +z)."""
    eye64, target64 = eye.double(), target.double()
    up64 = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) if up is None else up.double()
    forward = target64 - eye64
    if float(forward.norm()) < 1e-9:
        raise ValueError("look_at: eye and target coincide")
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up64)
    if float(right.norm()) < 1e-9:
        raise ValueError("look_at: viewing direction is parallel to up")
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye64
    return pose.float()


def pixel_rays(pose: Tensor, intrinsics: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """World-frame rays through every pixel centre, row-major.

    Returns:
        ``origin (3,)`` and ``directions (H * W, 3)``, scaled so that the camera-frame z
        component is 1 (a hit parameter is then the pixel's depth).
    """
    dtype = pose.dtype
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype),
                          indexing="ij")
    uv1 = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(height * width, dtype=dtype)], 1)
    cam = uv1 @ torch.linalg.inv(intrinsics.to(dtype)).T  # (H*W, 3), z = 1
    return pose[:3, 3].clone(), cam @ pose[:3, :3].T
