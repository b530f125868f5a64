"""The fused one-pass mask statistics (`esam.losses.fused`) against loops and the torch-op path."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from benchmarks.released_reference import released_mixed_instance_loss
from esam.config import esam_preset
from esam.losses import ESAMCriterion, fused
from esam.losses import criterion as criterion_module
from esam.losses import functional as LF
from esam.losses import matcher as matcher_module
from esam.losses.criterion import build_instance_criterion
from esam.structures import InstanceMasks

from loops import sigmoid
from test_esam_parity import to_released
from test_instance import make_batch


@pytest.fixture
def force_fused(monkeypatch):
    """Fused kernel on at every size, and sparse matching by gathered pairs (which it needs)."""
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(matcher_module, "_PAIR_MODE_MIN_WORK", 0)
    monkeypatch.setattr(matcher_module, "_PAIR_MODE_MAX_FRACTION", float("inf"))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _loop_stats(x, ids, inst):
    out = torch.zeros(8, x.shape[0], dtype=torch.float64)
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            v = float(x[r, i])
            q = sigmoid(v)
            hit = 1.0 if q >= 0.5 else 0.0
            member = int(ids[i]) == int(inst[r])
            out[:, r] += torch.tensor([_softplus(v), q, q * q, hit, v * member, q * member,
                                       hit * member, v], dtype=torch.float64)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# rows shorter than a chunk, whole chunks, a tail; one lane group; groups, chunks and a tail
@pytest.mark.parametrize("p", [53, 128, 203, 512, 1203])
def test_row_stats_equal_loops(dtype, p):
    g = torch.Generator().manual_seed(p)
    x = (torch.randn(6, p, generator=g, dtype=torch.float64) * 4)
    x[0, :5] = torch.tensor([80.0, -80.0, 1e4, -1e4, 0.0], dtype=torch.float64)  # huge, and 0
    x[0, -3:] = torch.tensor([-1e4, 1e4, -90.0], dtype=torch.float64)  # and in the tail
    x[1] = 1e-3 * x[1]  # near the binarisation threshold, but not within rounding of it
    x[5] = -x[5].abs() - 12  # every probability tiny: products of many factors close to 1
    x = x.to(dtype)
    ids = torch.randint(-1, 4, (p,), generator=g)
    inst = torch.tensor([0, 3, fused.NO_INSTANCE, 1, 2, 0])
    got = fused.row_stats(x, ids, inst)
    assert got is not None and got.dtype == dtype and got.shape == (8, 6)
    assert torch.isfinite(got).all()
    want = _loop_stats(x.double(), ids, inst)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    # float32 sums of rows with +-1e4 entries: rounding is relative to the sum of |x|
    scale = x.double().abs().sum(1) * (1e-14 if dtype == torch.float64 else 2e-7)  # (6,)
    assert ((got.double() - want).abs() <= tol * want.abs() + tol + scale).all(), \
        (got.double() - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_grad_equals_the_formula_and_zeros_unmatched_rows(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 31, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.randint(-1, 3, (31,), generator=g)
    # a row without a pair but with a row part (4) is computed; rows 1 and 5 stay zero
    inst = torch.tensor([2, fused.NO_INSTANCE, 0, 1, fused.NO_INSTANCE, fused.NO_INSTANCE])
    coef = torch.randn(6, 5, generator=g, dtype=torch.float64).to(dtype)
    coef[1] = coef[5] = 0.0
    coef[4, 3:] = 0.0
    got = fused.row_grad(x, ids, inst, coef)
    assert got is not None and got.dtype == dtype and got.shape == (6, 31)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for r in range(6):
        a, b, c, gamma, beta = coef[r].tolist()
        for i in range(31):
            q = sigmoid(float(x[r, i]))
            member = 1.0 if int(ids[i]) == int(inst[r]) else 0.0
            want = q * (a + b * q) + c * q * q * (1 - q) - member * (gamma + beta * q * (1 - q))
            assert float(got[r, i]) == pytest.approx(want, rel=tol, abs=tol)
    assert (got[1] == 0).all() and (got[5] == 0).all()
    assert (fused.row_grad(x, ids, torch.full((6,), fused.NO_INSTANCE), coef * 0) == 0).all()
    with pytest.raises(ValueError, match=r"coef: expected shape \(R=6, 5\)"):
        fused.row_grad(x, ids, inst, coef[:, :4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_lazy_zeros_are_zeros_and_writable(dtype):
    z = fused.lazy_zeros((300, 5000), dtype)
    assert z.shape == (300, 5000) and z.dtype == dtype and z.is_contiguous()
    assert int(torch.count_nonzero(z)) == 0
    z[7] = 3
    assert int(torch.count_nonzero(z)) == 5000 and float(z.sum()) == 15000
    assert fused.lazy_zeros((0, 4), dtype).shape == (0, 4)


def test_no_positions_give_zero_sums_and_gradients():
    x, ids, inst = torch.zeros(3, 0), torch.zeros(0, dtype=torch.long), torch.tensor([0, 1, -2])
    assert torch.equal(fused.row_stats(x, ids, inst), torch.zeros(8, 3))
    grad = fused.row_grad(x, ids, inst, torch.ones(3, 5))
    assert grad.shape == (3, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_member_grad_equals_the_loop(dtype, monkeypatch):
    monkeypatch.setattr(fused, "_enabled", True)
    g = torch.Generator().manual_seed(5)
    p, d, s = 23, 7, 5
    segment = torch.randint(0, s, (p,), generator=g)
    x = torch.randint(-2, 3, (p, d), generator=g).to(dtype)  # small integers: many ties
    top = torch.full((s, d), -10.0, dtype=dtype).scatter_reduce(
        0, segment.view(-1, 1).expand(p, d), x, "amax")
    top[4] = float("nan")  # a segment whose rows never hit
    share = torch.randn(s, d, generator=g, dtype=dtype)
    spread = torch.randn(s, d, generator=g, dtype=dtype)
    out = torch.randn(p, d, generator=g, dtype=dtype)
    want = out.clone()
    hits = 0
    for j in range(p):
        for c in range(d):
            k = int(segment[j])
            hit = bool(x[j, c] == top[k, c])
            hits += hit
            want[j, c] += spread[k, c] + (share[k, c] if hit else 0.0)
    n = fused.member_grad(out, x, segment, top, share, spread)
    assert int(n) == hits
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="segment"):
        fused.member_grad(out, x, segment[:-1], top, share, spread)
    with pytest.raises(ValueError, match="share"):
        fused.member_grad(out, x, segment, top, share[:, :-1], spread)


def test_row_stats_shape_errors():
    x = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"ids: expected shape \(P=5,\)"):
        fused.row_stats(x, torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inst: expected shape \(R=3,\)"):
        fused.row_stats(x, torch.zeros(5, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def _one_instance_per_query(targets, seed):
    """ESAM's query masks: each query may take only the instance of its seed superpoint."""
    g = torch.Generator().manual_seed(seed)
    for t in targets:
        k, q = t.query_masks.shape
        owner = torch.randint(-1, max(k, 1), (q,), generator=g)
        t.query_masks = torch.arange(k).unsqueeze(1) == owner.unsqueeze(0)
    return targets


