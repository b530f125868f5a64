"""The sequence form of ESAMCriterion: per-frame terms, cross-frame loss, merge losses."""

import pytest
import torch

from esam.config import esam_preset, seed_preset
from esam.losses import ESAMCriterion
from esam.losses.cross_frame import CrossFrameCriterion
from esam.losses.merge import ScanNetMergeCriterion_Fast
from esam.structures import (FramePrediction, FrameTarget, LayerOutput, SequencePrediction,
                             SequenceTarget)


def make_sequence(v=3, q=8, n=120, s=16, scene_instances=4, d=8, seed=0, present=None,
                  empty_frame=None):
    """A random sequence; ``present[f]`` lists the global ids visible in frame f."""
    g = torch.Generator().manual_seed(seed)
    frames, targets = [], []
    for f in range(v):
        nf = 0 if f == empty_frame else n
        ids_present = (present[f] if present is not None else
                       sorted(torch.randperm(scene_instances, generator=g)[:3].tolist()))
        k = len(ids_present)
        ids = torch.randint(-1, k, (nf,), generator=g) if k else torch.full((nf,), -1)
        layers = [LayerOutput(torch.randn(q, 2, generator=g), torch.randn(q, s, generator=g),
                              "superpoint", torch.rand(q, generator=g),
                              torch.rand(q, 6, generator=g), torch.randn(q, 3, generator=g)),
                  LayerOutput(torch.randn(q, 2, generator=g), torch.randn(q, nf, generator=g) * 3,
                              "point", torch.rand(q, generator=g), torch.rand(q, 6, generator=g),
                              torch.randn(q, 3, generator=g))]
        for layer in layers:
            for t in (layer.cls_logits, layer.mask_logits, layer.scores, layer.box_preds):
                t.requires_grad_()
        frames.append(FramePrediction(
            layers, semantic_logits=torch.randn(nf, 5, generator=g),
            query_features=torch.randn(q, d, generator=g),
            merge_features=torch.randn(q, d, generator=g).requires_grad_()))
        targets.append(FrameTarget(
            labels=torch.zeros(k, dtype=torch.long), instance_ids=ids,
            superpoints=torch.randint(0, s, (nf,), generator=g), num_superpoints=s,
            semantic=torch.randint(0, 6, (nf,), generator=g), boxes=torch.rand(k, 6, generator=g),
            query_masks=torch.rand(k, q, generator=g) > 0.6,
            global_ids=torch.tensor(ids_present, dtype=torch.long),
            points=torch.rand(nf, 3, generator=g) * 2))
    match = [torch.randn(q, q, generator=g).requires_grad_() for _ in range(v - 1)]
    feats = [torch.randn(q, d, generator=g).requires_grad_() for _ in range(v)]
    return SequencePrediction(frames, match, feats), SequenceTarget(targets)


def _batch(n=2, **kw):
    pairs = [make_sequence(seed=i, **kw) for i in range(n)]
    return [p for p, _ in pairs], [t for _, t in pairs]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_frame_terms_are_summed_or_averaged_over_frames(reduction):
    preds, targets = _batch()
    cfg = esam_preset(5, 1)
    cfg.frame_reduction = reduction
    crit = ESAMCriterion(cfg)
    out = crit(preds, targets)
    v = preds[0].num_frames
    expected = {}
    for f in range(v):
        single = crit([p.frames[f] for p in preds], [t.frames[f] for t in targets])
        for k, val in single.items():
            expected[k] = expected.get(k, 0.0) + val.item()
    for k in ("loss_cls", "loss_bce", "loss_dice_0", "loss_sem", "loss_bbox"):
        want = expected[k] / (v if reduction == "mean" else 1)
        assert out[k].item() == pytest.approx(want, rel=1e-6), k


def test_cross_frame_term_equals_the_criterion_applied_directly():
    preds, targets = _batch()
    cfg = seed_preset(5, 1)
    crit = ESAMCriterion(cfg)
    out = crit(preds, targets)
    cf = CrossFrameCriterion()
    vals = []
    for p, t in zip(preds, targets):
        g = cf.build_targets(mask_logits=[f.final.mask_logits.detach() for f in p.frames],
                             points=[ft.points for ft in t.frames])
        vals.append(cf(p.match_logits, p.tdt_features, g))
    for k in ("loss_match", "loss_cons"):
        assert out[k].item() == pytest.approx(torch.stack([d[k] for d in vals]).mean().item())


def test_instance_identity_targets_come_from_the_final_matching():
    preds, targets = _batch()
    cfg = seed_preset(5, 1)
    cfg.cross_frame.gt_source = "instance"
    out = ESAMCriterion(cfg)(preds, targets)
    assert torch.isfinite(out["loss_match"])


