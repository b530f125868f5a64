import math

import pytest
import torch

from esam.losses import functional as LF
from esam.structures import InstanceMasks

import loops



@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _case(q=5, p=23, k=4, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(q, p, generator=g) * scale
    ids = torch.randint(-1, k, (p,), generator=g)
    return x, ids, k


@pytest.mark.parametrize("encoding", ["ids", "dense"])
def test_mask_bce_cost_matches_loop(encoding):
    x, ids, k = _case()
    gt = InstanceMasks(ids=ids, num_instances=k)
    if encoding == "dense":
        gt = InstanceMasks(dense=gt.to_dense())
    ref = loops.bce_cost(x, loops.dense_masks(ids, k))
    torch.testing.assert_close(LF.mask_bce_cost(x, gt), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["seed", "esam"])
@pytest.mark.parametrize("encoding", ["ids", "dense"])
def test_mask_dice_cost_matches_loop(form, encoding):
    x, ids, k = _case(seed=1)
    gt = InstanceMasks(ids=ids, num_instances=k)
    if encoding == "dense":
        gt = InstanceMasks(dense=gt.to_dense())
    ref = loops.dice_cost(x, loops.dense_masks(ids, k), form)
    torch.testing.assert_close(LF.mask_dice_cost(x, gt, form), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("as_printed", [False, True])
def test_mask_l1_cost_matches_loop(as_printed):
    x, ids, k = _case(seed=2)
    gt = InstanceMasks(ids=ids, num_instances=k)
    ref = loops.l1_cost(x, loops.dense_masks(ids, k), as_printed)
    torch.testing.assert_close(LF.mask_l1_cost(x, gt, as_printed=as_printed), ref)


@pytest.mark.parametrize("form", ["one_minus", "negative"])
def test_class_cost_matches_loop(form):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, generator=g) * 4
    labels = torch.tensor([0, 3, 3, 1])
    torch.testing.assert_close(LF.class_cost(logits, labels, form),
                               loops.class_cost(logits, labels, form))


def test_overlapping_dense_masks_are_supported():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 10, generator=g)
    dense = torch.rand(4, 10, generator=g) > 0.4  # overlapping rows
    gt = InstanceMasks(dense=dense)
    ref = loops.bce_cost(x, dense.double().tolist())
    torch.testing.assert_close(LF.mask_bce_cost(x, gt), ref)


def test_matched_losses_match_loop_and_share_cost_formula():
    x, ids, k = _case(q=4, p=17, k=4, seed=5)
    gt = InstanceMasks(ids=ids, num_instances=k)
    kk = torch.tensor([2, 0, 3, 1])
    rows = gt.rows(kk, x.dtype)
    g = loops.dense_masks(ids, k)
    bce = LF.sigmoid_bce_loss(x, rows, reduction="none")
    for m in range(4):
        ref = sum(loops.bce(float(x[m, i]), g[int(kk[m])][i]) for i in range(17)) / 17
        assert bce[m].item() == pytest.approx(ref, rel=1e-10)
    # the matched loss equals the cost at the matched entries
    torch.testing.assert_close(bce, LF.mask_bce_cost(x, gt)[torch.arange(4), kk])
    for form in ("seed", "esam"):
        torch.testing.assert_close(LF.dice_loss(x, rows, form, reduction="none"),
                                   LF.mask_dice_cost(x, gt, form)[torch.arange(4), kk])


def test_hand_values():
    # perfect confident mask: BCE ~ 0, seed Dice = 1 - 2n/(2n+1)
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    x = torch.tensor([[1e4, 1e4, -1e4, -1e4]])
    assert LF.sigmoid_bce_loss(x, t).item() == pytest.approx(0.0, abs=1e-12)
    assert LF.dice_loss(x, t, "seed").item() == pytest.approx(1 - 4 / 5)
    assert LF.dice_loss(x, t, "esam").item() == pytest.approx(0.0, abs=1e-12)
    # zero logits: BCE = log 2
    assert LF.sigmoid_bce_loss(torch.zeros(1, 4), t).item() == pytest.approx(math.log(2))
    # IoU: 1 of 3 predicted points right, GT has 2 -> 1/4
    assert LF.mask_iou(torch.tensor([[5.0, -5, 5, 5]]), torch.tensor([[1.0, 1, 0, 0]])).item() \
        == pytest.approx(1 / 4, abs=1e-5)