def _loss_and_grads(preds, targets, cfg):
    leaves = [l.mask_logits for p in preds for l in p.layers]
    for t in leaves:
        t.requires_grad_(True)
        t.grad = None
    loss = build_instance_criterion(cfg)(preds, targets)["loss"]
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in leaves]


def _with_and_without_kernels(preds, targets, cfg, kernel):
    """Loss and gradients with the fused kernels (checking ``kernel`` ran) and without."""
    calls = []
    real = getattr(fused, kernel)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, kernel, lambda *a: calls.append(1) or real(*a))
        with_kernels = _loss_and_grads(preds, targets, cfg)
    assert calls, f"the fused kernel {kernel} was not used"
    previous = fused.set_enabled(False)
    try:
        without = _loss_and_grads(preds, targets, cfg)
    finally:
        fused.set_enabled(previous)
    return with_kernels, without


# (Q, K, N) per sample: no GT instance, more GT instances than queries; an empty frame
SPECS = {"instances": [(24, 5, 300), (20, 4, 250), (16, 0, 120), (5, 9, 80)],
         "empty_frame": [(20, 4, 250), (6, 3, 0)]}


@pytest.mark.parametrize("specs", SPECS)
@pytest.mark.parametrize("dice", ["esam", "seed"])
def test_criterion_with_fused_kernel_equals_torch_ops_and_released(force_fused, dice, specs):
    specs = SPECS[specs]
    preds, targets = make_batch(specs, seed=3, dtype=torch.float32, c=1, s=20,
                                levels=("superpoint", "point", "point"))
    targets = _one_instance_per_query(targets, seed=4)
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=1)
    # the esam preset, or its sparse matching with both Dice formulas of the seed
    cfg.dice_form = cfg.matcher.dice_cost = dice
    (loss_fused, grads_fused), (loss_ops, grads_ops) = _with_and_without_kernels(
        preds, targets, cfg, "row_stats")
    torch.testing.assert_close(loss_fused, loss_ops, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_fused, grads_ops):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(loss_fused)
    if dice == "esam":
        pred, insts, modes = to_released(preds, targets)
        ref = released_mixed_instance_loss(pred, insts, modes)
        if any(n == 0 for _, _, n in specs):
            assert torch.isnan(ref)  # the released code's known failure on an empty frame
        else:
            assert loss_fused.item() == pytest.approx(ref.item(), rel=1e-5)


