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
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

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
    """The model of a checkpoint (in eval mode) and the checkpoint dict."""
    ckpt = torch.load(Path(path), map_location=device, weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path}: not an esam checkpoint (expected keys 'model', 'model_config')")
    model = ESAMReferenceModel(ReferenceModelConfig.from_dict(ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
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


def _sample_batch(model: ESAMReferenceModel, data: _RunData, batch: list[int], window: int,
                  generator: torch.Generator
                  ) -> tuple[list[SequencePrediction], list[SequenceTarget]]:
    """A random V-frame window of every scene of the batch, run through the model."""
    preds, targets = [], []
    for i in batch:
        ps = data.train[i]
        v = min(window, ps.num_frames)
        first = data.starts[i][int(torch.randint(0, len(data.starts[i]), (), generator=generator))]
        frames = range(first, first + v)
        seeds = [model.sample_seeds(ps.inputs[t], generator=generator) for t in frames]
        preds.append(model([ps.inputs[t] for t in frames], seeds)[0])
        targets.append(SequenceTarget(
            [with_query_masks(ps.targets[t], s) for t, s in zip(frames, seeds)]))
    return preds, targets


def _train_epoch(model: ESAMReferenceModel, criterion: ESAMCriterion, optimizer, scheduler,
                 generator: torch.Generator, data: _RunData, cfg: RunConfig, epoch: int,
                 step: int) -> tuple[dict[str, float], int]:
    """One pass over the training scenes -> (mean of every loss term, steps taken)."""
    from tqdm.auto import tqdm

    model.train()
    order = torch.randperm(len(data.train), generator=generator).tolist()
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if cfg.max_steps is not None:
        batches = batches[:max(cfg.max_steps - step, 0)]
    sums: dict[str, float] = {}
    bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress,
               leave=False, dynamic_ncols=True, mininterval=0.5)
    for batch in bar:
        losses = sequence_losses(criterion, *_sample_batch(model, data, batch, cfg.data.window,
                                                            generator))
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix({_short(k): f"{v:.3f}" for k, v in values.items() if not k[-1].isdigit()},
                        refresh=False)
    bar.close()
    return {k: v / max(len(batches), 1) for k, v in sums.items()}, len(batches)


def train(run_config: RunConfig | dict) -> dict:
    """Train the reference model; returns the metrics written to ``<out>/metrics.json``.

    ``metrics.json`` and ``last.pt`` are rewritten (atomically) after every epoch, the plots at
    the end.

    Args:
        run_config: a `RunConfig` or a dict of its fields.

    Returns:
        ``{'config', 'loss_config', 'data', 'epochs': [per epoch: mean of every loss term, lr,
        seconds], 'eval': [held-out metrics per evaluation], 'final': the last held-out metrics,
        'timings': {...}, 'files': {...}}``.
    """
    cfg = run_config if isinstance(run_config, RunConfig) else RunConfig(**run_config)
    t_start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = _resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = _load_run_data(cfg, device)
    num_classes = len(data.class_names)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                             num_semantic_classes=num_classes))
    loss_cfg = build_loss_config(cfg, num_classes)
    t_data = time.perf_counter()

    model = ESAMReferenceModel(cfg.model).to(device)
    criterion = ESAMCriterion(loss_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * math.ceil(len(data.train) / cfg.batch_size)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    epoch, step, history, evals = 0, 0, [], []
    if cfg.resume:
        ckpt = torch.load(cfg.resume, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["generator"])
        epoch, step = ckpt["epoch"], ckpt["step"]
        history, evals = ckpt.get("history", []), ckpt.get("evals", [])

    def metrics(files: dict | None = None) -> dict:
        return {
            "config": cfg.to_dict(), "loss_config": config_to_dict(loss_cfg),
            "data": {"train_scenes": len(data.train), "val_scenes": len(data.val),
                     "thing_classes": data.thing_classes, "class_names": data.class_names,
                     "points_per_frame": float(np.mean([x.num_points for p in data.train
                                                        for x in p.inputs]))},
            "epochs": history, "eval": evals, "final": evals[-1] if evals else None,
            "timings": {"data_s": t_data - t_start,
                        "train_s": sum(h["seconds"] for h in history),
                        "eval_s": sum(e["seconds"] for e in evals),
                        "total_s": time.perf_counter() - t_start, "steps": step},
            "files": files or {},
        }

    while epoch < cfg.epochs and (cfg.max_steps is None or step < cfg.max_steps):
        epoch += 1
        t0 = time.perf_counter()
        means, taken = _train_epoch(model, criterion, optimizer, scheduler, generator, data, cfg,
                                    epoch, step)
        step += taken
        history.append({"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0],
                        "seconds": time.perf_counter() - t0, **means})
        last = epoch == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
        note = ""
        if data.val and (last or (cfg.eval_every and epoch % cfg.eval_every == 0)):
            t_eval = time.perf_counter()
            result = evaluate_model(model, data.val, inference=cfg.inference,
                                    thing_classes=data.thing_classes,
                                    min_region_size=cfg.eval_min_region_size)
            evals.append({**result, "epoch": epoch, "seconds": time.perf_counter() - t_eval})
            ap50 = result["multi_view"]["class_agnostic"]["ap50"]
            note = f", held-out multi-view AP50 {ap50:.3f}"
        _log.info("epoch %d/%d: loss %.4f (%.1f s)%s", epoch, cfg.epochs, history[-1]["loss"],
                  history[-1]["seconds"], note)
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
            "epoch": epoch, "step": step, "run_config": cfg.to_dict(),
            "model_config": cfg.model.to_dict(), "loss_config": config_to_dict(loss_cfg),
            "thing_classes": data.thing_classes, "class_names": data.class_names,
            "history": history, "evals": evals,
        }
        _atomic_write(out_dir / "last.pt", lambda p: torch.save(state, p))
        _save_json(out_dir / "metrics.json", metrics())

    files = {"checkpoint": str(out_dir / "last.pt"), "metrics": str(out_dir / "metrics.json")}
    if cfg.plots and history:
        from esam.visualize import plot_loss_curves

        files["loss_curves"] = [str(p) for p in plot_loss_curves(history, out_dir / "plots")]
        if data.val:
            files["instances"] = str(render_prediction(
                model, data.val[0], out_dir / "instances.png", inference=cfg.inference))
    result = metrics(files)
    _save_json(out_dir / "metrics.json", result)
    return json_ready(result)
