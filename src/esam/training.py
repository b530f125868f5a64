"""Training and evaluation of the reference model on synthetic streaming scenes.

`train(run_config)` runs the whole job: data (generated once, cached on disk), the model, the
full ESAM objective (every term on), AdamW with gradient clipping and a warm-up + cosine (or
poly) learning rate, a progress bar with per-term losses, atomic checkpoints, ``metrics.json``,
a loss-curve PNG per term and a PNG of predicted vs true instances on a held-out sequence.

`evaluate_model` gives ScanNet instance AP (AP over IoU 0.50:0.95, AP50, AP25; class-agnostic and
per class) on the merged online output and per frame, and semantic mIoU; `evaluate_baseline`
does the same for a non-learned baseline.

Shape vocabulary: B samples, V frames, N points, S superpoints, Q queries, K instances.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from esam.checkpoint import CheckpointError, restore_state, save_checkpoint
from esam.checkpoint import load_checkpoint as read_checkpoint
from esam.config import ESAMLossConfig, config_from_dict, config_to_dict
from esam.data import SceneSequence, SyntheticSceneConfig, train_val_split
from esam.evaluation import SemanticMeter, evaluate_instances
from esam.losses import ESAMCriterion
from esam.models.baselines import connected_components, superpoint_instances
from esam.models.reference import (
    ESAMReferenceModel,
    FrameInput,
    InferenceConfig,
    ReferenceModelConfig,
    frame_target,
    prepare_frame,
    with_query_masks,
)
from esam.structures import FrameTarget, SequencePrediction, SequenceTarget

__all__ = [
    "DataConfig",
    "RunConfig",
    "PreparedScene",
    "train",
    "load_run_config",
    "load_data",
    "prepare_scene",
    "build_loss_config",
    "sequence_losses",
    "evaluate_model",
    "evaluate_baseline",
    "load_checkpoint",
    "CheckpointError",
    "epoch_order",
    "render_prediction",
    "json_ready",
    "window_starts",
    "thing_classes_of",
]


_log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """Synthetic data of a run (scenes are generated once and cached in ``cache_dir``)."""

    train_scenes: int = 48  # training scenes
    val_scenes: int = 8  # held-out scenes (a disjoint seed stream)
    frames_per_scene: int = 8  # V frames rendered per scene
    window: int = 4  # V frames per training sample (a random window of a scene)
    height: int = 72  # rendered image rows
    width: int = 96  # rendered image columns
    max_points_per_frame: int | None = 4096  # random subsample of every frame
    seed: int = 0  # base seed of the scene streams
    cache_dir: str | None = ".cache/esam-synthetic"  # None: generate every time
    scene: dict = field(default_factory=dict)  # other SyntheticSceneConfig fields


@dataclass
class RunConfig:
    """Everything `train` needs. YAML files map onto it (see ``configs/``)."""

    out: str = "runs/default"  # run folder: checkpoints, metrics.json, plots
    preset: str = "esam"  # loss preset: "esam" (released code) or "seed" (the formulas)
    loss: dict = field(default_factory=lambda: {  # overrides on the preset (see esam.config)
        # L_match and L_cons averaged over query pairs instead of summed over the Q x Q matrix
        # (a sum of ~2,300 entries would swamp the per-frame terms), L_cons on the pairs of the
        # same object (queries seeded at different superpoints have no slot alignment), match
        # targets from the GT identity of the matched queries, L_cons down-weighted (a squared
        # distance of d-dimensional features).
        "cross_frame": {"reduction": "mean", "consistency": "matched", "gt_source": "instance"},
        "loss_weight": {"cons": 0.05},
    })
    model: ReferenceModelConfig = field(default_factory=ReferenceModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 20  # one window of every training scene per epoch
    batch_size: int = 1  # sequences per optimiser step
    lr: float = 2e-3
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    lr_schedule: str = "cosine"  # "cosine", "poly" (ESAM: power 0.9) or "constant"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.02  # final lr / lr (cosine)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    seed: int = 0
    num_threads: int | None = 1  # torch CPU threads (None: torch's default); the model's ops are
    #   too small to gain from intra-op threads, and one thread cannot oversubscribe the cores
    eval_every: int = 5  # epochs between held-out evaluations (0: only after the last)
    eval_min_region_size: int = 25  # GT instances / predictions with fewer points are set aside
    progress: bool = True  # tqdm progress bar
    plots: bool = True  # loss-curve PNGs and the held-out instance picture
    resume: str | None = None  # checkpoint to continue from
    max_steps: int | None = None  # stop after this many optimiser steps (tests, smoke runs)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ReferenceModelConfig.from_dict(self.model)
        if isinstance(self.inference, dict):
            self.inference = _dataclass_from_dict(InferenceConfig, self.inference, "inference")
        if isinstance(self.data, dict):
            self.data = _dataclass_from_dict(DataConfig, self.data, "data")
        if self.preset not in ("seed", "esam"):
            raise ValueError(f"preset: expected 'seed' or 'esam', got {self.preset!r}")
        if self.lr_schedule not in ("cosine", "poly", "constant"):
            raise ValueError(f"lr_schedule: expected 'cosine', 'poly' or 'constant', got "
                             f"{self.lr_schedule!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.data.window > self.data.frames_per_scene:
            raise ValueError(f"data.window: expected <= frames_per_scene="
                             f"{self.data.frames_per_scene}, got {self.data.window}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dataclass_from_dict(cls: type, data: dict, name: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}; expected some of {sorted(names)}")
    return cls(**data)


def load_run_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """A `RunConfig` from a YAML file (or the defaults), then ``overrides`` (None values skipped).

    Nested sections (``model``, ``data``, ``inference``, ``loss``) merge key by key.
    """
    data: dict = {}
    if path is not None:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got "
                             f"{type(data).__name__}")
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"run config: unknown keys {unknown}; expected some of {sorted(names)}")
    return RunConfig(**data)


def build_loss_config(cfg: RunConfig, num_semantic_classes: int) -> ESAMLossConfig:
    """The preset with the run's overrides and the model's class counts."""
    data = {"preset": cfg.preset, **cfg.loss, "num_semantic_classes": num_semantic_classes,
            "num_instance_classes": cfg.model.num_instance_classes}
    return config_from_dict(data)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

@dataclass
class PreparedScene:
    """A scene with its model inputs and targets (targets without query masks) per frame."""

    scene: SceneSequence
    inputs: list[FrameInput]
    targets: list[FrameTarget]

    @property
    def num_frames(self) -> int:
        return len(self.inputs)


def prepare_scene(scene: SceneSequence, model_cfg: ReferenceModelConfig,
                  thing_classes: Sequence[int] | None, device: torch.device | str = "cpu"
                  ) -> PreparedScene:
    """Inputs and targets of every frame (``thing_classes`` as in `frame_target`)."""
    things = None if model_cfg.num_instance_classes == 1 or thing_classes is None \
        else tuple(thing_classes)
    scene = scene.to(device)
    return PreparedScene(
        scene=scene, inputs=[prepare_frame(f, model_cfg) for f in scene.frames],
        targets=[frame_target(f, scene.instance_labels, thing_classes=things)
                 for f in scene.frames])


def window_starts(scene: PreparedScene, length: int) -> list[int]:
    """First frames of the ``length``-frame windows that show at least one instance."""
    v = min(length, scene.num_frames)
    has = torch.tensor([t.num_instances > 0 for t in scene.targets])
    return [s for s in range(scene.num_frames - v + 1) if bool(has[s:s + v].any())]


def load_data(cfg: DataConfig) -> tuple[list[SceneSequence], list[SceneSequence]]:
    """Training and held-out scenes (generated, or read from the cache)."""
    scene_cfg = SyntheticSceneConfig(**{
        "height": cfg.height, "width": cfg.width, "num_frames": cfg.frames_per_scene,
        "max_points_per_frame": cfg.max_points_per_frame, "render_image": True, **cfg.scene})
    train_ds, val_ds = train_val_split(cfg.train_scenes, cfg.val_scenes, seed=cfg.seed,
                                       config=scene_cfg, cache_dir=cfg.cache_dir)
    return [train_ds[i] for i in range(len(train_ds))], [val_ds[i] for i in range(len(val_ds))]


def thing_classes_of(scenes: Sequence[SceneSequence]) -> list[int]:
    """Semantic classes that have instances in any of the scenes, sorted."""
    labels = [s.instance_labels for s in scenes if s.instance_labels.numel()]
    return sorted(int(c) for c in torch.unique(torch.cat(labels)).tolist()) if labels else []


# ------------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------------

def sequence_losses(criterion: ESAMCriterion, predictions: Sequence[SequencePrediction],
                    targets: Sequence[SequenceTarget]) -> dict[str, Tensor]:
    """The full objective of B sequences: every raw term and ``loss``, the weighted total.

    The one place the criterion is called: its sequence form (per-frame terms over the V
    frames, the cross-frame terms ``loss_match`` / ``loss_cons`` and the merge terms).
    """
    return criterion(list(predictions), list(targets))


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

def _ap_summary(result: dict, with_classes: bool) -> dict:
    out = {key: result[key] for key in ("ap", "ap50", "ap25")}
    if with_classes:
        out["per_class"] = result["per_class"]
    return out


def _semantic_instance_labels(masks: Tensor, semantic: Tensor, thing_classes: Sequence[int],
                              num_classes: int) -> Tensor:
    """Class of every predicted mask ``(P, N)``: its most frequent predicted thing class."""
    onehot = torch.nn.functional.one_hot(semantic.long(), num_classes).float()  # (N, C)
    votes = masks.float() @ onehot  # (P, C)
    things = torch.tensor(list(thing_classes), dtype=torch.long, device=votes.device)
    if things.numel() == 0:
        return torch.zeros(masks.shape[0], dtype=torch.long, device=masks.device)
    return things[votes[:, things].argmax(1)] if masks.shape[0] else things[:0]


def _instance_results(preds: list[dict], gts: list[dict], thing_classes: Sequence[int],
                      class_names: Sequence[str], min_region_size: int,
                      per_class: bool) -> dict:
    agnostic = evaluate_instances(preds, gts, class_ids=thing_classes, class_agnostic=True,
                                  min_region_size=min_region_size)
    out = {"class_agnostic": _ap_summary(agnostic, False)}
    if per_class:
        classes = evaluate_instances(
            [{**p, "labels": p["class_labels"]} for p in preds], gts, class_ids=thing_classes,
            class_names=[class_names[c] for c in thing_classes], min_region_size=min_region_size)
        out["per_class"] = _ap_summary(classes, True)
    return out


@torch.no_grad()
def evaluate_model(model: ESAMReferenceModel, scenes: Sequence[PreparedScene], *,
                   inference: InferenceConfig | None = None, thing_classes: Sequence[int],
                   min_region_size: int = 25) -> dict:
    """Held-out metrics of the model.

    Returns:
        ``{'multi_view': {'class_agnostic': {'ap', 'ap50', 'ap25'}, 'per_class': {'ap', 'ap50',
        'ap25', 'per_class': {name: ...}}}, 'per_frame': {...same...}, 'semantic': {'miou',
        'acc', 'iou': {name: value}}, 'num_scenes', 'num_frames'}``. Multi-view: the merged
        online output over each scene's frames (points concatenated); per frame: every frame's
        own instances against its own GT.
    """
    was_training = model.training
    model.eval()
    c = model.config.num_semantic_classes
    meter = SemanticMeter(num_classes=c, ignore_index=c)
    mv_preds, mv_gts, pf_preds, pf_gts = [], [], [], []
    things = list(thing_classes)
    for ps in scenes:
        out = model.predict(ps.inputs, inference)
        frames = ps.scene.frames
        labels = ps.scene.instance_labels
        gt = {"instance_ids": torch.cat([f.instance for f in frames]),
              "semantic": torch.cat([f.semantic for f in frames]), "instance_labels": labels}
        mv_gts.append(gt)
        mv_preds.append({"masks": out.masks, "labels": out.labels, "scores": out.scores,
                         "class_labels": _class_labels(model, out.masks, out.labels, out.semantic,
                                                       things)})
        meter.update(out.semantic, gt["semantic"])
        for f, inst in zip(frames, out.frames):
            pf_gts.append({"instance_ids": f.instance, "semantic": f.semantic,
                           "instance_labels": labels})
            pf_preds.append({"masks": inst["masks"], "labels": inst["labels"],
                             "scores": inst["scores"],
                             "class_labels": _class_labels(model, inst["masks"], inst["labels"],
                                                           inst["semantic"], things)})
    model.train(was_training)
    names = list(scenes[0].scene.class_names) if scenes else []
    sem = meter.compute()
    return {
        "multi_view": _instance_results(mv_preds, mv_gts, things, names, min_region_size, True),
        "per_frame": _instance_results(pf_preds, pf_gts, things, names, min_region_size, True),
        "semantic": {"miou": sem["miou"], "acc": sem["acc"],
                     "iou": {n: float(v) for n, v in zip(names, sem["iou"].tolist())}},
        "num_scenes": len(scenes), "num_frames": sum(ps.num_frames for ps in scenes),
    }


def _class_labels(model: ESAMReferenceModel, masks: Tensor, labels: Tensor, semantic: Tensor,
                  things: list[int]) -> Tensor:
    if model.config.num_instance_classes == 1:
        return _semantic_instance_labels(masks, semantic, things, model.config.num_semantic_classes)
    table = torch.tensor(things, dtype=torch.long, device=labels.device)
    return table[labels.long()]


def evaluate_baseline(scenes: Sequence[SceneSequence], kind: str = "components", *,
                      thing_classes: Sequence[int], min_region_size: int = 25) -> dict:
    """Class-agnostic AP of a non-learned baseline, multi-view and per frame.

    Args:
        kind: ``"superpoints"`` (every superpoint an instance; across frames nothing merges) or
            ``"components"`` (geometric connected components after removing the room's planes;
            multi-view on the frames' points concatenated).
    """
    if kind not in ("superpoints", "components"):
        raise ValueError(f"kind: expected 'superpoints' or 'components', got {kind!r}")
    mv_preds, mv_gts, pf_preds, pf_gts = [], [], [], []
    for scene in scenes:
        frames = scene.frames
        labels = scene.instance_labels
        points = torch.cat([f.points for f in frames])
        if kind == "superpoints":
            offsets = torch.tensor([0] + [f.num_superpoints for f in frames[:-1]]).cumsum(0)
            sp = torch.cat([f.superpoints + o for f, o in zip(frames, offsets.tolist())])
            mv_preds.append(superpoint_instances(points, sp))
        else:
            mv_preds.append(connected_components(points))
        mv_gts.append({"instance_ids": torch.cat([f.instance for f in frames]),
                       "semantic": torch.cat([f.semantic for f in frames]),
                       "instance_labels": labels})
        for f in frames:
            pf_preds.append(superpoint_instances(f.points, f.superpoints) if kind == "superpoints"
                            else connected_components(f.points))
            pf_gts.append({"instance_ids": f.instance, "semantic": f.semantic,
                           "instance_labels": labels})
    things = list(thing_classes)
    names = list(scenes[0].class_names) if scenes else []
    return {
        "baseline": kind,
        "multi_view": _instance_results(mv_preds, mv_gts, things, names, min_region_size, False),
        "per_frame": _instance_results(pf_preds, pf_gts, things, names, min_region_size, False),
        "num_scenes": len(scenes), "num_frames": sum(s.num_frames for s in scenes),
    }


@torch.no_grad()
def render_prediction(model: ESAMReferenceModel, scene: PreparedScene, path: str | Path, *,
                      inference: InferenceConfig | None = None) -> Path:
    """PNG of a held-out sequence: true vs predicted (merged online) instances, top-down."""
    from esam.visualize import plot_instances

    was_training = model.training
    model.eval()
    out = model.predict(scene.inputs, inference)
    model.train(was_training)
    points = torch.cat([f.points for f in scene.scene.frames])
    truth = torch.cat([f.instance for f in scene.scene.frames])
    return plot_instances(points, {"true instances": truth,
                                   "predicted (online merge)": out.global_ids - 1}, path,
                          title=f"{scene.scene.scene_id}: {scene.num_frames} frames")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def _lr_lambda(cfg: RunConfig, total_steps: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min((step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1), 1.0)
        if cfg.lr_schedule == "cosine":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if cfg.lr_schedule == "poly":
            return max((1 - t) ** 0.9, cfg.min_lr_ratio)
        return 1.0
    return fn


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and `os.replace`, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def json_ready(x: Any) -> Any:
    """``x`` with tensors as lists, NaN as None and ``ap_table`` entries dropped (strict JSON)."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items() if k != "ap_table"}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, Tensor):
        return json_ready(x.tolist())
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _save_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(json_ready(data), indent=2)))