def test_rows_with_several_pairs_keep_the_torch_op_path(force_fused, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 40, generator=g)
    ids = torch.randint(-1, 3, (40,), generator=g)
    gt = InstanceMasks(ids=ids, num_instances=3)
    pairs = (torch.tensor([0, 0, 2]), torch.tensor([0, 1, 2]))  # row 0 has two pairs
    monkeypatch.setattr(fused, "row_stats", lambda *a: pytest.fail("fused kernel used"))
    sums = LF.MaskSums(x, gt, pairs=pairs).prefetch("softplus", "logits", "probs")
    dense = LF.MaskSums(x, gt).prefetch("softplus", "logits", "probs")
    for row, inst in zip(*pairs):
        assert sums.inside("logits")[row, inst] == pytest.approx(
            dense.inside("logits")[row, inst].item(), rel=1e-5)
    torch.testing.assert_close(sums.total("softplus"), dense.total("softplus"))


def test_failed_compile_warns_once_and_falls_back(force_fused, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(torch, "compile", broken)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 30, generator=g)
    gt = InstanceMasks(ids=torch.randint(-1, 2, (30,), generator=g), num_instances=2)
    pairs = (torch.tensor([0, 3]), torch.tensor([1, 0]))
    with pytest.warns(RuntimeWarning, match="compiling the fused mask kernels failed"):
        sums = LF.MaskSums(x, gt, pairs=pairs).prefetch("softplus", "logits", "probs")
    assert not fused.is_enabled() and not fused.applies(x)
    want = LF.MaskSums(x, gt).prefetch("softplus", "logits", "probs")
    torch.testing.assert_close(sums.total("softplus"), want.total("softplus"))
    assert sums.inside("probs")[3, 0] == pytest.approx(want.inside("probs")[3, 0].item(),
                                                       rel=1e-5)


def test_recompile_limit_falls_back_for_that_call_only(force_fused, monkeypatch):
    class FailOnRecompileLimitHit(Exception):  # the name torch._dynamo.exc raises under
        pass

    def limited(x, *args):
        if x.shape[0] == 1:
            raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")
        return x.new_ones(8, x.shape[0])

    monkeypatch.setattr(fused, "_compiled", {"stats": limited, "stats_tail": limited})
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(fused, "_limit_warned", False)
    ids = torch.zeros(100, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="recompile_limit was reached"):
        assert fused.row_stats(torch.zeros(1, 100), ids, torch.zeros(1, dtype=torch.long)) is None
    assert fused.is_enabled()  # the usual shapes keep their kernels
    got = fused.row_stats(torch.zeros(3, 100), ids, torch.zeros(3, dtype=torch.long))
    assert got is not None and got.shape == (8, 3)


def test_applies_only_to_large_cpu_float_layers():
    assert fused.applies(torch.zeros(1024, 1024)) == fused.is_enabled()
    assert not fused.applies(torch.zeros(1023, 1024))
    assert not fused.applies(torch.zeros(1024, 1024, dtype=torch.float16))


def test_environment_variable_turns_it_off():
    env = {**os.environ, "ESAM_FUSED": "0"}
    out = subprocess.run([sys.executable, "-c", "from esam.losses import fused; "
                          "print(fused.is_enabled())"], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_half_precision_logits_use_the_kernel_in_float32(force_fused):
    preds, targets = make_batch([(16, 4, 200), (12, 3, 150)], seed=7, dtype=torch.float32, c=1,
                                s=12, levels=("point", "point"))
    targets = _one_instance_per_query(targets, seed=8)
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=1)
    want, want_grads = _loss_and_grads(preds, targets, cfg)
    for p in preds:
        for layer in p.layers:
            layer.mask_logits = layer.mask_logits.detach().to(torch.bfloat16)
    calls = []
    real = fused.row_grad_at  # where every fused gradient pass goes through
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=torch.bfloat16):
        mp.setattr(fused, "row_grad_at", lambda *a: calls.append(a[0].dtype) or real(*a))
        got, grads = _loss_and_grads(preds, targets, cfg)
    assert calls and set(calls) == {torch.float32}
    assert torch.isfinite(got) and all(g.dtype == torch.bfloat16 for g in grads)
    assert got.item() == pytest.approx(want.item(), rel=2e-2)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=2e-4)


