"""The sparse matcher's batched path (`esam.losses.rowwise`, `SparseMatcher.match_rows`).

Every query of ESAM may only take the instance of its seed superpoint. The batched path must give
the same assignment, terms and gradients as the general per-sample path, which the loop
references in test_released_reference / test_matcher already pin down.
"""

import math

import pytest
import torch

from esam.config import esam_preset
from esam.losses import MaskBCECost, MaskDiceCost, QueryClassificationCost, SparseMatcher, fused
from esam.losses import InstanceCriterion
from esam.losses.criterion import build_instance_criterion
from esam.losses.matcher import CostTerm
from esam.losses.rowwise import (NO_INSTANCE, RowStats, row_instances, row_stats_torch,
                                 rowwise_mask_losses)
from esam.structures import InstanceMasks

from test_instance import make_batch


def _seeded(targets, seed, none=True):
    """ESAM's query masks: each query may take only one instance (or none)."""
    g = torch.Generator().manual_seed(seed)
    for t in targets:
        k, q = t.query_masks.shape
        owner = torch.randint(-1 if none else 0, max(k, 1), (q,), generator=g)
        t.query_masks = torch.arange(k).unsqueeze(1) == owner.unsqueeze(0)
    return targets


def _args(preds, targets, layer=-1):
    layers = [p.layers[layer] for p in preds]
    return ([l.cls_logits for l in layers], [l.mask_logits for l in layers],
            [t.labels for t in targets], [t.masks(l.mask_level) for l, t in zip(layers, targets)],
            [t.query_masks for t in targets])


def _matcher(topk=1, dice="esam"):
    return SparseMatcher([QueryClassificationCost(0.5, "negative"), MaskBCECost(1.0),
                          MaskDiceCost(1.0, dice)], topk=topk)


SPECS = [
    [(9, 3, 40), (7, 2, 33)],
    [(6, 0, 20), (8, 4, 25), (5, 5, 30)],  # a sample with no GT instance
    [(3, 5, 15)],  # more GT than queries, one sample
    [(12, 4, 0), (10, 3, 18)],  # an empty frame (no points)
    [(1, 1, 9), (4, 1, 9)],
]


@pytest.mark.parametrize("specs", SPECS)
@pytest.mark.parametrize("topk", [1, 2, 5])
@pytest.mark.parametrize("level", ["point", "superpoint"])
def test_match_rows_equals_forward(specs, topk, level):
    for seed in range(4):
        preds, targets = make_batch(specs, seed=seed, levels=(level,), c=2)
        targets = _seeded(targets, seed + 10)
        m = _matcher(topk)
        args = _args(preds, targets)
        expected = m(*args)
        indices, stats, rows = m.match_rows(*args)
        again = m.match_rows(*args, candidates=[row_instances(qm) for qm in args[4]])
        assert all(torch.equal(a[0], b[0]) for a, b in zip(indices, again[0]))
        assert len(indices) == len(expected)
        for (q, k), (eq, ek) in zip(indices, expected):
            assert torch.equal(q, eq) and torch.equal(k, ek)
        assert len(rows) == sum(len(q) for q, _ in indices)


def test_select_topk_equals_its_definition():
    """Loop over the definition: per instance, keep the rows whose cost is strictly below the
    (topk+1)-th smallest cost among its candidates (all of them with at most topk), ties
    included."""
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        k = int(torch.randint(1, 6, (1,), generator=g))
        q = int(torch.randint(1, 15, (1,), generator=g))
        inst = torch.randint(-1, k, (q,), generator=g)
        inst = torch.where(inst < 0, torch.full_like(inst, NO_INSTANCE), inst)
        x = torch.randn(q, 4, dtype=torch.float64)
        masks = InstanceMasks(ids=torch.randint(-1, k, (4,)), num_instances=k)
        stats = RowStats([x], [masks], [inst])
        cost = torch.randint(0, 4, (q,), generator=g).double()  # many ties
        cost[inst < 0] = math.inf
        for topk in (1, 2, 3):
            keep = stats.select_topk(cost, topk)
            for r in range(q):
                if inst[r] < 0:
                    assert not keep[r]
                    continue
                rivals = sorted(float(cost[j]) for j in range(q) if inst[j] == inst[r])
                want = len(rivals) <= topk or float(cost[r]) < rivals[topk]
                assert bool(keep[r]) == want, (trial, topk, r)