def _short(key: str) -> str:
    return key[5:] if key.startswith("loss_") else key


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu"
                    ) -> tuple[ESAMReferenceModel, dict]:
    """The model of a checkpoint (in eval mode) and the checkpoint dict.

    Raises:
        CheckpointError: (a ``ValueError``) naming the file: missing, truncated, corrupt, not an
            esam checkpoint, or weights that do not fit the model of its ``model_config``.
    """
    ckpt = read_checkpoint(path, map_location=device, required=("model", "model_config"))
    try:
        model_cfg = ReferenceModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model_config ({e})") from e
    model = ESAMReferenceModel(model_cfg).to(device)
    restore_state(ckpt, {"model": model}, path)
    model.eval()
    return model, ckpt


def _resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


@dataclass
class _RunData:
    """Prepared scenes of a run."""

    train: list[PreparedScene]
    starts: list[list[int]]  # per training scene, the window starts with an instance
    val: list[PreparedScene]
    thing_classes: list[int]
    class_names: list[str]


def _load_run_data(cfg: RunConfig, device: torch.device) -> _RunData:
    train_scenes, val_scenes = load_data(cfg.data)
    if not train_scenes:
        raise ValueError("data.train_scenes: expected >= 1 training scene, got 0")
    things = thing_classes_of(train_scenes)
    if cfg.model.num_instance_classes not in (1, len(things)):
        raise ValueError(f"model.num_instance_classes: expected 1 (class-agnostic) or the "
                         f"{len(things)} thing classes of the data, got "
                         f"{cfg.model.num_instance_classes}")
    train_data = [prepare_scene(s, cfg.model, things, device) for s in train_scenes]
    # Windows that show no instance at all are skipped (no instance term to learn from).
    starts = [window_starts(p, cfg.data.window) for p in train_data]
    if not any(starts):
        raise ValueError("data: no training window shows an instance; generate more scenes")
    return _RunData(train=[p for p, st in zip(train_data, starts) if st],
                    starts=[st for st in starts if st],
                    val=[prepare_scene(s, cfg.model, things, device) for s in val_scenes],
                    thing_classes=things, class_names=list(train_scenes[0].class_names))


