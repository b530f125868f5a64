"""Plain-tensor containers for what the losses consume.

Shape vocabulary used throughout the package: B samples, V frames, N points, S superpoints,
Q queries, K ground-truth instances, M matched pairs, C classes (+1 for no-object), d features.

Nothing here is framework specific: each container is a dataclass of tensors, with N and K free
to vary from sample to sample. Validation happens in `__post_init__`, so a malformed input is
reported where it is built, naming the field, the expected shape and the shape received.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor

MaskLevel = Literal["point", "superpoint"]

# Up to this many instances, segment sums run as one GEMM against cached float masks.
_GEMM_MAX_SEGMENTS = 64
# Index tensors below this size and range are int32 (half the memory of int64).
_INT32_LIMIT = 2**31

__all__ = [
    "InstanceMasks",
    "LayerOutput",
    "FramePrediction",
    "FrameTarget",
    "SequencePrediction",
    "SequenceTarget",
    "pool_to_superpoints",
    "boxes_from_instance_ids",
]


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _check(cond: bool, name: str, expected: str, got: Tensor | None | str) -> None:
    if not cond:
        got_s = got if isinstance(got, str) else _shape(got)
        raise ValueError(f"{name}: expected {expected}, got {got_s}")


def _check_long(t: Tensor, name: str) -> None:
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name}: expected an integer tensor, got dtype {t.dtype}")


def _check_mask(t: Tensor, name: str) -> None:
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name}: expected a bool (or integer 0/1) tensor, got dtype {t.dtype}")


def _check_float(t: Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


class InstanceMasks:
    """Ground-truth instance masks over P positions (points or superpoints).

    Two encodings with one interface:

    * ids: ``(P,)`` integer tensor, ``ids[i] = k`` when position i belongs to instance k and -1
      when it belongs to none. Instances cannot overlap; pairwise sums are segment sums, O(Q*P).
    * dense: ``(K, P)`` boolean tensor. Instances may overlap; pairwise sums are one matmul.

    Every mask term of the objective is written against the three operations below, so both
    encodings give the same numbers (tested).
    """

    def __init__(self, *, ids: Tensor | None = None, dense: Tensor | None = None,
                 num_instances: int | None = None, name: str | None = None):
        # ``name``: the argument the masks came from, for error messages (default ids / dense)
        if (ids is None) == (dense is None):
            raise ValueError("InstanceMasks: give exactly one of `ids` (P,) or `dense` (K, P)")
        if ids is not None:
            name = name or "ids"
            _check(ids.dim() == 1, name, "shape (P,)", ids)
            _check_long(ids, name)
            ids = ids.long()
            k_max = int(ids.max()) + 1 if ids.numel() else 0
            if ids.numel() and int(ids.min()) < -1:
                raise ValueError(f"{name}: expected values in [-1, K), got minimum "
                                 f"{int(ids.min())}")
            if num_instances is None:
                num_instances = k_max
            elif k_max > num_instances:
                raise ValueError(f"{name}: expected values < K={num_instances} (one per label), "
                                 f"got maximum {k_max - 1}")
            self.num_instances = int(num_instances)
            self.num_positions = ids.shape[0]
        else:
            name = name or "dense"
            _check(dense.dim() == 2, name, "shape (K, P)", dense)
            if dense.dtype != torch.bool:
                if dense.is_floating_point() or dense.dtype.is_complex:
                    raise ValueError(f"{name}: expected a bool (K, P) tensor, got dtype "
                                     f"{dense.dtype}")
                dense = dense != 0
            if num_instances is not None and num_instances != dense.shape[0]:
                raise ValueError(
                    f"{name}: expected {num_instances} rows (num_instances), got {dense.shape[0]}")
            self.num_instances = dense.shape[0]
            self.num_positions = dense.shape[1]
        self.ids = ids
        self.dense = dense
        self._cache: dict = {}

    @property
    def device(self) -> torch.device:
        return (self.ids if self.ids is not None else self.dense).device

    def __len__(self) -> int:
        return self.num_instances

    def segment_sum(self, values: Tensor) -> Tensor:
        """Sum ``values (R, P)`` over each instance's positions -> ``(R, K)``."""
        return self.segment_and_total(values)[0]

    def segment_and_total(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, K)`` per-instance sums of ``values (R, P)`` and ``(R,)`` row totals.

        Dense masks, and ids with few instances, run one GEMM against the (cached) float masks:
        BLAS streams ``values`` once, faster than a scatter on CPU, and both encodings then
        produce bitwise-equal sums (so matching ties break the same way). Many instances use a
        scatter-add, O(R*P) whatever K is.
        """
        if self.dense is not None or self.num_instances <= _GEMM_MAX_SEGMENTS:
            inside = torch.mm(self._float(values.dtype), values.T).T  # (R, K)
        else:
            seg = values.new_zeros(values.shape[0], self.num_instances + 1)
            seg.index_add_(1, self.ids + 1, values)  # column 0: outside every instance
            inside = seg[:, 1:]
        return inside, values.sum(1)

    def segment_accumulate(self, out_t: Tensor, values: Tensor, start: int) -> None:
        """Add the per-instance sums of a block of columns to ``out_t``.

        Args:
            out_t: ``(K, R)`` accumulator (instances first: the GEMM's fast layout).
            values: ``(R, C)`` values of positions ``[start, start + C)``.
        """
        stop = start + values.shape[1]
        if self.dense is not None or self.num_instances <= _GEMM_MAX_SEGMENTS:
            out_t.addmm_(self._float(values.dtype)[:, start:stop], values.T)
        else:
            seg = values.new_zeros(values.shape[0], self.num_instances + 1)
            seg.index_add_(1, self.ids[start:stop] + 1, values)  # column 0: outside all
            out_t += seg[:, 1:].T

    def _float(self, dtype: torch.dtype) -> Tensor:
        """``(K, P)`` float masks, cached per dtype."""
        key = ("float", dtype)
        if key not in self._cache:
            if self.dense is not None:
                self._cache[key] = self.dense.to(dtype)
            else:
                k = torch.arange(self.num_instances, device=self.ids.device)
                self._cache[key] = (k.unsqueeze(1) == self.ids.unsqueeze(0)).to(dtype)
        return self._cache[key]

    def members(self) -> tuple[Tensor, Tensor, Tensor]:
        """Positions of every instance, grouped by instance (cached).

        Returns:
            ``(positions (E,), starts (K,), counts (K,))`` (positions int32 when they fit, else
            int64; the others int64): the positions of instance k are
            ``positions[starts[k] : starts[k] + counts[k]]``, in increasing order; E is the
            number of (instance, position) memberships.
        """
        if "members" not in self._cache:
            counts = self.sizes(torch.long)
            if self.dense is not None:
                positions = torch.nonzero(self.dense)[:, 1]  # row-major: grouped by instance
            else:
                # a stable sort keeps each instance's positions increasing; -1 (none) sorts first
                order = torch.sort(self.ids, stable=True).indices
                positions = order[self.num_positions - int(counts.sum()):]
            starts = torch.cumsum(counts, 0) - counts
            if self.num_positions < _INT32_LIMIT:
                positions = positions.int()
            self._cache["members"] = (positions, starts, counts)
        return self._cache["members"]

    def pair_positions(self, rows: Tensor, instance_idx: Tensor, row_stride: int,
                       ) -> tuple[Tensor, Tensor]:
        """Flat indices of the members of given (row, instance) pairs in a ``(R, P)`` tensor.

        For pairs ``a`` with row ``rows[a]`` and instance ``instance_idx[a]``, lists every
        ``(a, rows[a] * row_stride + i)`` with position i in that instance, pair by pair, so a
        sum over each pair's mask is one gather and one segment reduction of ``sum_a |g_a|``
        elements instead of a pass over all P positions per pair.

        Returns:
            ``(pair (T,), flat (T,))``: ``pair`` int32 (int64 when an index could overflow
            it), ``flat`` int64.
        """
        positions, starts, counts = self.members()
        n = counts.index_select(0, instance_idx)  # (A,)
        total = int(n.sum())  # T (the output size, known once)
        # int32 intermediates where every index fits (half the memory: T is ~R*P/K)
        small = positions.dtype == torch.int32 and max(total, len(positions)) < _INT32_LIMIT
        pair = torch.repeat_interleave(n.int() if small else n, output_size=total)  # (T,)
        # member j of the output list is positions[starts[k_a] + (j - first_a)]
        shift = (starts.index_select(0, instance_idx) - (torch.cumsum(n, 0) - n)).to(pair.dtype)
        src = shift.index_select(0, pair).add_(
            torch.arange(len(pair), device=n.device, dtype=pair.dtype))
        flat = (rows * row_stride).index_select(0, pair)  # (T,) int64
        flat += positions.index_select(0, src)
        return pair, flat

    def sizes(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Number of positions of each instance -> ``(K,)`` (counted once, cached)."""
        if "sizes" not in self._cache:
            if self.dense is not None:
                counts = torch.count_nonzero(self.dense, dim=1)
            else:
                counts = torch.bincount(self.ids + 1, minlength=self.num_instances + 1)[1:]
            self._cache["sizes"] = counts
        return self._cache["sizes"].to(dtype)

    def rows(self, instance_idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Binary masks of the given instances -> ``(M, P)`` of ``dtype``."""
        if self.dense is not None or self.num_instances <= _GEMM_MAX_SEGMENTS:
            return self._float(dtype).index_select(0, instance_idx)
        return (self.ids.unsqueeze(0) == instance_idx.unsqueeze(1)).to(dtype)

    def to_dense(self) -> Tensor:
        """``(K, P)`` boolean masks."""
        if self.dense is not None:
            return self.dense
        k = torch.arange(self.num_instances, device=self.ids.device)
        return self.ids.unsqueeze(0) == k.unsqueeze(1)

    def to(self, device: torch.device | str) -> InstanceMasks:
        if self.ids is not None:
            return InstanceMasks(ids=self.ids.to(device), num_instances=self.num_instances)
        return InstanceMasks(dense=self.dense.to(device))


def pool_to_superpoints(labels: Tensor, superpoints: Tensor, num_superpoints: int,
                        num_values: int, *, ignore_value: int, mode: str = "plurality") -> Tensor:
    """Pool per-point labels to superpoints by vote.

    Args:
        labels: ``(N,)`` integers in ``[0, num_values)``, or ``ignore_value``.
        superpoints: ``(N,)`` superpoint index of every point, in ``[0, S)``.
        num_superpoints: S.
        num_values: number of label values (classes, or instances).
        ignore_value: label of points that vote for nothing (and of superpoints that get no vote).
        mode: ``"plurality"`` — the most frequent label, unlabeled points voting for
            ``ignore_value`` (ties to the smallest label), as ESAM takes the argmax of per-superpoint
            class frequencies over C+1 columns; ``"majority"`` — a label only when it holds
            more than half of the superpoint's points, as ESAM's superpoint instance masks do.

    Returns:
        ``(S,)`` pooled labels.
    """
    if mode not in ("plurality", "majority"):
        raise ValueError(f"mode: expected 'plurality' or 'majority', got {mode!r}")
    if num_values == 0:
        return torch.full((num_superpoints,), ignore_value, dtype=torch.long, device=labels.device)
    lab = labels.long()
    valid = (lab >= 0) & (lab < num_values)
    if 0 <= ignore_value < num_values:
        valid &= lab != ignore_value
    sp = superpoints.long()
    # (S, V+1) votes (column V: no label): one bincount of the flat (superpoint, label) cell,
    # cheaper than a 2-D accumulating index_put
    cell = torch.where(valid, lab, num_values).add_(sp, alpha=num_values + 1)
    counts = torch.bincount(cell, minlength=num_superpoints * (num_values + 1))
    counts = counts.view(num_superpoints, num_values + 1)
    if mode == "plurality":
        # Unlabeled points vote too (for "ignore"), as ESAM's argmax over C+1 frequencies does;
        # ties go to the smallest label, so a labelled class wins a tie with "ignore". A
        # superpoint without points has no vote at all.
        best_count, best = counts.max(1)
        keep = (best < num_values) & (best_count > 0)
    else:
        best_count, best = counts[:, :num_values].max(1)
        keep = 2 * best_count > torch.bincount(sp, minlength=num_superpoints)  # every point
    return torch.where(keep, best, ignore_value)


def boxes_from_instance_ids(points: Tensor, ids: Tensor, num_instances: int) -> Tensor:
    """Axis-aligned boxes ``(K, 6)`` = (cx, cy, cz, dx, dy, dz) of each instance's points.

    Args:
        points: ``(N, 3)`` xyz.
        ids: ``(N,)`` instance index in ``[-1, K)``; -1 is no instance.
        num_instances: K. Instances without points get a zero box.
    """
    valid = ids >= 0
    idx = ids[valid].long()
    pts = points[valid]
    big = torch.finfo(points.dtype).max
    lo = points.new_full((num_instances, 3), big).scatter_reduce(
        0, idx.unsqueeze(1).expand(-1, 3), pts, reduce="amin")
    hi = points.new_full((num_instances, 3), -big).scatter_reduce(
        0, idx.unsqueeze(1).expand(-1, 3), pts, reduce="amax")
    empty = torch.bincount(idx, minlength=num_instances) == 0
    lo = torch.where(empty.unsqueeze(1), torch.zeros_like(lo), lo)
    hi = torch.where(empty.unsqueeze(1), torch.zeros_like(hi), hi)
    return torch.cat([(lo + hi) / 2, hi - lo], dim=1)


@dataclass
class LayerOutput:
    """One decoder layer's query outputs for one sample (one frame).

    Attributes:
        cls_logits: ``(Q, C+1)`` class logits; the last column is no-object.
        mask_logits: ``(Q, N)`` point-level or ``(Q, S)`` superpoint-level mask logits.
        mask_level: which of the two ``mask_logits`` holds ("point" or "superpoint"); ESAM's
            ``mask_pred_mode`` "P" / "SP".
        scores: ``(Q,)`` or ``(Q, 1)`` predicted mask quality (regressed to the mask IoU), or None.
        box_preds: ``(Q, 6)`` predicted box (cx, cy, cz, dx, dy, dz), or — when ``query_centers`` is
            given — a centre offset from it followed by the size, as ESAM predicts; or None.
        query_centers: ``(Q, 3)`` position each query was seeded at, or None.
    """

    cls_logits: Tensor
    mask_logits: Tensor
    mask_level: MaskLevel = "point"
    scores: Tensor | None = None
    box_preds: Tensor | None = None
    query_centers: Tensor | None = None

    def __post_init__(self) -> None:
        _check(self.cls_logits.dim() == 2, "cls_logits", "shape (Q, C+1)", self.cls_logits)
        q = self.cls_logits.shape[0]
        _check(self.cls_logits.shape[1] >= 2, "cls_logits",
               "shape (Q, C+1) with at least one class and the no-object column", self.cls_logits)
        _check(self.mask_logits.dim() == 2 and self.mask_logits.shape[0] == q, "mask_logits",
               f"shape (Q={q}, N or S)", self.mask_logits)
        if self.mask_level not in ("point", "superpoint"):
            raise ValueError(f"mask_level: expected 'point' or 'superpoint', got {self.mask_level!r}")
        if self.scores is not None:
            ok = self.scores.shape in ((q,), (q, 1))
            _check(ok, "scores", f"shape (Q={q},) or (Q={q}, 1)", self.scores)
        if self.box_preds is not None:
            _check(self.box_preds.shape == (q, 6), "box_preds", f"shape (Q={q}, 6)", self.box_preds)
        if self.query_centers is not None:
            _check(self.query_centers.shape == (q, 3), "query_centers", f"shape (Q={q}, 3)",
                   self.query_centers)
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and not v.is_floating_point():
                raise ValueError(f"{f.name}: expected a floating-point tensor, got dtype {v.dtype}")

    @property
    def num_queries(self) -> int:
        return self.cls_logits.shape[0]

    def boxes(self) -> Tensor | None:
        """Predicted boxes ``(Q, 6)`` in (cx, cy, cz, dx, dy, dz)."""
        if self.box_preds is None:
            return None
        if self.query_centers is None:
            return self.box_preds
        return torch.cat([self.query_centers + self.box_preds[:, :3], self.box_preds[:, 3:]], 1)


@dataclass
class FramePrediction:
    """Everything a model predicts for one frame of one sample.

    Attributes:
        layers: decoder layers in order; the last one is the final prediction, the others are
            deep-supervision (auxiliary) outputs.
        semantic_logits: ``(N, C)`` / ``(S, C)`` (or ``C+1`` columns, see
            `ScanNetSemanticCriterion`) semantic logits, or None.
        semantic_level: "point" or "superpoint" for ``semantic_logits``.
        query_features: ``(Q, d)`` query embeddings (cross-frame terms), or None.
        merge_features: ``(Q, d)`` merge embeddings (online merge terms), or None.
        fused_global: ``(M, d)`` pooled fused 3-D features (CLIP term), or None.
        clip_global: ``(M, d)`` image CLS embeddings paired row by row with ``fused_global``.
    """

    layers: list[LayerOutput]
    semantic_logits: Tensor | None = None
    semantic_level: MaskLevel = "point"
    query_features: Tensor | None = None
    merge_features: Tensor | None = None
    fused_global: Tensor | None = None
    clip_global: Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, LayerOutput):
            self.layers = [self.layers]
        if len(self.layers) == 0:
            raise ValueError("layers: expected at least one LayerOutput, got an empty list")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LayerOutput):
                raise ValueError(f"layers[{i}]: expected a LayerOutput, got {type(layer).__name__}")
        for name in ("semantic_logits", "query_features", "merge_features", "fused_global",
                     "clip_global"):
            t = getattr(self, name)
            if t is not None and not t.is_floating_point():
                raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        if self.semantic_logits is not None:
            _check(self.semantic_logits.dim() == 2, "semantic_logits", "shape (N or S, C)",
                   self.semantic_logits)
        if self.semantic_level not in ("point", "superpoint"):
            raise ValueError(
                f"semantic_level: expected 'point' or 'superpoint', got {self.semantic_level!r}")
        q = self.layers[-1].num_queries
        for name in ("query_features", "merge_features"):
            t = getattr(self, name)
            if t is not None:
                _check(t.dim() == 2 and t.shape[0] == q, name, f"shape (Q={q}, d)", t)
        if (self.fused_global is None) != (self.clip_global is None):
            raise ValueError("fused_global and clip_global: give both or neither")
        if self.fused_global is not None:
            _check(self.fused_global.dim() == 2, "fused_global", "shape (M, d)", self.fused_global)
            _check(self.clip_global.shape == self.fused_global.shape, "clip_global",
                   f"shape {tuple(self.fused_global.shape)} (same as fused_global)", self.clip_global)

    @property
    def final(self) -> LayerOutput:
        return self.layers[-1]


@dataclass
class FrameTarget:
    """Ground truth of one frame of one sample.

    Give the instance masks either as per-point ids (``instance_ids``, the fast path) or as dense
    masks (``instance_masks``); superpoint-level masks are derived from the point level and
    ``superpoints`` by majority vote (as ESAM builds ``sp_masks``) unless given.

    Attributes:
        labels: ``(K,)`` instance class in ``[0, C)``.
        instance_ids: ``(N,)`` instance index in ``[-1, K)`` (-1: no instance).
        instance_masks: ``(K, N)`` bool, alternative to ``instance_ids``.
        superpoints: ``(N,)`` superpoint index in ``[0, S)``.
        sp_instance_ids / sp_instance_masks: superpoint-level masks ``(S,)`` / ``(K, S)``.
        semantic: ``(N,)`` semantic class per point; ``ignore_index`` marks unlabeled points.
        sp_semantic: ``(S,)`` semantic class per superpoint (else pooled by plurality vote).
        boxes: ``(K, 6)`` (cx, cy, cz, dx, dy, dz) instance boxes.
        query_masks: ``(K, Q)`` bool: query j may match instance k (ESAM's `SparseMatcher`).
        global_ids: ``(K,)`` identity of each instance across the frames of a sequence.
        points: ``(N, 3)`` world-frame xyz (cross-frame targets, boxes).
    """

    labels: Tensor
    instance_ids: Tensor | None = None
    instance_masks: Tensor | None = None
    superpoints: Tensor | None = None
    sp_instance_ids: Tensor | None = None
    sp_instance_masks: Tensor | None = None
    semantic: Tensor | None = None
    sp_semantic: Tensor | None = None
    boxes: Tensor | None = None
    query_masks: Tensor | None = None
    global_ids: Tensor | None = None
    points: Tensor | None = None
    num_superpoints: int | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(self.labels.dim() == 1, "labels", "shape (K,)", self.labels)
        _check_long(self.labels, "labels")
        k = self.labels.shape[0]
        if self.instance_ids is None and self.instance_masks is None:
            raise ValueError("FrameTarget: give instance_ids (N,) or instance_masks (K, N)")
        if self.instance_ids is not None and self.instance_masks is not None:
            raise ValueError("FrameTarget: give only one of instance_ids and instance_masks")
        if self.instance_ids is not None:
            _check(self.instance_ids.dim() == 1, "instance_ids", "shape (N,)", self.instance_ids)
            _check_long(self.instance_ids, "instance_ids")
            n = self.instance_ids.shape[0]
        else:
            _check(self.instance_masks.dim() == 2 and self.instance_masks.shape[0] == k,
                   "instance_masks", f"shape (K={k}, N)", self.instance_masks)
            _check_mask(self.instance_masks, "instance_masks")
            n = self.instance_masks.shape[1]
        self.num_points = n
        if self.superpoints is not None:
            _check(self.superpoints.shape == (n,), "superpoints", f"shape (N={n},)", self.superpoints)
            _check_long(self.superpoints, "superpoints")
            if self.num_superpoints is None:
                self.num_superpoints = int(self.superpoints.max()) + 1 if n else 0
        if self.sp_instance_masks is not None:
            _check(self.sp_instance_masks.dim() == 2 and self.sp_instance_masks.shape[0] == k,
                   "sp_instance_masks", f"shape (K={k}, S)", self.sp_instance_masks)
            _check_mask(self.sp_instance_masks, "sp_instance_masks")
            self.num_superpoints = self.sp_instance_masks.shape[1]
        if self.sp_instance_ids is not None:
            _check(self.sp_instance_ids.dim() == 1, "sp_instance_ids", "shape (S,)",
                   self.sp_instance_ids)
            _check_long(self.sp_instance_ids, "sp_instance_ids")
            self.num_superpoints = self.sp_instance_ids.shape[0]
        if self.superpoints is not None and n:
            # An index past S would fail deep inside torch, a negative one would silently wrap.
            lo, hi = (int(x) for x in torch.aminmax(self.superpoints))
            if lo < 0 or hi >= self.num_superpoints:
                raise ValueError(f"superpoints: expected values in [0, S={self.num_superpoints}), "
                                 f"got range [{lo}, {hi}]")
        if self.sp_semantic is not None:
            _check(self.sp_semantic.dim() == 1, "sp_semantic", "shape (S,)", self.sp_semantic)
            _check_long(self.sp_semantic, "sp_semantic")
        if self.semantic is not None:
            _check(self.semantic.shape == (n,), "semantic", f"shape (N={n},)", self.semantic)
            _check_long(self.semantic, "semantic")
        if self.boxes is not None:
            _check(self.boxes.shape == (k, 6), "boxes", f"shape (K={k}, 6)", self.boxes)
        if self.query_masks is not None:
            _check(self.query_masks.dim() == 2 and self.query_masks.shape[0] == k, "query_masks",
                   f"shape (K={k}, Q)", self.query_masks)
            _check_mask(self.query_masks, "query_masks")
        if self.global_ids is not None:
            _check(self.global_ids.shape == (k,), "global_ids", f"shape (K={k},)", self.global_ids)
            _check_long(self.global_ids, "global_ids")
        if self.points is not None:
            _check(self.points.shape == (n, 3), "points", f"shape (N={n}, 3)", self.points)

    @property
    def num_instances(self) -> int:
        return self.labels.shape[0]

    def point_masks(self) -> InstanceMasks:
        """Point-level GT masks."""
        if "point" not in self._cache:
            if self.instance_ids is not None:
                m = InstanceMasks(ids=self.instance_ids, num_instances=self.num_instances,
                                  name="instance_ids")
            else:
                m = InstanceMasks(dense=self.instance_masks, name="instance_masks")
            self._cache["point"] = m
        return self._cache["point"]

    def superpoint_masks(self) -> InstanceMasks:
        """Superpoint-level GT masks: given, or a majority vote of the point level."""
        if "superpoint" not in self._cache:
            if self.sp_instance_masks is not None:
                m = InstanceMasks(dense=self.sp_instance_masks, name="sp_instance_masks")
            elif self.sp_instance_ids is not None:
                m = InstanceMasks(ids=self.sp_instance_ids, num_instances=self.num_instances,
                                  name="sp_instance_ids")
            else:
                if self.superpoints is None:
                    raise ValueError(
                        "superpoints: needed (N,) to derive superpoint-level masks for a "
                        "superpoint-level prediction; got None")
                s = self.num_superpoints
                k = self.num_instances
                if self.instance_ids is not None:
                    ids = pool_to_superpoints(self.instance_ids, self.superpoints, s, k,
                                              ignore_value=-1, mode="majority")
                    m = InstanceMasks(ids=ids, num_instances=k)
                else:
                    # Overlapping dense masks: per instance, more than half of the superpoint.
                    sp = self.superpoints.long()
                    cnt = torch.zeros(k, s, device=sp.device).index_add_(
                        1, sp, self.instance_masks.float())
                    tot = torch.bincount(sp, minlength=s).float()
                    m = InstanceMasks(dense=cnt > 0.5 * tot)
            self._cache["superpoint"] = m
        return self._cache["superpoint"]

    def masks(self, level: MaskLevel) -> InstanceMasks:
        return self.point_masks() if level == "point" else self.superpoint_masks()

    def semantic_targets(self, level: MaskLevel, ignore_index: int, num_classes: int) -> Tensor:
        """Semantic labels at point level ``(N,)`` or superpoint level ``(S,)``."""
        if level == "point":
            if self.semantic is None:
                raise ValueError("semantic: needed (N,) for the semantic loss; got None")
            return self.semantic.long()
        if self.sp_semantic is not None:
            return self.sp_semantic.long()
        if self.semantic is None or self.superpoints is None:
            raise ValueError("sp_semantic: needed (S,), or semantic (N,) and superpoints (N,) to "
                             "pool it; got None")
        key = ("sp_semantic", ignore_index, num_classes)
        if key not in self._cache:
            # Pooling would silently read an out-of-range label as unlabeled.
            bad = (self.semantic != ignore_index) & ((self.semantic < 0)
                                                     | (self.semantic >= num_classes))
            if bool(bad.any()):
                raise ValueError(f"semantic: expected values in [0, {num_classes}) or "
                                 f"ignore_index={ignore_index}, got {int(self.semantic[bad][0])}")
            self._cache[key] = pool_to_superpoints(
                self.semantic, self.superpoints, self.num_superpoints, num_classes,
                ignore_value=ignore_index, mode="plurality")
        return self._cache[key]


def check_finite(named: list[tuple[str, Tensor]]) -> None:
    """Raise a ValueError naming the first tensor holding NaN or Inf.

    Fast path: one sum per tensor (a single read, vectorised) and a single host synchronisation
    for the whole list. A sum of floats is finite only if every term is, so a finite sum proves
    the tensor finite; a non-finite sum (a NaN/Inf, or an overflow of huge finite values) falls
    back to the exact element-wise test. Five to thirty times cheaper than ``isfinite().all()``.
    """
    named = [(n, t) for n, t in named if t is not None and t.is_floating_point() and t.numel()]
    if not named:
        return
    # float64 accumulation for float64 inputs, float32 otherwise (half sums overflow at 65504);
    # one op per tensor (no graph is recorded under no_grad), promoted by the stack
    with torch.no_grad():
        sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64
                                  else torch.float32) for _, t in named])
    maybe_bad = ~torch.isfinite(sums)
    if not bool(maybe_bad.any()):
        return
    named = [(n, t.detach()) for n, t in named]
    ok = torch.stack([torch.isfinite(t).all() if bad else torch.ones((), dtype=torch.bool,
                                                                      device=t.device)
                      for (_, t), bad in zip(named, maybe_bad.tolist())])
    if bool(ok.all()):
        return
    name, t = named[int((~ok).nonzero()[0])]
    bad = int((~torch.isfinite(t)).sum())
    raise ValueError(f"{name}: expected finite values, got {bad} NaN/Inf of {t.numel()} "
                     f"(shape {tuple(t.shape)})")


def prediction_tensors(pred: "FramePrediction", prefix: str) -> list[tuple[str, Tensor]]:
    """Every tensor of a frame prediction with a readable name, for `check_finite`."""
    out = []
    for i, layer in enumerate(pred.layers):
        for f in fields(layer):
            v = getattr(layer, f.name)
            if isinstance(v, Tensor):
                out.append((f"{prefix}.layers[{i}].{f.name}", v))
    for name in ("semantic_logits", "query_features", "merge_features", "fused_global",
                 "clip_global"):
        v = getattr(pred, name)
        if v is not None:
            out.append((f"{prefix}.{name}", v))
    return out


@dataclass
class SequencePrediction:
    """A model's outputs for one sample of V consecutive frames (MV-Online).

    Attributes:
        frames: V per-frame predictions.
        match_logits: V-1 cross-frame match logits ``(Q_t, Q_{t+1})`` (`TimeDividedTransformer`),
            or None.
        tdt_features: V updated query features ``(Q_t, d)`` from the transformer, or None.
    """

    frames: list[FramePrediction]
    match_logits: list[Tensor] | None = None
    tdt_features: list[Tensor] | None = None

    def __post_init__(self) -> None:
        v = len(self.frames)
        if v == 0:
            raise ValueError("frames: expected at least one FramePrediction, got none")
        if self.match_logits is not None:
            if len(self.match_logits) != v - 1:
                raise ValueError(f"match_logits: expected V-1={v - 1} matrices, got "
                                 f"{len(self.match_logits)}")
            for t, m in enumerate(self.match_logits):
                qa, qb = self.frames[t].final.num_queries, self.frames[t + 1].final.num_queries
                _check(m.shape == (qa, qb), f"match_logits[{t}]", f"shape (Q_t={qa}, Q_t+1={qb})", m)
                _check_float(m, f"match_logits[{t}]")
        if self.tdt_features is not None:
            if len(self.tdt_features) != v:
                raise ValueError(f"tdt_features: expected V={v} tensors, got {len(self.tdt_features)}")
            for t, f in enumerate(self.tdt_features):
                q = self.frames[t].final.num_queries
                _check(f.dim() == 2 and f.shape[0] == q, f"tdt_features[{t}]", f"shape (Q={q}, d)", f)
                _check_float(f, f"tdt_features[{t}]")
                d = self.tdt_features[0].shape[1]
                _check(f.shape[1] == d, f"tdt_features[{t}]",
                       f"shape (Q={q}, d={d}) (d as tdt_features[0])", f)

    @property
    def num_frames(self) -> int:
        return len(self.frames)


@dataclass
class SequenceTarget:
    """Ground truth of one sample of V frames; ``FrameTarget.global_ids`` ties instances across
    frames and ``FrameTarget.points`` places every frame in one world frame."""

    frames: list[FrameTarget]

    def __post_init__(self) -> None:
        if len(self.frames) == 0:
            raise ValueError("frames: expected at least one FrameTarget, got none")

    @property
    def num_frames(self) -> int:
        return len(self.frames)
