"""`ESAMCriterion`: the weighted total of every enabled term, built from one config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from esam.config import ESAMLossConfig, config_from_dict, load_config, preset
from esam.losses import fused
from esam.losses.clip import ClipConsCriterion
from esam.losses.cross_frame import CrossFrameCriterion
from esam.losses.instance import InstanceCriterion, InstanceWeights, MixedInstanceCriterion
from esam.losses.matcher import HungarianMatcher, SparseMatcher, build_costs
from esam.losses.merge import (MergeCECriterion, ScanNetMergeCriterion_Fast,
                               ScanNetMergeCriterion_Seal, align_global_ids, global_point_logits,
                               merge_ce_loss)
from esam.losses.semantic import ScanNetSemanticCriterion
from esam.structures import (FramePrediction, FrameTarget, LayerOutput, SequencePrediction,
                             SequenceTarget, boxes_from_instance_ids, check_finite,
                             prediction_tensors)

__all__ = ["ESAMCriterion", "build_matcher", "build_instance_criterion"]


def build_matcher(cfg: ESAMLossConfig) -> HungarianMatcher | SparseMatcher:
    m = cfg.matcher
    costs = build_costs(m.costs, class_form=m.class_cost, mask_form=m.mask_cost,
                        dice_form=m.dice_cost)
    return SparseMatcher(costs, topk=m.topk) if m.type == "sparse" else HungarianMatcher(costs)


def build_instance_criterion(cfg: ESAMLossConfig) -> InstanceCriterion:
    w = cfg.loss_weight
    kwargs = dict(
        matcher=build_matcher(cfg), num_classes=cfg.num_instance_classes,
        weights=InstanceWeights(cls=w.cls, bce=w.bce, dice=w.dice, score=w.score, bbox=w.bbox),
        no_object_weight=cfg.no_object_weight, dice_form=cfg.dice_form,
        normalization=cfg.normalization, score_iou_threshold=cfg.score_iou_threshold,
        iter_matcher=cfg.iter_matcher, aux_loss=cfg.aux_loss,
        fix_dice_loss_weight=cfg.fix_dice_loss_weight, fix_mean_loss=cfg.fix_mean_loss,
        final_dice_sum=cfg.final_dice_sum)
    if cfg.box_loss is not None and w.bbox > 0:
        return MixedInstanceCriterion(box_loss=cfg.box_loss, **kwargs)
    return InstanceCriterion(**kwargs)


class ESAMCriterion(nn.Module):
    """The total objective.

    ``total = L_sem + L_inst + [L_bbox] + [L_clip]`` for B single frames, and for B sequences of
    V frames ``sum_v (per-frame terms) + L_tdt + L_merge`` (ESAM sums the per-frame terms over
    frames; ``frame_reduction="mean"`` averages them). Every term is weighted by
    ``cfg.loss_weight``. A term is present when its weight is non-zero and its inputs are given
    (``L_clip`` needs ``fused_global``/``clip_global``, ``L_tdt`` needs the transformer's
    ``match_logits``/``tdt_features``, ``L_merge`` needs ``merge_features``); disabled terms are
    absent from the output, not zeros.

    The merge term follows ``cfg.merge.type``: ``"ce"`` (seed) runs `OnlineMerge` over the
    sequence without gradient, aligns GT instances to the merged global instances by box IoU and
    applies a per-point cross-entropy over {background, global instances}, averaged over the
    sequence's points (points whose aligned global instance got no query of their own frame are
    left out: no logit of that frame can learn them); ``"fast"`` /
    ``"seal"`` (ESAM) are the contrastive `ScanNetMergeCriterion_Fast` / ``_Seal`` over the
    queries each GT instance owns (``FrameTarget.query_masks``; the matched queries without it).

    Args:
        config: an `ESAMLossConfig`, a preset name (``"seed"``, ``"esam"``), a nested dict (see
            `config_from_dict`) or the path of a YAML file.
    """

    def __init__(self, config: ESAMLossConfig | dict | str | None = None):
        super().__init__()
        if config is None:
            config = ESAMLossConfig()
        elif isinstance(config, str):
            # A YAML path, else a preset name (a misspelt one gets the closest name suggested).
            is_path = Path(config).suffix in (".yaml", ".yml", ".json") or Path(config).is_file()
            config = load_config(config) if is_path else preset(config)
        elif isinstance(config, dict):
            config = config_from_dict(config)
        elif not isinstance(config, ESAMLossConfig):
            raise ValueError(f"config: expected ESAMLossConfig, dict, preset name or YAML path, "
                             f"got {type(config).__name__}")
        self.config = config
        w = config.loss_weight
        self.semantic = ScanNetSemanticCriterion(
            num_classes=config.num_semantic_classes, ignore_index=config.ignore_index,
            drop_last_column=config.semantic_drop_last_column) if w.sem > 0 else None
        self.instance = build_instance_criterion(config)
        self.clip = ClipConsCriterion(temperature=config.clip_temperature,
                                      symmetric=config.clip_symmetric) if w.clip > 0 else None
        cf = config.cross_frame
        self.cross_frame = CrossFrameCriterion(
            match_weight=w.match, cons_weight=w.cons, reduction=cf.reduction,
            pos_weight=cf.pos_weight, consistency=cf.consistency, gt_source=cf.gt_source,
            voxel_size=cf.voxel_size, iou_threshold=cf.iou_threshold,
        ) if (w.match > 0 or w.cons > 0) else None
        self.merge = None
        if w.merge > 0:
            self.merge = {"ce": MergeCECriterion, "fast": ScanNetMergeCriterion_Fast,
                          "seal": ScanNetMergeCriterion_Seal}[config.merge.type]()

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> ESAMCriterion:
        return cls(preset(name, **kwargs))

    def single_view(self, predictions: Sequence[FramePrediction], targets: Sequence[FrameTarget],
                    *, check: bool = True,
                    ) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
        """Per-frame terms of B samples: raw terms, weighted ``loss``, and the final assignment.

        ``check=False`` skips the NaN/Inf check (`multi_view` checks every frame at once).
        """
        if isinstance(predictions, FramePrediction) or isinstance(targets, FrameTarget):
            raise ValueError("predictions/targets: expected a sequence of B FramePrediction / "
                             "FrameTarget (one per sample), got a single object")
        if self.config.check_finite and check:
            return self._finite_checked(
                [t for b, p in enumerate(predictions)
                 for t in prediction_tensors(p, f"predictions[{b}]")],
                lambda: self.single_view(predictions, targets, check=False))
        w = self.config.loss_weight
        out: dict[str, Tensor] = {}
        inst, indices = self.instance.compute(predictions, targets)
        total = inst.pop("loss")
        out.update(inst)
        if self.semantic is not None:
            sem = self.semantic(predictions, targets)["loss_sem"]
            out["loss_sem"] = sem
            total = total + w.sem * sem
        if self.clip is not None and any(p.fused_global is not None for p in predictions):
            clip = self.clip(predictions)["loss_clip"]
            out["loss_clip"] = clip
            total = total + w.clip * clip
        out["loss"] = total
        return out, indices

    def forward(self, predictions: Sequence[FramePrediction] | Sequence[SequencePrediction],
                targets: Sequence[FrameTarget] | Sequence[SequenceTarget]) -> dict[str, Tensor]:
        """Loss dict: every enabled raw term (``loss_<term>``, auxiliary layers ``_<i>``) and
        ``loss``, the weighted total to back-propagate.

        Args:
            predictions: B `FramePrediction` (single view) or B `SequencePrediction` (MV-Online).
            targets: the matching B `FrameTarget` or `SequenceTarget`.
        """
        if isinstance(predictions, (FramePrediction, SequencePrediction)) or isinstance(
                targets, (FrameTarget, SequenceTarget)):
            raise ValueError("predictions/targets: expected a list of B predictions / targets "
                             "(one per sample), got a single object")
        if len(predictions) and isinstance(predictions[0], SequencePrediction):
            return self.multi_view(predictions, targets)
        return self.single_view(predictions, targets)[0]

    # -- multi-view ---------------------------------------------------------------------------

    def multi_view(self, predictions: Sequence[SequencePrediction],
                   targets: Sequence[SequenceTarget]) -> dict[str, Tensor]:
        """Per-frame terms over V frames plus the cross-frame and merge terms (see class doc)."""
        if len(predictions) != len(targets):
            raise ValueError(f"targets: expected {len(predictions)} sequences, got {len(targets)}")
        for b, (p, t) in enumerate(zip(predictions, targets)):
            if not isinstance(p, SequencePrediction) or not isinstance(t, SequenceTarget):
                raise ValueError(f"predictions[{b}] / targets[{b}]: expected SequencePrediction / "
                                 f"SequenceTarget, got {type(p).__name__} / {type(t).__name__}")
            if p.num_frames != t.num_frames:
                raise ValueError(f"targets[{b}]: expected {p.num_frames} frames (as the "
                                 f"prediction), got {t.num_frames}")
        v = {p.num_frames for p in predictions}
        if len(v) != 1:
            raise ValueError(f"predictions: every sequence of a batch must have the same number "
                             f"of frames V, got {sorted(v)}")
        v = v.pop()
        if self.config.check_finite:
            named = []
            for b, p in enumerate(predictions):
                for f, fp in enumerate(p.frames):
                    named += prediction_tensors(fp, f"predictions[{b}].frames[{f}]")
                named += [(f"predictions[{b}].match_logits[{t}]", m)
                          for t, m in enumerate(p.match_logits or [])]
                named += [(f"predictions[{b}].tdt_features[{t}]", m)
                          for t, m in enumerate(p.tdt_features or [])]
            return self._finite_checked(named, lambda: self._multi_view(predictions, targets, v))
        return self._multi_view(predictions, targets, v)

    def _multi_view(self, predictions: Sequence[SequencePrediction],
                    targets: Sequence[SequenceTarget], v: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        indices = []  # [frame][sample] final-layer assignment
        for f in range(v):
            terms, idx = self.single_view([p.frames[f] for p in predictions],
                                          [t.frames[f] for t in targets], check=False)
            indices.append(idx)
            for k, val in terms.items():
                out[k] = out[k] + val if k in out else val
        if self.config.frame_reduction == "mean":
            out = {k: val / v for k, val in out.items()}
        total = out.pop("loss")
        w = self.config.loss_weight
        if self.cross_frame is not None and all(p.match_logits is not None and
                                                p.tdt_features is not None for p in predictions):
            tdt = [self._cross_frame(p, t, [indices[f][b] for f in range(v)])
                   for b, (p, t) in enumerate(zip(predictions, targets))]
            for name, weight in (("loss_match", w.match), ("loss_cons", w.cons)):
                if weight > 0:
                    out[name] = torch.stack([d[name] for d in tdt]).mean()
                    total = total + weight * out[name]
        if self.merge is not None and all(f.merge_features is not None
                                          for p in predictions for f in p.frames):
            merge = self._merge(predictions, targets, indices)
            for name, val in merge.items():
                if name != "loss":
                    out[name] = val
            total = total + w.merge * merge["loss"]
        out["loss"] = total
        return out

    @staticmethod
    def _finite_checked(named: list[tuple[str, Tensor]], compute):
        """``compute()`` with the NaN/Inf check of the ``named`` prediction tensors.

        Large CPU mask logits are checked by the fused statistics pass that reads them anyway
        (`esam.losses.fused.watch_finite`) instead of by a separate read; whatever that pass did
        not vouch for is checked exactly afterwards, so the error, naming the tensor, is the
        same either way.
        """
        late = [(n, t) for n, t in named if n.endswith(".mask_logits") and fused.applies(t)]
        late_ids = {id(t) for _, t in late}
        check_finite([(n, t) for n, t in named if id(t) not in late_ids])
        if not late:
            return compute()
        with fused.watch_finite(t for _, t in late) as watch:
            try:
                out = compute()
            except Exception:
                check_finite(late)  # a NaN/Inf behind the failure is the error to report
                raise
        check_finite([(n, t) for n, t in late if watch.unverified(t)])
        return out

    @staticmethod
    def _point_mask_logits(layer: LayerOutput, target: FrameTarget) -> Tensor:
        """Final-layer mask logits at point level ``(Q, N)`` (superpoint masks are broadcast)."""
        if layer.mask_level == "point":
            return layer.mask_logits
        if target.superpoints is None:
            raise ValueError("superpoints: needed (N,) to read superpoint-level masks at point "
                             "level for the multi-view terms; got None")
        return layer.mask_logits[:, target.superpoints.long()]

    @staticmethod
    def _query_global_ids(layer: LayerOutput, target: FrameTarget,
                          idx: tuple[Tensor, Tensor]) -> Tensor:
        """``(Q,)`` global GT id each query is matched to, -1 for unmatched."""
        gids = _global_ids(target, "gt_source='instance'", "a frame")
        ids = torch.full((layer.num_queries,), -1, dtype=torch.long,
                         device=layer.cls_logits.device)
        ids[idx[0]] = gids[idx[1]]
        return ids

    def _cross_frame(self, pred: SequencePrediction, target: SequenceTarget,
                     indices: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        cf = self.cross_frame
        frames = list(zip(pred.frames, target.frames))
        if cf.gt_source == "mask":
            for f, (_, t) in enumerate(frames):
                if t.points is None:
                    raise ValueError(f"points: gt_source='mask' needs world-frame (N, 3) points on "
                                     f"every FrameTarget; frame {f} has None")
            g = cf.build_targets(
                mask_logits=[self._point_mask_logits(p.final, t).detach() for p, t in frames],
                points=[t.points for _, t in frames])
        else:
            g = cf.build_targets(instance_ids=[self._query_global_ids(p.final, t, i)
                                               for (p, t), i in zip(frames, indices)])
        return cf(pred.match_logits, pred.tdt_features, g)

    def _merge(self, predictions: Sequence[SequencePrediction], targets: Sequence[SequenceTarget],
               indices: list[list[tuple[Tensor, Tensor]]]) -> dict[str, Tensor]:
        if isinstance(self.merge, MergeCECriterion):
            return self._merge_ce(predictions, targets)
        feats, ins_masks = [], []
        for b, (p, t) in enumerate(zip(predictions, targets)):
            gids = [_global_ids(ft, "the merge loss", f"sample {b} frame {f}")
                    for f, ft in enumerate(t.frames)]
            order = torch.unique(torch.cat(gids)).tolist()  # the sample's K instances
            feats.append([fp.merge_features for fp in p.frames])
            per_frame = []
            for f, (fp, ft) in enumerate(zip(p.frames, t.frames)):
                local = {g: k for k, g in enumerate(gids[f].tolist())}
                if ft.query_masks is not None:
                    owned = [ft.query_masks[k].nonzero().flatten() for k in range(len(local))]
                else:
                    qi, ki = indices[f][b]
                    owned = [qi[ki == k] for k in range(len(local))]
                empty = torch.empty(0, dtype=torch.long, device=fp.merge_features.device)
                per_frame.append([owned[local[g]] if g in local else empty for g in order])
            ins_masks.append(per_frame)
        return self.merge(feats, ins_masks)

    @torch.no_grad()
    def _online_merge(self, pred: SequencePrediction, target: SequenceTarget):
        """Run `OnlineMerge` over a sequence: per-frame query -> global id, and global boxes."""
        from esam.merge.online_merge import FrameInstances, OnlineMerge

        merger = OnlineMerge()
        query_ids = []
        for f, (fp, ft) in enumerate(zip(pred.frames, target.frames)):
            if ft.points is None:
                raise ValueError(f"points: the 'ce' merge loss needs world-frame (N, 3) points on "
                                 f"every FrameTarget; frame {f} has None")
            layer = fp.final
            probs = layer.cls_logits.float().softmax(-1)
            scores, labels = probs[:, :-1].max(-1)
            masks = self._point_mask_logits(layer, ft) >= 0
            res = merger.merge(FrameInstances(masks=masks, scores=scores, labels=labels,
                                              features=fp.merge_features.float(),
                                              points=ft.points.float()))
            query_ids.append(res.instance_ids)
        boxes = merger.boxes if merger.boxes is not None else torch.zeros(0, 6)
        return query_ids, merger.num_global, boxes

    def _merge_ce(self, predictions: Sequence[SequencePrediction],
                  targets: Sequence[SequenceTarget]) -> dict[str, Tensor]:
        losses = []
        for b, (p, t) in enumerate(zip(predictions, targets)):
            gids = [_global_ids(ft, "the merge loss", f"sample {b} frame {f}")
                    for f, ft in enumerate(t.frames)]
            with torch.autocast(p.frames[0].final.cls_logits.device.type, enabled=False):
                query_ids, k, boxes = self._online_merge(p, t)
            # GT global instances of the whole sequence and their boxes over every frame
            order = torch.unique(torch.cat(gids))  # (G,)
            point_gt = []
            for ft, g in zip(t.frames, gids):
                local = ft.point_masks().ids if ft.instance_ids is not None else \
                    _ids_from_dense(ft.instance_masks)
                # local instance -> index in order; a -1 slot in front serves "no instance"
                mapped = torch.cat([local.new_full((1,), -1), torch.searchsorted(order, g)])
                point_gt.append(mapped[local + 1])
            points = torch.cat([ft.points.float() for ft in t.frames])
            gt_ids = torch.cat(point_gt)
            gt_boxes = boxes_from_instance_ids(points, gt_ids, len(order))
            target_ids = align_global_ids(boxes.to(points), gt_boxes, gt_ids,
                                          self.config.merge.align_iou_threshold)
            logits, keep = [], []
            start = 0
            for fp, ft, q in zip(p.frames, t.frames, query_ids):
                n = ft.num_points
                logits.append(global_point_logits(self._point_mask_logits(fp.final, ft).float(),
                                                  q, k))
                # A global instance none of this frame's queries went into has no logit to
                # train here; its points are left out rather than given a -inf-like target.
                present = torch.zeros(k + 1, dtype=torch.bool, device=q.device)
                present[q] = True
                present[0] = True
                keep.append(present[target_ids[start:start + n]])
                start += n
            keep_all = torch.cat(keep)
            losses.append(merge_ce_loss(torch.cat(logits)[keep_all], target_ids[keep_all]))
        ce = torch.stack(losses).mean()
        return {"loss_merge": ce, "loss": ce}


def _global_ids(target: FrameTarget, purpose: str, where: str) -> Tensor:
    """``(K,)`` int64 global ids of one frame: given, >= 0 and distinct (one id, one instance)."""
    g = target.global_ids
    if g is None:
        raise ValueError(f"global_ids: {purpose} needs (K,) global ids on every FrameTarget; "
                         f"{where} has None")
    g = g.long()
    if g.numel() and (int(g.min()) < 0 or int(torch.unique(g).numel()) != g.numel()):
        raise ValueError(f"global_ids: expected K distinct ids >= 0 in a frame, got "
                         f"{g.tolist()} ({where})")
    return g


def _ids_from_dense(masks: Tensor) -> Tensor:
    """``(K, N)`` bool -> ``(N,)`` index of the first instance covering each point, else -1."""
    if masks.shape[0] == 0:  # argmax over zero instances is an error
        return torch.full((masks.shape[1],), -1, dtype=torch.long, device=masks.device)
    covered = masks.any(0)
    return torch.where(covered, masks.float().argmax(0), torch.full_like(covered, -1,
                                                                          dtype=torch.long))
