"""One configuration for the whole objective: dataclasses, presets, dict/YAML loading.

Every weight (``loss_weight``) and matcher cost (``matcher.costs``) lives here. A preset is a
function returning a config: `seed_preset` (the formulas as the user's document writes them) and
`esam_preset` (the released ESAM code's behaviour, quirks included). Each field's comment says
which preset picks what.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

__all__ = [
    "LossWeights",
    "MatcherConfig",
    "CrossFrameConfig",
    "MergeConfig",
    "ESAMLossConfig",
    "seed_preset",
    "esam_preset",
    "preset",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


@dataclass
class LossWeights:
    """``loss_weight``: the weight of every term in the total (0 disables a term)."""

    sem: float = 0.5  # L_sem (ESAM 0.5)
    cls: float = 0.5  # w0, class CE (ESAM 0.5)
    bce: float = 1.0  # w1, mask BCE
    dice: float = 1.0  # w2, mask Dice
    score: float = 0.5  # w3, IoU-score regression (ESAM 0.5)
    bbox: float = 0.5  # w4, box regression (ESAM 0.5)
    match: float = 1.0  # lambda1, cross-frame match BCE
    cons: float = 1.0  # lambda2, cross-frame feature consistency
    merge: float = 1.0  # L_merge (the contrastive merge criteria weight their parts inside)
    clip: float = 1.0  # L_clip


@dataclass
class MatcherConfig:
    """``matcher``: assignment of queries to GT instances."""

    type: Literal["hungarian", "sparse"] = "hungarian"  # seed: hungarian; esam: sparse
    topk: int = 1  # sparse matcher: queries per GT instance (esam: 1)
    costs: dict[str, float] = field(
        default_factory=lambda: {"cls": 0.5, "bce": 1.0, "dice": 1.0})  # alpha, beta, gamma
    class_cost: Literal["one_minus", "negative"] = "one_minus"  # seed: 1 - p; esam: -p
    mask_cost: Literal["bce", "l1", "l1_as_printed"] = "bce"  # "l1": the seed's printed form
    dice_cost: Literal["seed", "esam"] = "seed"  # Dice formula inside the cost


@dataclass
class CrossFrameConfig:
    """Cross-frame (``TimeDividedTransformer``) loss options."""

    reduction: Literal["sum", "mean"] = "sum"  # seed: sum of matrix entries
    pos_weight: float | None = None  # weight of the sparse positives in the match BCE
    consistency: Literal["slot", "matched"] = "slot"  # seed: slot-aligned queries
    gt_source: Literal["mask", "instance"] = "mask"  # G from mask IoU, or from GT identity
    voxel_size: float = 0.05  # shared world grid for the mask IoU
    iou_threshold: float = 0.5


@dataclass
class MergeConfig:
    """Online-merge loss options."""

    type: Literal["ce", "fast", "seal"] = "ce"  # seed: per-point CE; esam: contrastive "fast"
    align_iou_threshold: float = 0.25  # "ce": box IoU needed to align a GT to a merged instance


@dataclass
class ESAMLossConfig:
    """Configuration of `ESAMCriterion`. Defaults are the library's recommendation (seed
    formulas, matched-count normalisation); `seed_preset` and `esam_preset` set the rest."""

    num_semantic_classes: int = 20  # C of the semantic head
    num_instance_classes: int = 1  # C of the instance head (1: class-agnostic)
    ignore_index: int | None = None  # unlabeled semantic value (default num_semantic_classes)
    loss_weight: LossWeights = field(default_factory=LossWeights)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    normalization: Literal["matched", "seed", "esam"] = "matched"  # see InstanceCriterion
    dice_form: Literal["seed", "esam"] = "seed"  # Dice formula of the loss
    no_object_weight: float = 1.0  # esam: 0.1
    score_iou_threshold: float | None = None  # esam: 0.5 (score loss only where IoU > 0.5)
    box_loss: Literal["l1", "iou", "giou"] | None = "l1"  # seed: l1; esam: iou; None: off
    iter_matcher: bool = True  # re-match every auxiliary layer
    aux_loss: bool = True  # deep supervision over auxiliary decoder layers
    fix_dice_loss_weight: bool = False  # esam: True (Dice / B * 4)
    fix_mean_loss: bool = False  # esam: True (divide by samples with matches)
    final_dice_sum: bool = False  # esam: True (final-layer Dice without 1/B)
    semantic_drop_last_column: bool = True  # accept (P, C+1) semantic logits, drop the last
    clip_temperature: float = 0.07
    clip_symmetric: bool = False
    frame_reduction: Literal["sum", "mean"] = "sum"  # per-frame terms over V frames (esam: sum)
    check_finite: bool = True  # reject NaN/Inf predictions, naming the tensor (one host sync)
    cross_frame: CrossFrameConfig = field(default_factory=CrossFrameConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)

    def __post_init__(self) -> None:
        validate_config(self)


def seed_preset(num_semantic_classes: int = 200, num_instance_classes: int = 1) -> ESAMLossConfig:
    """The formulas exactly as the seed document writes them, normalisations included."""
    return ESAMLossConfig(
        num_semantic_classes=num_semantic_classes, num_instance_classes=num_instance_classes,
        matcher=MatcherConfig(type="hungarian", class_cost="one_minus", mask_cost="bce",
                              dice_cost="seed"),
        normalization="seed", dice_form="seed", no_object_weight=1.0, score_iou_threshold=None,
        box_loss="l1", merge=MergeConfig(type="ce"), cross_frame=CrossFrameConfig(reduction="sum"))


def esam_preset(num_semantic_classes: int = 200, num_instance_classes: int = 1) -> ESAMLossConfig:
    """The released ESAM code's behaviour (ScanNet200 class-agnostic configs), quirks included."""
    return ESAMLossConfig(
        num_semantic_classes=num_semantic_classes, num_instance_classes=num_instance_classes,
        matcher=MatcherConfig(type="sparse", topk=1, class_cost="negative", mask_cost="bce",
                              dice_cost="esam"),
        normalization="esam", dice_form="esam", no_object_weight=0.1, score_iou_threshold=0.5,
        box_loss="iou", fix_dice_loss_weight=True, fix_mean_loss=True, final_dice_sum=True,
        frame_reduction="sum", merge=MergeConfig(type="fast"))