def test_row_instances():
    qm = torch.tensor([[True, False, False, False], [False, False, True, False]])
    assert row_instances(qm).tolist() == [0, NO_INSTANCE, 1, NO_INSTANCE]
    qm[1, 0] = True  # query 0 allowed for two instances
    assert row_instances(qm) is None
    assert row_instances(torch.zeros(0, 3, dtype=torch.bool)).tolist() == [NO_INSTANCE] * 3


def _stats_loop(x, ids, inst):
    out = torch.zeros(8, x.shape[0], dtype=torch.float64)
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            v = float(x[r, i])
            q = 1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v))
            m = float(ids[i] == inst[r])
            hit = float(q >= 0.5)
            vals = [max(v, 0) + math.log1p(math.exp(-abs(v))), q, q * q, hit, m * v, m * q,
                    m * hit, v]
            for j, val in enumerate(vals):
                out[j, r] += val
    return out


def _stats_dense(x, ids, inst):
    q = x.sigmoid()
    hit = (q >= 0.5).to(x.dtype)
    m = (ids.unsqueeze(0) == inst.unsqueeze(1)).to(x.dtype)
    return torch.stack([torch.nn.functional.softplus(x).sum(1), q.sum(1), (q * q).sum(1),
                        hit.sum(1), (m * x).sum(1), (m * q).sum(1), (m * hit).sum(1), x.sum(1)])


def test_row_stats_torch_equals_loop_and_fused_kernel():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 37, generator=g, dtype=torch.float64) * 4
    ids = torch.randint(-1, 3, (37,), generator=g)
    inst = torch.tensor([0, 2, NO_INSTANCE, 1, 0])
    torch.testing.assert_close(row_stats_torch(x, ids, inst), _stats_loop(x, ids, inst))
    # column blocks on CPU (more than 2**18 elements): the same sums
    wide = torch.randn(20, 15_000, generator=g, dtype=torch.float64) * 3
    wide_ids = torch.randint(-1, 4, (15_000,), generator=g)
    wide_inst = torch.tensor([0, 1, 2, 3, NO_INSTANCE] * 4)
    torch.testing.assert_close(row_stats_torch(wide, wide_ids, wide_inst),
                               _stats_dense(wide, wide_ids, wide_inst))
    # an instance without positions, and the InstanceMasks form
    masks = InstanceMasks(ids=ids, num_instances=5)
    inst5 = torch.tensor([4, 2, NO_INSTANCE, 1, 0])
    torch.testing.assert_close(row_stats_torch(x, masks, inst5), _stats_loop(x, ids, inst5))
    big = torch.randn(64, 1 << 14, generator=g)
    big_ids = torch.randint(-1, 6, (1 << 14,), generator=g)
    big_inst = torch.randint(-1, 6, (64,), generator=g)
    big_inst[big_inst < 0] = NO_INSTANCE
    kernel = fused.row_stats(big, big_ids, big_inst)
    if kernel is not None:
        ref = row_stats_torch(big.double(), big_ids, big_inst)
        scale = big.double().abs().sum(1).clamp(min=1)
        assert ((kernel.double() - ref).abs() / scale).max() < 1e-6


