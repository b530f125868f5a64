"""Mixed precision: every loss is computed in float32 and stays finite.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with bf16 or fp16 inputs (predictions and
the float fields of the targets), every criterion — `ESAMCriterion` on single frames and on
sequences, and each stand-alone criterion and matcher — returns float32 finite values equal (to
float32 rounding) to the float32 computation on the same rounded inputs, and back-propagates
finite gradients. The same holds with half inputs and autocast off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from esam.losses import ESAMCriterion
from esam.losses.clip import ClipConsCriterion
from esam.losses.cross_frame import CrossFrameCriterion
from esam.losses.matcher import HungarianMatcher, SparseMatcher, build_costs
from esam.losses.merge import (MergeCECriterion, ScanNetMergeCriterion_Fast,
                               ScanNetMergeCriterion_Seal, sample_seal_negatives)
from esam.losses.semantic import ScanNetSemanticCriterion
from esam.structures import FrameTarget
from strategies import (HOSTILE, BatchSpec, FrameSpec, batch_config, batch_specs, build_batch,
                        build_sequences, prediction_leaves, seq_specs, values)

HALF = (torch.bfloat16, torch.float16)
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors
    yield
    torch.set_num_threads(threads)


def cast(obj, dtype: torch.dtype):
    """A copy of predictions / targets (dataclasses, lists) with every float tensor in ``dtype``;
    leaves keep ``requires_grad``."""
    if isinstance(obj, Tensor):
        if not obj.is_floating_point():
            return obj
        return obj.detach().to(dtype).requires_grad_(obj.requires_grad)
    if isinstance(obj, list):
        return [cast(o, dtype) for o in obj]
    if dataclasses.is_dataclass(obj):
        kw = {f.name: cast(getattr(obj, f.name), dtype) for f in dataclasses.fields(obj)
              if f.init and f.name != "_cache"}
        if isinstance(obj, FrameTarget):
            kw["_cache"] = {}
        return dataclasses.replace(obj, **kw)
    return obj


def autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def assert_fp32_and_close(out: dict, ref: dict) -> None:
    assert out.keys() == ref.keys()
    for key, value in out.items():
        assert value.dtype == torch.float32, (key, value.dtype)
        assert torch.isfinite(value), key
        x, y = value.item(), ref[key].item()
        assert math.isclose(x, y, rel_tol=RTOL, abs_tol=ATOL), (key, x, y)


def assert_half_grads_are_rounded_fp32_grads(loss: Tensor, predictions, ref_loss: Tensor,
                                              ref_predictions, dtype: torch.dtype) -> None:
    """The half leaves get the (finite) fp32 gradient rounded to their dtype: finite wherever it
    fits the dtype's range (fp16 tops out at 65504)."""
    loss.backward()
    ref_loss.backward()
    pairs = list(zip(prediction_leaves(predictions), prediction_leaves(ref_predictions)))
    assert any(r.grad is not None for _, (_, r) in pairs)
    for (name, h), (_, r) in pairs:
        assert (h.grad is None) == (r.grad is None), name
        if r.grad is not None:
            assert torch.isfinite(r.grad).all(), name
            assert h.grad.dtype == dtype, name
            torch.testing.assert_close(h.grad.float(), r.grad.to(dtype).float(), rtol=1e-2,
                                       atol=1e-3, msg=name)


# ---------------------------------------------------------------------------------------------
# ESAMCriterion


@settings(HOSTILE, max_examples=25)
@given(spec=batch_specs(with_options=True, dtypes=(torch.float32,)), dtype=st.sampled_from(HALF),
       on=st.booleans())
def test_single_view_in_half_precision_is_fp32_and_matches_fp32(spec, dtype, on):
    crit = ESAMCriterion(batch_config(spec))
    preds, targets = build_batch(spec)
    half_p, half_t = cast(preds, dtype), cast(targets, dtype)
    ref_p = cast(half_p, torch.float32)
    ref = crit(ref_p, cast(half_t, torch.float32))
    with autocast(on):
        out = crit(half_p, half_t)
    assert_fp32_and_close(out, ref)
    assert_half_grads_are_rounded_fp32_grads(out["loss"], half_p, ref["loss"], ref_p, dtype)


@settings(HOSTILE, max_examples=15)
@given(spec=seq_specs(with_options=True), dtype=st.sampled_from(HALF), on=st.booleans())
def test_sequences_in_half_precision_are_fp32_and_match_fp32(spec, dtype, on):
    crit = ESAMCriterion(batch_config(spec))
    preds, targets = build_sequences(spec)
    half_p, half_t = cast(preds, dtype), cast(targets, dtype)
    ref_p = cast(half_p, torch.float32)
    torch.manual_seed(0)  # the Seal merge loss draws its negatives
    ref = crit(ref_p, cast(half_t, torch.float32))
    torch.manual_seed(0)
    with autocast(on):
        out = crit(half_p, half_t)
    assert_fp32_and_close(out, ref)
    assert_half_grads_are_rounded_fp32_grads(out["loss"], half_p, ref["loss"], ref_p, dtype)


