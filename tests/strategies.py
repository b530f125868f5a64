"""Hypothesis strategies for hostile inputs to the objective.

A strategy draws a small *spec* (sizes, levels, value regime, a seed); `build_batch` /
`build_sequences` turn a spec into real `FramePrediction` / `FrameTarget` (or sequence) objects
with a seeded generator. Drawing sizes through hypothesis and values through torch keeps each
example cheap while hypothesis still explores (and shrinks) the shapes that matter: no queries,
no GT, more GT than queries, empty frames, instances with no points, saturated logits.

Value regimes of every prediction tensor (``Spec.mode``):

* ``"normal"``: ``randn * scale`` with ``scale`` in {1, 30, 1e4};
* ``"saturated"``: exactly ``+-1e4`` everywhere;
* ``"mixed"``: ``randn * scale`` with about a third of the entries set to exactly ``+-1e4``;
* ``"zero"``: all zeros (every cost ties).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor

from esam.structures import (FramePrediction, FrameTarget, LayerOutput, SequencePrediction,
                             SequenceTarget)

__all__ = ["HOSTILE", "MODES", "SCALES", "FrameSpec", "BatchSpec", "SeqSpec", "options",
           "frame_specs", "batch_specs", "seq_specs", "build_batch", "build_sequences", "values",
           "config_for", "batch_config", "permute_frame", "prediction_leaves"]

# Reproducible in CI: derandomized, no example database, no wall-clock deadline.
HOSTILE = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BIG = 1e4
MODES = ("normal", "saturated", "mixed", "zero")
SCALES = (1.0, 30.0, BIG)
CONFIGS = ("seed", "esam", "default")


def values(g: torch.Generator, shape: tuple[int, ...], mode: str, scale: float,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """A prediction tensor in one of the value regimes (see module doc)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if mode == "normal":
        out = x * scale
    elif mode == "saturated":
        out = torch.where(x >= 0, BIG, -BIG)
    elif mode == "mixed":
        extreme = torch.rand(shape, generator=g, dtype=torch.float64) < 1 / 3
        out = torch.where(extreme, torch.where(x >= 0, BIG, -BIG), x * scale)
    elif mode == "zero":
        out = torch.zeros(shape, dtype=torch.float64)
    else:
        raise ValueError(f"mode: unknown {mode!r}")
    return out.to(dtype)


@dataclass(frozen=True)
class FrameSpec:
    """One frame of one sample: sizes and the value regime of its predictions."""

    q: int  # queries
    k: int  # GT instances
    n: int  # points
    s: int  # superpoints
    seed: int
    mode: str = "normal"
    scale: float = 1.0
    sem_level: str = "point"
    sem_extra_column: bool = False
    scores_2d: bool = False
    clip_rows: int | None = None  # rows of fused_global / clip_global, None: no CLIP inputs
    empty_instances: bool = False  # some GT instances own no point at all


@dataclass(frozen=True)
class BatchSpec:
    """B single-view samples sharing the class counts and decoder depth."""

    frames: tuple[FrameSpec, ...]
    levels: tuple[str, ...]  # mask level of each decoder layer
    c_sem: int
    c_inst: int
    config: str = "seed"
    dtype: torch.dtype = torch.float32
    options: tuple = ()  # config overrides, ((key, value), ...) with nested dicts as values


@dataclass(frozen=True)
class SeqSpec:
    """B sequences of V frames; ``present[b][v]`` lists the global ids visible in that frame."""

    frames: tuple[tuple[FrameSpec, ...], ...]  # [b][v]
    present: tuple[tuple[tuple[int, ...], ...], ...]  # [b][v]
    levels: tuple[str, ...]
    c_sem: int
    c_inst: int
    config: str = "seed"
    gt_source: str = "mask"
    merge: str | None = None  # None: the config's merge type
    d: int = 4
    options: tuple = ()


