"""Hungarian-matched instance losses: class CE, mask BCE, mask Dice, score, box.

One code path serves every decoder layer: `InstanceCriterion` loops over layers, suffixes the
keys of auxiliary layers with ``_{i}`` (the final layer has none), and re-matches each layer
when ``iter_matcher`` is on. Terms are computed per matched pair for the whole batch and only
then reduced, so the three normalisations (``"matched"``, ``"seed"``, ``"esam"``) differ in one
small function, `_reduce_terms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esam.losses import functional as LF
from esam.losses._dist import global_mean_count
from esam.losses.matcher import HungarianMatcher, SparseMatcher
from esam.losses.rowwise import RowStats, row_instances, rowwise_mask_losses
from esam.structures import FramePrediction, FrameTarget, LayerOutput

__all__ = ["InstanceCriterion", "MixedInstanceCriterion", "InstanceWeights"]

Normalization = Literal["matched", "seed", "esam"]
BoxLoss = Literal["l1", "iou", "giou"]
MatchIndices = tuple[Tensor, Tensor]


@dataclass
class InstanceWeights:
    """Weights of the instance terms (w0..w4 of the spec). ESAM: 0.5, 1, 1, 0.5, 0.5."""

    cls: float = 1.0
    bce: float = 1.0
    dice: float = 1.0
    score: float = 1.0
    bbox: float = 1.0


@dataclass
class _LayerPairs:
    """Per-pair and per-query raw losses of one layer, for the whole batch."""

    sample: Tensor  # (M,) sample of each pair
    bce: Tensor  # (M,)
    dice: Tensor  # (M,)
    score: Tensor | None  # (M,) squared error, or None without a score head
    score_keep: Tensor | None  # (M,) bool, pairs that enter the score loss
    box: Tensor | None  # (M,)
    ce: Tensor  # (sum Q,) per-query CE
    ce_weight: Tensor  # (sum Q,) class weight of each query's target
    query_sample: Tensor  # (sum Q,) sample of each query
    num_samples: int


@dataclass
class _RowMatch:
    """A layer matched by `SparseMatcher.match_rows`: its `RowStats` and matched rows."""

    stats: RowStats
    rows: Tensor  # (M,) increasing rows of the concatenated batch


def _split_layers(p: _LayerPairs, n: int, b: int, queries: list[int]) -> list[_LayerPairs]:
    """Pairs of L*B (layer, sample) entries, layer-major, -> one `_LayerPairs` per layer."""
    layer = torch.div(p.sample, b, rounding_mode="floor")
    counts = torch.bincount(layer, minlength=n).tolist()  # pairs are sorted by entry

    def by_pair(t: Tensor | None) -> list[Tensor | None]:
        return [None] * n if t is None else list(t.split(counts))

    def by_query(t: Tensor) -> list[Tensor]:
        return list(t.split(queries))

    fields = zip(by_pair(p.sample - layer * b), by_pair(p.bce), by_pair(p.dice),
                 by_pair(p.score), by_pair(p.score_keep), by_pair(p.box), by_query(p.ce),
                 by_query(p.ce_weight), by_query(torch.remainder(p.query_sample, b)))
    return [_LayerPairs(sample=s, bce=bce, dice=dice, score=sc, score_keep=keep, box=box, ce=ce,
                        ce_weight=cw, query_sample=qs, num_samples=b)
            for s, bce, dice, sc, keep, box, ce, cw, qs in fields]


def _matcher_args(layers: Sequence[LayerOutput], targets: Sequence[FrameTarget]) -> tuple:
    """A matcher's arguments for one `LayerOutput` and `FrameTarget` per sample."""
    return ([l.cls_logits for l in layers], [l.mask_logits for l in layers],
            [t.labels for t in targets], [t.masks(l.mask_level) for l, t in zip(layers, targets)],
            [t.query_masks for t in targets])


def _candidates(targets: Sequence[FrameTarget], cache: dict) -> list[Tensor | None]:
    """Each sample's `row_instances`, computed once per batch (``cache``); None where a target
    has no query masks (the matcher reports it)."""
    if "candidates" not in cache:
        cache["candidates"] = [None if t.query_masks is None else row_instances(t.query_masks)
                               for t in targets]
    return cache["candidates"]


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _segment_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    return values.new_zeros(size).index_add_(0, index, values)


