"""A compact ESAM-style reference model that produces every input of `ESAMCriterion`.

Shape vocabulary: V frames, N points of a frame, S superpoints, Q queries, K instances,
C classes, H attention heads, d feature dim, G x G image grid cells (M occupied ones).

Pipeline of one frame (pure PyTorch, no sparse-convolution library)::

    points (xyz, rgb) -> per-point MLP -> pooled context (voxel / superpoint max, broadcast back)
      -> superpoint pooling (mean, max, geometry) -> superpoint self-attention (distance bias)
      -> queries seeded at sampled superpoints (ESAM samples its queries from superpoints)
      -> prediction from the seeds, then 3 decoder layers (cross-attention to superpoints,
         self-attention, FFN), each followed by the shared heads:
         class (C_inst + 1), score (mask IoU), box (centre offset from the seed, size), mask
         logits by dot product with superpoint features (ESAM's "SP") or point features ("P"),
         plus an ellipsoidal box prior that is itself a dot product (`box_prior_logits`).
      -> final queries: merge features (L2-normalised), query features for the
         `TimeDividedTransformer`; superpoints: semantic logits.

A sequence runs the frames independently, then the `TimeDividedTransformer` across consecutive
frames (updated features, match logits) -> `SequencePrediction`. The optional 2-D branch (a tiny
CNN on the frame's rendered image) gives ``clip_global`` per image-grid cell, paired with the
pooled 3-D point features of the same cell (``fused_global``).

Inference (`ESAMReferenceModel.predict`): per frame, queries seeded at every superpoint, mask
binarisation, scores, ESAM's matrix NMS, a score threshold, removal of near-duplicate masks and
top-k; then `OnlineMerge` across the frames, with a similarity of merge-feature cosine times the
voxel containment of the masks in the shared world frame -> global instance ids of every point
of the sequence.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esam.data.structures import FrameData, frame_instances
from esam.merge.online_merge import FrameInstances, OnlineMerge
from esam.models.functional import (
    box_prior_logits,
    distance_bias,
    mask_nms,
    matrix_nms,
    scatter_max,
    scatter_mean,
    voxel_ids,
    voxel_overlap,
)
from esam.models.tdt import TimeDividedTransformer
from esam.structures import (
    FramePrediction,
    FrameTarget,
    LayerOutput,
    SequencePrediction,
    boxes_from_instance_ids,
    pool_to_superpoints,
)

__all__ = [
    "ReferenceModelConfig",
    "InferenceConfig",
    "FrameInput",
    "FrameOutput",
    "SequenceInstances",
    "ESAMReferenceModel",
    "prepare_frame",
    "frame_target",
    "with_query_masks",
]


@dataclass
class ReferenceModelConfig:
    """Architecture of `ESAMReferenceModel` (defaults: trains on 2 CPU cores in minutes)."""

    num_semantic_classes: int = 12  # C of the semantic head (synthetic data: 12)
    num_instance_classes: int = 1  # C of the instance head (1: class-agnostic, as ESAM)
    point_dim: int = 48  # per-point feature width
    d_model: int = 64  # superpoint / query width d
    num_heads: int = 4  # attention heads H (must divide d_model)
    ffn_dim: int = 128  # hidden width of every FFN
    context_layers: int = 1  # superpoint self-attention layers
    decoder_layers: int = 3  # query decoder layers (predictions: 1 + decoder_layers)
    mask_pred_mode: tuple[str, ...] = ("SP", "SP", "P", "P")  # ESAM: SP masks early, P later
    voxel_sizes: tuple[float, ...] = (0.1, 0.3)  # context pooling grids (metres)
    xyz_scale: float = 2.0  # metres per unit of normalised input coordinates
    num_queries: int = 48  # training queries per frame (sampled superpoints)
    merge_dim: int = 32  # merge-feature width
    semantic_level: str = "superpoint"  # semantic head on "superpoint" or "point"
    use_tdt: bool = True  # run the TimeDividedTransformer across frames
    tdt_layers: int = 1
    clip_branch: bool = True  # 2-D branch (needs FrameData.image); off: no CLIP features
    clip_dim: int = 32  # width of fused_global / clip_global
    clip_grid: int = 3  # image cells per side (M <= clip_grid^2 rows per frame)
    box_min_size: float = 0.02  # smallest predicted box edge (metres)

    def __post_init__(self) -> None:
        self.mask_pred_mode = tuple(self.mask_pred_mode)
        self.voxel_sizes = tuple(float(v) for v in self.voxel_sizes)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model: expected a multiple of num_heads={self.num_heads}, "
                             f"got {self.d_model}")
        if len(self.mask_pred_mode) != self.decoder_layers + 1:
            raise ValueError(f"mask_pred_mode: expected decoder_layers + 1 = "
                             f"{self.decoder_layers + 1} entries, got {self.mask_pred_mode}")
        if any(m not in ("SP", "P") for m in self.mask_pred_mode):
            raise ValueError(f"mask_pred_mode: expected entries 'SP' or 'P', got "
                             f"{self.mask_pred_mode}")
        if self.semantic_level not in ("superpoint", "point"):
            raise ValueError(f"semantic_level: expected 'superpoint' or 'point', got "
                             f"{self.semantic_level!r}")
        for name in ("num_semantic_classes", "num_instance_classes", "num_queries",
                     "decoder_layers", "point_dim", "merge_dim", "clip_dim", "clip_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ReferenceModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}; expected some of "
                             f"{sorted(names)}")
        return cls(**data)


@dataclass
class InferenceConfig:
    """Post-processing of `ESAMReferenceModel.predict`."""

    score_threshold: float = 0.1  # frame instances scoring below (after NMS) are dropped
    mask_threshold: float = 0.5  # mask binarisation on sigmoid(mask logits)
    topk: int = 40  # frame instances kept per frame, by score
    nms: str = "matrix"  # "matrix": ESAM's test-time matrix NMS (score decay); "none": top-k only
    nms_kernel: str = "linear"  # matrix NMS kernel ("linear", as ESAM, or "gaussian")
    nms_iou: float | None = 0.5  # then drop masks overlapping a better one above this IoU
    #   (OnlineMerge matches one-to-one, so a duplicate left in a frame becomes a second global
    #   instance); None keeps them
    min_points: int = 10  # smaller binarised masks are dropped
    max_queries: int | None = None  # queries per frame at inference (None: every superpoint)
    merge_threshold: float = 0.05  # similarity a frame instance needs to join a global one
    merge_similarity: str = "voxel"  # "voxel": merge-feature cosine x voxel containment of the
    #   masks (the frames share one world frame); "iou" / "distance": OnlineMerge's own feature
    #   cosine x box IoU / inverse centre distance
    merge_voxel_size: float = 0.1  # grid of the "voxel" similarity (metres)
    merge_topk: int | None = None  # global instances reported (None: all)

    def __post_init__(self) -> None:
        if self.nms not in ("matrix", "none"):
            raise ValueError(f"nms: expected 'matrix' or 'none', got {self.nms!r}")
        if self.merge_similarity not in ("voxel", "iou", "distance"):
            raise ValueError(f"merge_similarity: expected 'voxel', 'iou' or 'distance', got "
                             f"{self.merge_similarity!r}")
        if self.nms_kernel not in ("linear", "gaussian"):
            raise ValueError(f"nms_kernel: expected 'linear' or 'gaussian', got "
                             f"{self.nms_kernel!r}")


# ------------------------------------------------------------------------------------------------
# Inputs and targets
# ------------------------------------------------------------------------------------------------

@dataclass
class FrameInput:
    """One frame, ready for the model (all tensors on one device).

    Attributes:
        points: ``(N, 3)`` world-frame xyz.
        features: ``(N, 9)`` normalised input: xyz about the frame's floor-level centre, rgb,
            offset from the superpoint centroid.
        superpoints: ``(N,)`` superpoint of every point, in ``[0, S)``.
        num_superpoints: S.
        sp_centroids: ``(S, 3)`` world-frame superpoint centroids.
        voxels: per context grid, ``(N,)`` voxel ids and their count.
        image: ``(3, H, W)`` rendered colours in [0, 1], or None.
        cells: ``(N,)`` image-grid cell of every point in ``[0, G^2)``, or None.
    """

    points: Tensor
    features: Tensor
    superpoints: Tensor
    num_superpoints: int
    sp_centroids: Tensor
    voxels: list[tuple[Tensor, int]]
    image: Tensor | None = None
    cells: Tensor | None = None

    @property
    def num_points(self) -> int:
        return self.points.shape[0]

    @property
    def device(self) -> torch.device:
        return self.points.device

    def to(self, device: torch.device | str) -> FrameInput:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)
        return FrameInput(points=mv(self.points), features=mv(self.features),
                          superpoints=mv(self.superpoints), num_superpoints=self.num_superpoints,
                          sp_centroids=mv(self.sp_centroids),
                          voxels=[(mv(v), n) for v, n in self.voxels], image=mv(self.image),
                          cells=mv(self.cells))


def prepare_frame(frame: FrameData, config: ReferenceModelConfig) -> FrameInput:
    """`FrameData` -> `FrameInput`: normalised point features, superpoint centroids, voxel ids
    of every context grid and the image-grid cell of every point (when the frame has an image).
    """
    if not isinstance(frame, FrameData):
        raise ValueError(f"frame: expected a FrameData, got {type(frame).__name__}")
    points = frame.points.float()  # (N, 3)
    sp = frame.superpoints.long()  # (N,)
    s = int(sp.max()) + 1 if sp.numel() else 0
    centroids = scatter_mean(points, sp, s)  # (S, 3)
    centre = points.mean(0) if points.shape[0] else points.new_zeros(3)
    centre = torch.stack([centre[0], centre[1], centre.new_zeros(())])  # floor stays at z = 0
    features = torch.cat([
        (points - centre) / config.xyz_scale,
        frame.colors.float(),
        (points - centroids[sp]) / (0.25 * config.xyz_scale),
    ], dim=1)  # (N, 9)
    voxels = [voxel_ids(points, v) for v in config.voxel_sizes]
    image, cells = None, None
    if config.clip_branch and frame.image is not None and frame.pixel_index is not None:
        image = frame.image.float()
        h, w = image.shape[1:]
        g = config.clip_grid
        row, col = frame.pixel_index // w, frame.pixel_index % w  # (N,)
        cells = (row * g // h) * g + col * g // w  # (N,)
    return FrameInput(points=points, features=features, superpoints=sp, num_superpoints=s,
                      sp_centroids=centroids, voxels=voxels, image=image, cells=cells)


def frame_target(frame: FrameData, instance_labels: Tensor, seeds: Tensor | None = None, *,
                 thing_classes: tuple[int, ...] | None = None) -> FrameTarget:
    """`FrameData` -> `FrameTarget` of the instances present in the frame.

    Args:
        frame: one frame, instance ids global within its scene.
        instance_labels: ``(K_scene,)`` semantic class of every scene-global instance.
        seeds: ``(Q,)`` seed superpoint of every query; gives ``query_masks (K, Q)``:
            query j may match instance k iff its seed superpoint belongs to k (majority vote).
        thing_classes: semantic class of every instance class, for a class-aware instance head
            (labels are positions in this tuple); None labels every instance 0 (class-agnostic).

    Returns:
        A `FrameTarget` with labels, frame-local instance ids ``(N,)`` in ``[-1, K)``, global
        ids, superpoints, superpoint instance ids, semantic labels, boxes, points, query masks.
    """
    instance_ids, sem_labels, global_ids = frame_instances(frame, instance_labels)
    k = global_ids.shape[0]
    if thing_classes is None:
        labels = torch.zeros(k, dtype=torch.long, device=instance_ids.device)
    else:
        table = torch.full((int(max(thing_classes)) + 2,), -1, dtype=torch.long)
        table[torch.tensor(thing_classes, dtype=torch.long)] = torch.arange(len(thing_classes))
        labels = table.to(sem_labels.device)[sem_labels.clamp(max=table.shape[0] - 1)]
        if bool((labels < 0).any()):
            raise ValueError(f"thing_classes: instance classes {sem_labels.tolist()} must all be "
                             f"listed, got {thing_classes}")
    sp = frame.superpoints.long()
    s = frame.num_superpoints
    sp_ids = pool_to_superpoints(instance_ids, sp, s, k, ignore_value=-1, mode="majority")  # (S,)
    target = FrameTarget(
        labels=labels, instance_ids=instance_ids, superpoints=sp, sp_instance_ids=sp_ids,
        semantic=frame.semantic.long(),
        boxes=boxes_from_instance_ids(frame.points.float(), instance_ids, k),
        global_ids=global_ids, points=frame.points.float(), num_superpoints=s)
    return target if seeds is None else with_query_masks(target, seeds)


def with_query_masks(target: FrameTarget, seeds: Tensor) -> FrameTarget:
    """The target with ``query_masks (K, Q)`` for queries seeded at ``seeds (Q,)``: query j may
    match instance k iff its seed superpoint belongs to k (``target.sp_instance_ids``). The
    targets share their tensors and their cache of superpoint-level masks."""
    if target.sp_instance_ids is None:
        raise ValueError("target.sp_instance_ids: needed (S,) to build query masks; got None")
    arange = torch.arange(target.num_instances, device=seeds.device)
    qm = target.sp_instance_ids[seeds.long()].unsqueeze(0) == arange.unsqueeze(1)  # (K, Q)
    return dataclasses.replace(target, query_masks=qm)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

def _mlp(sizes: list[int], final_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_act:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class DistanceAttention(nn.Module):
    """Multi-head attention with a learned per-head distance decay ``-a_h ||p_q - p_k||``.

    Heads start at different locality scales (0 to ~4 per metre), so some attend globally and
    some to the neighbourhood.
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        init = torch.linspace(-4.0, 1.5, num_heads)  # softplus -> ~0.02 .. ~1.7 per metre
        self.decay_raw = nn.Parameter(init)

    def forward(self, x: Tensor, x_pos: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        """``x (Q, d)`` attends to ``memory (S, d)`` (positions ``(Q, 3)``, ``(S, 3)``)
        -> ``(Q, d)``."""
        q_len, d = x.shape
        h = self.num_heads
        q = self.q_proj(x).view(q_len, h, d // h).transpose(0, 1)  # (H, Q, d/H)
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        k = k.reshape(-1, h, d // h).transpose(0, 1)  # (H, S, d/H)
        v = v.reshape(-1, h, d // h).transpose(0, 1)  # (H, S, d/H)
        bias = distance_bias(x_pos, memory_pos, F.softplus(self.decay_raw))  # (H, Q, S)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (H, Q, d/H)
        return self.out(attn.transpose(0, 1).reshape(q_len, d))  # (Q, d)


class _AttentionBlock(nn.Module):
    """Pre-norm residual: optional cross-attention, self-attention, FFN."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, cross: bool):
        super().__init__()
        self.cross = DistanceAttention(d_model, num_heads) if cross else None
        self.norm_cross = nn.LayerNorm(d_model) if cross else None
        self.norm_memory = nn.LayerNorm(d_model) if cross else None
        self.self_attn = DistanceAttention(d_model, num_heads)
        self.norm_self = nn.LayerNorm(d_model)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = _mlp([d_model, ffn_dim, d_model])

    def forward(self, x: Tensor, pos: Tensor, memory: Tensor | None = None,
                memory_pos: Tensor | None = None) -> Tensor:
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), pos, self.norm_memory(memory), memory_pos)
        y = self.norm_self(x)
        x = x + self.self_attn(y, pos, y, pos)
        return x + self.ffn(self.norm_ffn(x))


class PointEncoder(nn.Module):
    """Per-point MLP with context from pooled neighbourhoods.

    Each context level (a voxel grid, then the superpoints) max-pools the point features over its
    segments and feeds them back to the points (``h += MLP([h, pooled[segment]])``), a light
    stand-in for a sparse 3-D U-Net.
    """

    def __init__(self, in_dim: int, dim: int, num_levels: int):
        super().__init__()
        self.stem = _mlp([in_dim, dim, dim], final_act=True)
        self.levels = nn.ModuleList(_mlp([2 * dim, dim, dim]) for _ in range(num_levels))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_levels))

    def forward(self, features: Tensor, segments: list[tuple[Tensor, int]]) -> Tensor:
        """``features (N, in)``, per level ``(ids (N,), count)`` -> ``(N, dim)``."""
        h = self.stem(features)  # (N, dim)
        for mlp, norm, (ids, n) in zip(self.levels, self.norms, segments):
            pooled = scatter_max(h, ids, n)[ids]  # (N, dim)
            h = norm(h + mlp(torch.cat([h, pooled], dim=1)))
        return h


class ImageBranch(nn.Module):
    """Tiny CNN on the rendered image -> one embedding per grid cell (the CLIP side)."""

    def __init__(self, out_dim: int, grid: int, width: int = 32):
        super().__init__()
        self.grid = grid
        self.convs = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU(),
        )
        self.head = _mlp([width, width, out_dim])

    def forward(self, image: Tensor) -> Tensor:
        """``image (3, H, W)`` -> ``(G^2, out_dim)`` cell embeddings, row-major cells."""
        x = self.convs(image.unsqueeze(0))  # (1, w, H/8, W/8)
        x = F.adaptive_avg_pool2d(x, self.grid)  # (1, w, G, G)
        return self.head(x.flatten(2).squeeze(0).T)  # (G^2, out_dim)


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------

@dataclass
class FrameOutput:
    """A frame's prediction plus what inference needs besides the loss inputs.

    Attributes:
        prediction: the `FramePrediction` (every loss input of the frame).
        seeds: ``(Q,)`` seed superpoint of every query.
        semantic_point_logits: ``(N, C)`` semantic logits broadcast to points.
    """

    prediction: FramePrediction
    seeds: Tensor
    semantic_point_logits: Tensor


@dataclass
class SequenceInstances:
    """Instances predicted for a V-frame sequence.

    Attributes:
        frames: per frame ``{'masks': (P, N_t) bool, 'scores': (P,), 'labels': (P,),
            'semantic': (N_t,) predicted class}`` (the per-frame output before merging).
        masks: ``(K, N_seen)`` bool global instance masks over the frames' points concatenated.
        scores: ``(K,)`` global instance scores.
        labels: ``(K,)`` global instance labels (instance-head classes).
        global_ids: ``(N_seen,)`` global instance id of every point (0: none).
        semantic: ``(N_seen,)`` predicted semantic class of every point.
    """

    frames: list[dict[str, Tensor]]
    masks: Tensor
    scores: Tensor
    labels: Tensor
    global_ids: Tensor
    semantic: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

class ESAMReferenceModel(nn.Module):
    """Point encoder, superpoint pooling, seeded query decoder, `TimeDividedTransformer`,
    optional 2-D branch; `predict` adds post-processing and `OnlineMerge`.

    Args:
        config: a `ReferenceModelConfig` (default: the CPU-sized reference).
    """

    def __init__(self, config: ReferenceModelConfig | None = None):
        super().__init__()
        cfg = config or ReferenceModelConfig()
        self.config = cfg
        d, dp = cfg.d_model, cfg.point_dim
        self.encoder = PointEncoder(9, dp, len(cfg.voxel_sizes) + 1)
        self.sp_proj = _mlp([2 * dp + 7, d, d])
        self.context = nn.ModuleList(
            _AttentionBlock(d, cfg.num_heads, cfg.ffn_dim, cross=False)
            for _ in range(cfg.context_layers))
        self.context_norm = nn.LayerNorm(d)
        self.sp_key = nn.Linear(d, d)
        self.point_key = nn.Linear(dp, d)
        self.query_init = nn.Linear(d, d)
        self.decoder = nn.ModuleList(
            _AttentionBlock(d, cfg.num_heads, cfg.ffn_dim, cross=True)
            for _ in range(cfg.decoder_layers))
        # Heads shared by every decoder layer (as OneFormer3D / ESAM).
        self.head_norm = nn.LayerNorm(d)
        self.cls_head = nn.Linear(d, cfg.num_instance_classes + 1)
        self.score_head = nn.Linear(d, 1)
        self.box_head = _mlp([d, d, 6])
        self.mask_embed = _mlp([d, d, d])
        self.prior_gain_raw = nn.Parameter(torch.tensor(1.0))  # softplus -> ~1.3
        self.prior_scale_raw = nn.Parameter(torch.tensor(0.5))  # softplus -> ~0.97 (x half size)
        self.merge_head = nn.Linear(d, cfg.merge_dim)
        self.semantic_head = nn.Linear(d if cfg.semantic_level == "superpoint" else dp,
                                       cfg.num_semantic_classes)
        self.tdt = TimeDividedTransformer(
            d_model=d, num_heads=cfg.num_heads, num_layers=cfg.tdt_layers,
            ffn_dim=cfg.ffn_dim) if cfg.use_tdt else None
        if cfg.clip_branch:
            self.image_branch = ImageBranch(cfg.clip_dim, cfg.clip_grid)
            self.fused_proj = _mlp([dp, dp, cfg.clip_dim])
        else:
            self.image_branch = None
            self.fused_proj = None
        nn.init.constant_(self.box_head[-1].bias, 0.0)
        with torch.no_grad():  # start with ~0.4 m boxes around the seed
            self.box_head[-1].bias[3:] = math.log(math.expm1(0.4))

    # -- queries ----------------------------------------------------------------------------

    def sample_seeds(self, frame: FrameInput, num_queries: int | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """Seed superpoints of the queries -> ``(Q,)`` long.

        Training (``generator`` given): exactly ``num_queries`` (default ``config.num_queries``)
        superpoints drawn at random, without replacement while there are enough, so every frame
        of a sequence has the same Q. Inference (no generator): every superpoint, or
        ``num_queries`` of them evenly spaced when there are more.
        """
        s = frame.num_superpoints
        device = frame.device
        if generator is None:
            if num_queries is None or s <= num_queries:
                return torch.arange(s, device=device)
            return torch.linspace(0, s - 1, num_queries).round().long().to(device)
        q = self.config.num_queries if num_queries is None else num_queries
        order = torch.randperm(s, generator=generator)
        if s < q:
            extra = torch.randint(0, s, (q - s,), generator=generator)
            order = torch.cat([order, extra])
        return order[:q].to(device)

    # -- one frame ----------------------------------------------------------------------------

    def _heads(self, q: Tensor, level: str, seeds_pos: Tensor, sp_keys: Tensor,
               point_keys: Tensor, frame: FrameInput) -> tuple[LayerOutput, Tensor]:
        """Shared heads on ``q (Q, d)`` -> a `LayerOutput` and the normalised queries."""
        cfg = self.config
        x = self.head_norm(q)  # (Q, d)
        box = self.box_head(x)  # (Q, 6)
        size = F.softplus(box[:, 3:]) + cfg.box_min_size  # (Q, 3)
        box_preds = torch.cat([box[:, :3], size], dim=1)  # (Q, 6) offset from seed, size
        emb = self.mask_embed(x)  # (Q, d)
        if level == "SP":
            keys, positions, mask_level = sp_keys, frame.sp_centroids, "superpoint"
        else:
            keys, positions, mask_level = point_keys, frame.points, "point"
        half = 0.5 * size * F.softplus(self.prior_scale_raw) + 0.5 * cfg.box_min_size  # (Q, 3)
        prior = box_prior_logits(positions, seeds_pos + box[:, :3], half)  # (Q, P)
        mask_logits = emb @ keys.T / math.sqrt(emb.shape[1]) \
            + F.softplus(self.prior_gain_raw) * prior  # (Q, P)
        layer = LayerOutput(
            cls_logits=self.cls_head(x), mask_logits=mask_logits, mask_level=mask_level,
            scores=torch.sigmoid(self.score_head(x)).squeeze(1), box_preds=box_preds,
            query_centers=seeds_pos)
        return layer, x

    def forward_frame(self, frame: FrameInput, seeds: Tensor) -> FrameOutput:
        """One frame -> `FrameOutput` (its `FramePrediction` and the seeds used).

        Args:
            frame: the prepared frame.
            seeds: ``(Q,)`` seed superpoints (`sample_seeds`).
        """
        cfg = self.config
        if seeds.dim() != 1 or (seeds.numel() and (int(seeds.min()) < 0
                                                   or int(seeds.max()) >= frame.num_superpoints)):
            raise ValueError(f"seeds: expected a (Q,) tensor of superpoints in "
                             f"[0, S={frame.num_superpoints}), got shape {tuple(seeds.shape)}")
        sp, s = frame.superpoints, frame.num_superpoints
        h = self.encoder(frame.features, [*frame.voxels, (sp, s)])  # (N, dp)

        counts = torch.bincount(sp, minlength=s).to(h.dtype)  # (S,)
        sp_pos = frame.sp_centroids  # (S, 3)
        spread = scatter_mean((frame.points - sp_pos[sp]).pow(2), sp, s).sqrt()  # (S, 3)
        sp_geom = torch.cat([scatter_mean(frame.features[:, :3], sp, s),  # normalised centroid
                             spread / cfg.xyz_scale,
                             torch.log1p(counts).unsqueeze(1) / 5], dim=1)  # (S, 7)
        f = self.sp_proj(torch.cat([scatter_mean(h, sp, s), scatter_max(h, sp, s), sp_geom],
                                   dim=1))  # (S, d)
        for block in self.context:
            f = block(f, sp_pos)
        f = self.context_norm(f)  # (S, d)
        sp_keys = self.sp_key(f)  # (S, d)
        point_keys = self.point_key(h) + sp_keys[sp]  # (N, d)

        seeds = seeds.long()
        seeds_pos = sp_pos[seeds]  # (Q, 3)
        q = self.query_init(f[seeds])  # (Q, d)
        layers = []
        for i, mode in enumerate(cfg.mask_pred_mode):
            if i > 0:
                q = self.decoder[i - 1](q, seeds_pos, f, sp_pos)  # (Q, d)
            layer, x = self._heads(q, mode, seeds_pos, sp_keys, point_keys, frame)
            layers.append(layer)

        if cfg.semantic_level == "superpoint":
            sem = self.semantic_head(f)  # (S, C)
            sem_points = sem[sp]  # (N, C)
        else:
            sem = sem_points = self.semantic_head(h)  # (N, C)
        fused, clip = None, None
        if self.image_branch is not None and frame.image is not None and frame.cells is not None:
            g2 = cfg.clip_grid ** 2
            occupied = torch.bincount(frame.cells, minlength=g2) > 0  # (G^2,)
            fused = self.fused_proj(scatter_mean(h, frame.cells, g2)[occupied])  # (M, c)
            clip = self.image_branch(frame.image)[occupied]  # (M, c)
        prediction = FramePrediction(
            layers=layers, semantic_logits=sem,
            semantic_level="superpoint" if cfg.semantic_level == "superpoint" else "point",
            query_features=q, merge_features=F.normalize(self.merge_head(x), dim=-1),
            fused_global=fused, clip_global=clip)
        return FrameOutput(prediction=prediction, seeds=seeds, semantic_point_logits=sem_points)

    # -- a sequence ---------------------------------------------------------------------------

    def forward(self, frames: list[FrameInput], seeds: list[Tensor]
                ) -> tuple[SequencePrediction, list[FrameOutput]]:
        """V frames -> the `SequencePrediction` (every loss input) and the per-frame outputs.

        Args:
            frames: V prepared frames of one sequence, in stream order.
            seeds: V seed tensors ``(Q_t,)`` (`sample_seeds`).
        """
        if len(frames) == 0 or len(frames) != len(seeds):
            raise ValueError(f"frames, seeds: expected two non-empty lists of equal length V, got "
                             f"{len(frames)} and {len(seeds)}")
        outputs = [self.forward_frame(x, s) for x, s in zip(frames, seeds)]
        preds = [o.prediction for o in outputs]
        match_logits, tdt_features = None, None
        if self.tdt is not None:
            tdt_features, match_logits = self.tdt.forward_sequence(
                [p.query_features for p in preds], [p.final.boxes() for p in preds])
        return SequencePrediction(frames=preds, match_logits=match_logits,
                                  tdt_features=tdt_features), outputs

    # -- inference ------------------------------------------------------------------------------

    @torch.no_grad()
    def frame_instances(self, output: FrameOutput, frame: FrameInput,
                        cfg: InferenceConfig) -> dict[str, Tensor]:
        """One frame's instances: binarised point masks, scores, matrix NMS (unless
        ``cfg.nms == "none"``), score threshold, duplicate removal (``cfg.nms_iou``), top-k.

        Score of a query = P(object) x mean mask probability inside its binarised mask x the
        predicted mask-IoU score; matrix NMS then decays the scores of near-duplicates.

        Returns:
            ``{'masks': (P, N) bool, 'scores': (P,), 'labels': (P,), 'features': (P, m),
            'boxes': (P, 6), 'query_index': (P,)}``.
        """
        final = output.prediction.final
        logits = final.mask_logits  # (Q, S) or (Q, N)
        if final.mask_level == "superpoint":
            logits = logits[:, frame.superpoints]  # (Q, N)
        prob = torch.sigmoid(logits)  # (Q, N)
        masks = prob > cfg.mask_threshold  # (Q, N)
        cls_prob = final.cls_logits.softmax(-1)[:, :-1]  # (Q, C)
        obj_prob, labels = cls_prob.max(-1)  # (Q,)
        sizes = masks.sum(1)  # (Q,)
        mask_score = (prob * masks).sum(1) / sizes.clamp(min=1)  # (Q,)
        score = obj_prob * mask_score
        if final.scores is not None:
            score = score * final.scores.reshape(-1).clamp(0, 1)
        if cfg.nms == "matrix":
            big = sizes >= cfg.min_points
            score = torch.where(big, score, torch.zeros_like(score))
            score = matrix_nms(masks & big.unsqueeze(1), labels, score, kernel=cfg.nms_kernel)
        keep = (score > cfg.score_threshold) & (sizes >= cfg.min_points)
        if cfg.nms_iou is not None:
            keep &= mask_nms(masks & keep.unsqueeze(1), score, cfg.nms_iou)
        idx = keep.nonzero().squeeze(1)
        idx = idx[score[idx].argsort(descending=True)[:cfg.topk]]
        return {"masks": masks[idx], "scores": score[idx], "labels": labels[idx],
                "features": output.prediction.merge_features[idx], "boxes": final.boxes()[idx],
                "query_index": idx}

    @torch.no_grad()
    def predict(self, frames: list[FrameInput], cfg: InferenceConfig | None = None
                ) -> SequenceInstances:
        """Online inference over a V-frame sequence: per-frame instances merged by `OnlineMerge`.

        Args:
            frames: V prepared frames in stream order.
            cfg: post-processing options (default `InferenceConfig()`).

        Returns:
            `SequenceInstances` (per-frame instances, merged global masks over the concatenated
            points, per-point global ids and semantic classes).
        """
        cfg = cfg or InferenceConfig()
        seeds = [self.sample_seeds(x, cfg.max_queries) for x in frames]
        _, outputs = self(frames, seeds)
        geometry = "iou" if cfg.merge_similarity == "voxel" else cfg.merge_similarity
        merger = OnlineMerge(geometry=geometry, threshold=cfg.merge_threshold,
                             label_gate=True, topk=cfg.merge_topk, min_points=cfg.min_points)
        per_frame, semantic, seen = [], [], []
        for out, x in zip(outputs, frames):
            inst = self.frame_instances(out, x, cfg)
            sem = out.semantic_point_logits.argmax(-1)  # (N,)
            per_frame.append({"masks": inst["masks"], "scores": inst["scores"],
                              "labels": inst["labels"], "semantic": sem})
            similarity = None
            if cfg.merge_similarity == "voxel" and merger.num_global > 0:
                overlap = voxel_overlap(merger.masks, torch.cat(seen), inst["masks"], x.points,
                                        cfg.merge_voxel_size)  # (K, P)
                cos = F.normalize(merger.features, dim=-1) @ F.normalize(
                    inst["features"], dim=-1).T  # (K, P)
                similarity = cos.clamp(min=0) * overlap
            merger.merge(FrameInstances(
                masks=inst["masks"], scores=inst["scores"], labels=inst["labels"],
                features=inst["features"], points=x.points, similarity=similarity))
            semantic.append(sem)
            seen.append(x.points)
        device = frames[0].device
        reported = merger.reported if merger.num_global else torch.zeros(0, dtype=torch.bool,
                                                                          device=device)
        masks = merger.masks[reported] if merger.num_global else torch.zeros(
            0, sum(x.num_points for x in frames), dtype=torch.bool, device=device)
        empty = torch.zeros(0, device=device)
        return SequenceInstances(
            frames=per_frame, masks=masks,
            scores=merger.scores[reported] if merger.num_global else empty,
            labels=merger.labels[reported] if merger.num_global else empty.long(),
            global_ids=merger.point_global_ids().to(device), semantic=torch.cat(semantic))