@st.composite
def options(draw) -> tuple:
    """A few random config overrides on top of a preset (every named option is reachable)."""
    choices = {
        "normalization": st.sampled_from(("matched", "seed", "esam")),
        "dice_form": st.sampled_from(("seed", "esam")),
        "no_object_weight": st.sampled_from((0.0, 0.1, 1.0)),
        "score_iou_threshold": st.sampled_from((None, 0.5)),
        "box_loss": st.sampled_from((None, "l1", "iou", "giou")),
        "iter_matcher": st.booleans(),
        "aux_loss": st.booleans(),
        "fix_dice_loss_weight": st.booleans(),
        "fix_mean_loss": st.booleans(),
        "final_dice_sum": st.booleans(),
        "frame_reduction": st.sampled_from(("sum", "mean")),
        "clip_symmetric": st.booleans(),
        "matcher": st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(("hungarian", "sparse")),
            "topk": st.integers(1, 3),
            "class_cost": st.sampled_from(("one_minus", "negative")),
            "mask_cost": st.sampled_from(("bce", "l1", "l1_as_printed")),
            "dice_cost": st.sampled_from(("seed", "esam")),
            "costs": st.sampled_from(({"cls": 0.5, "bce": 1.0, "dice": 1.0}, {"cls": 1.0},
                                      {"bce": 1.0}, {"dice": 2.0, "cls": 0.0})),
        }),
        "cross_frame": st.fixed_dictionaries({}, optional={
            "reduction": st.sampled_from(("sum", "mean")),
            "pos_weight": st.sampled_from((None, 10.0)),
            "consistency": st.sampled_from(("slot", "matched")),
        }),
        "loss_weight": st.fixed_dictionaries({}, optional={
            name: st.sampled_from((0.0, 2.0)) for name in
            ("sem", "cls", "bce", "dice", "score", "bbox", "match", "cons", "merge", "clip")}),
    }
    keys = draw(st.lists(st.sampled_from(sorted(choices)), unique=True, max_size=4))
    return tuple((k, draw(choices[k])) for k in keys)


@st.composite
def frame_specs(draw, *, q=None, k=None, max_q: int = 12, max_k: int = 15, max_n: int = 60,
                clip: bool = True, modes=MODES, scales=SCALES) -> FrameSpec:
    n = draw(st.integers(0, max_n))
    return FrameSpec(
        q=draw(st.integers(0, max_q)) if q is None else q,
        k=draw(st.integers(0, max_k)) if k is None else k,
        n=n,
        s=draw(st.integers(1, 10)),
        seed=draw(st.integers(0, 2**31 - 1)),
        mode=draw(st.sampled_from(modes)),
        scale=draw(st.sampled_from(scales)),
        sem_level=draw(st.sampled_from(("point", "superpoint"))),
        sem_extra_column=draw(st.booleans()),
        scores_2d=draw(st.booleans()),
        clip_rows=draw(st.none() | st.integers(0, 5)) if clip else None,
        empty_instances=draw(st.booleans()),
    )


@st.composite
def batch_specs(draw, *, max_b: int = 3, min_q: int = 0, configs=CONFIGS, clip: bool = True,
                max_n: int = 60, with_options: bool = False,
                dtypes=(torch.float32, torch.float64), modes=MODES, scales=SCALES) -> BatchSpec:
    b = draw(st.integers(1, max_b))
    depth = draw(st.integers(1, 3))
    frames = tuple(draw(frame_specs(q=draw(st.integers(min_q, 12)), clip=clip, max_n=max_n,
                                    modes=modes, scales=scales))
                   for _ in range(b))
    return BatchSpec(
        frames=frames,
        levels=tuple(draw(st.sampled_from(("point", "superpoint"))) for _ in range(depth)),
        c_sem=draw(st.integers(1, 6)),
        c_inst=draw(st.integers(1, 3)),
        config=draw(st.sampled_from(configs)),
        dtype=draw(st.sampled_from(dtypes)),
        options=draw(options()) if with_options else (),
    )


