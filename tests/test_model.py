"""Reference model: functional pieces against loop definitions, targets, shapes, gradients."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from esam.data.synthetic import SyntheticSceneConfig, generate_scene
from esam.losses import ESAMCriterion
from esam.config import esam_preset, seed_preset
from esam.models.baselines import connected_components, superpoint_instances
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
from esam.models.reference import (
    ESAMReferenceModel,
    InferenceConfig,
    ReferenceModelConfig,
    frame_target,
    prepare_frame,
    with_query_masks,
)
from esam.structures import FramePrediction, LayerOutput, SequencePrediction, SequenceTarget
from esam.structures import FrameTarget
from esam.training import sequence_losses

TINY = dict(point_dim=16, d_model=16, num_heads=2, ffn_dim=32, num_queries=8, merge_dim=8,
            clip_dim=8, clip_grid=2, voxel_sizes=(0.2,))
SCENE_CFG = SyntheticSceneConfig(height=24, width=32, num_frames=3, render_image=True,
                                 min_objects=4, max_objects=8)


@pytest.fixture(scope="module")
def scene():
    s = generate_scene(2, SCENE_CFG)  # every frame has instances and >= 8 superpoints
    assert all(f.num_instances > 0 and f.num_superpoints >= 8 for f in s.frames)
    return s


@pytest.fixture(scope="module")
def sparse_scene():
    s = generate_scene(3, SCENE_CFG)  # one frame has 7 superpoints, fewer than Q = 8
    assert min(f.num_superpoints for f in s.frames) < 8
    return s


def _model(**kw) -> ESAMReferenceModel:
    torch.manual_seed(0)
    return ESAMReferenceModel(ReferenceModelConfig(**{**TINY, **kw}))


def _run(model, scene, seed=0):
    inputs = [prepare_frame(f, model.config) for f in scene.frames]
    g = torch.Generator().manual_seed(seed)
    seeds = [model.sample_seeds(x, generator=g) for x in inputs]
    pred, outs = model(inputs, seeds)
    targets = SequenceTarget([frame_target(f, scene.instance_labels, s)
                              for f, s in zip(scene.frames, seeds)])
    return inputs, seeds, pred, outs, targets


# ---------------------------------------------------------------------------------------------
# Functional pieces
# ---------------------------------------------------------------------------------------------

def test_scatter_max_and_mean_match_loops():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(40, 3, dtype=torch.float64, generator=g)
    values[5] = values[4]  # a tie inside a segment
    index = torch.randint(0, 6, (40,), generator=g)
    index[4] = index[5] = 2
    index[index == 5] = 4  # segment 5 stays empty
    mx, mean = scatter_max(values, index, 6), scatter_mean(values, index, 6)
    for s in range(6):
        members = values[index == s]
        want_max = members.max(0).values if len(members) else torch.zeros(3, dtype=values.dtype)
        want_mean = members.mean(0) if len(members) else torch.zeros(3, dtype=values.dtype)
        assert torch.allclose(mx[s], want_max)
        assert torch.allclose(mean[s], want_mean)


def test_scatter_max_gradient_goes_to_the_maximum():
    values = torch.tensor([[1.0], [3.0], [2.0], [5.0]], dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 0, 1, 1])
    scatter_max(values, index, 2).sum().backward()
    assert values.grad.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    # Away from ties the pooling is differentiable: compare with finite differences.
    x = torch.randn(12, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 1, 2] * 4)
    assert torch.autograd.gradcheck(lambda v: scatter_max(v, idx, 3), (x,))
    assert torch.autograd.gradcheck(lambda v: scatter_mean(v, idx, 4), (x,))


def test_scatter_rejects_bad_shapes():
    with pytest.raises(ValueError, match="values, index"):
        scatter_max(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="values, index"):
        scatter_mean(torch.zeros(4), torch.zeros(4, dtype=torch.long), 2)


def test_box_prior_matches_the_quadratic_form():
    g = torch.Generator().manual_seed(1)
    pos = torch.rand(30, 3, dtype=torch.float64, generator=g) * 6
    centres = torch.rand(4, 3, dtype=torch.float64, generator=g) * 6
    half = torch.rand(4, 3, dtype=torch.float64, generator=g) + 0.05
    out = box_prior_logits(pos, centres, half)
    for q in range(4):
        for p in range(30):
            want = 1 - sum(((pos[p, a] - centres[q, a]) / half[q, a]) ** 2 for a in range(3))
            assert math.isclose(out[q, p].item(), want.item(), rel_tol=1e-9, abs_tol=1e-9)
    # 1 at the centre, 0 on the inscribed ellipsoid.
    one = box_prior_logits(centres[:1], centres[:1], half[:1])
    edge = box_prior_logits(centres[:1] + half[:1] * torch.tensor([[1.0, 0, 0]]), centres[:1],
                            half[:1])
    assert torch.allclose(one, torch.ones(1, 1, dtype=torch.float64))
    assert torch.allclose(edge, torch.zeros(1, 1, dtype=torch.float64), atol=1e-9)
    assert torch.autograd.gradcheck(
        box_prior_logits, (pos[:5], centres.requires_grad_(), half.requires_grad_()))


def test_distance_bias_matches_loop():
    a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    decay = torch.tensor([0.0, 0.5], dtype=torch.float64)
    out = distance_bias(a, b, decay)
    assert out.shape == (2, 3, 5)
    for h in range(2):
        for i in range(3):
            for j in range(5):
                want = -decay[h] * torch.linalg.norm(a[i] - b[j])
                assert torch.isclose(out[h, i, j], want)


def test_voxel_ids_group_points_of_one_cell():
    pts = torch.tensor([[0.01, 0.02, 0.03], [0.09, 0.05, 0.01], [0.11, 0.0, 0.0],
                        [-0.01, 0.0, 0.0], [0.15, 0.02, 0.09]])
    ids, n = voxel_ids(pts, 0.1)
    cells = torch.floor(pts / 0.1)
    for i in range(5):
        for j in range(5):
            assert (ids[i] == ids[j]) == bool((cells[i] == cells[j]).all())
    assert n == 3 and set(ids.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="voxel_size"):
        voxel_ids(pts, 0.0)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _random_masks(p: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, n, generator=g) < 0.4
    pick = torch.randint(0, 3, (p,), generator=g)
    flip = torch.rand(p, n, generator=g) < 0.1
    return base[pick] ^ flip, torch.rand(p, generator=g)  # near-duplicates of 3 masks


def test_mask_nms_matches_its_definition():
    masks, scores = _random_masks(12, 60, 0)
    keep = mask_nms(masks, scores, 0.5)
    for j in range(12):
        beaten = any(scores[i] > scores[j] and _iou(masks[i], masks[j]) > 0.5 for i in range(12))
        assert bool(keep[j]) == (not beaten)
    assert 1 <= int(keep.sum()) <= 3
    assert mask_nms(masks[:0], scores[:0], 0.5).shape == (0,)


def test_matrix_nms_matches_its_definition():
    masks, scores = _random_masks(10, 50, 1)
    labels = torch.tensor([0, 0, 1, 0, 1, 1, 0, 0, 1, 0])
    out = matrix_nms(masks, labels, scores.double(), kernel="linear")
    order = scores.argsort(descending=True).tolist()
    for rank, j in enumerate(order):
        better = [i for i in order[:rank] if labels[i] == labels[j]]
        decay = 1.0
        for i in better:
            worse_than_i = [k for k in order[:order.index(i)] if labels[k] == labels[i]]
            comp = max([_iou(masks[k], masks[i]) for k in worse_than_i], default=0.0)
            decay = min(decay, (1 - _iou(masks[i], masks[j])) / (1 - comp))
        assert out[j].item() == pytest.approx(scores[j].item() * min(decay, 1.0), abs=1e-6)
    # The best mask of each label keeps its score; a lone mask is untouched.
    assert out[order[0]] == pytest.approx(scores[order[0]].item())
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(masks, labels, scores, kernel="box")


def test_voxel_overlap_is_containment_on_the_grid():
    pts_a = torch.tensor([[0.05, 0.05, 0.05], [0.15, 0.05, 0.05], [0.55, 0.05, 0.05]])
    pts_b = torch.tensor([[0.06, 0.02, 0.01], [0.95, 0.05, 0.05]])
    masks_a = torch.tensor([[True, True, False], [False, False, True], [False, False, False]])
    masks_b = torch.tensor([[True, False], [True, True]])
    out = voxel_overlap(masks_a, pts_a, masks_b, pts_b, 0.1)
    # a0 = voxels {0, 1}, a1 = {5}, a2 = {}; b0 = {0}, b1 = {0, 9}
    assert out.tolist() == [[1.0, 0.5], [0.0, 0.0], [0.0, 0.0]]


# ---------------------------------------------------------------------------------------------
# Targets and seeds
# ---------------------------------------------------------------------------------------------

def test_frame_target_matches_definitions(scene):
    frame = scene.frames[2]
    seeds = torch.tensor([0, 3, 5, 3, 7])
    t = frame_target(frame, scene.instance_labels, seeds)
    present = sorted(set(frame.instance[frame.instance >= 0].tolist()))
    assert t.global_ids.tolist() == present
    assert t.labels.tolist() == [0] * len(present)
    for i in range(frame.num_points):  # local ids index the present instances
        g = int(frame.instance[i])
        assert int(t.instance_ids[i]) == (present.index(g) if g >= 0 else -1)
    for k, g in enumerate(present):  # boxes of each instance's points
        pts = frame.points[frame.instance == g]
        lo, hi = pts.min(0).values, pts.max(0).values
        assert torch.allclose(t.boxes[k], torch.cat([(lo + hi) / 2, hi - lo]))
    # query_masks[k, j]: the seed superpoint of query j belongs to instance k (majority of points)
    for j, s in enumerate(seeds.tolist()):
        members = t.instance_ids[frame.superpoints == s]
        owner = -1
        for k in range(len(present)):
            if (members == k).sum() * 2 > members.numel():
                owner = k
        for k in range(len(present)):
            assert bool(t.query_masks[k, j]) == (owner == k)


def test_frame_target_class_aware_labels(scene):
    frame = scene.frames[0]
    things = tuple(range(2, 12))
    t = frame_target(frame, scene.instance_labels, thing_classes=things)
    want = [things.index(int(scene.instance_labels[g])) for g in t.global_ids.tolist()]
    assert t.labels.tolist() == want
    with pytest.raises(ValueError, match="thing_classes"):
        frame_target(frame, scene.instance_labels, thing_classes=(99,))


def test_frame_target_without_instances(scene):
    frame = scene.frames[0]
    frame = dataclasses.replace(frame, instance=torch.full_like(frame.instance, -1))
    t = frame_target(frame, scene.instance_labels, torch.arange(4))
    assert t.num_instances == 0 and t.query_masks.shape == (0, 4) and t.boxes.shape == (0, 6)


def test_sample_seeds(scene, sparse_scene):
    model = _model()
    g = torch.Generator().manual_seed(0)
    for frame in [*scene.frames, *sparse_scene.frames]:
        x = prepare_frame(frame, model.config)
        s = model.sample_seeds(x, generator=g)
        assert s.shape == (8,) and int(s.min()) >= 0 and int(s.max()) < x.num_superpoints
        if x.num_superpoints >= 8:
            assert s.unique().numel() == 8  # without replacement while there are enough
        else:
            assert s.unique().numel() == x.num_superpoints
        assert torch.equal(model.sample_seeds(x), torch.arange(x.num_superpoints))
        capped = model.sample_seeds(x, num_queries=3)
        assert capped.numel() == min(3, x.num_superpoints)
        assert capped.unique().numel() == capped.numel()


# ---------------------------------------------------------------------------------------------
# Forward, losses, gradients
# ---------------------------------------------------------------------------------------------

def test_outputs_have_the_documented_shapes(scene):
    model = _model()
    inputs, seeds, pred, outs, _ = _run(model, scene)
    assert isinstance(pred, SequencePrediction) and pred.num_frames == 3
    assert len(pred.match_logits) == 2 and len(pred.tdt_features) == 3
    for x, s, f in zip(inputs, seeds, pred.frames):
        assert isinstance(f, FramePrediction) and len(f.layers) == 4
        assert [l.mask_level for l in f.layers] == ["superpoint", "superpoint", "point", "point"]
        for layer in f.layers:
            assert isinstance(layer, LayerOutput)
            n = x.num_superpoints if layer.mask_level == "superpoint" else x.num_points
            assert layer.mask_logits.shape == (8, n)
            assert layer.cls_logits.shape == (8, 2)
            assert bool(((layer.scores >= 0) & (layer.scores <= 1)).all())
            assert bool((layer.box_preds[:, 3:] > 0).all())
            assert torch.equal(layer.query_centers, x.sp_centroids[s])
        assert f.semantic_logits.shape == (x.num_superpoints, 12)
        assert torch.allclose(f.merge_features.norm(dim=1), torch.ones(8), atol=1e-5)
        assert f.fused_global.shape == f.clip_global.shape and f.fused_global.shape[1] == 8
        assert 1 <= f.fused_global.shape[0] <= 4
    assert pred.match_logits[0].shape == (8, 8)


@pytest.mark.parametrize("preset", ["esam", "seed"])
def test_criterion_is_finite_on_model_outputs(scene, preset):
    model = _model()
    _, _, pred, _, targets = _run(model, scene)
    cfg = (esam_preset if preset == "esam" else seed_preset)(num_semantic_classes=12)
    cfg.cross_frame.consistency = "matched"
    losses = sequence_losses(ESAMCriterion(cfg), [pred], [targets])
    for key in ("loss", "loss_cls", "loss_bce", "loss_dice", "loss_score", "loss_bbox",
                "loss_sem", "loss_clip", "loss_match", "loss_cons"):
        assert key in losses and torch.isfinite(losses[key]), key
    assert any(k.startswith("loss_merge") for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_every_parameter_receives_a_gradient(scene):
    model = _model()
    _, _, pred, _, targets = _run(model, scene)
    cfg = esam_preset(num_semantic_classes=12)
    cfg.cross_frame.consistency = "matched"
    cfg.score_iou_threshold = None  # an untrained model has no pair with mask IoU > 0.5
    sequence_losses(ESAMCriterion(cfg), [pred], [targets])["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    zero = [n for n, p in model.named_parameters()
            if p.grad is not None and float(p.grad.abs().sum()) == 0.0]
    assert not missing, missing
    assert not zero, zero
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_frame_without_instances_keeps_losses_finite(scene):
    model = _model()
    frames = [dataclasses.replace(f, instance=torch.full_like(f.instance, -1)) if i == 1 else f
              for i, f in enumerate(scene.frames)]
    empty = dataclasses.replace(scene, frames=frames)
    _, _, pred, _, targets = _run(model, empty)
    losses = sequence_losses(ESAMCriterion(esam_preset(num_semantic_classes=12)), [pred], [targets])
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()


def test_with_query_masks_shares_the_target(scene):
    frame = scene.frames[1]
    base = frame_target(frame, scene.instance_labels)
    assert base.query_masks is None
    base.superpoint_masks()  # fill the cache once
    seeded = with_query_masks(base, torch.tensor([1, 4, 4, 0]))
    assert seeded.query_masks.shape == (base.num_instances, 4)
    assert seeded.instance_ids is base.instance_ids and seeded._cache is base._cache
    assert torch.equal(seeded.query_masks[:, 1], seeded.query_masks[:, 2])  # same seed
    bare = FrameTarget(labels=base.labels, instance_ids=base.instance_ids)
    with pytest.raises(ValueError, match="sp_instance_ids"):
        with_query_masks(bare, torch.tensor([0]))


def test_forward_rejects_bad_inputs(scene):
    model = _model()
    x = prepare_frame(scene.frames[0], model.config)
    with pytest.raises(ValueError, match="seeds"):
        model.forward_frame(x, torch.tensor([0, x.num_superpoints]))
    with pytest.raises(ValueError, match="frames, seeds"):
        model([x], [])
    with pytest.raises(ValueError, match="frame"):
        prepare_frame(x, model.config)


def test_config_validation():
    with pytest.raises(ValueError, match="mask_pred_mode"):
        ReferenceModelConfig(mask_pred_mode=("SP", "P"))
    with pytest.raises(ValueError, match="d_model"):
        ReferenceModelConfig(d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="unknown keys"):
        ReferenceModelConfig.from_dict({"width": 3})
    cfg = ReferenceModelConfig(**TINY)
    assert ReferenceModelConfig.from_dict(cfg.to_dict()) == cfg


def test_without_optional_branches(scene):
    model = _model(use_tdt=False, clip_branch=False, semantic_level="point")
    _, _, pred, _, _ = _run(model, scene)
    assert pred.match_logits is None and pred.tdt_features is None
    assert all(f.fused_global is None for f in pred.frames)
    assert pred.frames[0].semantic_logits.shape == (scene.frames[0].num_points, 12)


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"merge_similarity": "iou", "nms": "none"},
                                     {"nms_iou": None, "merge_similarity": "distance"}])
def test_predict_merges_frames(scene, options):
    model = _model().eval()
    inputs = [prepare_frame(f, model.config) for f in scene.frames]
    out = model.predict(inputs, InferenceConfig(score_threshold=0.0, min_points=1, **options))
    n_seen = sum(x.num_points for x in inputs)
    k = out.masks.shape[0]
    assert out.masks.shape == (k, n_seen) and out.scores.shape == (k,) and out.labels.shape == (k,)
    assert out.global_ids.shape == (n_seen,) and out.semantic.shape == (n_seen,)
    assert int(out.global_ids.min()) >= 0 and int(out.global_ids.max()) <= k
    # A point with a global id lies in that instance's mask.
    covered = out.global_ids > 0
    assert bool(out.masks[out.global_ids[covered] - 1, covered.nonzero().squeeze(1)].all())
    for x, f in zip(inputs, out.frames):
        p = f["masks"].shape[0]
        assert f["masks"].shape == (p, x.num_points) and p <= 40
        assert bool((f["scores"][:-1] >= f["scores"][1:]).all())  # sorted by score
    assert k >= max(f["masks"].shape[0] for f in out.frames)
    if options.get("nms_iou", 0.5) is not None:  # no two kept masks of a frame overlap > 0.5
        for f in out.frames:
            m = f["masks"]
            for i in range(m.shape[0]):
                for j in range(i + 1, m.shape[0]):
                    assert _iou(m[i], m[j]) <= 0.5
    with pytest.raises(ValueError, match="merge_similarity"):
        InferenceConfig(merge_similarity="boxes")


def test_predict_score_threshold_drops_everything(scene):
    model = _model().eval()
    inputs = [prepare_frame(f, model.config) for f in scene.frames]
    out = model.predict(inputs, InferenceConfig(score_threshold=1.0))
    assert out.masks.shape == (0, sum(x.num_points for x in inputs))
    assert int(out.global_ids.max()) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_outputs_on_cuda(scene):
    model = _model().eval()
    inputs = [prepare_frame(f, model.config) for f in scene.frames]
    seeds = [model.sample_seeds(x) for x in inputs]
    cpu, _ = model(inputs, seeds)
    gpu, _ = model.to("cuda")([x.to("cuda") for x in inputs], [s.cuda() for s in seeds])
    assert gpu.frames[0].final.mask_logits.is_cuda
    assert torch.allclose(cpu.frames[0].final.mask_logits, gpu.frames[0].final.mask_logits.cpu(),
                          atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------

def test_superpoint_baseline_is_one_instance_per_superpoint():
    sp = torch.tensor([3, 3, 5, 9, 5, 3])
    out = superpoint_instances(torch.zeros(6, 3), sp)
    assert out["masks"].tolist() == [[True, True, False, False, False, True],
                                     [False, False, True, False, True, False],
                                     [False, False, False, True, False, False]]
    assert torch.allclose(out["scores"], torch.tensor([1.0, 2 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="superpoints"):
        superpoint_instances(torch.zeros(6, 3), sp[:5])


def test_components_baseline_separates_two_objects():
    g = torch.Generator().manual_seed(0)
    floor = torch.cat([torch.rand(2000, 2, generator=g) * 4, torch.zeros(2000, 1)], 1)
    wall = torch.cat([torch.zeros(500, 1), torch.rand(500, 1, generator=g) * 4,
                      torch.rand(500, 1, generator=g) * 2.5], 1)
    cube_a = torch.rand(400, 3, generator=g) * 0.4 + torch.tensor([1.0, 1.0, 0.1])
    cube_b = torch.rand(400, 3, generator=g) * 0.4 + torch.tensor([2.5, 2.5, 0.1])
    top = torch.cat([torch.rand(100, 2, generator=g) * 4, torch.full((100, 1), 2.5)], 1)
    points = torch.cat([floor, wall, cube_a, cube_b, top])
    out = connected_components(points)
    assert out["masks"].shape[0] == 2
    a = torch.zeros(points.shape[0], dtype=torch.bool)
    a[2500:2900] = True
    ious = [(m & a).sum() / (m | a).sum() for m in out["masks"]]
    assert max(ious) > 0.8
    assert connected_components(torch.zeros(0, 3))["masks"].shape == (0, 0)
    assert connected_components(floor)["masks"].shape == (0, 2000)  # only a plane: nothing left
    none = superpoint_instances(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert none["masks"].shape == (0, 0)
