"""Tests of the merge criteria (ESAM's `_Fast` / `_Seal`, the seed's L_merge) and box IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.released_merge_reference import ReferenceMergeFast, ReferenceMergeSeal
from esam.losses import fused
import esam.losses.merge as merge_module
from esam.losses.merge import (
    MergeCECriterion,
    ScanNetMergeCriterion_Fast,
    ScanNetMergeCriterion_Seal,
    align_global_ids,
    axis_aligned_box_iou,
    global_point_logits,
    merge_ce_loss,
    sample_seal_negatives,
)


def make_inputs(frames=(3, 2), instances=(4, 3), queries=(10, 7), dim=8, dtype=torch.float64,
                seed=0, p_absent=0.3, p_member=0.8, normalize=True, max_members=None):
    """Released layout: per sample b, V_b frames of (Q_b, d) features and K_b query lists."""
    g = torch.Generator().manual_seed(seed)
    feats, masks = [], []
    for v_b, k_b, q_b in zip(frames, instances, queries):
        fs, ms = [], []
        for _ in range(v_b):
            f = torch.randn(q_b, dim, generator=g, dtype=dtype)
            fs.append((F.normalize(f, dim=-1) if normalize else f).requires_grad_())
            owner = torch.randint(0, max(k_b, 1), (q_b,), generator=g)
            member = torch.rand(q_b, generator=g) < p_member
            present = torch.rand(max(k_b, 1), generator=g) >= p_absent
            lists = []
            for k in range(k_b):
                idx = torch.nonzero(member & (owner == k) & present[k]).flatten()
                lists.append(idx if max_members is None else idx[:max_members])
            ms.append(lists)
        feats.append(fs)
        masks.append(ms)
    return feats, masks


@pytest.fixture(params=["torch-ops", "member-kernel", "entry-layout"])
def member_path(request, monkeypatch):
    """Run a test on the backward paths of the member-pooled centres: torch ops, the fused
    `member_grad` kernel forced on at every size (both on the stacked layout wherever no query
    is listed twice), and the entry-by-entry layout with the kernel."""
    import esam.losses.merge as merge_module
    monkeypatch.setattr(merge_module, "_STACK_MIN_MEMBERS",
                        float("inf") if request.param == "entry-layout" else 0.0)
    if request.param != "torch-ops":
        monkeypatch.setattr(fused, "MIN_MEMBER_ELEMENTS", 0)
        monkeypatch.setattr(fused, "_enabled", True)
    else:
        monkeypatch.setattr(fused, "MIN_MEMBER_ELEMENTS", float("inf"))
    return request.param


def tie_first_two_queries(feats, masks, scale=1.0):
    """Exact ties of the max: in every frame query 1 copies query 0 (features times
    ``scale``), both listed in instance 0; the other lists lose them."""
    feats = [[scale * f.detach() for f in sample] for sample in feats]
    for sample in feats:
        for f in sample:
            f[1] = f[0]
            f.requires_grad_()
    masks = [[[torch.cat([torch.tensor([0, 1]), t[t > 1]]) if k == 0 else t[t > 1]
               for k, t in enumerate(frame)] for frame in sample] for sample in masks]
    return feats, masks


def leaves(feats):
    return [f for sample in feats for f in sample]


def grads(loss, feats):
    return torch.autograd.grad(loss, leaves(feats), allow_unused=True, materialize_grads=True)


def assert_close(a, b, rtol, atol=0.0):
    a = torch.as_tensor(a).detach().double()
    b = torch.as_tensor(b, dtype=torch.float64) if isinstance(b, float) else b.detach().double()
    assert torch.allclose(a, b, rtol=rtol, atol=atol), (a.item(), b.item())


# ------------------------------------------------------------------------------------------
# _Fast against the loop reference
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fast_matches_reference(seed, dtype, rtol, member_path):
    feats, masks = make_inputs(dtype=dtype, seed=seed)
    ref = ReferenceMergeFast()(feats, masks)
    ours = ScanNetMergeCriterion_Fast()(feats, masks)
    # the released dict holds the weighted terms
    assert_close(ours["loss_merge_tmp"] * 2.0, ref["merge_loss_tmp"], rtol)
    assert_close(ours["loss_merge_p2s"] * 2.0, ref["merge_loss_p2s"], rtol)
    assert_close(ours["loss"], ref["merge_loss_tmp"] + ref["merge_loss_p2s"], rtol)
    g_ref = grads(ref["merge_loss_tmp"] + ref["merge_loss_p2s"], feats)
    g_ours = grads(ours["loss"], feats)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


def test_fast_uniform_batch_matches_reference():
    # every sample with the same V and Q takes the stacking fast path
    feats, masks = make_inputs(frames=(4, 4, 4), instances=(5, 2, 6), queries=(12, 12, 12),
                               seed=7)
    ref = ReferenceMergeFast()(feats, masks)
    ours = ScanNetMergeCriterion_Fast()(feats, masks)
    assert_close(ours["loss"], ref["merge_loss_tmp"] + ref["merge_loss_p2s"], 1e-10)


@pytest.mark.parametrize("tmp,p2s", [(True, False), (False, True)])
def test_fast_single_term(tmp, p2s):
    feats, masks = make_inputs(seed=3)
    ours = ScanNetMergeCriterion_Fast(tmp=tmp, p2s=p2s, tmp_weight=0.5, p2s_weight=3.0)(feats,
                                                                                       masks)
    ref = ReferenceMergeFast(tmp=tmp, p2s=p2s, tmp_weight=0.5, p2s_weight=3.0)(feats, masks)
    assert ("loss_merge_tmp" in ours) == tmp and ("loss_merge_p2s" in ours) == p2s
    assert_close(ours["loss"], sum(ref.values()), 1e-10)


def test_fast_temperatures_are_options():
    feats, masks = make_inputs(seed=5)
    a = ScanNetMergeCriterion_Fast(tmp_tau=0.07, p2s_tau=0.02)(feats, masks)["loss"]
    b = ScanNetMergeCriterion_Fast(tmp_tau=0.5, p2s_tau=0.5)(feats, masks)["loss"]
    assert not torch.isclose(a, b)


def test_fast_mask_zero_logits_only_matters_for_exact_zeros():
    feats, masks = make_inputs(seed=2)
    a = ScanNetMergeCriterion_Fast(mask_zero_logits=True)(feats, masks)["loss"]
    b = ScanNetMergeCriterion_Fast(mask_zero_logits=False)(feats, masks)["loss"]
    assert_close(a, b, 1e-12)


# ------------------------------------------------------------------------------------------
# Hand values
# ------------------------------------------------------------------------------------------

def two_pairs(cos: float, dtype=torch.float64):
    """Two instances, two frames, one query each; instance features a, b with <a, b> = cos."""
    a = torch.tensor([1.0, 0.0], dtype=dtype)
    b = torch.tensor([cos, math.sqrt(1 - cos ** 2)], dtype=dtype)
    feats = [[torch.stack([a, b]).requires_grad_(), torch.stack([a, b]).requires_grad_()]]
    masks = [[[torch.tensor([0]), torch.tensor([1])], [torch.tensor([0]), torch.tensor([1])]]]
    return feats, masks


@pytest.mark.parametrize("cos", [0.5, -0.3])
def test_hand_value_infonce(cos):
    feats, masks = two_pairs(cos)
    out = ScanNetMergeCriterion_Fast()(feats, masks)
    # each row: -log(e^{1/t} / (e^{1/t} + e^{cos/t})) = log(1 + e^{(cos - 1)/t}); 2 directions
    expected_tmp = 2 * math.log1p(math.exp((cos - 1) / 0.07))
    expected_p2s = 2 * math.log1p(math.exp((cos - 1) / 0.02))  # 2 frames, one member each
    # log(1 + tiny) carries an absolute float64 error of ~1e-16
    assert_close(out["loss_merge_tmp"], expected_tmp, 1e-9, 1e-15)
    assert_close(out["loss_merge_p2s"], expected_p2s, 1e-9, 1e-15)
    assert_close(out["loss"], 2 * expected_tmp + 2 * expected_p2s, 1e-9, 1e-15)
    seal = ScanNetMergeCriterion_Seal()(feats, masks)
    assert_close(seal["loss_merge_tmp"], expected_tmp, 1e-9, 1e-15)  # sum of 2 rows / K=2
    assert_close(seal["loss_merge_p2s"], expected_p2s, 1e-9, 1e-15)


def test_hand_value_orthogonal_negatives():
    feats, masks = two_pairs(0.0)
    # the released code reads a zero logit as "absent": the negative drops out, loss 0
    released = ScanNetMergeCriterion_Fast()(feats, masks)
    assert released["loss"].item() == 0.0
    ref = ReferenceMergeFast()(feats, masks)
    assert ref["merge_loss_tmp"].item() == 0.0 and ref["merge_loss_p2s"].item() == 0.0
    plain = ScanNetMergeCriterion_Fast(mask_zero_logits=False)(feats, masks)
    assert_close(plain["loss_merge_tmp"], 2 * math.log1p(math.exp(-1 / 0.07)), 1e-9, 1e-15)


def test_better_features_give_lower_loss():
    good = ScanNetMergeCriterion_Fast()(*two_pairs(-0.5))["loss"]
    bad = ScanNetMergeCriterion_Fast()(*two_pairs(0.9))["loss"]
    assert good < bad


# ------------------------------------------------------------------------------------------
# _Seal against the loop reference
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_seal_matches_reference_with_given_negatives(seed, dtype, rtol, member_path):
    feats, masks = make_inputs(dtype=dtype, seed=seed)
    negatives = sample_seal_negatives(masks, torch.Generator().manual_seed(seed))
    ref = ReferenceMergeSeal()(feats, masks, negatives)
    ours = ScanNetMergeCriterion_Seal()(feats, masks, negatives=negatives)
    assert_close(ours["loss_merge_tmp"], ref["merge_loss_tmp"], rtol)
    assert_close(ours["loss_merge_p2s"], ref["merge_loss_p2s"], rtol)
    assert_close(ours["loss"], ref["merge_loss"], rtol)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for a, b in zip(grads(ours["loss"], feats), grads(ref["merge_loss"], feats)):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


def test_seal_one_member_per_instance_is_deterministic():
    # with one query per instance the random negative is forced: any draw matches
    feats, masks = make_inputs(seed=4, max_members=1)
    ref = ReferenceMergeSeal(np.random.default_rng(0))(feats, masks)
    for seed in range(2):
        ours = ScanNetMergeCriterion_Seal()(feats, masks,
                                            generator=torch.Generator().manual_seed(seed))
        assert_close(ours["loss"], ref["merge_loss"], 1e-10)


def test_seal_generator_reproducible_and_near_reference_mean():
    feats, masks = make_inputs(seed=6)
    crit = ScanNetMergeCriterion_Seal()
    a = crit(feats, masks, generator=torch.Generator().manual_seed(1))["loss"]
    b = crit(feats, masks, generator=torch.Generator().manual_seed(1))["loss"]
    assert a.item() == b.item()
    # the drawn loss is unbiased for the reference's expectation over its own draws
    ref = ReferenceMergeSeal(np.random.default_rng(0))
    ref_mean = np.mean([ref(feats, masks)["merge_loss"].item() for _ in range(30)])
    ours_mean = np.mean([crit(feats, masks, generator=torch.Generator().manual_seed(s))["loss"]
                         .item() for s in range(30)])
    assert abs(ours_mean - ref_mean) < 0.1 * ref_mean


def test_seal_rejects_out_of_range_negatives():
    feats, masks = make_inputs(seed=0)
    negatives = sample_seal_negatives(masks)
    bad = [[n.clone() for n in sample] for sample in negatives]
    k = bad[0][0].shape[0]
    counts = [len(t) for t in masks[0][0]]
    r = next(i for i, c in enumerate(counts) if c > 0)
    c = next(i for i, n in enumerate(counts) if n > 0 and i != r)
    bad[0][0][r, 0, c] = counts[c]  # one past the end of instance c's list
    assert k == len(counts)
    with pytest.raises(ValueError, match="negatives"):
        ScanNetMergeCriterion_Seal()(feats, masks, negatives=bad)
    with pytest.raises(ValueError, match="negatives"):
        ScanNetMergeCriterion_Seal()(feats, masks, negatives=negatives[:1])


# ------------------------------------------------------------------------------------------
# Gradients and edge cases
# ------------------------------------------------------------------------------------------

def test_gradcheck_fast_and_seal(member_path):
    feats, masks = make_inputs(frames=(2,), instances=(3,), queries=(6,), dim=4, seed=11,
                               p_absent=0.0)
    flat = leaves(feats)
    negatives = sample_seal_negatives(masks, torch.Generator().manual_seed(0))

    def fast(*xs):
        return ScanNetMergeCriterion_Fast()([list(xs)], masks)["loss"]

    def seal(*xs):
        return ScanNetMergeCriterion_Seal()([list(xs)], masks, negatives=negatives)["loss"]

    assert torch.autograd.gradcheck(fast, flat)
    assert torch.autograd.gradcheck(seal, flat)


def test_one_frame_gives_zero_tmp_connected_to_graph(member_path):
    feats, masks = make_inputs(frames=(1, 1), seed=1)
    for crit in (ScanNetMergeCriterion_Fast(), ScanNetMergeCriterion_Seal()):
        out = crit(feats, masks)
        assert out["loss_merge_tmp"].item() == 0.0
        assert out["loss_merge_tmp"].requires_grad
        assert torch.isfinite(out["loss"]) and out["loss_merge_p2s"] > 0
        out["loss"].backward()
    # the released code stacks a Python float here and fails; the p2s term still matches
    ref = ReferenceMergeFast(tmp=False)(feats, masks)
    ours = ScanNetMergeCriterion_Fast(tmp=False)(feats, masks)
    assert_close(ours["loss"], ref["merge_loss_p2s"], 1e-10)


def test_no_instances_gives_finite_zero_with_graph(member_path):
    feats, masks = make_inputs(frames=(2, 3), instances=(0, 0), seed=2)
    for crit in (ScanNetMergeCriterion_Fast(), ScanNetMergeCriterion_Seal()):
        out = crit(feats, masks)
        assert out["loss"].item() == 0.0 and out["loss"].requires_grad
        out["loss"].backward()
    for f in leaves(feats):
        assert f.grad is not None and torch.all(f.grad == 0)


def test_every_instance_absent_in_a_frame(member_path):
    feats, masks = make_inputs(frames=(3,), instances=(3,), seed=3, p_absent=0.0)
    masks[0][1] = [torch.zeros(0, dtype=torch.long) for _ in range(3)]  # frame 1 sees nothing
    ref = ReferenceMergeFast()(feats, masks)
    ours = ScanNetMergeCriterion_Fast()(feats, masks)
    assert_close(ours["loss"], ref["merge_loss_tmp"] + ref["merge_loss_p2s"], 1e-10)
    negatives = sample_seal_negatives(masks)
    seal = ScanNetMergeCriterion_Seal()(feats, masks, negatives=negatives)
    assert_close(seal["loss"], ReferenceMergeSeal()(feats, masks, negatives)["merge_loss"], 1e-10)


def test_huge_features_stay_finite(member_path):
    feats, masks = make_inputs(seed=8, normalize=False)
    big = [[(f.detach() * 1e4).requires_grad_() for f in sample] for sample in feats]
    for crit in (ScanNetMergeCriterion_Fast(), ScanNetMergeCriterion_Seal()):
        out = crit(big, masks)
        assert all(torch.isfinite(v) for v in out.values())
        for g in grads(out["loss"], big):
            assert torch.isfinite(g).all()


@pytest.mark.parametrize("where", ["same list", "next list"])
def test_int32_and_duplicate_indices_match_reference(member_path, where):
    """A query listed twice in a frame (the entry layout), in its own list or the next one."""
    feats, masks = make_inputs(seed=9)
    if where == "same list":
        masks = [[[torch.cat([t, t[:1]]).int() for t in frame] for frame in sample]
                 for sample in masks]
    else:
        masks = [[[torch.cat([t, frame[j - 1][:1]]).int() if j else t.int()
                   for j, t in enumerate(frame)] for frame in sample] for sample in masks]
    assert not merge_module._pack(feats, masks).layout.stacked
    ref = ReferenceMergeFast()(feats, masks)
    ours = ScanNetMergeCriterion_Fast()(feats, masks)
    assert_close(ours["loss"], ref["merge_loss_tmp"] + ref["merge_loss_p2s"], 1e-10)
    # a query listed twice ties with itself in the max: its gradient is still the released one
    for a, b in zip(grads(ours["loss"], feats),
                    grads(ref["merge_loss_tmp"] + ref["merge_loss_p2s"], feats)):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def test_max_ties_share_the_gradient(member_path):
    # two distinct queries with equal features tie in the max: together they get the gradient
    # the released code gives the first one
    feats, masks = make_inputs(frames=(2,), instances=(3,), queries=(8,), seed=12, p_absent=0.0)
    masks = [[[torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])]
              for _ in range(2)]]
    # scaled down: logits of order 1 at tau 0.02, so the max's gradient is not saturated away
    feats = [[0.1 * f.detach() for f in feats[0]]]
    for f in feats[0]:
        f[1] = f[0]
        f.requires_grad_()
    ref = ReferenceMergeFast(tmp=False)(feats, masks)["merge_loss_p2s"]
    ours = ScanNetMergeCriterion_Fast(tmp=False)(feats, masks)["loss"]
    assert_close(ours, ref, 1e-10)
    for a, b in zip(grads(ours, feats), grads(ref, feats)):
        assert torch.allclose(a[0] + a[1], b[0] + b[1], atol=1e-9, rtol=1e-9)
        assert torch.allclose(a[2:], b[2:], atol=1e-9, rtol=1e-9)


def test_bad_inputs_raise():
    feats, masks = make_inputs(seed=0)
    crit = ScanNetMergeCriterion_Fast()
    with pytest.raises(ValueError, match="merge_feats"):
        crit([], [])
    with pytest.raises(ValueError, match="ins_masks"):
        crit(feats, masks[:1])
    with pytest.raises(ValueError, match=r"ins_masks\[0\]\[1\]"):
        crit(feats, [[masks[0][0], masks[0][1][:-1], masks[0][2]], masks[1]])
    bad = [[[t.float() for t in frame] for frame in sample] for sample in masks]
    with pytest.raises(ValueError, match=r"ins_masks\[0\]\[0\]\[0\]"):
        crit(feats, bad)
    out_of_range = [[[t + 100 for t in frame] for frame in sample] for sample in masks]
    with pytest.raises(ValueError, match=r"\[0, Q\)"):
        crit(feats, out_of_range)
    with pytest.raises(ValueError, match="d="):
        crit([[feats[0][0], feats[0][1][:, :3]] + feats[0][2:], feats[1]], masks)
    with pytest.raises(ValueError, match="tmp, p2s"):
        ScanNetMergeCriterion_Fast(tmp=False, p2s=False)


# ------------------------------------------------------------------------------------------
# Seed L_merge
# ------------------------------------------------------------------------------------------

def test_merge_ce_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (20,), generator=g)
    loop = sum(-(logits[i, target[i]] - torch.logsumexp(logits[i], 0)) for i in range(20)) / 20
    assert_close(merge_ce_loss(logits, target), loop, 1e-12)
    assert_close(merge_ce_loss(logits, target, reduction="sum"), loop * 20, 1e-12)
    assert merge_ce_loss(logits, target, reduction="none").shape == (20,)


def test_merge_ce_empty_and_huge():
    logits = torch.zeros(0, 3, requires_grad=True)
    loss = merge_ce_loss(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    huge = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], requires_grad=True)
    loss = merge_ce_loss(huge, torch.tensor([1, 0]))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(huge.grad).all()


def test_global_point_logits_matches_loop_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    q, n, k = 7, 9, 4
    mask_logits = torch.randn(q, n, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 3, 0, 3, 3])  # global 2 and 4 get no query
    out = global_point_logits(mask_logits, ids, k, background_logit=0.5)
    assert out.shape == (n, 1 + k)
    for i in range(n):
        assert out[i, 0].item() == 0.5
        for gid in range(1, k + 1):
            members = [j for j in range(q) if ids[j] == gid]
            expected = max(mask_logits[j, i].item() for j in members) if members else -1e4
            assert out[i, gid].item() == expected
    assert torch.autograd.gradcheck(lambda x: global_point_logits(x, ids, k), (mask_logits,))


def test_merge_ce_criterion_module_equals_functions():
    g = torch.Generator().manual_seed(2)
    mask_logits = torch.randn(6, 11, generator=g)
    ids = torch.tensor([1, 2, 0, 2, 3, 1])
    gt = torch.randint(0, 4, (11,), generator=g)
    expected = merge_ce_loss(global_point_logits(mask_logits, ids, 3), gt)
    out = MergeCECriterion(weight=2.0)(mask_logits, ids, gt)
    assert_close(out["loss_merge_ce"], expected, 1e-6)
    assert_close(out["loss"], 2 * expected, 1e-6)
    batch = MergeCECriterion()([mask_logits, mask_logits[:3, :5]], [ids, ids[:3]],
                               [gt, gt[:5]], [3, 3])
    second = merge_ce_loss(global_point_logits(mask_logits[:3, :5], ids[:3], 3), gt[:5])
    assert_close(batch["loss"], (expected + second) / 2, 1e-6)


def test_merge_ce_bad_inputs():
    with pytest.raises(ValueError, match="global_id_gt"):
        merge_ce_loss(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="point_logits"):
        merge_ce_loss(torch.zeros(3), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="query_global_ids"):
        global_point_logits(torch.zeros(2, 4), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="mask_logits"):
        global_point_logits(torch.zeros(4), torch.tensor([0]), 3)


# ------------------------------------------------------------------------------------------
# Boxes and alignment
# ------------------------------------------------------------------------------------------

def test_box_iou_hand_values():
    big = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0, 2.0]])
    quarter = torch.tensor([[0.5, 0.5, 0.0, 1.0, 1.0, 2.0]])  # a quarter of the volume, inside
    far = torch.tensor([[10.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    shifted = torch.tensor([[1.0, 0.0, 0.0, 2.0, 2.0, 2.0]])  # half overlap: 4 / 12
    iou = axis_aligned_box_iou(big, torch.cat([quarter, far, shifted, big]))
    assert torch.allclose(iou, torch.tensor([[0.25, 0.0, 1 / 3, 1.0]]))
    empty = torch.zeros(1, 6)
    assert axis_aligned_box_iou(empty, empty).item() == 0.0
    assert axis_aligned_box_iou(torch.zeros(0, 6), big).shape == (0, 1)


def test_box_iou_matches_loop():
    g = torch.Generator().manual_seed(3)
    a = torch.cat([torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g) + 0.5], 1)
    b = torch.cat([torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.5], 1)
    iou = axis_aligned_box_iou(a.double(), b.double())
    for i in range(5):
        for j in range(4):
            inter = 1.0
            for ax in range(3):
                lo = max(a[i, ax] - a[i, ax + 3] / 2, b[j, ax] - b[j, ax + 3] / 2)
                hi = min(a[i, ax] + a[i, ax + 3] / 2, b[j, ax] + b[j, ax + 3] / 2)
                inter *= max(0.0, float(hi - lo))
            union = float(a[i, 3:].prod() + b[j, 3:].prod()) - inter
            assert abs(iou[i, j].item() - inter / union) < 1e-6
    with pytest.raises(ValueError, match="boxes1"):
        axis_aligned_box_iou(torch.zeros(2, 4), b)


def test_align_global_ids_hand_case():
    pred = torch.tensor([[10.0, 0, 0, 1, 1, 1],  # matches GT 1
                         [0.0, 0, 0, 2, 2, 2],  # matches GT 0
                         [5.0, 5, 5, 1, 1, 1]])  # matches nothing
    gt = torch.tensor([[0.1, 0, 0, 2, 2, 2],
                       [10.0, 0, 0, 1, 1, 1],
                       [0.5, 0.5, 0, 1, 1, 2]])  # GT 2: IoU 0.25 with pred 1, but pred 1 is taken
    points = torch.tensor([-1, 0, 0, 1, 2, 2, 1])
    out = align_global_ids(pred, gt, points, iou_threshold=0.25)
    assert out.tolist() == [0, 2, 2, 1, 0, 0, 1]
    strict = align_global_ids(pred, gt, points, iou_threshold=0.99)
    assert strict.tolist() == [0, 0, 0, 1, 0, 0, 1]  # only the exact box survives
    assert align_global_ids(torch.zeros(0, 6), gt, points).tolist() == [0] * 7
    with pytest.raises(ValueError, match="gt_point_ids"):
        align_global_ids(pred, gt, torch.tensor([3]))


@pytest.mark.parametrize("p_member,stacked", [(0.9, True), (0.2, False)])
def test_layout_stacks_frames_of_mostly_members(p_member, stacked):
    feats, masks = make_inputs(frames=(2, 2), instances=(4, 3), queries=(20, 20), seed=3,
                               p_absent=0.0, p_member=p_member)
    assert merge_module._pack(feats, masks).layout.stacked == stacked
    ref = ReferenceMergeFast()(feats, masks)
    ours = ScanNetMergeCriterion_Fast()(feats, masks)
    assert_close(ours["loss"], ref["merge_loss_tmp"] + ref["merge_loss_p2s"], 1e-10)


@pytest.mark.parametrize("layout", ["stacked", "entries"])
def test_member_layout_places_every_entry_and_counts_blocks(monkeypatch, layout):
    """Stacked: each frame's block is the frame (row = query). Entries (a query listed in two
    instances of a frame): each block holds the frame's entries in order."""
    import esam.losses.merge as merge_module
    # a short sample before a long one: missing grid frames between present ones
    feats, masks = make_inputs(frames=(1, 3, 2), instances=(5, 2, 4), queries=(12, 9, 7),
                               seed=4, p_absent=0.2)
    if layout == "entries":  # the first query of some list also joins the next one
        masks = [[[torch.cat([t, frame[j - 1][:1]]) if j else t for j, t in enumerate(frame)]
                  for frame in sample] for sample in masks]
    monkeypatch.setattr(merge_module, "_CHUNK_ELEMENTS", 1)  # one frame per block
    monkeypatch.setattr(merge_module, "_STACK_MIN_MEMBERS", 0.0)
    p = merge_module._pack(feats, masks)
    lay = p.layout
    b, v, k = p.shape
    assert lay.stacked == (layout == "stacked")
    x = merge_module._MemberPool.apply(lay, p.counts.view(-1), *leaves(feats))[2].detach()
    assert x.shape[1] == lay.rows == (max(f.shape[0] for f in leaves(feats))
                                      if layout == "stacked" else lay.rows)
    filled = []
    for bi in range(b):
        for t in range(v):
            f = bi * v + t
            seg = lay.segment[f * lay.rows:(f + 1) * lay.rows]
            if t >= len(masks[bi]):
                assert not lay.present[f] and (x[f] == 0).all() and (seg == b * v * k).all()
                filled.append(0)
                continue
            lists, frame = masks[bi][t], feats[bi][t].detach()
            if layout == "stacked":
                assert torch.equal(x[f, :frame.shape[0]], frame)
                assert (x[f, frame.shape[0]:] == 0).all()  # padding
                want = torch.full((lay.rows,), b * v * k)
                for j, idx in enumerate(lists):
                    want[idx] = f * k + j
                assert torch.equal(seg, want)
            else:
                rows = torch.cat(list(lists)) if lists else torch.zeros(0, dtype=torch.long)
                n = rows.numel()
                assert torch.equal(x[f, :n], frame[rows])
                assert (x[f, n:] == 0).all()  # padding
                slots = torch.cat([torch.full((len(idx),), f * k + j)
                                   for j, idx in enumerate(lists)])
                assert torch.equal(seg[:n], slots) and (seg[n:] == b * v * k).all()
            for j, idx in enumerate(lists):  # the table walks each list, its last entry repeated
                for i in range(lay.table.shape[-1]):
                    if len(idx):
                        assert torch.equal(x[f, lay.table[f, j, i]],
                                           frame[idx[min(i, len(idx) - 1)]])
            filled.append(sum(len(idx) > 0 for idx in lists))
    assert lay.blocks == [(f, f + 1, filled[f]) for f in range(b * v)]