def _terms_and_grads(preds, targets, cfg, batched, every_layer=True):
    leaves = [t for p in preds for l in p.layers
              for t in (l.cls_logits, l.mask_logits, l.scores, l.box_preds, l.query_centers)]
    for t in leaves:
        t.requires_grad_(True)
        t.grad = None
    crit = build_instance_criterion(cfg)
    used = []
    real = SparseMatcher.match_rows

    def spy(self, *a, **kw):
        out = real(self, *a, **kw) if batched else None
        used.append(out is not None)
        return out

    real_every = InstanceCriterion._every_layer
    every = []

    def spy_every(self, *a):
        out = real_every(self, *a) if every_layer else None
        every.append(out is not None)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SparseMatcher, "match_rows", spy)
        mp.setattr(InstanceCriterion, "_every_layer", spy_every)
        terms = crit(preds, targets)
    terms["loss"].backward()
    assert all(used) if batched else not any(used)
    assert every == [batched and every_layer]  # one call, used where it may be
    return ({k: v.detach() for k, v in terms.items()},
            [t.grad.clone() if t.grad is not None else None for t in leaves])


@pytest.mark.parametrize("dice", ["esam", "seed"])
@pytest.mark.parametrize("normalization", ["esam", "matched", "seed"])
@pytest.mark.parametrize("specs", SPECS)
def test_criterion_batched_equals_general_path(dice, normalization, specs):
    preds, targets = make_batch(specs, seed=5, c=1, s=9,
                                levels=("superpoint", "superpoint", "point", "point"))
    targets = _seeded(targets, seed=6)
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=1)
    cfg.dice_form = cfg.matcher.dice_cost = dice
    cfg.normalization = normalization
    terms_g, grads_g = _terms_and_grads(preds, targets, cfg, batched=False)
    for every_layer in (True, False):  # all layers in one matcher call, or layer by layer
        terms_b, grads_b = _terms_and_grads(preds, targets, cfg, batched=True,
                                            every_layer=every_layer)
        assert terms_b.keys() == terms_g.keys()
        for k in terms_b:
            torch.testing.assert_close(terms_b[k], terms_g[k], rtol=1e-10, atol=1e-12, msg=k)
            assert torch.isfinite(terms_b[k])
        for a, b in zip(grads_b, grads_g):
            if a is None or b is None:
                assert a is None and b is None
                continue
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernels", [True, False])
def test_criterion_batched_on_large_layers_equals_general_path(kernels):
    """A point layer large enough for the fused kernels (float32), with them and without
    (the torch-op statistics in column blocks, the gradient's unwritten rows lazily zero)."""
    preds, targets = make_batch([(64, 6, 1 << 14), (48, 4, 20_000)], seed=7, c=1, s=50,
                                dtype=torch.float32, levels=("superpoint", "point"))
    targets = _seeded(targets, seed=8)
    assert fused.applies(preds[0].layers[-1].mask_logits)
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=1)
    previous = fused.set_enabled(kernels)
    try:
        terms_b, grads_b = _terms_and_grads(preds, targets, cfg, batched=True)
    finally:
        fused.set_enabled(previous)
    terms_g, grads_g = _terms_and_grads(preds, targets, cfg, batched=False)
    for k in terms_b:
        torch.testing.assert_close(terms_b[k], terms_g[k], rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(grads_b, grads_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_batched_mask_losses_gradcheck():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True),
          torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)]
    masks = [InstanceMasks(ids=torch.randint(-1, 3, (11,), generator=g), num_instances=3),
             InstanceMasks(ids=torch.randint(-1, 2, (7,), generator=g), num_instances=2)]
    inst = [torch.tensor([0, 1, NO_INSTANCE, 2, 0]), torch.tensor([1, 0, 0, NO_INSTANCE])]
    rows = torch.tensor([0, 1, 3, 5, 7])
    for form in ("esam", "seed"):
        def f(a, b):
            stats = RowStats([a.detach(), b.detach()], masks, inst)
            bce, dice, _ = rowwise_mask_losses(stats, rows, form, False, [a, b])
            return bce * 1.3 + dice

        assert torch.autograd.gradcheck(f, tuple(xs))