PRESETS = {"seed": seed_preset, "esam": esam_preset}


def preset(name: str, **kwargs: Any) -> ESAMLossConfig:
    """A preset by name (``"seed"`` or ``"esam"``)."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; expected one of {sorted(PRESETS)}"
                         + _suggest(name, PRESETS))
    return PRESETS[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# Validation and loading.


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_literal(path: str, value: Any, tp: Any) -> None:
    if get_origin(tp) is Literal and value not in get_args(tp):
        raise ValueError(f"{path}: expected one of {list(get_args(tp))}, got {value!r}"
                         + (_suggest(value, [str(a) for a in get_args(tp)])
                            if isinstance(value, str) else ""))


def _check_type(name: str, value: Any, tp: Any) -> None:
    """Check one value against its annotation (bool, int, float, str, dict, dataclass)."""
    if get_origin(tp) is Literal:
        _check_literal(name, value, tp)
        return
    kinds = {bool: "a bool", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping"}
    base = get_origin(tp) or tp
    ok = True
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    elif base in (str, dict):
        ok = isinstance(value, base)
    elif dataclasses.is_dataclass(base):
        ok = isinstance(value, base)
        kinds[base] = f"a {base.__name__} (or a mapping of its fields)"
    if not ok:
        raise ValueError(f"{name}: expected {kinds.get(base, base)}, got {value!r}")


def validate_config(cfg: Any, path: str = "") -> None:
    """Types, literal choices and numeric ranges; raises ValueError naming the field."""
    hints = get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        tp = hints[f.name]
        name = f"{path}{f.name}"
        if get_origin(tp) is Union or isinstance(tp, types.UnionType):
            args = get_args(tp)
            if value is None and type(None) in args:
                continue
            options = [a for a in args if a is not type(None)]
            errors = []
            for opt in options:
                try:
                    _check_type(name, value, opt)
                    break
                except ValueError as e:
                    errors.append(str(e))
            else:
                msg = errors[0]
                if type(None) in args:
                    msg = msg.replace(", got", " or None, got", 1)
                raise ValueError(msg)
        else:
            _check_type(name, value, tp)
        if f.name in ("temperature", "clip_temperature", "voxel_size", "pos_weight") and \
                value is not None and value <= 0:
            raise ValueError(f"{name}: expected > 0, got {value}")
        if f.name in ("iou_threshold", "align_iou_threshold", "score_iou_threshold") and \
                value is not None and not 0 <= value <= 1:
            raise ValueError(f"{name}: expected a value in [0, 1], got {value}")
    if isinstance(cfg, LossWeights):
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if v < 0:
                raise ValueError(f"{path}{f.name}: expected a weight >= 0, got {v!r}")
    if isinstance(cfg, MatcherConfig):
        for k, v in cfg.costs.items():
            if k not in ("cls", "bce", "dice"):
                raise ValueError(f"{path}costs.{k}: unknown cost; expected 'cls', 'bce' or 'dice'"
                                 + _suggest(k, ("cls", "bce", "dice")))
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{path}costs.{k}: expected a finite weight >= 0, got {v!r}")
        if cfg.topk < 1:
            raise ValueError(f"{path}topk: expected >= 1, got {cfg.topk}")
    if isinstance(cfg, ESAMLossConfig):
        if cfg.num_semantic_classes < 1:
            raise ValueError(f"num_semantic_classes: expected >= 1, got {cfg.num_semantic_classes}")
        if cfg.num_instance_classes < 1:
            raise ValueError(f"num_instance_classes: expected >= 1, got {cfg.num_instance_classes}")
        for sub in ("loss_weight", "matcher", "cross_frame", "merge"):
            validate_config(getattr(cfg, sub), f"{path}{sub}.")


def _build(cls: type, data: dict, path: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{path}{key}: unknown config key" + _suggest(key, names))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict | tp):
                raise ValueError(f"{path}{key}: expected a mapping of {tp.__name__} fields, got "
                                 f"{value!r}")
            if isinstance(value, dict):
                value = _build(tp, value, f"{path}{key}.")
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict, base: ESAMLossConfig | str | None = None) -> ESAMLossConfig:
    """Build a config from a nested dict, optionally on top of a preset.

    ``{"preset": "esam", "loss_weight": {"sem": 1.0}}`` starts from `esam_preset` and overrides
    one weight. Unknown keys raise a ValueError naming the key and the closest valid one.
    """
    data = dict(data)
    name = data.pop("preset", None)
    base = name if name is not None else base
    if base is None:
        return _build(ESAMLossConfig, data, "")
    if isinstance(base, str):
        kw = {k: data[k] for k in ("num_semantic_classes", "num_instance_classes") if k in data}
        base = preset(base, **kw)
    merged = _merge(config_to_dict(base), data, "")
    return _build(ESAMLossConfig, merged, "")


def _merge(base: dict, over: dict, path: str) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            raise ValueError(f"{path}{k}: unknown config key" + _suggest(k, base))
        if isinstance(v, dict) and isinstance(base[k], dict) and k != "costs":
            out[k] = _merge(base[k], v, f"{path}{k}.")
        else:
            out[k] = v
    return out


def config_to_dict(cfg: ESAMLossConfig) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> ESAMLossConfig:
    """Read a YAML (or JSON) file into a config (see `config_from_dict`)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    return config_from_dict(data or {})