@st.composite
def seq_specs(draw, *, max_b: int = 2, max_v: int = 4, configs=CONFIGS,
              with_options: bool = False) -> SeqSpec:
    b = draw(st.integers(1, max_b))
    v = draw(st.integers(1, max_v))
    scene = draw(st.integers(0, 6))  # global instances of the scene
    frames, present = [], []
    for _ in range(b):
        q = draw(st.integers(0, 10))  # slot-aligned consistency: one Q per sequence
        per_frame, seen = [], []
        for _ in range(v):
            ids = draw(st.lists(st.integers(0, max(scene - 1, 0)), unique=True, max_size=scene))
            ids = tuple(sorted(ids)) if scene else ()
            seen.append(ids)
            per_frame.append(draw(frame_specs(q=q, k=len(ids), max_n=40, clip=False)))
        frames.append(tuple(per_frame))
        present.append(tuple(seen))
    return SeqSpec(
        frames=tuple(frames), present=tuple(present),
        levels=tuple(draw(st.sampled_from(("point", "superpoint")))
                     for _ in range(draw(st.integers(1, 2)))),
        c_sem=draw(st.integers(1, 4)), c_inst=draw(st.integers(1, 2)),
        config=draw(st.sampled_from(configs)),
        gt_source=draw(st.sampled_from(("mask", "instance"))),
        merge=draw(st.sampled_from((None, "ce", "fast", "seal"))),
        d=draw(st.integers(1, 6)),
        options=draw(options()) if with_options else (),
    )


def config_for(name: str, c_sem: int, c_inst: int, options: tuple = (), **overrides) -> dict:
    """A config dict: ``"seed"`` / ``"esam"`` presets or the library default, with
    ``options`` (drawn overrides) and then ``overrides`` applied (nested dicts merged)."""
    cfg: dict = {"num_semantic_classes": c_sem, "num_instance_classes": c_inst}
    for key, value in (*options, *overrides.items()):
        if isinstance(value, dict) and key in cfg:
            value = {**cfg[key], **value}
        cfg[key] = value
    if name != "default":
        cfg["preset"] = name
    return cfg


def batch_config(spec: BatchSpec | SeqSpec, **overrides) -> dict:
    """The config dict a spec asks for."""
    if isinstance(spec, SeqSpec):
        overrides = {"cross_frame": {"gt_source": spec.gt_source}, **overrides}
        if spec.merge is not None:
            overrides["merge"] = {"type": spec.merge}
    return config_for(spec.config, spec.c_sem, spec.c_inst, spec.options, **overrides)


