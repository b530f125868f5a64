import math

import pytest
import torch

from esam.config import esam_preset, seed_preset
from esam.losses import (ESAMCriterion, HungarianMatcher, InstanceCriterion, MaskBCECost,
                         MaskDiceCost, MixedInstanceCriterion, QueryClassificationCost)
from esam.losses.criterion import build_instance_criterion
from esam.structures import FramePrediction, FrameTarget, LayerOutput

import loops


def _costs():
    return [QueryClassificationCost(0.5), MaskBCECost(1.0), MaskDiceCost(1.0)]


def make_batch(specs, *, c=3, seed=0, dtype=torch.float64, levels=("point",), s=12,
               empty_masks=False, scale=2.0):
    """specs: list of (Q, K, N) per sample."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for q, k, n in specs:
        sp = torch.randint(0, s, (n,), generator=g)
        ids = torch.randint(-1, k, (n,), generator=g) if k else torch.full((n,), -1)
        if empty_masks:
            ids = torch.full((n,), -1)
        layers = []
        for level in levels:
            p = n if level == "point" else s
            layers.append(LayerOutput(
                cls_logits=torch.randn(q, c + 1, generator=g, dtype=dtype) * scale,
                mask_logits=torch.randn(q, p, generator=g, dtype=dtype) * scale,
                mask_level=level,
                scores=torch.rand(q, 1, generator=g, dtype=dtype),
                box_preds=torch.cat([torch.randn(q, 3, generator=g, dtype=dtype) * 0.1,
                                     torch.rand(q, 3, generator=g, dtype=dtype) + 0.5], 1),
                query_centers=torch.randn(q, 3, generator=g, dtype=dtype)))
        preds.append(FramePrediction(layers))
        boxes = torch.cat([torch.randn(k, 3, generator=g, dtype=dtype),
                           torch.rand(k, 3, generator=g, dtype=dtype) + 0.5], 1)
        targets.append(FrameTarget(
            labels=torch.randint(0, c, (k,), generator=g), instance_ids=ids, superpoints=sp,
            num_superpoints=s, boxes=boxes,
            query_masks=torch.rand(k, q, generator=g) > 0.4))
    return preds, targets


def _loop_samples(preds, targets, indices):
    out = []
    for p, t, (qi, ki) in zip(preds, targets, indices):
        layer = p.final
        out.append(dict(cls=layer.cls_logits, masks=layer.mask_logits,
                        scores=layer.scores.reshape(-1), boxes=layer.boxes(),
                        gt_ids=t.instance_ids, labels=t.labels, gt_boxes=t.boxes,
                        pairs=list(zip(qi.tolist(), ki.tolist()))))
    return out


@pytest.mark.parametrize("specs", [[(6, 3, 20), (5, 4, 17)], [(3, 5, 15)], [(4, 0, 10), (4, 2, 9)]])
@pytest.mark.parametrize("no_object_weight", [1.0, 0.1])
def test_seed_normalisation_matches_loop(specs, no_object_weight):
    preds, targets = make_batch(specs, seed=len(specs))
    crit = MixedInstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=3,
                                  normalization="seed", dice_form="seed", box_loss="l1",
                                  no_object_weight=no_object_weight, aux_loss=False)
    terms, idx = crit.compute(preds, targets)
    ref = loops.instance_terms_seed(_loop_samples(preds, targets, idx), dice_form="seed",
                                    no_object_weight=no_object_weight, num_classes=3)
    for name in ("cls", "bce", "dice", "score", "bbox"):
        assert terms[f"loss_{name}"].item() == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name
    w = crit.weights
    expected = sum(getattr(w, n) * ref[n] for n in ("cls", "bce", "dice", "score", "bbox"))
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-9)


def test_matched_normalisation_matches_loop():
    preds, targets = make_batch([(6, 3, 20), (5, 4, 17), (4, 0, 8)], seed=11)
    crit = InstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=3,
                             normalization="matched", dice_form="esam", aux_loss=False,
                             no_object_weight=0.1)
    terms, idx = crit.compute(preds, targets)
    bce = dice = 0.0
    m = 0
    ce = wsum = 0.0
    for p, t, (qi, ki) in zip(preds, targets, idx):
        g = loops.dense_masks(t.instance_ids, len(t.labels))
        n = t.num_points
        tgt = [3] * p.final.num_queries
        for j, k in zip(qi.tolist(), ki.tolist()):
            xs = p.final.mask_logits[j].tolist()
            bce += sum(loops.bce(xs[i], g[k][i]) for i in range(n)) / n
            dice += loops.dice([loops.sigmoid(v) for v in xs], g[k], "esam")
            m += 1
            tgt[j] = int(t.labels[k])
        for j in range(p.final.num_queries):
            w = 0.1 if tgt[j] == 3 else 1.0
            ce += w * loops.cross_entropy(p.final.cls_logits[j].tolist(), tgt[j])
            wsum += w
    assert terms["loss_bce"].item() == pytest.approx(bce / m)
    assert terms["loss_dice"].item() == pytest.approx(dice / m)
    assert terms["loss_cls"].item() == pytest.approx(ce / wsum)


def test_ids_and_dense_targets_give_the_same_loss():
    preds, targets = make_batch([(6, 3, 20), (5, 4, 17)], seed=3, levels=("superpoint", "point"))
    dense_targets = [FrameTarget(labels=t.labels, instance_masks=t.point_masks().to_dense(),
                                 superpoints=t.superpoints, num_superpoints=t.num_superpoints,
                                 boxes=t.boxes, query_masks=t.query_masks) for t in targets]
    crit = ESAMCriterion(seed_preset(num_semantic_classes=4, num_instance_classes=3))
    crit.semantic = None
    a, b = crit(preds, targets), crit(preds, dense_targets)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_aux_layers_are_suffixed_and_rematched():
    preds, targets = make_batch([(6, 3, 20)], seed=4, levels=("superpoint", "point", "point"))
    crit = InstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=3)
    out = crit(preds, targets)
    assert {"loss_cls", "loss_cls_0", "loss_cls_1", "loss_dice_1", "loss"} <= out.keys()
    # an auxiliary layer equal to the final one gives the same terms
    p = preds[0]
    twin = FramePrediction([p.final, p.final])
    out2 = crit([twin], targets)
    for name in ("cls", "bce", "dice", "score"):
        torch.testing.assert_close(out2[f"loss_{name}_0"], out2[f"loss_{name}"])


def test_iter_matcher_off_reuses_final_assignment():
    preds, targets = make_batch([(6, 3, 20)], seed=5, levels=("point", "point"))
    on = InstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=3, iter_matcher=True)
    off = InstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=3, iter_matcher=False)
    _, idx = off.compute(preds, targets)
    aux_only = [FramePrediction([p.layers[0]]) for p in preds]
    forced, _ = on.compute(aux_only, targets, indices=idx)
    assert off(preds, targets)["loss_bce_0"].item() == pytest.approx(forced["loss_bce"].item())


def test_no_gt_anywhere_is_finite_with_gradients():
    preds, targets = make_batch([(5, 0, 10), (4, 0, 8)], seed=6, dtype=torch.float32)
    for p in preds:
        for layer in p.layers:
            layer.mask_logits.requires_grad_()
            layer.cls_logits.requires_grad_()
    for cfg in (seed_preset(4, 3), esam_preset(4, 3)):
        crit = build_instance_criterion(cfg)
        out = crit(preds, targets)
        assert all(torch.isfinite(v) for v in out.values())
        out["loss"].backward()
        assert preds[0].final.cls_logits.grad is not None
        assert preds[0].final.mask_logits.grad is not None


def test_listed_but_absent_gt_instances_stay_finite_under_esam():
    # every GT mask is empty: the sparse matcher finds nothing (released code: NaN)
    preds, targets = make_batch([(5, 3, 10), (4, 2, 8)], seed=7, empty_masks=True,
                                dtype=torch.float32)
    for t in targets:
        t.query_masks = torch.zeros_like(t.query_masks)
    crit = build_instance_criterion(esam_preset(4, 3))
    out = crit(preds, targets)
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss_bce"].item() == 0.0


def test_more_gt_than_queries():
    preds, targets = make_batch([(3, 7, 25)], seed=8)
    crit = InstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=3)
    terms, idx = crit.compute(preds, targets)
    assert len(idx[0][0]) == 3
    assert all(torch.isfinite(v) for v in terms.values())


def test_huge_logits_finite():
    preds, targets = make_batch([(6, 3, 20)], seed=9, scale=1e4, dtype=torch.float32)
    for cfg in (seed_preset(4, 3), esam_preset(4, 3)):
        out = build_instance_criterion(cfg)(preds, targets)
        assert all(torch.isfinite(v) for v in out.values()), cfg.normalization


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_autocast_compute_in_fp32(dtype):
    preds, targets = make_batch([(6, 3, 20), (5, 2, 11)], seed=10, dtype=torch.float32)
    crit = build_instance_criterion(esam_preset(4, 3))
    ref = crit(preds, targets)
    half = [FramePrediction([LayerOutput(
        l.cls_logits.to(dtype), l.mask_logits.to(dtype), l.mask_level, l.scores.to(dtype),
        l.box_preds.to(dtype), l.query_centers.to(dtype)) for l in p.layers]) for p in preds]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(half, targets)
    for k in ref:
        assert out[k].dtype == torch.float32
        assert torch.isfinite(out[k])
        assert out[k].item() == pytest.approx(ref[k].item(), rel=0.05, abs=0.02), k


def test_gradcheck_criterion_float64():
    preds, targets = make_batch([(3, 2, 6)], seed=12, scale=1.0)
    layer = preds[0].final
    crit = MixedInstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=3, box_loss="giou")
    _, idx = crit.compute(preds, targets)

    def f(cls, masks, scores, boxes):
        p = FramePrediction([LayerOutput(cls, masks, "point", scores, boxes, layer.query_centers)])
        return crit.compute([p], targets, indices=idx)[0]["loss"]

    inputs = tuple(t.detach().clone().requires_grad_() for t in
                   (layer.cls_logits, layer.mask_logits, layer.scores, layer.box_preds))
    assert torch.autograd.gradcheck(f, inputs)


def test_bad_inputs_raise_clear_errors():
    preds, targets = make_batch([(4, 2, 10)], seed=13)
    crit = InstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=2)
    with pytest.raises(ValueError, match="cls_logits"):
        crit(preds, targets)  # C+1 = 4 columns but num_classes=2
    crit3 = MixedInstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=3)
    bad = [FrameTarget(labels=torch.tensor([0, 5]), instance_ids=targets[0].instance_ids,
                       boxes=targets[0].boxes)]
    with pytest.raises(ValueError, match="labels"):
        crit3(preds, bad)
    nobox = [FrameTarget(labels=targets[0].labels, instance_ids=targets[0].instance_ids)]
    with pytest.raises(ValueError, match="boxes"):
        crit3(preds, nobox)
    with pytest.raises(ValueError, match="targets"):
        crit3(preds, targets + targets)
    with pytest.raises(ValueError, match="mask_logits"):
        LayerOutput(torch.zeros(3, 4), torch.zeros(2, 10))
    with pytest.raises(ValueError, match="instance_ids"):
        FrameTarget(labels=torch.tensor([0]), instance_ids=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="normalization"):
        InstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=2, normalization="avg")


def test_ordering_good_prediction_has_lower_loss():
    preds, targets = make_batch([(4, 2, 30)], seed=14)
    t = targets[0]
    good = preds[0].final
    masks = torch.full_like(good.mask_logits, -8.0)
    for k in range(2):
        masks[k] = torch.where(t.instance_ids == k, 8.0, -8.0)
    cls = torch.full_like(good.cls_logits, -5.0)
    cls[0, int(t.labels[0])] = cls[1, int(t.labels[1])] = 5.0
    cls[2:, -1] = 5.0
    perfect = FramePrediction([LayerOutput(cls, masks, "point")])
    crit = InstanceCriterion(matcher=HungarianMatcher(_costs()), num_classes=3,
                             weights={"score": 0.0})
    assert crit([perfect], targets)["loss"] < crit([FramePrediction([good])], targets)["loss"]
    assert crit([perfect], targets)["loss_bce"].item() < 1e-3
    assert math.isfinite(crit([perfect], targets)["loss"].item())