def test_seed_preset_gradient_with_the_kernel_equals_torch_ops(force_fused):
    # Hungarian matching: no pair mode, but each query has one pair, so the gradient is fused
    from esam.config import seed_preset
    preds, targets = make_batch([(14, 5, 220), (10, 3, 160)], seed=9, dtype=torch.float32, c=2,
                                s=12, levels=("point", "point"))
    cfg = seed_preset(num_semantic_classes=4, num_instance_classes=2)
    (loss_fused, grads_fused), (loss_ops, grads_ops) = _with_and_without_kernels(
        preds, targets, cfg, "row_grad")
    torch.testing.assert_close(loss_fused, loss_ops, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_fused, grads_ops):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# -- the NaN/Inf check riding on the statistics pass --------------------------------------------

def _criterion():
    cfg = esam_preset(num_semantic_classes=4, num_instance_classes=1)
    cfg.loss_weight.sem = 0.0  # the batch has no semantic logits
    return ESAMCriterion(cfg)


def _sparse_batch(seed=3):
    preds, targets = make_batch([(24, 5, 300), (20, 4, 250)], seed=seed, dtype=torch.float32,
                                c=1, s=20, levels=("superpoint", "point", "point"))
    return preds, _one_instance_per_query(targets, seed=seed + 1)


def _exact_checks(monkeypatch):
    """Record the names of the tensors the criterion checks element by element."""
    seen = []
    real = criterion_module.check_finite

    def spy(named):
        seen.extend(n for n, _ in named)
        return real(named)

    monkeypatch.setattr(criterion_module, "check_finite", spy)
    return seen


def test_stats_pass_stands_in_for_the_finite_check(force_fused, monkeypatch):
    preds, targets = _sparse_batch()
    crit = _criterion()
    seen = _exact_checks(monkeypatch)
    crit(preds, targets)
    point = [f"predictions[{b}].layers[{i}].mask_logits" for b in range(2) for i in (1, 2)]
    assert not set(point) & set(seen)  # the fused pass vouched for them
    assert "predictions[1].layers[2].cls_logits" in seen  # everything else: checked on its own
    seen.clear()
    previous = fused.set_enabled(False)
    try:
        crit(preds, targets)
    finally:
        fused.set_enabled(previous)
    assert set(point) <= set(seen)  # no pass: each is checked on its own


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [(0, 1, 3, 7), (1, 2, 19, 249), (1, 1, 0, 0)])
def test_non_finite_logit_found_by_the_stats_pass_is_named(force_fused, value, where):
    preds, targets = _sparse_batch()
    b, layer, row, col = where
    with torch.no_grad():
        preds[b].layers[layer].mask_logits[row, col] = value
    crit = _criterion()
    with pytest.raises(ValueError, match=re.escape(f"predictions[{b}].layers[{layer}]."
                                                   "mask_logits: expected finite values")):
        crit(preds, targets)


def test_overflowing_row_totals_of_finite_logits_are_not_an_error(force_fused):
    preds, targets = _sparse_batch()
    with torch.no_grad():
        preds[0].layers[1].mask_logits[2] = 3e38  # finite; their row total overflows to inf
    crit = _criterion()
    assert torch.isfinite(crit(preds, targets)["loss"])


def test_watch_outside_a_criterion():
    x = torch.randn(4, 300)
    bad = x.clone()
    bad[1, 5] = float("nan")
    ids, inst = torch.randint(-1, 3, (300,)), torch.tensor([0, 1, 2, fused.NO_INSTANCE])
    unread = torch.zeros(3)
    with fused.watch_finite([x, bad, unread]) as watch:
        fused.row_stats(x, ids, inst)
        fused.row_stats(bad, ids, inst)
    assert not watch.unverified(x) and watch.unverified(bad)
    assert watch.unverified(unread)  # never read by a pass
    fused.row_stats(x, ids, inst)  # no watch: nothing to record


