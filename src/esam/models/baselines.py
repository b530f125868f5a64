"""Non-learned instance baselines: every superpoint an instance, or geometric components.

Shape vocabulary: N points, S superpoints, P predicted instances.

Both return the evaluator's prediction dict ``{'masks': (P, N) bool, 'labels': (P,) int,
'scores': (P,) float}`` (labels are 0: class-agnostic).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = ["superpoint_instances", "connected_components", "BASELINES"]


def superpoint_instances(points: Tensor, superpoints: Tensor) -> dict[str, Tensor]:
    """Every superpoint is an instance, scored by its share of the points.

    Args:
        points: ``(N, 3)`` xyz (only its length is used).
        superpoints: ``(N,)`` superpoint id in ``[0, S)``; for several frames concatenated, give
            ids that are distinct across frames.
    """
    if superpoints.shape != (points.shape[0],):
        raise ValueError(f"superpoints: expected shape (N={points.shape[0]},), got "
                         f"{tuple(superpoints.shape)}")
    ids, sp = torch.unique(superpoints.long(), return_inverse=True)  # (S,), (N,)
    s = ids.numel()
    masks = sp.unsqueeze(0) == torch.arange(s, device=sp.device).unsqueeze(1)  # (S, N)
    sizes = masks.sum(1).float()
    scores = sizes / sizes.max() if s else sizes
    return {"masks": masks, "labels": torch.zeros(s, dtype=torch.long, device=sp.device),
            "scores": scores}


def connected_components(points: Tensor, *, voxel_size: float = 0.05, plane_margin: float = 0.06,
                         min_points: int = 10) -> dict[str, Tensor]:
    """Connected components of the occupied voxels after removing the room's planes.

    The floor (points within ``plane_margin`` of the lowest 1 % height), the ceiling (within
    ``plane_margin`` of the highest) and the walls (within ``plane_margin`` of the x/y extent of
    the cloud) are removed; the remaining points are voxelised and voxels touching in any of the
    26 directions form one instance. Scores are component sizes over the largest.

    Args:
        points: ``(N, 3)`` world-frame xyz, z up.
        voxel_size: grid edge (metres).
        plane_margin: distance to a room plane under which a point is removed.
        min_points: smaller components are dropped.
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points: expected shape (N, 3), got {tuple(points.shape)}")
    device = points.device
    n = points.shape[0]
    empty = {"masks": torch.zeros(0, n, dtype=torch.bool, device=device),
             "labels": torch.zeros(0, dtype=torch.long, device=device),
             "scores": torch.zeros(0, device=device)}
    if n == 0:
        return empty
    xyz = points.detach().cpu().double()
    lo = torch.quantile(xyz, 0.01, dim=0) if n > 1 else xyz.min(0).values
    hi = torch.quantile(xyz, 0.99, dim=0) if n > 1 else xyz.max(0).values
    keep = (xyz[:, 2] > lo[2] + plane_margin) & (xyz[:, 2] < hi[2] - plane_margin)
    for axis in (0, 1):
        keep &= (xyz[:, axis] > lo[axis] + plane_margin) & (xyz[:, axis] < hi[axis] - plane_margin)
    if not bool(keep.any()):
        return empty
    cells = torch.floor((xyz[keep] - xyz[keep].min(0).values) / voxel_size).long()  # (N_k, 3)
    shape = tuple(int(v) + 1 for v in cells.max(0).values)
    grid = np.zeros(shape, dtype=bool)
    c = cells.numpy()
    grid[c[:, 0], c[:, 1], c[:, 2]] = True
    labels, num = ndimage.label(grid, structure=np.ones((3, 3, 3), dtype=bool))
    comp = torch.from_numpy(labels[c[:, 0], c[:, 1], c[:, 2]].astype(np.int64)) - 1  # (N_k,)
    point_comp = torch.full((n,), -1, dtype=torch.long)
    point_comp[keep] = comp
    sizes = torch.bincount(comp, minlength=num)  # (P0,)
    big = (sizes >= min_points).nonzero().squeeze(1)  # (P,)
    masks = point_comp.unsqueeze(0) == big.unsqueeze(1)  # (P, N)
    sizes = sizes[big].double()
    scores = sizes / sizes.max() if sizes.numel() else sizes
    return {"masks": masks.to(device), "labels": torch.zeros(big.numel(), dtype=torch.long,
                                                             device=device),
            "scores": scores.float().to(device)}


BASELINES = ("superpoints", "components")