def test_match_rows_declines_what_it_cannot_batch():
    preds, targets = make_batch([(6, 3, 20), (5, 2, 15)], seed=1)
    targets = _seeded(targets, seed=2)
    m = _matcher()
    assert m.match_rows(*_args(preds, targets)) is not None
    # a query allowed for two instances
    qm = targets[0].query_masks.clone()
    qm[:, 0] = True
    args = list(_args(preds, targets))
    args[4] = [qm, targets[1].query_masks]
    assert m.match_rows(*args) is None
    # dense GT masks
    args = list(_args(preds, targets))
    args[3] = [InstanceMasks(dense=args[3][0].to_dense()), args[3][1]]
    assert m.match_rows(*args) is None

    # a cost term with no row form
    class Custom(CostTerm):
        def cost(self, cls_logits, sums, labels):
            return cls_logits[:, :1].expand(-1, len(labels))

    assert SparseMatcher([Custom()]).match_rows(*_args(preds, targets)) is None
    with pytest.raises(ValueError, match=r"query_masks\[1\]"):
        args = list(_args(preds, targets))
        args[4] = [targets[0].query_masks, targets[1].query_masks[:, :2]]
        m.match_rows(*args)


def test_batched_path_huge_logits_and_no_instances():
    preds, targets = make_batch([(8, 3, 30), (6, 0, 12)], seed=4, scale=1e4, c=1,
                                levels=("superpoint", "point"))
    targets = _seeded(targets, seed=5)
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=1)
    terms, grads = _terms_and_grads(preds, targets, cfg, batched=True)
    assert all(torch.isfinite(v) for v in terms.values())
    assert {"loss_dice", "loss_dice_0", "loss_bbox_0", "loss_score_0"} <= terms.keys()
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    # the sample without instances still gets (zero) mask gradients
    assert grads[1 * 10 + 1] is not None


def test_criterion_reports_bad_query_masks_by_sample():
    """The all-layers path declines bad shapes, and the per-layer path names the sample."""
    preds, targets = make_batch([(6, 3, 20), (5, 2, 15)], seed=9, c=1,
                                levels=("superpoint", "point"))
    targets = _seeded(targets, seed=10)
    targets[1].query_masks = targets[1].query_masks[:, :3]  # Q=3 masks for 5 queries
    crit = build_instance_criterion(esam_preset(num_semantic_classes=4, num_instance_classes=1))
    with pytest.raises(ValueError, match=r"query_masks\[1\]: expected shape \(K=2, Q=5\)"):
        crit(preds, targets)


def test_small_layers_sharing_masks_take_one_stacked_statistics_call(monkeypatch):
    """The small layers of one sample share one `fused.row_stats` call on their stacked rows:
    the same sums as a call per layer, and each layer's NaN/Inf check still rides on them."""
    import esam.losses.rowwise as rowwise_module
    monkeypatch.setattr(fused, "_enabled", True)
    g = torch.Generator().manual_seed(3)
    p = 1000
    masks = [InstanceMasks(ids=torch.randint(-1, 4, (p,), generator=g), num_instances=4)
             for _ in range(2)]
    # entries: two layers of sample 0, two of sample 1, in layer-major order
    xs = [torch.randn(q, p, generator=g, dtype=torch.float64) for q in (50, 40, 50, 40)]
    ms = [masks[0], masks[1], masks[0], masks[1]]
    inst = [torch.randint(-2, 4, (x.shape[0],), generator=g) for x in xs]
    calls = []
    real = fused.row_stats
    monkeypatch.setattr(fused, "row_stats", lambda *a: calls.append(a[0].shape) or real(*a))
    with fused.watch_finite(xs) as watch:
        got = rowwise_module._entry_stats(xs, ms, inst)
    assert sorted(calls) == [(80, p), (100, p)]  # one call per sample
    assert not any(watch.unverified(x) for x in xs)
    want = torch.cat([real(x, m.ids, i) for x, m, i in zip(xs, ms, inst)], 1)
    assert torch.equal(got, want)
    xs[1] = xs[1].clone()
    xs[1][3, 5] = float("nan")
    with fused.watch_finite(xs) as watch:
        rowwise_module._entry_stats(xs, ms, inst)
    assert [watch.unverified(x) for x in xs] == [False, True, False, False]
