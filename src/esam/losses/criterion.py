"""`ESAMCriterion`: the weighted total of every enabled term, built from one config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from esam.config import ESAMLossConfig, config_from_dict, load_config, preset
from esam.losses.clip import ClipConsCriterion
from esam.losses.instance import InstanceCriterion, InstanceWeights, MixedInstanceCriterion
from esam.losses.matcher import HungarianMatcher, SparseMatcher, build_costs
from esam.losses.semantic import ScanNetSemanticCriterion
from esam.structures import FramePrediction, FrameTarget

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

    ``total = L_sem + L_inst + [L_bbox] + [L_clip]`` (single view; the multi-view terms are added
    by the sequence form of `forward`), every term weighted by ``cfg.loss_weight``. A term is
    present when its weight is non-zero and its inputs are given (``L_clip`` needs
    ``fused_global``/``clip_global``); disabled terms are absent from the output, not zeros.

    Args:
        config: an `ESAMLossConfig`, a preset name (``"seed"``, ``"esam"``), a nested dict (see
            `config_from_dict`) or the path of a YAML file.
    """

    def __init__(self, config: ESAMLossConfig | dict | str | None = None):
        super().__init__()
        if config is None:
            config = ESAMLossConfig()
        elif isinstance(config, str):
            config = preset(config) if config in ("seed", "esam") else load_config(config)
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

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> ESAMCriterion:
        return cls(preset(name, **kwargs))

    def single_view(self, predictions: Sequence[FramePrediction], targets: Sequence[FrameTarget],
                    ) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
        """Per-frame terms of B samples: raw terms, weighted ``loss``, and the final assignment."""
        if isinstance(predictions, FramePrediction) or isinstance(targets, FrameTarget):
            raise ValueError("predictions/targets: expected a sequence of B FramePrediction / "
                             "FrameTarget (one per sample), got a single object")
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

    def forward(self, predictions: Sequence[FramePrediction],
                targets: Sequence[FrameTarget]) -> dict[str, Tensor]:
        """Loss dict: every enabled raw term (``loss_<term>``, auxiliary layers ``_<i>``) and
        ``loss``, the weighted total to back-propagate."""
        return self.single_view(predictions, targets)[0]