def _frame(spec: FrameSpec, levels: tuple[str, ...], c_sem: int, c_inst: int,
           dtype: torch.dtype, *, dense: bool = False, global_ids: tuple[int, ...] | None = None,
           d: int = 4, with_merge: bool = False) -> tuple[FramePrediction, FrameTarget]:
    g = torch.Generator().manual_seed(spec.seed)
    q, k, n, s = spec.q, spec.k, spec.n, spec.s

    def pred(*shape: int) -> Tensor:
        return values(g, shape, spec.mode, spec.scale, dtype).requires_grad_()

    layers = []
    for level in levels:
        p = n if level == "point" else s
        layers.append(LayerOutput(
            cls_logits=pred(q, c_inst + 1), mask_logits=pred(q, p), mask_level=level,
            scores=pred(q, 1) if spec.scores_2d else pred(q),
            box_preds=pred(q, 6), query_centers=pred(q, 3)))
    sem_rows = n if spec.sem_level == "point" else s
    fused = clip = None
    if spec.clip_rows is not None:
        fused, clip = pred(spec.clip_rows, d), pred(spec.clip_rows, d)
    prediction = FramePrediction(
        layers, semantic_logits=pred(sem_rows, c_sem + int(spec.sem_extra_column)),
        semantic_level=spec.sem_level, query_features=pred(q, d),
        merge_features=pred(q, d) if with_merge else None,
        fused_global=fused, clip_global=clip)

    # Ids in [-1, K); with empty_instances only the lower half of the instances get points.
    k_used = max(k // 2, 1) if spec.empty_instances else k
    ids = torch.randint(-1, k_used, (n,), generator=g) if k else torch.full((n,), -1)
    superpoints = torch.randint(0, s, (n,), generator=g)
    semantic = torch.randint(0, c_sem + 1, (n,), generator=g)  # c_sem: unlabeled
    masks = {"instance_masks": ids.unsqueeze(0) == torch.arange(k).unsqueeze(1)} if dense \
        else {"instance_ids": ids}
    target = FrameTarget(
        labels=torch.randint(0, c_inst, (k,), generator=g), superpoints=superpoints,
        num_superpoints=s, semantic=semantic,
        boxes=torch.rand(k, 6, generator=g, dtype=torch.float64).to(dtype) * 2,
        query_masks=torch.rand(k, q, generator=g) < 0.5,
        global_ids=torch.tensor(global_ids, dtype=torch.long) if global_ids is not None else None,
        points=torch.rand(n, 3, generator=g, dtype=torch.float64).to(dtype) * 2,
        **masks)
    return prediction, target


def build_batch(spec: BatchSpec, *, dense: bool = False,
                ) -> tuple[list[FramePrediction], list[FrameTarget]]:
    """B single-view predictions and targets (``dense``: GT as (K, N) masks instead of ids)."""
    pairs = [_frame(f, spec.levels, spec.c_sem, spec.c_inst, spec.dtype, dense=dense)
             for f in spec.frames]
    return [p for p, _ in pairs], [t for _, t in pairs]


def build_sequences(spec: SeqSpec, *, dtype: torch.dtype = torch.float32, dense: bool = False,
                    ) -> tuple[list[SequencePrediction], list[SequenceTarget]]:
    """B sequences of V frames with match logits, transformer features and merge features."""
    preds, targets = [], []
    for frames, present in zip(spec.frames, spec.present):
        pairs = [_frame(f, spec.levels, spec.c_sem, spec.c_inst, dtype, global_ids=ids,
                        d=spec.d, with_merge=True, dense=dense)
                 for f, ids in zip(frames, present)]
        g = torch.Generator().manual_seed(frames[0].seed + 1)
        f0 = frames[0]
        match = [values(g, (a.q, b.q), f0.mode, f0.scale, dtype).requires_grad_()
                 for a, b in zip(frames[:-1], frames[1:])]
        feats = [values(g, (f.q, spec.d), f0.mode, f0.scale, dtype).requires_grad_()
                 for f in frames]
        preds.append(SequencePrediction([p for p, _ in pairs], match, feats))
        targets.append(SequenceTarget([t for _, t in pairs]))
    return preds, targets


def prediction_leaves(predictions) -> list[tuple[str, Tensor]]:
    """Every differentiable prediction tensor, named (frames or sequences)."""
    out = []

    def frame(p: FramePrediction, prefix: str) -> None:
        for i, layer in enumerate(p.layers):
            for name in ("cls_logits", "mask_logits", "scores", "box_preds", "query_centers"):
                t = getattr(layer, name)
                if t is not None:
                    out.append((f"{prefix}.layers[{i}].{name}", t))
        for name in ("semantic_logits", "query_features", "merge_features", "fused_global",
                     "clip_global"):
            t = getattr(p, name)
            if t is not None:
                out.append((f"{prefix}.{name}", t))

    for b, p in enumerate(predictions):
        if isinstance(p, SequencePrediction):
            for v, f in enumerate(p.frames):
                frame(f, f"predictions[{b}].frames[{v}]")
            for t, m in enumerate(p.match_logits or []):
                out.append((f"predictions[{b}].match_logits[{t}]", m))
            for t, m in enumerate(p.tdt_features or []):
                out.append((f"predictions[{b}].tdt_features[{t}]", m))
        else:
            frame(p, f"predictions[{b}]")
    return out


def permute_frame(pred: FramePrediction, target: FrameTarget, perm: Tensor,
                  ) -> tuple[FramePrediction, FrameTarget]:
    """The same frame with its queries reordered by ``perm`` on every layer and in
    ``query_masks``; GT and everything per point untouched."""
    layers = [LayerOutput(l.cls_logits[perm], l.mask_logits[perm], l.mask_level,
                          None if l.scores is None else l.scores[perm],
                          None if l.box_preds is None else l.box_preds[perm],
                          None if l.query_centers is None else l.query_centers[perm])
              for l in pred.layers]
    new_pred = replace(pred, layers=layers,
                       query_features=None if pred.query_features is None
                       else pred.query_features[perm],
                       merge_features=None if pred.merge_features is None
                       else pred.merge_features[perm])
    new_target = replace(target, query_masks=None if target.query_masks is None
                         else target.query_masks[:, perm], _cache={})
    return new_pred, new_target