def test_box_hand_values():
    big = torch.tensor([[0.0, 0, 0, 2, 2, 2]])
    quarter = torch.tensor([[0.5, 0.5, 0.0, 1, 1, 2]])  # a quarter of the volume, inside
    assert LF.axis_aligned_box_iou(big, quarter).item() == pytest.approx(0.25)
    assert LF.box_iou_loss(quarter, big).item() == pytest.approx(0.75)
    assert LF.box_giou_loss(quarter, big).item() == pytest.approx(0.75)  # hull == union here
    far = torch.tensor([[10.0, 0, 0, 2, 2, 2]])  # disjoint: IoU 0, hull 12*2*2
    assert LF.box_giou_loss(far, big).item() == pytest.approx(1 + (48 - 16) / 48)
    assert LF.box_l1_loss(quarter, big).item() == pytest.approx(0.5 + 0.5 + 1 + 1)


def test_box_iou_matches_loop():
    g = torch.Generator().manual_seed(6)
    a = torch.cat([torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g) + 0.5], 1)
    b = torch.cat([torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.5], 1)
    ref = torch.tensor([[loops.box_iou(a[i].tolist(), b[j].tolist()) for j in range(4)]
                        for i in range(5)])
    torch.testing.assert_close(LF.axis_aligned_box_iou(a, b), ref)


def test_semantic_cross_entropy_matches_loop_and_ignores():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(12, 5, generator=g) * 3
    y = torch.randint(0, 6, (12,), generator=g)  # 5 is ignore
    valid = [i for i in range(12) if int(y[i]) != 5]
    ref = sum(loops.cross_entropy(z[i].tolist(), int(y[i])) for i in valid) / len(valid)
    assert LF.semantic_cross_entropy(z, y, ignore_index=5).item() == pytest.approx(ref)
    all_ignored = LF.semantic_cross_entropy(z.requires_grad_(), torch.full((12,), 5),
                                            ignore_index=5)
    assert all_ignored.item() == 0.0
    all_ignored.backward()
    assert z.grad is not None


@pytest.mark.parametrize("symmetric", [False, True])
def test_nt_xent_matches_loop(symmetric):
    g = torch.Generator().manual_seed(8)
    f = torch.randn(6, 4, generator=g)
    c = torch.randn(6, 4, generator=g)
    tau = 0.07

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    def one_side(u, v):
        return sum(loops.cross_entropy([cos(u[i], v[j]) / tau for j in range(6)], i)
                   for i in range(6)) / 6

    ref = one_side(f, c)
    if symmetric:
        ref = (ref + one_side(c, f)) / 2
    assert LF.nt_xent(f, c, temperature=tau, symmetric=symmetric).item() == pytest.approx(ref)


def test_nt_xent_ordering_and_gradients_both_sides():
    f = torch.eye(4, requires_grad=True)
    c = torch.eye(4, requires_grad=True)
    good = LF.nt_xent(f, c)
    bad = LF.nt_xent(f, c.roll(1, 0))
    assert good < bad
    good.backward()
    assert f.grad.abs().sum() > 0 and c.grad.abs().sum() > 0