@pytest.mark.parametrize("tmp", [True, False])
def test_blocked_member_backward_equals_one_block(monkeypatch, tmp):
    import esam.losses.merge as merge_module
    monkeypatch.setattr(fused, "MIN_MEMBER_ELEMENTS", float("inf"))  # the blocked torch ops
    feats, masks = make_inputs(frames=(3, 2), instances=(5, 4), queries=(12, 9), seed=13,
                               p_absent=0.1)
    # scaled down (unsaturated gradients), and ties inside blocks
    feats, masks = tie_first_two_queries(feats, masks, scale=0.1)
    crit = ScanNetMergeCriterion_Fast(tmp=tmp)
    whole = crit(feats, masks)["loss"]
    g_whole = grads(whole, feats)
    monkeypatch.setattr(merge_module, "_CHUNK_ELEMENTS", 3 * 8)  # blocks of ~3 entries
    blocked = crit(feats, masks)["loss"]
    assert_close(blocked, whole, 1e-12)
    for a, b in zip(grads(blocked, feats), g_whole):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", ["plain", "ties", "listed-twice"])
def test_member_kernel_gradient_equals_torch_ops(monkeypatch, case):
    """The fused member gradient against the blocked torch ops, on a batch large enough to
    take the kernel at its default threshold. With exact ties of the max, or a query listed in
    two instances of a frame (the entry layout), the kernel runs too."""
    feats, masks = make_inputs(frames=(3, 2), instances=(6, 5), queries=(40, 30), dim=300,
                               dtype=torch.float64, seed=21, p_absent=0.1)
    if case == "ties":
        feats, masks = tie_first_two_queries(feats, masks)
    if case == "listed-twice":  # the first member of instance 0 also joins instance 1
        masks = [[[torch.cat([t, frame[0][:1]]) if k == 1 else t for k, t in enumerate(frame)]
                  for frame in sample] for sample in masks]
        assert any(len(frame[0]) for sample in masks for frame in sample)
    crit = ScanNetMergeCriterion_Fast()
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "MIN_MEMBER_ELEMENTS", float("inf"))
    want = grads(crit(feats, masks)["loss"], feats)
    monkeypatch.setattr(fused, "MIN_MEMBER_ELEMENTS", 1 << 12)
    calls = []
    real = fused.member_grad
    monkeypatch.setattr(fused, "member_grad", lambda *a: calls.append(1) or real(*a))
    got = grads(crit(feats, masks)["loss"], feats)
    assert calls, "the kernel was not used"
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
