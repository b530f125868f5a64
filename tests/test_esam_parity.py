"""The `esam` preset against a plain port of the released ESAM code (benchmarks/released_reference)."""

import pytest
import torch

from benchmarks.released_reference import (released_instance_loss, released_mixed_instance_loss,
                                           released_semantic_loss)
from esam.config import esam_preset
from esam.losses import ESAMCriterion
from esam.losses.criterion import build_instance_criterion
from esam.structures import FramePrediction, FrameTarget, LayerOutput

from test_instance import make_batch

MODE = {"point": "P", "superpoint": "SP"}


def to_released(preds, targets):
    def layer_dict(layers):
        return {"cls_preds": [l.cls_logits for l in layers],
                "scores": [l.scores for l in layers],
                "masks": [l.mask_logits for l in layers],
                "bboxes": [l.box_preds for l in layers],
                "centers": [l.query_centers for l in layers]}
    n = len(preds[0].layers)
    pred = layer_dict([p.final for p in preds])
    pred["aux_outputs"] = [layer_dict([p.layers[i] for p in preds]) for i in range(n - 1)]
    modes = [MODE[preds[0].layers[i].mask_level] for i in range(n - 1)]
    insts = [{"labels_3d": t.labels, "sp_masks": t.superpoint_masks().to_dense(),
              "p_masks": t.point_masks().to_dense(), "bboxes_3d": t.boxes,
              "query_masks": t.query_masks} for t in targets]
    return pred, insts, modes


SPECS = [
    [(24, 5, 120), (20, 4, 90), (16, 6, 100), (22, 3, 80)],
    [(30, 6, 150), (25, 0, 60)],
    [(12, 4, 70)],
]


@pytest.mark.parametrize("specs", SPECS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixed_instance_criterion_equals_released(specs, dtype):
    preds, targets = make_batch(specs, seed=len(specs), dtype=dtype, c=1, s=20,
                                levels=("superpoint", "superpoint", "point", "point"))
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=1)
    ours = build_instance_criterion(cfg)(preds, targets)["loss"]
    pred, insts, modes = to_released(preds, targets)
    ref = released_mixed_instance_loss(pred, insts, modes)
    assert torch.isfinite(ref)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert ours.item() == pytest.approx(ref.item(), rel=tol)


@pytest.mark.parametrize("iter_matcher", [True, False])
@pytest.mark.parametrize("fix_dice,fix_mean", [(True, True), (False, False), (True, False)])
def test_compatibility_switches_equal_released(iter_matcher, fix_dice, fix_mean):
    preds, targets = make_batch([(20, 4, 90), (18, 5, 70), (15, 0, 40)], seed=21, c=1, s=16,
                                levels=("superpoint", "point", "point"))
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=1)
    cfg.iter_matcher = iter_matcher
    cfg.fix_dice_loss_weight = fix_dice
    cfg.fix_mean_loss = fix_mean
    ours = build_instance_criterion(cfg)(preds, targets)["loss"]
    pred, insts, modes = to_released(preds, targets)
    ref = released_mixed_instance_loss(pred, insts, modes, iter_matcher=iter_matcher,
                                       fix_dice_loss_weight=fix_dice, fix_mean_loss=fix_mean)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)


def test_hungarian_multiclass_instance_criterion_equals_released():
    # ESAM's InstanceCriterion: Hungarian, every layer at superpoint level, no boxes, C classes
    preds, targets = make_batch([(14, 4, 60), (12, 3, 50)], seed=22, c=5, s=18,
                                levels=("superpoint", "superpoint", "superpoint"))
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=5)
    cfg.matcher.type = "hungarian"
    cfg.box_loss = None
    cfg.fix_mean_loss = False
    ours = build_instance_criterion(cfg)(preds, targets)["loss"]
    pred, insts, _ = to_released(preds, targets)
    ref = released_instance_loss(pred, insts, num_classes=5, matcher="hungarian",
                                 fix_mean_loss=False)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)


def test_semantic_equals_released_on_superpoints():
    g = torch.Generator().manual_seed(23)
    c, s, n = 6, 15, 200
    preds, targets, sem_preds, sem_masks = [], [], [], []
    for _ in range(3):
        sp = torch.randint(0, s, (n,), generator=g)
        sem = torch.randint(0, c + 1, (n,), generator=g)  # c is unlabeled
        logits = torch.randn(s, c + 1, generator=g, dtype=torch.float64)
        layer = LayerOutput(torch.zeros(2, 2, dtype=torch.float64),
                            torch.zeros(2, n, dtype=torch.float64))
        preds.append(FramePrediction([layer], semantic_logits=logits, semantic_level="superpoint"))
        targets.append(FrameTarget(labels=torch.zeros(0, dtype=torch.long),
                                   instance_ids=torch.full((n,), -1), superpoints=sp,
                                   num_superpoints=s, semantic=sem))
        counts = torch.zeros(c + 1, s).index_put_((sem, sp), torch.ones(n), accumulate=True)
        sem_preds.append(logits)
        sem_masks.append(counts)
    crit = ESAMCriterion(esam_preset(num_semantic_classes=c, num_instance_classes=1))
    ours = crit.semantic(preds, targets)["loss_sem"] * crit.config.loss_weight.sem
    ref = released_semantic_loss(sem_preds, sem_masks, ignore_index=c, loss_weight=0.5)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)


def test_released_nan_case_is_finite_here():
    # a sample lists GT instances but no query is allowed to match them: released -> NaN
    preds, targets = make_batch([(10, 3, 50), (10, 2, 40)], seed=24, c=1, s=12,
                                levels=("superpoint", "point"))
    targets[1].query_masks = torch.zeros_like(targets[1].query_masks)
    pred, insts, modes = to_released(preds, targets)
    assert torch.isnan(released_mixed_instance_loss(pred, insts, modes))
    ours = build_instance_criterion(esam_preset(4, 1))(preds, targets)
    assert all(torch.isfinite(v) for v in ours.values())


@pytest.mark.parametrize("inside_sums", ["gemm", "pairs"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_esam_values_and_gradients_equal_released_with_one_instance_per_query(
        inside_sums, dtype, monkeypatch):
    # ESAM's layout: a query is allowed only for the instance holding its seed superpoint, so
    # the sparse matcher gathers those pairs' members instead of a GEMM per instance
    from esam.losses import matcher as matcher_module
    monkeypatch.setattr(matcher_module, "_PAIR_MODE_MIN_WORK",
                        0 if inside_sums == "pairs" else float("inf"))
    preds, targets = make_batch([(24, 5, 120), (20, 4, 90), (16, 6, 100)], seed=7, dtype=dtype,
                                c=1, s=20, levels=("superpoint", "superpoint", "point", "point"))
    g = torch.Generator().manual_seed(8)
    for t in targets:
        k, q = t.query_masks.shape
        seed_instance = torch.randint(-1, k, (q,), generator=g)
        t.query_masks = seed_instance.unsqueeze(0) == torch.arange(k).unsqueeze(1)
    leaves = [t for p in preds for l in p.layers for t in (l.cls_logits, l.mask_logits, l.scores,
                                                           l.box_preds)]
    for t in leaves:
        t.requires_grad_()
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=1)
    ours = build_instance_criterion(cfg)(preds, targets)["loss"]
    grads = torch.autograd.grad(ours, leaves, allow_unused=True)
    ref = released_mixed_instance_loss(*to_released(preds, targets))
    ref_grads = torch.autograd.grad(ref, leaves, allow_unused=True)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert ours.item() == pytest.approx(ref.item(), rel=tol)
    for a, b in zip(grads, ref_grads):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2)