def test_gradcheck_mask_terms():
    x, ids, k = _case(q=3, p=7, k=2, seed=9, scale=1.0)
    gt = InstanceMasks(ids=ids, num_instances=k)
    rows = gt.rows(torch.tensor([0, 1, 1]), torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: LF.sigmoid_bce_loss(t, rows), (x,))
    assert torch.autograd.gradcheck(lambda t: LF.dice_loss(t, rows, "seed"), (x,))
    assert torch.autograd.gradcheck(lambda t: LF.dice_loss(t, rows, "esam"), (x,))
    b = (torch.rand(3, 6, dtype=torch.float64) + 0.5).requires_grad_()
    gb = torch.rand(3, 6, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda t: LF.box_iou_loss(t, gb), (b,))
    assert torch.autograd.gradcheck(lambda t: LF.box_giou_loss(t, gb), (b,))
    f = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: LF.nt_xent(a, b, symmetric=True), (f, c))


def test_huge_logits_stay_finite():
    x = torch.tensor([[1e4, -1e4, 1e4], [-1e4, 1e4, -1e4]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    gt = InstanceMasks(ids=torch.tensor([0, 1, -1]), num_instances=2)
    for v in (LF.sigmoid_bce_loss(x, t), LF.dice_loss(x, t),
              LF.mask_bce_cost(x, gt).sum(), LF.mask_dice_cost(x, gt).sum(),
              LF.nt_xent(x * 1e4, x), LF.class_cost(x, torch.tensor([0, 2])).sum()):
        assert torch.isfinite(v)
    LF.sigmoid_bce_loss(x, t).backward()
    assert torch.isfinite(x.grad).all()


def test_empty_inputs_are_safe():
    x = torch.zeros(0, 5, requires_grad=True)
    for v in (LF.sigmoid_bce_loss(x, x.detach()), LF.dice_loss(x, x.detach()),
              LF.box_l1_loss(torch.zeros(0, 6), torch.zeros(0, 6))):
        assert v.item() == 0.0
    LF.sigmoid_bce_loss(x, x.detach()).backward()
    assert x.grad is not None
    gt = InstanceMasks(ids=torch.full((5,), -1), num_instances=0)
    assert LF.mask_bce_cost(torch.randn(3, 5), gt).shape == (3, 0)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="targets"):
        LF.sigmoid_bce_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="gt_boxes"):
        LF.box_iou_loss(torch.zeros(2, 6), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="reduction"):
        LF.reduce_loss(torch.zeros(2), "avg")
    with pytest.raises(ValueError, match="temperature"):
        LF.nt_xent(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)
    with pytest.raises(ValueError, match="ids"):
        InstanceMasks(ids=torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="dense"):
        InstanceMasks(dense=torch.rand(2, 3))


def _pairs(q, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, q, (m,), generator=g), torch.randint(0, k, (m,), generator=g)


@pytest.mark.parametrize("form", ["seed", "esam"])
@pytest.mark.parametrize("source", ["direct", "sums", "row_subset_sums", "pair_sums",
                                    "row_subset_pair_sums"])
def test_matched_mask_losses_match_loop_with_and_without_shared_sums(form, source):
    x, ids, k = _case(q=7, p=31, k=4, seed=21)
    gt = InstanceMasks(ids=ids, num_instances=k)
    qi, ki = _pairs(7, k, 9, seed=22)  # repeated queries: one query may take several pairs
    sums = None
    if source == "sums":
        sums = LF.MaskSums(x, gt)
    elif source == "row_subset_sums":
        rows = torch.unique(torch.cat([qi, torch.tensor([6])]))  # sorted, a superset of qi
        sums = LF.MaskSums(x[rows], gt, rows=rows)
    elif source == "pair_sums":  # inside sums at the matched pairs (and one more) only
        pairs = torch.unique(torch.stack([torch.cat([qi, torch.tensor([6])]),
                                          torch.cat([ki, torch.tensor([0])])]), dim=1)
        sums = LF.MaskSums(x, gt, pairs=(pairs[0], pairs[1]))
    elif source == "row_subset_pair_sums":
        rows = torch.unique(qi)
        sums = LF.MaskSums(x[rows], gt, rows=rows, pairs=(torch.searchsorted(rows, qi), ki))
    bce, dice, iou = LF.matched_mask_losses(x, qi, ki, gt, form, True, sums=sums)
    g = loops.dense_masks(ids, k)
    for m, (j, kk) in enumerate(zip(qi.tolist(), ki.tolist())):
        row = x[j].tolist()
        ref_bce = sum(loops.bce(v, t) for v, t in zip(row, g[kk])) / len(row)
        ref_dice = loops.dice([loops.sigmoid(v) for v in row], g[kk], form)
        assert bce[m].item() == pytest.approx(ref_bce, rel=1e-10)
        assert dice[m].item() == pytest.approx(ref_dice, rel=1e-10, abs=1e-12)
        assert iou[m].item() == pytest.approx(loops.iou_binary(row, g[kk]), abs=1e-6)