class InstanceCriterion(nn.Module):
    """Instance losses after matching, over every decoder layer.

    Args:
        matcher: a `HungarianMatcher` or `SparseMatcher`.
        num_classes: C instance classes (1 for class-agnostic); the no-object class is C.
        weights: term weights; a term whose weight is 0 is not computed.
        no_object_weight: class weight of no-object in the class CE, with PyTorch's weighted-mean
            semantics (ESAM 0.1; 1 gives the seed's plain mean).
        dice_form: ``"seed"`` ``1 - 2<q,g>/(<q,q>+<g,g>+1)`` or ``"esam"``
            ``1 - (2<q,g>+1)/(sum q + sum g + 1)``.
        normalization: ``"matched"`` (default) — mask, score and box terms summed over the batch's
            matched pairs and divided by their number (all-reduced under DDP, clamped at 1), class
            CE a weighted mean over all queries of the batch; ``"seed"`` — the seed's per-sample
            ``1/Q`` (class, BCE, Dice) and ``1/|M|`` (score, box), averaged over samples;
            ``"esam"`` — the released code: per-sample means summed and divided by B, shaped by
            ``fix_dice_loss_weight``, ``fix_mean_loss`` and ``final_dice_sum``.
        score_iou_threshold: pairs enter the score loss only when their mask IoU is above this
            (ESAM: 0.5; seed: None, every pair).
        box_loss: ``None`` (no box term), ``"l1"`` (seed), ``"iou"`` (1 - IoU, ESAM) or ``"giou"``.
        iter_matcher: re-match every auxiliary layer (ESAM: True); otherwise reuse the final
            layer's assignment.
        aux_loss: supervise auxiliary layers too (deep supervision).
        fix_dice_loss_weight: ``"esam"`` only — ESAM's ``Dice / B * 4`` ("fix for batch size != 4").
        fix_mean_loss: ``"esam"`` only — divide BCE and Dice by the number of samples with matches
            instead of B. The released code divides by samples with GT rows and returns NaN when one
            of them has no match; we skip such samples (same value whenever the released one is
            finite).
        final_dice_sum: ``"esam"`` only — the final layer's Dice is summed over samples without the
            1/B that auxiliary layers get (ESAM's quirk; on in the ``esam`` preset).
    """

    def __init__(self, *, matcher: HungarianMatcher | SparseMatcher, num_classes: int,
                 weights: InstanceWeights | dict | None = None, no_object_weight: float = 1.0,
                 dice_form: LF.DiceForm = "seed", normalization: Normalization = "matched",
                 score_iou_threshold: float | None = None, box_loss: BoxLoss | None = None,
                 iter_matcher: bool = True, aux_loss: bool = True,
                 fix_dice_loss_weight: bool = False, fix_mean_loss: bool = False,
                 final_dice_sum: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        if normalization not in ("matched", "seed", "esam"):
            raise ValueError(
                f"normalization: expected 'matched', 'seed' or 'esam', got {normalization!r}")
        if dice_form not in ("seed", "esam"):
            raise ValueError(f"dice_form: expected 'seed' or 'esam', got {dice_form!r}")
        if box_loss not in (None, "l1", "iou", "giou"):
            raise ValueError(f"box_loss: expected None, 'l1', 'iou' or 'giou', got {box_loss!r}")
        if isinstance(weights, dict):
            weights = InstanceWeights(**weights)
        self.matcher = matcher
        self.num_classes = num_classes
        self.weights = weights or InstanceWeights()
        self.dice_form = dice_form
        self.normalization = normalization
        self.score_iou_threshold = score_iou_threshold
        self.box_loss = box_loss
        self.iter_matcher = iter_matcher
        self.aux_loss = aux_loss
        self.fix_dice_loss_weight = fix_dice_loss_weight
        self.fix_mean_loss = fix_mean_loss
        self.final_dice_sum = final_dice_sum
        class_weight = torch.ones(num_classes + 1, dtype=torch.float64)  # exact 0.1 in fp64 runs
        class_weight[-1] = no_object_weight
        self.register_buffer("class_weight", class_weight)

    # -- matching -----------------------------------------------------------------------------

    def match(self, layers: Sequence[LayerOutput],
              targets: Sequence[FrameTarget]) -> list[MatchIndices]:
        """Assign one decoder layer's queries (one `LayerOutput` per sample) to GT instances."""
        return self._match(layers, targets)[0]

    def _match(self, layers: Sequence[LayerOutput], targets: Sequence[FrameTarget],
               cache: dict | None = None,
               ) -> tuple[list[MatchIndices], list[LF.MaskSums | None] | _RowMatch]:
        """The assignment and the matcher's mask sums, which the mask losses reuse: per sample
        `MaskSums`, or the batch's `RowStats` where the sparse matcher's batched path applies.
        ``cache`` keeps what the layers of one batch share (each query's candidate)."""
        args = _matcher_args(layers, targets)
        if isinstance(self.matcher, SparseMatcher):
            batched = self.matcher.match_rows(
                *args, candidates=_candidates(targets, {} if cache is None else cache))
            if batched is not None:
                indices, stats, rows = batched
                return indices, _RowMatch(stats, rows)
        return self.matcher(*args, return_sums=True)

    def _every_layer(self, layers_by_depth: list[list[LayerOutput]],
                     targets: Sequence[FrameTarget], shared: dict,
                     ) -> tuple[list[_LayerPairs], list[MatchIndices]] | None:
        """Every layer matched and turned into pairs at once, the (layer, sample) entries of
        the batch treated as L*B samples of one `SparseMatcher.match_rows` call (each is
        matched on its own; only the bookkeeping is shared). Returns the per-layer pairs and
        the final layer's assignment, or None where that path does not apply (the per-layer
        loop then runs, and reports any bad input by sample)."""
        if not isinstance(self.matcher, SparseMatcher):
            return None
        n, b = len(layers_by_depth), len(targets)
        flat = [l for layers in layers_by_depth for l in layers]  # layer-major
        flat_targets = list(targets) * n
        use_box = self.box_loss is not None and self.weights.bbox != 0
        for l, t in zip(flat, flat_targets):
            if (t.query_masks is None or t.query_masks.shape[1] != l.num_queries
                    or l.mask_logits.shape[1] != t.masks(l.mask_level).num_positions
                    or (use_box and (l.box_preds is None or t.boxes is None))):
                return None
        matched = self.matcher.match_rows(*_matcher_args(flat, flat_targets),
                                          candidates=_candidates(targets, shared) * n)
        if matched is None:
            return None
        indices, stats, rows = matched
        pairs = self._layer_pairs(flat, flat_targets, indices, _RowMatch(stats, rows))
        return _split_layers(pairs, n, b, [sum(l.num_queries for l in ls)
                                           for ls in layers_by_depth]), indices[-b:]

    # -- per layer ----------------------------------------------------------------------------

    def _layer_pairs(self, layers: Sequence[LayerOutput], targets: Sequence[FrameTarget],
                     indices: Sequence[MatchIndices],
                     sums: Sequence[LF.MaskSums | None] | _RowMatch | None = None) -> _LayerPairs:
        w = self.weights
        use_score = w.score != 0 and all(l.scores is not None for l in layers)
        use_box = self.box_loss is not None and w.bbox != 0
        device = layers[0].cls_logits.device
        num_q = [l.num_queries for l in layers]
        num_k = [len(t.labels) for t in targets]
        if isinstance(sums, _RowMatch):  # the whole batch's pairs at once
            st, rows = sums.stats, sums.rows
            bce, dice, iou = rowwise_mask_losses(st, rows, self.dice_form, use_score,
                                                 [l.mask_logits for l in layers])
            sample = st.sample.index_select(0, rows)
            query = rows  # rows of the concatenated batch
            gt = st.group.index_select(0, rows)
            query_sample = st.sample
        else:
            bce, dice, ious, sample, query, gt = [], [], [], [], [], []
            q_off = k_off = 0
            for b, (layer, tgt, (qi, ki)) in enumerate(zip(layers, targets, indices)):
                pair_bce, pair_dice, pair_iou = LF.matched_mask_losses(
                    layer.mask_logits, qi, ki, tgt.masks(layer.mask_level), self.dice_form,
                    use_score, sums=sums[b] if sums is not None else None)
                bce.append(pair_bce)
                dice.append(pair_dice)
                ious.append(pair_iou)
                sample.append(torch.full_like(qi, b))
                query.append(qi + q_off)
                gt.append(ki + k_off)
                q_off += num_q[b]
                k_off += num_k[b]
            bce, dice, sample, query, gt = (torch.cat(v) for v in (bce, dice, sample, query, gt))
            iou = torch.cat(ious) if use_score else None
            query_sample = torch.repeat_interleave(
                torch.arange(len(layers), device=device), torch.tensor(num_q, device=device),
                output_size=sum(num_q))
        # class, score and box terms once for the whole batch's pairs
        c = self.num_classes
        labels = _cat([t.labels.long() for t in targets])  # (sum K,)
        cat_logits = _cat([l.cls_logits for l in layers])  # (sum Q, C+1)
        cat_target = torch.full((len(cat_logits),), c, dtype=torch.long, device=device)
        cat_target.index_put_((query,), labels.index_select(0, gt))
        score_term = score_keep = box_term = None
        if use_score:
            scores = _cat([l.scores.reshape(-1) for l in layers])
            score_term = LF.score_loss(scores.index_select(0, query), iou, reduction="none")
            thr = self.score_iou_threshold
            score_keep = iou > thr if thr is not None else torch.ones_like(iou, dtype=torch.bool)
        if use_box:
            for b, (layer, tgt) in enumerate(zip(layers, targets)):
                if layer.box_preds is None:
                    raise ValueError(f"box_preds: box_loss={self.box_loss!r} needs (Q, 6) box "
                                     f"predictions on every layer, got None (sample {b})")
                if tgt.boxes is None:
                    raise ValueError(f"boxes: box_loss={self.box_loss!r} needs (K, 6) GT boxes, "
                                     f"got None (sample {b})")
            pred = _cat([l.box_preds for l in layers]).index_select(0, query)
            if all(l.query_centers is not None for l in layers):  # `LayerOutput.boxes`, batched
                centers = _cat([l.query_centers for l in layers]).index_select(0, query)
                pred = torch.cat([centers + pred[:, :3], pred[:, 3:]], 1)
            elif any(l.query_centers is not None for l in layers):
                pred = _cat([l.boxes() for l in layers]).index_select(0, query)
            gt_boxes = _cat([t.boxes for t in targets]).index_select(0, gt).to(pred.dtype)
            box_term = self._box_term(pred, gt_boxes)
        ce = F.cross_entropy(cat_logits, cat_target, reduction="none")
        cw = self.class_weight.to(ce.dtype)[cat_target]
        return _LayerPairs(
            sample=sample, bce=bce, dice=dice, score=score_term, score_keep=score_keep,
            box=box_term, ce=ce, ce_weight=cw, query_sample=query_sample,
            num_samples=len(layers))

    def _box_term(self, pred: Tensor, gt: Tensor) -> Tensor:
        if self.box_loss == "l1":
            return LF.box_l1_loss(pred, gt, reduction="none")
        if self.box_loss == "iou":
            return LF.box_iou_loss(pred, gt, reduction="none")
        return LF.box_giou_loss(pred, gt, reduction="none")

    def _reduce_terms(self, p: _LayerPairs, final: bool, anchor: Tensor) -> dict[str, Tensor]:
        """Per-pair losses -> one value per term, by the chosen normalisation."""
        w = self.weights
        b = p.num_samples
        zero = 0.0 * anchor
        m_b = torch.bincount(p.sample, minlength=b).to(p.bce.dtype)  # (B,) pairs per sample
        q_b = torch.bincount(p.query_sample, minlength=b).to(p.ce.dtype)  # (B,)
        has = m_b > 0
        out: dict[str, Tensor] = {}

        def per_sample(values: Tensor, index: Tensor) -> Tensor:
            return _segment_sum(values, index, b)

        if w.cls != 0:
            wce = per_sample(p.ce * p.ce_weight, p.query_sample)  # (B,)
            ws = per_sample(p.ce_weight, p.query_sample)
            if self.normalization == "matched":  # weighted mean over the global batch's queries
                out["cls"] = wce.sum() / global_mean_count(ws.sum().detach(), anchor.device,
                                                           minimum=1e-12)
            else:
                out["cls"] = (wce / ws.clamp(min=1e-12)).mean()

        mask_terms = [t for t in ("bce", "dice") if getattr(w, t) != 0]
        if self.normalization == "matched":
            n = global_mean_count(len(p.sample), anchor.device)
            for t in mask_terms:
                out[t] = getattr(p, t).sum() / n + zero
            if p.box is not None:
                out["bbox"] = p.box.sum() / n + zero
            if p.score is not None:
                kept = p.score_keep.to(p.score.dtype)
                out["score"] = (p.score * kept).sum() / global_mean_count(
                    kept.sum(), anchor.device) + zero
        elif self.normalization == "seed":
            for t in mask_terms:
                out[t] = (per_sample(getattr(p, t), p.sample) / q_b.clamp(min=1)).mean() + zero
            if p.box is not None:
                out["bbox"] = (per_sample(p.box, p.sample) / m_b.clamp(min=1)).mean() + zero
            if p.score is not None:
                kept = p.score_keep.to(p.score.dtype)
                k_b = per_sample(kept, p.sample)
                out["score"] = (per_sample(p.score * kept, p.sample) / k_b.clamp(min=1)).mean() + zero
        else:  # "esam": per-sample means, summed, divided by B (and its compatibility switches)
            n_has = has.sum().clamp(min=1).to(p.bce.dtype)
            for t in mask_terms:
                s = (per_sample(getattr(p, t), p.sample) / m_b.clamp(min=1)).sum()
                if not (t == "dice" and final and self.final_dice_sum):
                    s = s / b
                if t == "dice" and self.fix_dice_loss_weight:
                    s = s / b * 4
                if self.fix_mean_loss:
                    s = s * b / n_has
                out[t] = s + zero
            if p.box is not None:
                out["bbox"] = (per_sample(p.box, p.sample) / m_b.clamp(min=1)).sum() / b + zero
            if p.score is not None:
                kept = p.score_keep.to(p.score.dtype)
                k_b = per_sample(kept, p.sample)
                out["score"] = (per_sample(p.score * kept, p.sample)
                                / k_b.clamp(min=1)).sum() / b + zero
        return out

    def _validate(self, predictions: Sequence[FramePrediction],
                  targets: Sequence[FrameTarget]) -> None:
        c = self.num_classes
        for b, (p, t) in enumerate(zip(predictions, targets)):
            for i, layer in enumerate(p.layers):
                if layer.cls_logits.shape[1] != c + 1:
                    raise ValueError(
                        f"cls_logits: expected (Q, C+1={c + 1}) columns for num_classes={c}, got "
                        f"shape {tuple(layer.cls_logits.shape)} (sample {b}, layer {i})")
            if len(t.labels) and (int(t.labels.min()) < 0 or int(t.labels.max()) >= c):
                raise ValueError(f"labels: expected instance classes in [0, {c}), got range "
                                 f"[{int(t.labels.min())}, {int(t.labels.max())}] (sample {b})")

    # -- public ------------------------------------------------------------------------------

    def compute(self, predictions: Sequence[FramePrediction], targets: Sequence[FrameTarget],
                indices: Sequence[MatchIndices] | None = None,
                ) -> tuple[dict[str, Tensor], list[MatchIndices]]:
        """Losses and the final layer's assignment.

        Args:
            predictions: B frame predictions (one per sample).
            targets: B frame targets.
            indices: optional precomputed final-layer assignment.

        Returns:
            ``(terms, final_indices)``: ``terms`` holds raw (unweighted) terms ``loss_cls``,
            ``loss_bce``, ``loss_dice``, ``loss_score``, ``loss_bbox`` for the final layer,
            ``loss_<term>_<i>`` for auxiliary layer i, and ``loss``, the weighted sum over every
            term and layer.
        """
        if len(predictions) != len(targets):
            raise ValueError(f"targets: expected {len(predictions)} samples (as predictions), "
                             f"got {len(targets)}")
        if len(predictions) == 0:
            raise ValueError("predictions: expected at least one sample, got an empty list")
        n_layers = {len(p.layers) for p in predictions}
        if len(n_layers) != 1:
            raise ValueError(f"predictions: every sample must have the same number of decoder "
                             f"layers, got {sorted(n_layers)}")
        n_layers = n_layers.pop()
        self._validate(predictions, targets)
        w = self.weights
        weight_of = {"cls": w.cls, "bce": w.bce, "dice": w.dice, "score": w.score, "bbox": w.bbox}
        with torch.autocast(predictions[0].final.cls_logits.device.type, enabled=False):
            layers_by_depth = [[_fp32(p.layers[i]) for p in predictions] for i in range(n_layers)]
            final_layers = layers_by_depth[-1]
            final_sums = None
            shared: dict = {}  # what every layer's matching shares
            every_layer = None
            if indices is None and self.aux_loss and self.iter_matcher and n_layers > 1:
                every_layer = self._every_layer(layers_by_depth, targets, shared)
            if every_layer is not None:
                all_pairs, final_indices = every_layer
            elif indices is not None:
                final_indices = list(indices)
            else:
                final_indices, final_sums = self._match(final_layers, targets, shared)
            terms: dict[str, Tensor] = {}
            total = None
            depths = range(n_layers) if self.aux_loss else [n_layers - 1]
            for i in depths:
                final = i == n_layers - 1
                layers = layers_by_depth[i]
                if every_layer is not None:
                    pairs = all_pairs[i]
                else:
                    if final:
                        idx, sums = final_indices, final_sums
                    elif self.iter_matcher:
                        idx, sums = self._match(layers, targets, shared)
                    else:
                        idx, sums = final_indices, None
                    pairs = self._layer_pairs(layers, targets, idx, sums)
                # Keeps every term on the graph when nothing matched (then gradients are zeros,
                # not None); cheap, since the mask part is a one-column slice.
                anchor = sum(l.cls_logits.sum() for l in layers)
                if len(pairs.sample) == 0:
                    anchor = anchor + sum(l.mask_logits[:, :1].sum() for l in layers)
                values = self._reduce_terms(pairs, final, anchor)
                suffix = "" if final else f"_{i}"
                for name, v in values.items():
                    terms[f"loss_{name}{suffix}"] = v
                    total = weight_of[name] * v if total is None else total + weight_of[name] * v
        terms["loss"] = total if total is not None else 0.0 * anchor
        return terms, final_indices

    def forward(self, predictions: Sequence[FramePrediction],
                targets: Sequence[FrameTarget]) -> dict[str, Tensor]:
        """Raw terms per layer and ``loss``, their weighted sum (see `compute`)."""
        return self.compute(predictions, targets)[0]


class MixedInstanceCriterion(InstanceCriterion):
    """`InstanceCriterion` with the box term on (ESAM's point/superpoint "mixed" criterion).

    Layers may mix superpoint-level and point-level masks (ESAM's ``mask_pred_mode``, set per
    `LayerOutput.mask_level`). ``box_loss`` defaults to ``"iou"`` (ESAM); ``"l1"`` is the seed's.
    """

    def __init__(self, *, box_loss: BoxLoss = "iou", **kwargs):
        if box_loss is None:
            raise ValueError("box_loss: MixedInstanceCriterion needs 'l1', 'iou' or 'giou', got None")
        super().__init__(box_loss=box_loss, **kwargs)


def _fp32(layer: LayerOutput) -> LayerOutput:
    """The layer with half-precision tensors promoted to float32 (losses are computed in fp32)."""
    tensors = (layer.cls_logits, layer.mask_logits, layer.scores, layer.box_preds,
               layer.query_centers)
    if all(LF.upcast(t) is t for t in tensors):
        return layer
    return LayerOutput(*(LF.upcast(t) for t in tensors[:2]), layer.mask_level,
                       *(LF.upcast(t) for t in tensors[2:]))