def test_fast_merge_term_matches_the_released_layout():
    present = [[0, 1, 2], [1, 2, 3], [0, 3]]  # instance 0 absent from frame 1, 3 from frame 0
    preds, targets = _batch(present=present)
    out = ESAMCriterion(esam_preset(5, 1))(preds, targets)
    feats = [[f.merge_features for f in p.frames] for p in preds]
    ins = []
    for t in targets:
        per_frame = []
        for f, ft in enumerate(t.frames):
            local = {g: k for k, g in enumerate(ft.global_ids.tolist())}
            per_frame.append([ft.query_masks[local[g]].nonzero().flatten() if g in local
                              else torch.empty(0, dtype=torch.long) for g in range(4)])
        ins.append(per_frame)
    ref = ScanNetMergeCriterion_Fast()(feats, ins)
    assert out["loss_merge_tmp"].item() == pytest.approx(ref["loss_merge_tmp"].item())
    assert out["loss_merge_p2s"].item() == pytest.approx(ref["loss_merge_p2s"].item())


@pytest.mark.parametrize("preset", ["seed", "esam"])
def test_every_input_gets_a_gradient_and_values_are_finite(preset):
    preds, targets = _batch()
    out = ESAMCriterion(preset_cfg(preset))(preds, targets)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    p = preds[0]
    assert p.match_logits[0].grad is not None and p.tdt_features[1].grad is not None
    assert p.frames[0].final.mask_logits.grad is not None
    if preset == "esam":  # the contrastive merge losses train the merge embedding
        assert p.frames[0].merge_features.grad is not None
    else:  # the seed's per-point CE trains the masks; the merge decides only without gradient
        assert p.frames[0].merge_features.grad is None


def preset_cfg(name):
    return seed_preset(5, 1) if name == "seed" else esam_preset(5, 1)


def test_seed_merge_ce_rewards_consistent_predictions():
    # two frames seeing the same object: queries whose masks equal the GT give a lower L_merge
    # than random masks
    torch.manual_seed(0)
    n, q = 60, 4
    pts = torch.rand(n, 3)
    ids = torch.cat([torch.zeros(30, dtype=torch.long), torch.full((30,), -1)])

    def frame(masks):
        layer = LayerOutput(torch.tensor([[4.0, -4.0]] * q), masks, "point")
        return FramePrediction([layer], merge_features=torch.ones(q, 3))

    def target():
        return FrameTarget(labels=torch.zeros(1, dtype=torch.long), instance_ids=ids,
                           global_ids=torch.tensor([7]), points=pts,
                           boxes=torch.zeros(1, 6))
    good = torch.full((q, n), -6.0)
    good[0, :30] = 6.0
    bad = torch.randn(q, n) * 3
    cfg = seed_preset(5, 1)
    cfg.loss_weight.sem = 0
    cfg.box_loss = None
    crit = ESAMCriterion(cfg)
    lg = crit([SequencePrediction([frame(good), frame(good)])],
              [SequenceTarget([target(), target()])])["loss_merge"]
    lb = crit([SequencePrediction([frame(bad), frame(bad)])],
              [SequenceTarget([target(), target()])])["loss_merge"]
    assert lg < lb
    assert lg.item() < 0.05


def test_one_frame_gives_zero_cross_frame_terms_with_graph():
    preds, targets = _batch(v=1)
    out = ESAMCriterion(seed_preset(5, 1))(preds, targets)
    assert out["loss_match"].item() == 0.0 and out["loss_cons"].item() == 0.0
    out["loss"].backward()
    assert preds[0].tdt_features[0].grad is not None


def test_no_instances_and_an_empty_frame_stay_finite():
    preds, targets = _batch(present=[[], [], []])
    for preset in ("seed", "esam"):
        out = ESAMCriterion(preset_cfg(preset))(preds, targets)
        assert all(torch.isfinite(v) for v in out.values()), preset
    preds, targets = _batch(empty_frame=1)
    for preset in ("seed", "esam"):
        out = ESAMCriterion(preset_cfg(preset))(preds, targets)
        assert all(torch.isfinite(v) for v in out.values()), preset


def test_sequence_errors_are_clear():
    preds, targets = _batch()
    short, short_t = make_sequence(v=2)
    with pytest.raises(ValueError, match="same number of frames"):
        ESAMCriterion(seed_preset(5, 1))([preds[0], short], [targets[0], short_t])
    with pytest.raises(ValueError, match=r"targets\[1\]: expected 2 frames"):
        ESAMCriterion(seed_preset(5, 1))([preds[0], short], targets)
    with pytest.raises(ValueError, match="match_logits"):
        SequencePrediction(preds[0].frames, preds[0].match_logits[:1], None)
    t = targets[0]
    for ft in t.frames:
        ft.points = None
    with pytest.raises(ValueError, match="points"):
        ESAMCriterion(seed_preset(5, 1))([preds[0]], [t])
