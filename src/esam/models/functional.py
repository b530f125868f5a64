"""Pure tensor functions of the reference model: pooling, attention biases, mask priors.

Shape vocabulary: N points, S superpoints (or any segments: voxels), Q queries, H attention
heads, d feature dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "scatter_mean",
    "scatter_max",
    "segment_counts",
    "voxel_ids",
    "distance_bias",
    "box_prior_logits",
    "matrix_nms",
    "mask_nms",
    "voxel_overlap",
]


def segment_counts(index: Tensor, num_segments: int) -> Tensor:
    """Members of every segment -> ``(S,)`` float (0 for an empty segment)."""
    return torch.bincount(index, minlength=num_segments).to(torch.get_default_dtype())


def scatter_mean(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Mean of ``values (N, d)`` over each segment of ``index (N,)`` -> ``(S, d)``.

    Empty segments get zeros.
    """
    if values.dim() != 2 or index.shape != (values.shape[0],):
        raise ValueError(f"values, index: expected (N, d) and (N,), got {tuple(values.shape)} "
                         f"and {tuple(index.shape)}")
    sums = values.new_zeros(num_segments, values.shape[1]).index_add_(0, index, values)  # (S, d)
    counts = torch.bincount(index, minlength=num_segments).to(values.dtype)  # (S,)
    return sums / counts.clamp(min=1).unsqueeze(1)


