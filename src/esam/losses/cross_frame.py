"""Cross-frame loss L_tdt = lambda1 L_match + lambda2 L_cons (seed section 3, SPEC section 3.4).

For a sequence of V frames, the :class:`~esam.models.tdt.TimeDividedTransformer` gives updated
query features ``q_t (Q_t, d)`` and match logits ``P_t (Q_t, Q_{t+1})``. With binary targets
``G_t (Q_t, Q_{t+1})``:

    L_match = -(1/(V-1)) sum_t [ <G_t, log P_t> + <1 - G_t, log(1 - P_t)> ]
    L_cons  =  (1/(V-1)) sum_t ||q_t - q_{t+1}||^2

Targets come either from the predicted masks (``gt_source="mask"``: G[i, j] = 1 iff the
binarised masks of query i in frame t and query j in frame t+1 have IoU > threshold on a voxel
grid shared by both frames' world-frame points) or from GT instance identities
(``gt_source="instance"``: both queries matched to the same global GT instance).

Shape vocabulary: V frames, N points, Q queries (``Q_a``/``Q_b`` for the two frames of a pair),
d feature dim, P matched query pairs.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esam.losses.functional import upcast

__all__ = [
    "CrossFrameCriterion",
    "consistency_loss",
    "instance_identity_targets",
    "mask_iou_targets",
    "match_bce_loss",
]

Reduction = Literal["sum", "mean", "none"]


def _check_reduction(reduction: str, allowed: tuple[str, ...] = ("sum", "mean", "none")) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def _check_mask_frame(mask_logits: Tensor, points: Tensor, mask_name: str, points_name: str) -> None:
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"{points_name} must have shape (N, 3), got {tuple(points.shape)}")
    if mask_logits.dim() != 2 or mask_logits.shape[1] != points.shape[0]:
        raise ValueError(
            f"{mask_name} must have shape (Q, {points.shape[0]}) to match {points_name}, "
            f"got {tuple(mask_logits.shape)}"
        )


@torch.no_grad()
def mask_iou_targets(
    mask_logits_a: Tensor,
    points_a: Tensor,
    mask_logits_b: Tensor,
    points_b: Tensor,
    *,
    voxel_size: float = 0.05,
    iou_threshold: float = 0.5,
) -> Tensor:
    """Match targets from the IoU of two frames' binarised query masks on a shared voxel grid.

    Both frames' points are in one world frame; each is assigned the voxel
    ``floor(xyz / voxel_size)``. A query's voxel set holds every voxel containing at least one
    of its points (mask logit >= 0, i.e. probability >= 0.5). Empty voxel sets never match.

    Args:
        mask_logits_a: ``(Q_a, N_a)`` mask logits of frame t.
        points_a: ``(N_a, 3)`` world-frame points of frame t.
        mask_logits_b: ``(Q_b, N_b)`` mask logits of frame t+1.
        points_b: ``(N_b, 3)`` world-frame points of frame t+1.
        voxel_size: edge length of the shared voxel grid (same unit as the points).
        iou_threshold: a pair is positive iff IoU > iou_threshold (strict).

    Returns:
        ``(Q_a, Q_b)`` bool targets G, without gradient.
    """
    _check_mask_frame(mask_logits_a, points_a, "mask_logits_a", "points_a")
    _check_mask_frame(mask_logits_b, points_b, "mask_logits_b", "points_b")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    num_a = points_a.shape[0]
    points_a = upcast(points_a)  # CPU autocast cannot concatenate fp16 tensors
    points = torch.cat([points_a, points_b.to(points_a.dtype)], dim=0)  # (N_a + N_b, 3)
    voxel_coords = torch.floor(points / voxel_size).long()  # (N_a + N_b, 3)
    # One integer key per voxel (a 1-D unique is far faster than unique over rows).
    lo = voxel_coords.amin(0) if voxel_coords.numel() else voxel_coords.new_zeros(3)
    rel = voxel_coords - lo  # (N_a + N_b, 3), >= 0
    span = rel.amax(0) + 1 if rel.numel() else rel.new_ones(3)
    if float(span.double().prod()) < 2.0 ** 62:
        key = (rel[:, 0] * span[1] + rel[:, 1]) * span[2] + rel[:, 2]  # (N_a + N_b,)
        _, voxel_idx = torch.unique(key, return_inverse=True)  # (N_a + N_b,)
    else:  # a grid too large for one int64 key
        _, voxel_idx = torch.unique(voxel_coords, dim=0, return_inverse=True)
    num_voxels = int(voxel_idx.max()) + 1 if voxel_idx.numel() > 0 else 0

    def occupancy(mask_logits: Tensor, idx: Tensor) -> Tensor:
        occ = mask_logits.new_zeros((mask_logits.shape[0], num_voxels), dtype=torch.float32)  # (Q, V_x)
        occ.index_add_(1, idx, (mask_logits >= 0).float())  # point counts per voxel
        return (occ > 0).float()  # (Q, V_x)

    occ_a = occupancy(mask_logits_a, voxel_idx[:num_a])  # (Q_a, V_x)
    occ_b = occupancy(mask_logits_b, voxel_idx[num_a:])  # (Q_b, V_x)
    # Voxel counts are integers < 2^24, exact in float32; compare in float64 without dividing.
    intersection = (occ_a @ occ_b.T).double()  # (Q_a, Q_b)
    union = occ_a.sum(1).double()[:, None] + occ_b.sum(1).double()[None, :] - intersection  # (Q_a, Q_b)
    return (intersection > iou_threshold * union) & (union > 0)


def instance_identity_targets(ids_a: Tensor, ids_b: Tensor) -> Tensor:
    """Match targets from GT identities: both queries matched to the same global GT instance.

    Args:
        ids_a: ``(Q_a,)`` global GT instance id per query of frame t, -1 for unmatched.
        ids_b: ``(Q_b,)`` the same for frame t+1.

    Returns:
        ``(Q_a, Q_b)`` bool targets; unmatched queries (id < 0) are never positive.
    """
    if ids_a.dim() != 1:
        raise ValueError(f"ids_a must have shape (Q_a,), got {tuple(ids_a.shape)}")
    if ids_b.dim() != 1:
        raise ValueError(f"ids_b must have shape (Q_b,), got {tuple(ids_b.shape)}")
    return (ids_a[:, None] == ids_b[None, :]) & (ids_a[:, None] >= 0)  # (Q_a, Q_b)


def match_bce_loss(
    match_logits: Tensor,
    targets: Tensor,
    *,
    reduction: Reduction = "sum",
    pos_weight: float | Tensor | None = None,
) -> Tensor:
    """Binary cross-entropy of match logits against binary match targets.

    ``-[<G, log P> + <1 - G, log(1 - P)>]`` with ``P = sigmoid(match_logits)``, computed in
    log space (finite for logits of any magnitude).

    Args:
        match_logits: ``(Q_a, Q_b)`` logits.
        targets: ``(Q_a, Q_b)`` bool or {0, 1} targets G.
        reduction: ``"sum"`` sums the entries (the seed), ``"mean"`` averages them, ``"none"``
            returns ``(Q_a, Q_b)``. Empty input gives 0 connected to the graph.
        pos_weight: optional weight of the positive term (for sparse positives).

    Returns:
        Scalar loss, or ``(Q_a, Q_b)`` for ``reduction="none"``.
    """
    _check_reduction(reduction)
    if match_logits.dim() != 2:
        raise ValueError(f"match_logits must have shape (Q_a, Q_b), got {tuple(match_logits.shape)}")
    if targets.shape != match_logits.shape:
        raise ValueError(
            f"targets must have the shape of match_logits {tuple(match_logits.shape)}, got {tuple(targets.shape)}"
        )
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, dtype=match_logits.dtype, device=match_logits.device)
    loss = F.binary_cross_entropy_with_logits(
        match_logits, targets.to(match_logits.dtype), pos_weight=pos_weight, reduction="none"
    )  # (Q_a, Q_b)
    if reduction == "none":
        return loss
    if loss.numel() == 0:
        return loss.sum() * 0.0
    return loss.sum() if reduction == "sum" else loss.mean()


def consistency_loss(
    feat_a: Tensor,
    feat_b: Tensor,
    *,
    pairs: Tensor | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """Squared L2 distance between query features of consecutive frames.

    Args:
        feat_a: ``(Q_a, d)`` query features of frame t.
        feat_b: ``(Q_b, d)`` query features of frame t+1.
        pairs: ``(P, 2)`` long ``(i, j)`` pairs of matched queries (e.g. the G = 1 entries);
            ``None`` compares slot-aligned queries (the seed, requires ``Q_a == Q_b``).
        reduction: ``"sum"`` gives ``sum_pairs ||a_i - b_j||^2`` (the seed's squared norm),
            ``"mean"`` averages the per-pair squared distances over pairs. No pairs give 0
            connected to the graph.

    Returns:
        Scalar loss.
    """
    _check_reduction(reduction, ("sum", "mean"))
    if feat_a.dim() != 2 or feat_b.dim() != 2 or feat_a.shape[1] != feat_b.shape[1]:
        raise ValueError(
            f"feat_a and feat_b must have shapes (Q_a, d) and (Q_b, d) with the same d, "
            f"got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}"
        )
    if pairs is None:
        if feat_a.shape[0] != feat_b.shape[0]:
            raise ValueError(
                f"slot-aligned consistency needs Q_a == Q_b, got feat_a {tuple(feat_a.shape)} and "
                f"feat_b {tuple(feat_b.shape)}; pass pairs= to compare matched queries only"
            )
        a, b = feat_a, feat_b  # (Q, d), (Q, d)
    else:
        if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype != torch.long:
            raise ValueError(f"pairs must be a (P, 2) long tensor, got {tuple(pairs.shape)} {pairs.dtype}")
        if pairs.numel() > 0 and (
            pairs.min() < 0 or pairs[:, 0].max() >= feat_a.shape[0] or pairs[:, 1].max() >= feat_b.shape[0]
        ):
            raise ValueError(
                f"pairs must index rows of feat_a (< {feat_a.shape[0]}) and feat_b (< {feat_b.shape[0]}), "
                f"got values in [{int(pairs.min())}, {int(pairs.max())}]"
            )
        a, b = feat_a[pairs[:, 0]], feat_b[pairs[:, 1]]  # (P, d), (P, d)
    sq_dist = (a - b).pow(2).sum(dim=1)  # (P,)
    if sq_dist.numel() == 0:
        return (feat_a.sum() + feat_b.sum()) * 0.0
    return sq_dist.sum() if reduction == "sum" else sq_dist.mean()


class CrossFrameCriterion(nn.Module):
    """L_tdt over a sequence of V frames: ``match_weight * L_match + cons_weight * L_cons``.

    Args:
        match_weight: lambda1, weight of L_match in ``loss``.
        cons_weight: lambda2, weight of L_cons in ``loss``.
        reduction: per-pair reduction of both terms; ``"sum"`` is the seed's, ``"mean"``
            averages the entries of each P_t and the per-pair distances of L_cons.
        pos_weight: optional weight of the positive BCE term.
        consistency: ``"slot"`` compares slot-aligned queries (the seed; needs equal Q per
            frame), ``"matched"`` only the pairs with G = 1.
        gt_source: how :meth:`build_targets` makes G: ``"mask"`` (mask IoU on the shared voxel
            grid, the seed) or ``"instance"`` (same matched global GT instance).
        voxel_size: voxel edge of the shared grid for ``gt_source="mask"``.
        iou_threshold: positive iff mask IoU > iou_threshold.
    """

    def __init__(
        self,
        *,
        match_weight: float = 1.0,
        cons_weight: float = 1.0,
        reduction: Literal["sum", "mean"] = "sum",
        pos_weight: float | None = None,
        consistency: Literal["slot", "matched"] = "slot",
        gt_source: Literal["mask", "instance"] = "mask",
        voxel_size: float = 0.05,
        iou_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        _check_reduction(reduction, ("sum", "mean"))
        if consistency not in ("slot", "matched"):
            raise ValueError(f"consistency must be 'slot' or 'matched', got {consistency!r}")
        if gt_source not in ("mask", "instance"):
            raise ValueError(f"gt_source must be 'mask' or 'instance', got {gt_source!r}")
        if not voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
        self.match_weight = match_weight
        self.cons_weight = cons_weight
        self.reduction = reduction
        self.pos_weight = pos_weight
        self.consistency = consistency
        self.gt_source = gt_source
        self.voxel_size = voxel_size
        self.iou_threshold = iou_threshold

    @torch.no_grad()
    def build_targets(
        self,
        *,
        mask_logits: list[Tensor] | None = None,
        points: list[Tensor] | None = None,
        instance_ids: list[Tensor] | None = None,
    ) -> list[Tensor]:
        """Targets ``G_t (Q_t, Q_{t+1})`` for the V - 1 consecutive pairs, per ``gt_source``.

        Args:
            mask_logits: V tensors ``(Q_t, N_t)`` (``gt_source="mask"``).
            points: V world-frame tensors ``(N_t, 3)`` (``gt_source="mask"``).
            instance_ids: V tensors ``(Q_t,)`` of matched global GT ids, -1 for unmatched
                (``gt_source="instance"``).

        Returns:
            V - 1 bool tensors ``(Q_t, Q_{t+1})``.
        """
        if self.gt_source == "mask":
            if mask_logits is None or points is None or len(mask_logits) != len(points):
                raise ValueError(
                    "gt_source='mask' needs mask_logits and points, two lists of equal length V, got "
                    f"{None if mask_logits is None else len(mask_logits)} and {None if points is None else len(points)}"
                )
            return [
                mask_iou_targets(
                    mask_logits[t],
                    points[t],
                    mask_logits[t + 1],
                    points[t + 1],
                    voxel_size=self.voxel_size,
                    iou_threshold=self.iou_threshold,
                )
                for t in range(len(mask_logits) - 1)
            ]
        if instance_ids is None:
            raise ValueError("gt_source='instance' needs instance_ids, a list of V tensors (Q_t,)")
        return [instance_identity_targets(instance_ids[t], instance_ids[t + 1]) for t in range(len(instance_ids) - 1)]

    def forward(
        self, match_logits: list[Tensor], features: list[Tensor], targets: list[Tensor]
    ) -> dict[str, Tensor]:
        """Compute L_tdt for one sequence.

        Args:
            match_logits: V - 1 tensors ``(Q_t, Q_{t+1})`` of match logits.
            features: V tensors ``(Q_t, d)`` of updated query features.
            targets: V - 1 bool tensors ``(Q_t, Q_{t+1})``.

        Returns:
            ``{"loss_match", "loss_cons"}`` raw terms and ``"loss"``, the weighted sum. V = 1
            gives zeros connected to the graph of ``features``.
        """
        num_frames = len(features)
        if num_frames == 0:
            raise ValueError("features must hold at least one frame (V >= 1), got an empty list")
        if len(match_logits) != num_frames - 1 or len(targets) != num_frames - 1:
            raise ValueError(
                f"match_logits and targets must hold V - 1 = {num_frames - 1} tensors for V = {num_frames} "
                f"frames of features, got {len(match_logits)} and {len(targets)}"
            )
        d = features[0].shape[-1]
        for t, feat in enumerate(features):
            if feat.dim() != 2 or feat.shape[1] != d:
                raise ValueError(f"features[{t}] must have shape (Q_t, {d}), got {tuple(feat.shape)}")
        for t, (logits, target) in enumerate(zip(match_logits, targets)):
            expected = (features[t].shape[0], features[t + 1].shape[0])
            if tuple(logits.shape) != expected:
                raise ValueError(f"match_logits[{t}] must have shape {expected}, got {tuple(logits.shape)}")
            if tuple(target.shape) != expected:
                raise ValueError(f"targets[{t}] must have shape {expected}, got {tuple(target.shape)}")

        # Computed in (at least) fp32 with autocast off, like every other term.
        with torch.autocast(features[0].device.type, enabled=False):
            features = [upcast(f) for f in features]
            match_logits = [upcast(m) for m in match_logits]
            if num_frames == 1:
                zero = features[0].sum() * 0.0
                return {"loss_match": zero, "loss_cons": zero, "loss": zero}

            match_terms = []
            cons_terms = []
            for t in range(num_frames - 1):
                match_terms.append(match_bce_loss(match_logits[t], targets[t],
                                                  reduction=self.reduction,
                                                  pos_weight=self.pos_weight))
                pairs = targets[t].nonzero() if self.consistency == "matched" else None  # (P, 2)
                cons_terms.append(consistency_loss(features[t], features[t + 1], pairs=pairs,
                                                   reduction=self.reduction))
            loss_match = torch.stack(match_terms).mean()
            loss_cons = torch.stack(cons_terms).mean()
        return {
            "loss_match": loss_match,
            "loss_cons": loss_cons,
            "loss": self.match_weight * loss_match + self.cons_weight * loss_cons,
        }