@pytest.mark.parametrize("form", ["seed", "esam"])
@pytest.mark.parametrize("with_sums", [False, True])
def test_matched_mask_losses_analytic_gradient_equals_autograd_of_the_formulas(form, with_sums):
    x, ids, k = _case(q=6, p=40, k=3, seed=23, scale=2.0)
    gt = InstanceMasks(ids=ids, num_instances=k)
    qi, ki = _pairs(6, k, 8, seed=24)
    wb, wd = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    a = x.clone().requires_grad_()
    sums = LF.MaskSums(a, gt) if with_sums else None
    bce, dice, _ = LF.matched_mask_losses(a, qi, ki, gt, form, False, sums=sums)
    ((bce * wb).sum() + (dice * wd).sum()).backward()
    b = x.clone().requires_grad_()
    rows = gt.rows(ki, torch.float64)
    ref = ((LF.sigmoid_bce_loss(b[qi], rows, reduction="none") * wb).sum()
           + (LF.dice_loss(b[qi], rows, form, reduction="none") * wd).sum())
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)
    untouched = torch.ones(6, dtype=torch.bool)
    untouched[qi] = False
    assert (a.grad[untouched] == 0).all()


@pytest.mark.parametrize("form", ["seed", "esam"])
def test_gradcheck_matched_mask_losses(form):
    x, ids, k = _case(q=4, p=9, k=3, seed=25, scale=1.0)
    gt = InstanceMasks(ids=ids, num_instances=k)
    qi, ki = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 0, 2, 1])
    x.requires_grad_()

    def f(t):
        # the sums are rebuilt from t, as the matcher does, so gradcheck perturbs both paths
        bce, dice, _ = LF.matched_mask_losses(t, qi, ki, gt, form, False,
                                              sums=LF.MaskSums(t, gt))
        return bce, dice
    assert torch.autograd.gradcheck(f, (x,))


