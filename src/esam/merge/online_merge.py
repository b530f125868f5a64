"""Online merging of per-frame instances into a memory of global instances.

Shape vocabulary: P predicted instances of the current frame, N_t points of the current frame,
K global instances in the memory, N_seen points seen so far (all frames concatenated), d merge
feature dim.

Following ESAM's ``OnlineMerge`` (``oneformer3d/instance_merge.py``), each call to
:meth:`OnlineMerge.merge` folds one frame into the memory:

1. every frame instance gets a box (given, or the axis-aligned box of its points);
2. similarity (K, P) = cosine of merge features x geometry (3-D box IoU, or ``1 / (1 + centre
   distance)``), or a given similarity such as a cross-frame match matrix; pairs with different
   labels are gated out (option), and a pair must score above ``threshold`` (>= 0);
3. Hungarian assignment (scipy) maximising the summed similarity over the allowed pairs;
4. a matched memory entry becomes the running mean, over the frames merged into it, of features
   and scores (``count`` frames so far), its box the union of its boxes (the box of the union
   of its points when boxes come from points), its mask gains the frame's points;
5. unmatched frame instances become new global instances;
6. the top-k global instances by score are reported (ESAM keeps the whole memory and truncates
   what it reports), or the memory itself is pruned to them (``topk_mode="memory"``).

Global instance k (row k of the memory) has id k + 1; 0 means "no instance". Without pruning,
ids are stable from frame to frame. Masks are stored per frame and materialised on demand, so a
merge costs O(P N_t + K P), not O(K N_seen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from esam.losses.merge import axis_aligned_box_iou
from esam.structures import boxes_from_instance_ids

__all__ = ["FrameInstances", "MergeResult", "OnlineMerge", "boxes_from_masks", "merge_similarity"]


@dataclass
class FrameInstances:
    """The predicted instances of one frame, as :meth:`OnlineMerge.merge` takes them.

    Attributes:
        masks: ``(P, N_t)`` bool, instance p covers point i of the frame.
        scores: ``(P,)`` confidence.
        labels: ``(P,)`` integer class.
        features: ``(P, d)`` merge features (need not be normalised).
        points: ``(N_t, 3)`` world-frame xyz of the frame's points; needed when ``boxes`` is None.
        boxes: ``(P, 6)`` boxes (cx, cy, cz, dx, dy, dz); default the box of each mask's points.
        similarity: ``(K, P)`` similarity to the memory as it is before this frame (for example
            a cross-frame match matrix); replaces features x geometry when given.
    """

    masks: Tensor
    scores: Tensor
    labels: Tensor
    features: Tensor
    points: Tensor | None = None
    boxes: Tensor | None = None
    similarity: Tensor | None = None


@dataclass
class MergeResult:
    """What one :meth:`OnlineMerge.merge` call decided.

    Attributes:
        global_ids: ``(N_t,)`` int64 in ``{0..K}``: the reported global instance of each point of
            the frame (0: none); a point covered by several goes to the highest memory score.
        instance_ids: ``(P,)`` int64 in ``{0..K}``: the global instance each frame instance went
            to (0: dropped, too few points or pruned away).
        matched: ``(P,)`` bool: merged into an existing global instance (else new or dropped).
        kept: ``(K_r,)`` int64 memory rows reported (top-k by score), ascending.
        num_global: K, the memory size after the merge.
    """

    global_ids: Tensor
    instance_ids: Tensor
    matched: Tensor
    kept: Tensor
    num_global: int


def boxes_from_masks(points: Tensor, masks: Tensor) -> Tensor:
    """Axis-aligned boxes of the points of each mask.

    Args:
        points: ``(N, 3)`` xyz.
        masks: ``(P, N)`` bool.

    Returns:
        ``(P, 6)`` (cx, cy, cz, dx, dy, dz); a mask without points gets a zero box.
    """
    inst, pt = masks.nonzero(as_tuple=True)  # (nnz,), (nnz,)
    return _boxes_from_pairs(points, inst, pt, masks.shape[0])


def _boxes_from_pairs(points: Tensor, inst: Tensor, pt: Tensor, p: int) -> Tensor:
    """Boxes from (instance, point) membership pairs -> ``(P, 6)``."""
    return boxes_from_instance_ids(points[pt], inst, p)


def merge_similarity(memory_features: Tensor, memory_boxes: Tensor, features: Tensor,
                     boxes: Tensor, geometry: str = "iou") -> Tensor:
    """Feature x geometry similarity between memory and frame instances.

    Args:
        memory_features: ``(K, d)`` memory merge features.
        memory_boxes: ``(K, 6)`` memory boxes (cx, cy, cz, dx, dy, dz).
        features: ``(P, d)`` frame merge features.
        boxes: ``(P, 6)`` frame boxes.
        geometry: ``"iou"`` (3-D box IoU) or ``"distance"`` (``1 / (1 + ||centre_k - centre_p||)``).

    Returns:
        ``(K, P)`` cosine similarity of the features times the geometric score.
    """
    cos = F.normalize(memory_features, dim=-1) @ F.normalize(features, dim=-1).T  # (K, P)
    if geometry == "iou":
        geo = axis_aligned_box_iou(memory_boxes, boxes)  # (K, P)
    elif geometry == "distance":
        geo = 1.0 / (1.0 + torch.cdist(memory_boxes[:, :3], boxes[:, :3]))  # (K, P)
    else:
        raise ValueError(f"geometry: expected 'iou' or 'distance', got {geometry!r}")
    return cos * geo


def _corners(boxes: Tensor) -> tuple[Tensor, Tensor]:
    return boxes[:, :3] - boxes[:, 3:] / 2, boxes[:, :3] + boxes[:, 3:] / 2


class OnlineMerge:
    """Stateful online merger of per-frame instances into global instances.

    Args:
        geometry: ``"iou"`` (3-D box IoU, ESAM with boxes) or ``"distance"`` (inverse centre
            distance, ESAM without boxes; ours is ``1 / (1 + d)`` so it stays in (0, 1]).
        threshold: a pair must have similarity strictly above it (>= 0: positive required).
        label_gate: only instances with equal labels may merge.
        topk: number of global instances reported (None: all).
        topk_mode: ``"output"`` — the memory keeps everything and only the top-k are reported
            (ESAM); ``"memory"`` — the memory is pruned to the top-k after each frame (ids of
            the survivors are renumbered).
        box_update: ``"union"`` — a merged box is the union of the boxes (the box of the union
            of points when boxes come from points); ``"average"`` — running mean, as ESAM does
            with predicted boxes.
        min_points: frame instances with fewer points are ignored.
    """

    def __init__(self, *, geometry: str = "iou", threshold: float = 0.0, label_gate: bool = True,
                 topk: int | None = None, topk_mode: str = "output", box_update: str = "union",
                 min_points: int = 1):
        if geometry not in ("iou", "distance"):
            raise ValueError(f"geometry: expected 'iou' or 'distance', got {geometry!r}")
        if threshold < 0:
            raise ValueError(f"threshold: expected >= 0 (positive similarity required), got "
                             f"{threshold}")
        if topk is not None and topk < 1:
            raise ValueError(f"topk: expected None or >= 1, got {topk}")
        if topk_mode not in ("output", "memory"):
            raise ValueError(f"topk_mode: expected 'output' or 'memory', got {topk_mode!r}")
        if box_update not in ("union", "average"):
            raise ValueError(f"box_update: expected 'union' or 'average', got {box_update!r}")
        self.geometry = geometry
        self.threshold = threshold
        self.label_gate = label_gate
        self.topk = topk
        self.topk_mode = topk_mode
        self.box_update = box_update
        self.min_points = min_points
        self.reset()

    # ---------------------------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget every global instance and every point seen."""
        self._features: Tensor | None = None  # (K, d)
        self._boxes: Tensor | None = None  # (K, 6)
        self._scores: Tensor | None = None  # (K,)
        self._labels: Tensor | None = None  # (K,)
        self._counts: Tensor | None = None  # (K,) frames merged into each entry
        self._reported: Tensor | None = None  # (K,) bool, in the top-k
        self._blocks: list[tuple[Tensor, Tensor]] = []  # per frame: masks (P, N_t), rows (P,)
        self._num_seen = 0

    @property
    def num_global(self) -> int:
        """K, the number of global instances in the memory."""
        return 0 if self._scores is None else self._scores.shape[0]

    @property
    def num_points_seen(self) -> int:
        """N_seen, the points of every frame merged so far."""
        return self._num_seen

    @property
    def features(self) -> Tensor | None:
        """``(K, d)`` running-mean merge features."""
        return self._features

    @property
    def boxes(self) -> Tensor | None:
        """``(K, 6)`` boxes (cx, cy, cz, dx, dy, dz)."""
        return self._boxes

    @property
    def scores(self) -> Tensor | None:
        """``(K,)`` running-mean scores."""
        return self._scores

    @property
    def labels(self) -> Tensor | None:
        """``(K,)`` labels."""
        return self._labels

    @property
    def counts(self) -> Tensor | None:
        """``(K,)`` number of frames merged into each global instance."""
        return self._counts

    @property
    def reported(self) -> Tensor | None:
        """``(K,)`` bool, the global instances currently reported (top-k by score)."""
        return self._reported

    @property
    def masks(self) -> Tensor:
        """``(K, N_seen)`` bool masks of the global instances over every point seen."""
        device = self._scores.device if self._scores is not None else torch.device("cpu")
        out = torch.zeros(self.num_global, self._num_seen, dtype=torch.bool, device=device)
        start = 0
        for masks, rows in self._blocks:
            n = masks.shape[1]
            keep = rows >= 0
            out[rows[keep], start:start + n] = masks[keep]
            start += n
        return out

    def point_global_ids(self) -> Tensor:
        """``(N_seen,)`` int64 reported global id of every point seen (0: none)."""
        parts = [self._point_ids(masks, rows) for masks, rows in self._blocks]
        if not parts:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(parts)

    def _point_ids(self, masks: Tensor, rows: Tensor,
                   pairs: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Global id per point of one frame block, highest memory score first -> ``(N_t,)``.

        Works on the (instance, point) pairs of the masks: each instance gets a rank by memory
        score (ties: the lower global id ranks higher) and every point keeps the largest rank
        that covers it.
        """
        p, n = masks.shape
        out = torch.zeros(n, dtype=torch.long, device=masks.device)
        if p == 0 or self.num_global == 0:
            return out
        inst, pt = masks.nonzero(as_tuple=True) if pairs is None else pairs  # (nnz,)
        safe = rows.clamp(min=0)
        usable = (rows >= 0) & self._reported[safe]  # (P,)
        score = torch.where(usable, self._scores[safe], torch.full_like(self._scores[safe],
                                                                         float("-inf")))
        # ascending by score, and by descending memory row among equal scores
        by_row = torch.sort(safe, descending=True, stable=True).indices  # (P,)
        order = by_row[torch.sort(score[by_row], stable=True).indices]  # (P,)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(p, device=masks.device)
        keep = usable[inst]
        best = torch.full((n,), -1, dtype=torch.long, device=masks.device).scatter_reduce(
            0, pt[keep], rank[inst[keep]], reduce="amax")  # (N_t,)
        covered = best >= 0
        out[covered] = safe[order[best[covered]]] + 1
        return out

    # ---------------------------------------------------------------------------------- merge

    def _validate(self, frame: FrameInstances) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        masks = frame.masks
        if masks.dim() != 2:
            raise ValueError(f"masks: expected shape (P, N_t), got {tuple(masks.shape)}")
        if masks.dtype != torch.bool:
            if masks.is_floating_point():
                raise ValueError(f"masks: expected a bool (P, N_t) tensor, got dtype {masks.dtype}")
            masks = masks != 0
        p, n = masks.shape
        if frame.scores.shape != (p,):
            raise ValueError(f"scores: expected shape (P={p},), got {tuple(frame.scores.shape)}")
        if frame.labels.shape != (p,) or frame.labels.is_floating_point():
            raise ValueError(f"labels: expected an integer tensor of shape (P={p},), got shape "
                             f"{tuple(frame.labels.shape)} dtype {frame.labels.dtype}")
        f = frame.features
        if f.dim() != 2 or f.shape[0] != p:
            raise ValueError(f"features: expected shape (P={p}, d), got {tuple(f.shape)}")
        if self._features is not None and f.shape[1] != self._features.shape[1]:
            raise ValueError(f"features: expected d={self._features.shape[1]} (the memory's), "
                             f"got {f.shape[1]}")
        pairs = masks.nonzero(as_tuple=True)  # (instance, point) pairs, (nnz,) each
        if frame.boxes is not None:
            if frame.boxes.shape != (p, 6):
                raise ValueError(f"boxes: expected shape (P={p}, 6), got "
                                 f"{tuple(frame.boxes.shape)}")
            boxes = frame.boxes
        else:
            if frame.points is None:
                raise ValueError("points: expected (N_t, 3) xyz to compute the boxes (boxes is "
                                 "None), got None")
            if frame.points.shape != (n, 3):
                raise ValueError(f"points: expected shape (N_t={n}, 3), got "
                                 f"{tuple(frame.points.shape)}")
            boxes = _boxes_from_pairs(frame.points, pairs[0], pairs[1], p)
        if frame.similarity is not None and frame.similarity.shape != (self.num_global, p):
            raise ValueError(f"similarity: expected shape (K={self.num_global}, P={p}) against "
                             f"the memory before this frame, got {tuple(frame.similarity.shape)}")
        return masks, boxes, pairs

    @torch.no_grad()
    def merge(self, frame: FrameInstances) -> MergeResult:
        """Fold one frame's instances into the memory.

        Args:
            frame: the frame's instances (see :class:`FrameInstances`).

        Returns:
            :class:`MergeResult` with the frame's per-point global ids.
        """
        masks, boxes, pairs = self._validate(frame)
        p, n = masks.shape
        device = masks.device
        feats = frame.features.detach()
        scores = frame.scores.detach().to(feats.dtype)
        labels = frame.labels.long()
        boxes = boxes.detach().to(feats.dtype)
        usable = torch.bincount(pairs[0], minlength=p) >= self.min_points  # (P,)
        if self._scores is None:
            d = feats.shape[1]
            self._features = feats.new_zeros(0, d)
            self._boxes = feats.new_zeros(0, 6)
            self._scores = feats.new_zeros(0)
            self._labels = torch.zeros(0, dtype=torch.long, device=device)
            self._counts = torch.zeros(0, dtype=torch.long, device=device)

        k = self.num_global
        rows = torch.full((p,), -1, dtype=torch.long, device=device)  # memory row of each instance
        matched = torch.zeros(p, dtype=torch.bool, device=device)
        if k > 0 and p > 0:
            if frame.similarity is not None:
                sim = frame.similarity.detach().to(feats.dtype)  # (K, P)
            else:
                sim = merge_similarity(self._features, self._boxes, feats, boxes, self.geometry)
            allowed = (sim > self.threshold) & usable.unsqueeze(0)  # (K, P)
            if self.label_gate:
                allowed &= self._labels.unsqueeze(1) == labels.unsqueeze(0)
            gain = torch.where(allowed, sim, torch.zeros_like(sim)).double().cpu().numpy()
            mem_idx, inst_idx = linear_sum_assignment(gain, maximize=True)
            mem_idx = torch.as_tensor(mem_idx, dtype=torch.long, device=device)
            inst_idx = torch.as_tensor(inst_idx, dtype=torch.long, device=device)
            ok = allowed[mem_idx, inst_idx]
            mem_idx, inst_idx = mem_idx[ok], inst_idx[ok]
            self._update(mem_idx, feats[inst_idx], boxes[inst_idx], scores[inst_idx])
            rows[inst_idx] = mem_idx
            matched[inst_idx] = True

        new = usable & ~matched  # (P,)
        num_new = int(new.sum())
        rows[new] = torch.arange(k, k + num_new, device=device)
        self._features = torch.cat([self._features, feats[new]])
        self._boxes = torch.cat([self._boxes, boxes[new]])
        self._scores = torch.cat([self._scores, scores[new]])
        self._labels = torch.cat([self._labels, labels[new]])
        self._counts = torch.cat([self._counts, torch.ones(num_new, dtype=torch.long,
                                                           device=device)])
        self._blocks.append((masks, rows))
        self._num_seen += n
        self._select_topk()
        rows = self._blocks[-1][1]
        global_ids = self._point_ids(masks, rows, pairs)
        instance_ids = rows + 1  # -1 -> 0
        return MergeResult(
            global_ids=global_ids,
            instance_ids=instance_ids,
            matched=matched & (rows >= 0),
            kept=self._reported.nonzero().flatten(),
            num_global=self.num_global,
        )

    def _update(self, mem_idx: Tensor, feats: Tensor, boxes: Tensor, scores: Tensor) -> None:
        """Running means over merged frames for the matched memory rows."""
        c = self._counts[mem_idx].to(feats.dtype)  # (M,)
        w_old, w_new = (c / (c + 1)).unsqueeze(1), (1 / (c + 1)).unsqueeze(1)
        self._features[mem_idx] = self._features[mem_idx] * w_old + feats * w_new
        self._scores[mem_idx] = self._scores[mem_idx] * w_old[:, 0] + scores * w_new[:, 0]
        if self.box_update == "average":
            self._boxes[mem_idx] = self._boxes[mem_idx] * w_old + boxes * w_new
        else:
            lo1, hi1 = _corners(self._boxes[mem_idx])
            lo2, hi2 = _corners(boxes)
            lo, hi = torch.minimum(lo1, lo2), torch.maximum(hi1, hi2)
            self._boxes[mem_idx] = torch.cat([(lo + hi) / 2, hi - lo], 1)
        self._counts[mem_idx] += 1

    def _select_topk(self) -> None:
        """Mark the top-k global instances by score; prune the memory in ``"memory"`` mode."""
        k = self.num_global
        reported = torch.ones(k, dtype=torch.bool, device=self._scores.device)
        if self.topk is not None and k > self.topk:
            reported = torch.zeros_like(reported)
            reported[self._scores.topk(self.topk).indices] = True
            if self.topk_mode == "memory":
                remap = torch.full((k + 1,), -1, dtype=torch.long, device=reported.device)
                remap[:-1][reported] = torch.arange(self.topk, device=reported.device)
                self._features = self._features[reported]
                self._boxes = self._boxes[reported]
                self._scores = self._scores[reported]
                self._labels = self._labels[reported]
                self._counts = self._counts[reported]
                # rows == -1 index the last slot of remap, which stays -1
                self._blocks = [(m, remap[r]) for m, r in self._blocks]
                reported = torch.ones(self.topk, dtype=torch.bool, device=reported.device)
        self._reported = reported