# ---------------------------------------------------------------------------------------------
# Stand-alone criteria and matchers


def _frames(dtype):
    spec = BatchSpec(frames=tuple(FrameSpec(q=q, k=k, n=n, s=5, seed=s, mode=m, scale=sc,
                                            clip_rows=3, sem_level=lvl)
                                  for q, k, n, s, m, sc, lvl in (
                                      (6, 4, 30, 1, "mixed", 30.0, "point"),
                                      (5, 7, 25, 2, "normal", 1e4, "superpoint"),
                                      (4, 0, 0, 3, "saturated", 1.0, "point"))),
                     levels=("superpoint", "point"), c_sem=4, c_inst=2)
    preds, targets = build_batch(spec)
    return cast(preds, dtype), cast(targets, dtype)


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("dtype", HALF)
def test_each_criterion_and_matcher_in_half_precision(dtype, on):
    preds, targets = _frames(dtype)
    ref_p, ref_t = cast(preds, torch.float32), cast(targets, torch.float32)
    esam = ESAMCriterion({"preset": "esam", "num_semantic_classes": 4, "num_instance_classes": 2})
    seed = ESAMCriterion({"preset": "seed", "num_semantic_classes": 4, "num_instance_classes": 2,
                          "box_loss": "giou"})
    sem = ScanNetSemanticCriterion(num_classes=4)
    clip = ClipConsCriterion(symmetric=True)
    runs = {
        "instance_esam": lambda p, t: esam.instance(p, t),
        "instance_seed": lambda p, t: seed.instance(p, t),
        "semantic": lambda p, t: sem(p, t),
        "clip": lambda p, t: clip(p),
    }
    for name, run in runs.items():
        ref = run(ref_p, ref_t)
        with autocast(on):
            out = run(preds, targets)
        assert_fp32_and_close(out, ref)

    costs = build_costs({"cls": 0.5, "bce": 1.0, "dice": 1.0})
    args = lambda p, t: ([f.final.cls_logits for f in p], [f.final.mask_logits for f in p],
                         [x.labels for x in t], [x.masks(f.final.mask_level) for f, x in zip(p, t)],
                         [x.query_masks for x in t])
    for matcher in (HungarianMatcher(costs), SparseMatcher(costs, topk=2)):
        ref = matcher(*args(ref_p, ref_t))
        with autocast(on):
            out = matcher(*args(preds, targets))
        for (r_q, r_k), (o_q, o_k) in zip(ref, out):
            assert torch.equal(r_q, o_q) and torch.equal(r_k, o_k)


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("dtype", HALF)
def test_cross_frame_and_merge_criteria_in_half_precision(dtype, on):
    g = torch.Generator().manual_seed(0)
    q, d, v = 6, 5, 3
    match = [values(g, (q, q), "mixed", 30.0).to(dtype).requires_grad_() for _ in range(v - 1)]
    feats = [values(g, (q, d), "normal", 1e4).to(dtype).requires_grad_() for _ in range(v)]
    targets = [torch.rand(q, q, generator=g) < 0.3 for _ in range(v - 1)]
    ins = [[[torch.randperm(q, generator=g)[:int(torch.randint(0, 3, (1,), generator=g))]
             for _ in range(4)] for _ in range(v)] for _ in range(2)]
    merge_feats = [[values(g, (q, d), "normal", 1.0).to(dtype).requires_grad_() for _ in range(v)]
                   for _ in range(2)]
    negatives = sample_seal_negatives(ins, torch.Generator().manual_seed(1))
    logits = values(g, (q, 40), "mixed", 30.0).to(dtype).requires_grad_()
    qid, gt = torch.randint(0, 4, (q,), generator=g), torch.randint(0, 4, (40,), generator=g)
    runs = {
        "cross_frame_slot": lambda c: CrossFrameCriterion()(c(match), c(feats), targets),
        "cross_frame_matched": lambda c: CrossFrameCriterion(
            consistency="matched", reduction="mean", pos_weight=5.0)(c(match), c(feats), targets),
        "fast": lambda c: ScanNetMergeCriterion_Fast()([c(f) for f in merge_feats], ins),
        "seal": lambda c: ScanNetMergeCriterion_Seal()([c(f) for f in merge_feats], ins,
                                                       negatives=negatives),
        "merge_ce": lambda c: MergeCECriterion()(c(logits), qid, gt, 3),
    }
    for name, run in runs.items():
        ref = run(lambda x: cast(x, torch.float32))
        with autocast(on):
            out = run(lambda x: x)
        assert_fp32_and_close(out, ref)
        out["loss"].backward()
    for t in match + feats + [f for fs in merge_feats for f in fs] + [logits]:
        assert t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all()