def _stream_seed(*key: int) -> int:
    """A 63-bit seed that is a fixed function of ``key`` (not of the process or its history)."""
    digest = hashlib.sha256(repr(tuple(int(k) for k in key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def epoch_order(num_scenes: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> list[tuple[int, int]]:
    """The training samples one process visits in ``epoch``: ``(position, scene index)`` pairs.

    Every process draws the same permutation of the scenes (a function of ``seed`` and
    ``epoch``, like `DistributedSampler.set_epoch`), wraps it around to a multiple of
    ``world_size`` and takes every ``world_size``-th entry from ``rank``. ``position`` is the
    index in that padded permutation: consecutive local batches of b samples of the ranks form
    the global batch of ``b * world_size`` consecutive positions, and a sample's random draws
    are a function of (seed, epoch, position), so they do not depend on the world size.
    """
    if num_scenes < 1:
        raise ValueError(f"num_scenes: expected >= 1, got {num_scenes}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected in [0, world_size={world_size}), got {rank}")
    g = torch.Generator().manual_seed(_stream_seed(seed, epoch))
    order = torch.randperm(num_scenes, generator=g).tolist()
    total = -(-num_scenes // world_size) * world_size
    padded = (order * -(-total // num_scenes))[:total]
    return [(p, padded[p]) for p in range(rank, total, world_size)]


class _BatchLoss(torch.nn.Module):
    """B sequences through the model and the objective in one call -> (total, detached terms).

    The unit `DistributedDataParallel` wraps: its output is the total loss alone, so the
    parameters that do not reach it (the merge head under the "seed" preset's CE merge loss)
    are found unused instead of awaited.
    """

    def __init__(self, model: ESAMReferenceModel, criterion: ESAMCriterion):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, frames: list[list[FrameInput]], seeds: list[list[Tensor]],
                targets: list[SequenceTarget]) -> tuple[Tensor, dict[str, Tensor]]:
        preds = [self.model(f, s)[0] for f, s in zip(frames, seeds)]
        losses = sequence_losses(self.criterion, preds, targets)
        return losses["loss"], {k: v.detach() for k, v in losses.items()}


def _sample_batch(model: ESAMReferenceModel, data: _RunData, batch: list[tuple[int, int]],
                  window: int, seed: int, epoch: int
                  ) -> tuple[list[list[FrameInput]], list[list[Tensor]], list[SequenceTarget]]:
    """A random V-frame window of every ``(position, scene)`` of the batch: its frames, query
    seeds and targets.

    The window and the query seeds of a sample come from a generator seeded by (seed, epoch,
    position): the same on resume and whichever process draws it.
    """
    frames, seeds, targets = [], [], []
    for position, i in batch:
        g = torch.Generator().manual_seed(_stream_seed(seed, epoch, position))
        ps = data.train[i]
        v = min(window, ps.num_frames)
        first = data.starts[i][int(torch.randint(0, len(data.starts[i]), (), generator=g))]
        idx = range(first, first + v)
        frames.append([ps.inputs[t] for t in idx])
        seeds.append([model.sample_seeds(ps.inputs[t], generator=g) for t in idx])
        targets.append(SequenceTarget(
            [with_query_masks(ps.targets[t], s) for t, s in zip(idx, seeds[-1])]))
    return frames, seeds, targets


@dataclass
class _EpochState:
    """Where a run stands inside an epoch (saved in checkpoints, to resume mid-epoch)."""

    batches_done: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # per loss term, over the done batches
    seconds: float = 0.0


@dataclass
class _Ranks:
    """This process in the process group (world size 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _mean_over_ranks(values: dict[str, float], flag: bool, ranks: _Ranks,
                     device: torch.device) -> tuple[dict[str, float], bool]:
    """Loss values averaged over the processes, and whether any process raised ``flag``."""
    if ranks.world_size == 1:
        return values, flag
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [float(flag)], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t)
    return ({k: float(v) / ranks.world_size for k, v in zip(keys, t[:-1].tolist())},
            bool(t[-1] > 0))


def _train_epoch(forward: torch.nn.Module, model: ESAMReferenceModel, optimizer, scheduler,
                 data: _RunData, cfg: RunConfig, epoch: int, step: int,
                 part: _EpochState, ranks: _Ranks, device: torch.device,
                 stop_requested: Callable[[], bool], step_losses: list[float],
                 on_step: Callable[[int, dict[str, float]], bool | None] | None
                 ) -> tuple[int, bool, bool]:
    """The rest of one pass over the training scenes, from batch ``part.batches_done``.

    Updates ``part`` and ``step_losses`` in place. Returns (step, whether the epoch finished,
    whether a stop was requested): it stops after a whole step when ``stop_requested()`` on
    any process or ``on_step`` says so. All processes take the same steps.
    """
    from tqdm.auto import tqdm

    forward.train()
    items = epoch_order(len(data.train), cfg.seed, epoch, ranks.rank, ranks.world_size)
    batches = [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    if cfg.max_steps is not None:
        batches = batches[:max(cfg.max_steps - (step - part.batches_done), 0)]
    bar = tqdm(total=len(batches), initial=part.batches_done, desc=f"epoch {epoch}/{cfg.epochs}",
               disable=not cfg.progress or not ranks.main, leave=False, dynamic_ncols=True,
               mininterval=0.5)
    try:
        for batch in batches[part.batches_done:]:
            # Draws inside the objective (merge negatives) use the global generator.
            torch.manual_seed(_stream_seed(cfg.seed, step, ranks.rank))
            loss, losses = forward(*_sample_batch(model, data, batch, cfg.data.window, cfg.seed,
                                                  epoch))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: "
                                         f"{ {k: float(v) for k, v in losses.items()} }")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            values, stop = _mean_over_ranks({k: float(v) for k, v in losses.items()},
                                            stop_requested(), ranks, device)
            for k, v in values.items():
                part.sums[k] = part.sums.get(k, 0.0) + v
            part.batches_done += 1
            step_losses.append(values["loss"])
            bar.update(1)
            bar.set_postfix({_short(k): f"{v:.3f}" for k, v in values.items()
                             if not k[-1].isdigit()}, refresh=False)
            if on_step is not None and on_step(step, values):
                stop = True
            if stop:
                return step, part.batches_done == len(batches), True
    finally:
        bar.close()
    return step, True, False


def _distributed_env() -> _Ranks:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by ``torchrun`` (world size 1 when unset)."""
    try:
        return _Ranks(rank=int(os.environ.get("RANK", 0)),
                      world_size=int(os.environ.get("WORLD_SIZE", 1)),
                      local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE, LOCAL_RANK: expected integers ({e})") from e


class _StopSignals:
    """While active, SIGINT and SIGTERM only record themselves (the loop stops after the step).

    A second SIGINT raises `KeyboardInterrupt` at once. The previous handlers come back on exit.
    Outside the main thread (where handlers cannot be installed) it does nothing.
    """

    def __init__(self) -> None:
        self.caught: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.caught == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.caught = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return None if self.caught is None else signal.Signals(self.caught).name


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
              "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def train(run_config: RunConfig | dict, *,
          on_step: Callable[[int, dict[str, float]], bool | None] | None = None) -> dict:
    """Train the reference model; returns the metrics written to ``<out>/metrics.json``.

    ``metrics.json`` and ``last.pt`` are rewritten (atomically, see `esam.checkpoint`) after
    every epoch, the plots at the end. SIGINT or SIGTERM during training lets the current step
    finish, writes ``last.pt`` (with the position inside the epoch and the RNG states) and
    ``metrics.json``, and returns with ``'interrupted'`` set; ``resume`` then continues with the
    same data order and random draws, so the losses equal those of an uninterrupted run.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this: the process group is set
    up (gloo on CPU, nccl on CUDA, each process on ``cuda:LOCAL_RANK``), the model is wrapped
    in `DistributedDataParallel`, every epoch's samples are split across the processes
    (`epoch_order`; ``batch_size`` is per process), and only rank 0 writes files, evaluates
    and shows the progress bar.

    Args:
        run_config: a `RunConfig` or a dict of its fields.
        on_step: called after every optimiser step with (step, loss terms averaged over the
            processes); a true result stops the run as a signal does.

    Returns:
        ``{'config', 'loss_config', 'data', 'epochs': [per epoch: mean of every loss term, lr,
        seconds], 'step_losses': [total loss of every step], 'eval': [held-out metrics per
        evaluation], 'final': the last held-out metrics, 'timings': {...}, 'files': {...},
        'world_size', 'interrupted': None, 'SIGINT', 'SIGTERM' or 'requested'}``.
    """
    cfg = run_config if isinstance(run_config, RunConfig) else RunConfig(**run_config)
    ranks = _distributed_env()
    device = _resolve_device(cfg.device)
    if device.type == "cuda" and ranks.world_size > 1:
        if device.index is None:
            device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    own_group = ranks.world_size > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=ranks.rank, world_size=ranks.world_size)
    try:
        return _train(cfg, ranks, device, on_step)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(cfg: RunConfig, ranks: _Ranks, device: torch.device,
           on_step: Callable[[int, dict[str, float]], bool | None] | None) -> dict:
    t_start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    _seed_everything(cfg.seed)
    out_dir = Path(cfg.out)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # Rank 0 fills the data cache first; the others then read it.
    if ranks.world_size > 1 and not ranks.main:
        dist.barrier()
    data = _load_run_data(cfg, device)
    if ranks.world_size > 1 and ranks.main:
        dist.barrier()
    num_classes = len(data.class_names)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                             num_semantic_classes=num_classes))
    loss_cfg = build_loss_config(cfg, num_classes)
    t_data = time.perf_counter()

    model = ESAMReferenceModel(cfg.model).to(device)
    criterion = ESAMCriterion(loss_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / ranks.world_size) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    epoch, step, history, evals, step_losses = 0, 0, [], [], []
    part: _EpochState | None = None  # the epoch in progress
    if cfg.resume:
        ckpt = read_checkpoint(cfg.resume, map_location=device,
                               required=("model", "optimizer", "scheduler", "epoch", "step"))
        restore_state(ckpt, {"model": model, "optimizer": optimizer, "scheduler": scheduler},
                      cfg.resume)
        epoch, step = ckpt["epoch"], ckpt["step"]
        history, evals = ckpt.get("history", []), ckpt.get("evals", [])
        step_losses = list(ckpt.get("step_losses", []))
        if ckpt.get("partial_epoch") is not None:
            part = _EpochState(**ckpt["partial_epoch"])
        if "rng" in ckpt:
            _set_rng_states(ckpt["rng"])
    forward: torch.nn.Module = _BatchLoss(model, criterion)
    if ranks.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    interrupted: str | None = None

    def metrics(files: dict | None = None) -> dict:
        return {
            "config": cfg.to_dict(), "loss_config": config_to_dict(loss_cfg),
            "data": {"train_scenes": len(data.train), "val_scenes": len(data.val),
                     "thing_classes": data.thing_classes, "class_names": data.class_names,
                     "points_per_frame": float(np.mean([x.num_points for p in data.train
                                                        for x in p.inputs]))},
            "epochs": history, "step_losses": step_losses, "eval": evals,
            "final": evals[-1] if evals else None,
            "timings": {"data_s": t_data - t_start,
                        "train_s": sum(h["seconds"] for h in history),
                        "eval_s": sum(e["seconds"] for e in evals),
                        "total_s": time.perf_counter() - t_start, "steps": step},
            "world_size": ranks.world_size, "interrupted": interrupted,
            "files": files or {},
        }

    def checkpoint_state(partial: _EpochState | None) -> dict:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
            "partial_epoch": None if partial is None else dataclasses.asdict(partial),
            "rng": _rng_states(), "world_size": ranks.world_size,
            "run_config": cfg.to_dict(), "model_config": cfg.model.to_dict(),
            "loss_config": config_to_dict(loss_cfg), "thing_classes": data.thing_classes,
            "class_names": data.class_names, "history": history, "evals": evals,
            "step_losses": step_losses,
        }

    with _StopSignals() as signals:
        while part is not None or (epoch < cfg.epochs
                                   and (cfg.max_steps is None or step < cfg.max_steps)):
            if part is None:
                epoch += 1
                part = _EpochState()
            t0 = time.perf_counter() - part.seconds
            step, finished, stopped = _train_epoch(
                forward, model, optimizer, scheduler, data, cfg, epoch, step, part,
                ranks, device, lambda: signals.caught is not None, step_losses, on_step)
            part.seconds = time.perf_counter() - t0
            if stopped:
                interrupted = signals.name or "requested"
            if not finished:
                if ranks.main:
                    save_checkpoint(out_dir / "last.pt", checkpoint_state(part))
                    _save_json(out_dir / "metrics.json", metrics())
                _log.info("stopped (%s) at step %d, epoch %d; resume from %s", interrupted,
                          step, epoch, out_dir / "last.pt")
                break
            history.append({"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0],
                            "seconds": part.seconds,
                            **{k: v / max(part.batches_done, 1) for k, v in part.sums.items()}})
            part = None
            last = epoch == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
            note = ""
            if ranks.main and data.val and (last or (cfg.eval_every
                                                     and epoch % cfg.eval_every == 0)):
                t_eval = time.perf_counter()
                result = evaluate_model(model, data.val, inference=cfg.inference,
                                        thing_classes=data.thing_classes,
                                        min_region_size=cfg.eval_min_region_size)
                evals.append({**result, "epoch": epoch, "seconds": time.perf_counter() - t_eval})
                ap50 = result["multi_view"]["class_agnostic"]["ap50"]
                note = f", held-out multi-view AP50 {ap50:.3f}"
            if ranks.main:
                _log.info("epoch %d/%d: loss %.4f (%.1f s)%s", epoch, cfg.epochs,
                          history[-1]["loss"], history[-1]["seconds"], note)
                save_checkpoint(out_dir / "last.pt", checkpoint_state(None))
                _save_json(out_dir / "metrics.json", metrics())
            if stopped:
                break

    files = {"checkpoint": str(out_dir / "last.pt"), "metrics": str(out_dir / "metrics.json")}
    if ranks.main and interrupted is None:
        if cfg.plots and history:
            from esam.visualize import plot_loss_curves

            files["loss_curves"] = [str(p) for p in plot_loss_curves(history, out_dir / "plots")]
            if data.val:
                files["instances"] = str(render_prediction(
                    model, data.val[0], out_dir / "instances.png", inference=cfg.inference))
        _save_json(out_dir / "metrics.json", metrics(files))
    return json_ready(metrics(files))