def test_matched_mask_losses_under_half_precision_inputs_return_fp32_values_and_grads():
    x, ids, k = _case(q=5, p=50, k=3, seed=26)
    gt = InstanceMasks(ids=ids, num_instances=k)
    qi, ki = _pairs(5, k, 4, seed=27)
    for dtype in (torch.float16, torch.bfloat16):
        h = x.to(dtype).requires_grad_()
        bce, dice, iou = LF.matched_mask_losses(h, qi, ki, gt, "esam", True,
                                                sums=LF.MaskSums(h, gt))
        assert bce.dtype == dice.dtype == torch.float32
        ref_b, ref_d, ref_i = LF.matched_mask_losses(h.detach().double(), qi, ki, gt, "esam", True)
        torch.testing.assert_close(bce.double(), ref_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dice.double(), ref_d, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(iou.double(), ref_i)
        (bce.sum() + dice.sum()).backward()
        assert h.grad.dtype == dtype and torch.isfinite(h.grad).all()


def test_matched_mask_losses_with_no_pairs_or_no_positions_keep_the_graph():
    gt = InstanceMasks(ids=torch.tensor([0, 1, -1]), num_instances=2)
    x = torch.randn(3, 3, requires_grad=True)
    empty = torch.empty(0, dtype=torch.long)
    bce, dice, iou = LF.matched_mask_losses(x, empty, empty, gt, "esam", True)
    assert bce.shape == dice.shape == iou.shape == (0,)
    (bce.sum() + dice.sum()).backward()
    assert (x.grad == 0).all()
    gt0 = InstanceMasks(ids=torch.empty(0, dtype=torch.long), num_instances=2)
    x0 = torch.randn(3, 0, requires_grad=True)
    bce, dice, _ = LF.matched_mask_losses(x0, torch.tensor([0, 2]), torch.tensor([1, 1]), gt0,
                                          "seed", False)
    assert torch.isfinite(bce).all() and torch.isfinite(dice).all()
    (bce.sum() + dice.sum()).backward()
    assert x0.grad.shape == (3, 0)


@pytest.mark.parametrize("encoding", ["ids", "dense"])
def test_pair_mode_sums_equal_full_sums_at_the_pairs_and_count_binarised_hits(encoding):
    x, ids, k = _case(q=6, p=40, k=4, seed=31)
    gt = InstanceMasks(ids=ids, num_instances=k)
    if encoding == "dense":
        dense = gt.to_dense()
        dense[1, :5] = True  # overlaps
        gt = InstanceMasks(dense=dense)
    x[2, :7] = 0.0  # sigmoid(0) = 0.5 counts as inside the binarised mask
    rows, inst = torch.tensor([0, 0, 2, 3, 5]), torch.tensor([1, 3, 1, 0, 2])
    full = LF.MaskSums(x, gt)
    pair = LF.MaskSums(x, gt, pairs=(rows, inst))
    for name in ("logits", "probs"):
        torch.testing.assert_close(pair.inside(name)[rows, inst], full.inside(name)[rows, inst],
                                   rtol=1e-12, atol=1e-12)
        untouched = torch.ones(6, k, dtype=torch.bool)
        untouched[rows, inst] = False
        assert (pair.inside(name)[untouched] == 0).all()
    for name in ("softplus", "probs", "probs_sq"):
        torch.testing.assert_close(pair.total(name), full.total(name), rtol=1e-12, atol=1e-12)
    g = gt.to_dense()
    expected = [sum(1 for i in range(40) if g[kk, i] and loops.sigmoid(x[j, i].item()) >= 0.5)
                for j, kk in zip(rows.tolist(), inst.tolist())]
    assert pair.pair_positive(rows, inst).tolist() == expected
    assert full.pair_positive(rows, inst) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_row_totals_match_softplus_at_every_magnitude(dtype):
    # the sweep's relu(x) - log(max(q, 1 - q)) form against softplus itself, incl. huge logits
    g = torch.Generator().manual_seed(32)
    x = torch.cat([torch.randn(3, 700, generator=g, dtype=torch.float64) * s
                   for s in (0.1, 3.0, 30.0)])
    x = torch.cat([x, torch.full((1, 700), 1e4, dtype=torch.float64),
                   torch.full((1, 700), -1e4, dtype=torch.float64),
                   torch.zeros(1, 700, dtype=torch.float64)]).to(dtype)
    gt = InstanceMasks(ids=torch.randint(-1, 3, (700,), generator=g), num_instances=3)
    got = LF.MaskSums(x, gt).total("softplus")[:, 0]
    ref = torch.nn.functional.softplus(x.double()).sum(1)
    assert got.dtype == dtype
    # float32: each element's error is at most ~1 ulp of 1 (the rounding of max(q, 1 - q))
    atol = 700 * 1.2e-7 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(got.double(), ref, rtol=1e-6 if dtype == torch.float32 else 1e-10,
                               atol=atol)
    assert got[-2].item() == 0.0 and got[-3].item() == pytest.approx(7e6)