def test_reusable_empty_reuses_a_mapping_only_once_every_tensor_on_it_is_gone(monkeypatch):
    monkeypatch.setattr(fused, "_mappings", fused._MappingPool(max_mappings=3))
    a = fused.reusable_empty((64, 33), torch.float32)
    a.fill_(1.0)
    first = a.data_ptr()
    b = fused.reusable_empty((64, 33), torch.float32)
    assert b.data_ptr() != first  # `a` still holds its mapping
    view = a[10:20]
    del a
    c = fused.reusable_empty((64, 33), torch.float32)
    assert c.data_ptr() != first  # a view of it is still alive
    del view
    d = fused.reusable_empty((64, 33), torch.float32)
    assert d.data_ptr() == first  # now free: reused, its pages already mapped
    assert d.shape == (64, 33) and d._base is None and d.is_contiguous()
    assert fused.reusable_empty((0, 4), torch.float64).shape == (0, 4)
    e = fused.reusable_empty((3, 4), torch.float64)
    e.copy_(torch.arange(12.0).view(3, 4))
    assert torch.equal(e.sum(1), torch.tensor([6.0, 22.0, 38.0]))
    # beyond max_mappings, further buffers are plain (released with their tensors)
    keep = [fused.reusable_empty((64, 33), torch.float32) for _ in range(3)]
    assert fused._mappings._busy == 3 and len({t.data_ptr() for t in keep + [b, c, d]}) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reusable_zeros_are_zeros_even_in_a_reused_mapping(monkeypatch, dtype):
    monkeypatch.setattr(fused, "_zero_mappings", fused._MappingPool(max_mappings=2))
    a = fused.reusable_zeros((50, 700), dtype)
    assert a.shape == (50, 700) and a.dtype == dtype and a.is_contiguous()
    assert int(torch.count_nonzero(a)) == 0
    first = a.data_ptr()
    a[3] = 5.0
    a.view(-1)[-1] = -1.0  # writes anywhere, as a caller (an optimizer, say) might
    del a
    b = fused.reusable_zeros((50, 700), dtype)
    assert b.data_ptr() == first and int(torch.count_nonzero(b)) == 0  # reused, zeroed
    c = fused.reusable_zeros((50, 700), dtype)
    assert c.data_ptr() != first  # `b` still holds it
    c.fill_(2.0)
    del b, c
    assert fused._zero_mappings._busy == 0
    assert fused.release_memory() >= 2 * 50 * 700 * torch.empty((), dtype=dtype).element_size()
    assert fused._zero_mappings._bytes == 0 and not fused._zero_mappings._free
    assert int(torch.count_nonzero(fused.reusable_zeros((50, 700), dtype))) == 0
    assert fused.reusable_zeros((0, 3), dtype).shape == (0, 3)


def test_row_grad_rows_are_exact_in_a_reused_dirty_buffer(monkeypatch):
    monkeypatch.setattr(fused, "_zero_mappings", fused._MappingPool(max_mappings=4))
    torch.manual_seed(0)
    x = torch.randn(64, 20_000)
    ids = torch.randint(-1, 10, (20_000,))
    inst = torch.full((64,), fused.NO_INSTANCE)
    inst[:10] = torch.arange(10)
    coef = torch.randn(64, 5)
    first = fused.row_grad(x, ids, inst, coef)
    assert first is not None
    first.fill_(7.0)  # the caller scribbles over every row before releasing it
    ptr = first.data_ptr()
    del first
    other = inst.clone()
    other[:10] = fused.NO_INSTANCE
    other[30:40] = torch.arange(10)  # different rows this time
    coef = coef * (other != fused.NO_INSTANCE).unsqueeze(1)
    got = fused.row_grad(x, ids, other, coef)
    assert got.data_ptr() == ptr  # the scribbled-on mapping, reused
    assert int(torch.count_nonzero(got[:30])) == 0 and int(torch.count_nonzero(got[40:])) == 0
    # the documented row formula, in float64
    q = torch.sigmoid(x[30:40].double())
    a, b, c, gamma, beta = coef[30:40].double().T.unsqueeze(-1)
    g = (ids.unsqueeze(0) == torch.arange(10).unsqueeze(1)).double()
    want = q * (a + b * q) + c * q * q * (1 - q) - g * (gamma + beta * q * (1 - q))
    torch.testing.assert_close(got[30:40].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kept_mappings_are_private_to_a_forked_process(monkeypatch):
    monkeypatch.setattr(fused, "_zero_mappings", fused._MappingPool(max_mappings=2))
    a = fused.reusable_zeros((64, 64), torch.float32)
    lazy = fused.lazy_zeros((64, 64), torch.float32)
    pid = os.fork()
    if pid == 0:  # the child writes into both buffers
        try:
            a.fill_(3.0)
            lazy.fill_(4.0)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert int(torch.count_nonzero(a)) == 0 and int(torch.count_nonzero(lazy)) == 0