def scatter_max(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Element-wise maximum of ``values (N, d)`` over each segment -> ``(S, d)``.

    Empty segments get zeros; the gradient reaches the arg-max members.
    """
    if values.dim() != 2 or index.shape != (values.shape[0],):
        raise ValueError(f"values, index: expected (N, d) and (N,), got {tuple(values.shape)} "
                         f"and {tuple(index.shape)}")
    with torch.no_grad():
        peak = values.new_zeros(num_segments, values.shape[1]).scatter_reduce(
            0, index.unsqueeze(1).expand_as(values), values, reduce="amax",
            include_self=False)  # (S, d)
        at_peak = (values == peak[index]).to(values.dtype)  # (N, d)
        ties = values.new_zeros(num_segments, values.shape[1]).index_add_(0, index, at_peak)
    # The mean of the members at the maximum equals the maximum; written as a segment sum its
    # gradient (shared among ties, as scatter_reduce's) avoids scatter_reduce's slow backward.
    picked = values.new_zeros(num_segments, values.shape[1]).index_add_(0, index, values * at_peak)
    return picked / ties.clamp(min=1)  # (S, d)


def voxel_ids(points: Tensor, voxel_size: float) -> tuple[Tensor, int]:
    """Voxel of every point on a grid of edge ``voxel_size``.

    Args:
        points: ``(N, 3)`` xyz.
        voxel_size: grid edge (same unit as the points), > 0.

    Returns:
        ``(ids (N,), V)``: contiguous voxel ids in ``[0, V)``, V occupied voxels.
    """
    if voxel_size <= 0:
        raise ValueError(f"voxel_size: expected > 0, got {voxel_size}")
    if points.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=points.device), 0
    cells = torch.floor(points / voxel_size).long()  # (N, 3)
    cells = cells - cells.min(0).values
    extent = cells.max(0).values + 1  # (3,)
    # One int64 key per cell (row-major over the occupied box): a 1-D unique, much faster than
    # unique over rows.
    keys = (cells[:, 0] * extent[1] + cells[:, 1]) * extent[2] + cells[:, 2]  # (N,)
    _, ids = torch.unique(keys, return_inverse=True)  # (N,)
    return ids, int(ids.max()) + 1


def distance_bias(query_pos: Tensor, key_pos: Tensor, decay: Tensor) -> Tensor:
    """Additive attention bias ``-decay_h * ||p_q - p_k||`` per head.

    Args:
        query_pos: ``(Q, 3)`` positions of the queries.
        key_pos: ``(S, 3)`` positions of the keys.
        decay: ``(H,)`` non-negative decay per head (per metre); 0 gives global attention.

    Returns:
        ``(H, Q, S)`` bias.
    """
    dist = torch.cdist(query_pos, key_pos)  # (Q, S)
    return -decay[:, None, None] * dist.unsqueeze(0)  # (H, Q, S)


def box_prior_logits(positions: Tensor, centres: Tensor, half_sizes: Tensor) -> Tensor:
    """Ellipsoidal box prior ``1 - ||(p - c) / h||^2`` of every query at every position.

    Evaluated as the dot product it is: per position ``[p^2, p, 1]`` (7 numbers), per query
    ``[-1/h^2, 2c/h^2, 1 - sum c^2/h^2]``, so a mask that adds it stays a dot product of query
    and position features, and costs one ``(Q, 7) x (7, P)`` matrix product.

    Args:
        positions: ``(P, 3)`` point or superpoint positions.
        centres: ``(Q, 3)`` predicted instance centres.
        half_sizes: ``(Q, 3)`` positive half extents.

    Returns:
        ``(Q, P)``: 1 at a centre, 0 on the ellipsoid inscribed in the box, negative outside.
    """
    # Centre everything on the positions' mean: smaller squares, less cancellation.
    origin = positions.mean(0, keepdim=True) if positions.shape[0] else positions.new_zeros(1, 3)
    p = positions - origin  # (P, 3)
    c = centres - origin  # (Q, 3)
    inv2 = half_sizes.pow(-2)  # (Q, 3)
    pos_feats = torch.cat([p * p, p, p.new_ones(p.shape[0], 1)], dim=1)  # (P, 7)
    coef = torch.cat([-inv2, 2 * c * inv2, 1 - (c * c * inv2).sum(1, keepdim=True)], 1)  # (Q, 7)
    return coef @ pos_feats.T  # (Q, P)


def matrix_nms(masks: Tensor, labels: Tensor, scores: Tensor, *, kernel: str = "linear",
               sigma: float = 2.0) -> Tensor:
    """Matrix NMS (SOLOv2; ESAM's test-time ``nms``): decayed scores, no sequential loop.

    Every mask's score is multiplied by ``min_i f(IoU_ij) / f(IoU*_i)`` over the higher-scored
    masks i of its label, where ``IoU*_i`` is the largest IoU of mask i with a mask scored above
    it, ``f(x) = 1 - x`` (linear) or ``exp(-sigma x^2)`` (gaussian). A near-duplicate of a
    better mask falls to almost 0; a mask that overlaps nothing keeps its score.

    Args:
        masks: ``(P, N)`` bool masks.
        labels: ``(P,)`` class of every mask (only masks of one label suppress each other).
        scores: ``(P,)`` confidences.
        kernel: ``"linear"`` or ``"gaussian"``.
        sigma: gaussian kernel width.

    Returns:
        ``(P,)`` decayed scores, in the input order.
    """
    if kernel not in ("linear", "gaussian"):
        raise ValueError(f"kernel: expected 'linear' or 'gaussian', got {kernel!r}")
    p = masks.shape[0]
    if p == 0:
        return scores
    order = scores.argsort(descending=True)
    m = masks[order].to(scores.dtype)  # (P, N)
    inter = m @ m.T  # (P, P)
    area = m.sum(1)
    union = area[:, None] + area[None, :] - inter
    same = labels[order][:, None] == labels[order][None, :]
    iou = (inter / union.clamp(min=1) * same).triu(diagonal=1)  # (P, P) row i scored above col j
    worst = iou.max(0).values  # (P,) largest IoU of each mask with a better one
    if kernel == "linear":
        decay = ((1 - iou) / (1 - worst[:, None]).clamp(min=1e-6)).min(0).values  # (P,)
    else:
        decay = torch.exp(-sigma * (iou.pow(2) - worst[:, None].pow(2))).min(0).values
    out = torch.empty_like(scores)
    out[order] = scores[order] * decay.clamp(max=1)
    return out


def mask_nms(masks: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Hard NMS of masks, vectorised ("fast NMS"): a mask is dropped when a higher-scored mask
    overlaps it with IoU above ``iou_threshold`` (whether or not that one is dropped itself).

    Args:
        masks: ``(P, N)`` bool masks.
        scores: ``(P,)`` confidences.
        iou_threshold: IoU above which the lower-scored mask goes.

    Returns:
        ``(P,)`` bool, the masks kept (input order).
    """
    p = masks.shape[0]
    if p == 0:
        return torch.zeros(0, dtype=torch.bool, device=masks.device)
    order = scores.argsort(descending=True)
    m = masks[order].float()  # (P, N)
    inter = m @ m.T  # (P, P)
    area = m.sum(1)
    iou = (inter / (area[:, None] + area[None, :] - inter).clamp(min=1)).triu(diagonal=1)
    keep = torch.empty(p, dtype=torch.bool, device=masks.device)
    keep[order] = iou.max(0).values <= iou_threshold
    return keep


def voxel_overlap(masks_a: Tensor, points_a: Tensor, masks_b: Tensor, points_b: Tensor,
                  voxel_size: float) -> Tensor:
    """Containment of two sets of point masks on a shared voxel grid.

    ``|V_a ∩ V_b| / min(|V_a|, |V_b|)`` where ``V`` is the set of voxels holding a point of the
    mask: 1 when one mask lies inside the other (whatever their sizes), 0 when they are apart.
    Both point sets must be in one (world) frame.

    Args:
        masks_a: ``(A, N_a)`` bool masks over ``points_a (N_a, 3)``.
        masks_b: ``(B, N_b)`` bool masks over ``points_b (N_b, 3)``.
        voxel_size: grid edge.

    Returns:
        ``(A, B)`` containment in [0, 1] (0 where a mask is empty).
    """
    ids, n = voxel_ids(torch.cat([points_a, points_b.to(points_a.dtype)]), voxel_size)
    ids_a, ids_b = ids[:points_a.shape[0]], ids[points_a.shape[0]:]
    occ_a = masks_a.new_zeros((masks_a.shape[0], n), dtype=torch.float32).index_add_(
        1, ids_a, masks_a.float()) > 0  # (A, V)
    occ_b = masks_b.new_zeros((masks_b.shape[0], n), dtype=torch.float32).index_add_(
        1, ids_b, masks_b.float()) > 0  # (B, V)
    inter = occ_a.float() @ occ_b.float().T  # (A, B)
    smaller = torch.minimum(occ_a.sum(1)[:, None], occ_b.sum(1)[None, :]).float()  # (A, B)
    return inter / smaller.clamp(min=1)
