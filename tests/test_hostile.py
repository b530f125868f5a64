"""Hostile inputs: property-based tests (hypothesis) over every criterion.

Generated batches cover B in 1..3 samples, Q in 0..12 queries, K in 0..15 GT instances (K > Q
included), N in 0..60 points (empty frames included), GT instances that own no point, 1..3
decoder layers at point or superpoint level, logits of scale 1, 30 and 1e4, exactly +-1e4 or all
zero, float32 and float64, the `seed` / `esam` presets, the library default and random
overrides of every named option, and sequences of V in 1..4 frames with instances absent from
some frames. Properties:

1. finite inputs give finite terms, and ``loss`` back-propagates finite gradients;
2. a NaN or Inf anywhere in a prediction gives a ValueError naming that tensor;
3. out-of-range labels, mismatched lengths, wrong shapes and dtypes give a ValueError naming the
   argument (never an IndexError / RuntimeError from inside torch, never a silent number);
4. batched == per-sample where the normalisation makes it exact;
5. id and dense GT encodings give equal losses;
6. permuting the queries leaves the matched losses unchanged;
plus the same finiteness for the functional formulas, matchers and the stand-alone cross-frame
and merge criteria, and config errors that name an unknown key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from esam.config import (CrossFrameConfig, ESAMLossConfig, LossWeights, MatcherConfig,
                         MergeConfig, config_from_dict)
from esam.losses import ESAMCriterion, fused
from esam.losses import functional as LF
from esam.losses import matcher as matcher_module
from esam.losses.cross_frame import CrossFrameCriterion
from esam.losses.matcher import HungarianMatcher, SparseMatcher, build_costs
from esam.losses.merge import (MergeCECriterion, ScanNetMergeCriterion_Fast,
                               ScanNetMergeCriterion_Seal, axis_aligned_box_iou)
from esam.structures import (FramePrediction, FrameTarget, InstanceMasks, LayerOutput,
                             SequencePrediction)
from strategies import (HOSTILE, MODES, SCALES, BatchSpec, FrameSpec, SeqSpec, batch_config,
                        batch_specs, build_batch, build_sequences, permute_frame,
                        prediction_leaves, seq_specs, values)

# Small fixed inputs for the example-based tests.
_SMALL = BatchSpec(frames=(FrameSpec(q=3, k=2, n=10, s=4, seed=1),), levels=("point",),
                   c_sem=3, c_inst=1)
_SEQ = SeqSpec(frames=((FrameSpec(q=3, k=2, n=10, s=4, seed=1),
                        FrameSpec(q=3, k=1, n=8, s=4, seed=2),
                        FrameSpec(q=3, k=0, n=0, s=4, seed=3)),),
               present=(((0, 1), (1,), ()),), levels=("superpoint", "point"), c_sem=3, c_inst=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: a thread pool costs more than it saves, and much more on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_finite_terms(out: dict, dtype: torch.dtype) -> None:
    assert "loss" in out
    for key, value in out.items():
        assert value.dim() == 0, key
        assert value.dtype == dtype, (key, value.dtype)
        assert torch.isfinite(value), (key, value.item())


def assert_finite_backward(loss: torch.Tensor, predictions) -> None:
    assert loss.requires_grad  # the graph stays connected even when nothing matched
    loss.backward()
    leaves = prediction_leaves(predictions)
    assert any(t.grad is not None for _, t in leaves)
    for name, t in leaves:
        if t.grad is not None:
            assert torch.isfinite(t.grad).all(), name


def assert_same_terms(a: dict, b: dict, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].item(), b[key].item()
        assert math.isclose(x, y, rel_tol=rtol, abs_tol=atol), (key, x, y)


# ---------------------------------------------------------------------------------------------
# 1. Finite in, finite out (and finite gradients).


@settings(HOSTILE, max_examples=150)
@given(spec=batch_specs(with_options=True))
def test_single_view_terms_and_gradients_are_finite(spec):
    preds, targets = build_batch(spec)
    out = ESAMCriterion(batch_config(spec))(preds, targets)
    assert_finite_terms(out, spec.dtype)
    assert_finite_backward(out["loss"], preds)


@settings(HOSTILE, max_examples=80)
@given(spec=seq_specs(with_options=True))
def test_sequence_terms_and_gradients_are_finite(spec):
    preds, targets = build_sequences(spec)
    out = ESAMCriterion(batch_config(spec))(preds, targets)
    assert_finite_terms(out, torch.float32)
    assert_finite_backward(out["loss"], preds)


# ---------------------------------------------------------------------------------------------
# 2. NaN / Inf in a prediction: an error naming the tensor.

BAD_VALUES = (float("nan"), float("inf"), float("-inf"))


def _poison(predictions, data) -> str:
    leaves = [(name, t) for name, t in prediction_leaves(predictions) if t.numel()]
    assume(leaves)
    name, t = data.draw(st.sampled_from(leaves), label="tensor")
    pos = data.draw(st.integers(0, t.numel() - 1), label="position")
    with torch.no_grad():
        t.view(-1)[pos] = data.draw(st.sampled_from(BAD_VALUES), label="value")
    return name


@settings(HOSTILE, max_examples=60)
@given(spec=batch_specs(), data=st.data())
def test_nan_or_inf_in_any_frame_prediction_is_named(spec, data):
    preds, targets = build_batch(spec)
    name = _poison(preds, data)
    with pytest.raises(ValueError, match=re.escape(name) + r": expected finite values"):
        ESAMCriterion(batch_config(spec))(preds, targets)


@settings(HOSTILE, max_examples=40)
@given(spec=seq_specs(), data=st.data())
def test_nan_or_inf_in_any_sequence_prediction_is_named(spec, data):
    preds, targets = build_sequences(spec)
    name = _poison(preds, data)
    with pytest.raises(ValueError, match=re.escape(name) + r": expected finite values"):
        ESAMCriterion(batch_config(spec))(preds, targets)


def test_without_the_check_a_nan_propagates_instead_of_vanishing():
    g = torch.Generator().manual_seed(0)
    layer = LayerOutput(torch.randn(4, 2, generator=g), torch.randn(4, 10, generator=g))
    sem = torch.randn(10, 3, generator=g)
    sem[0, 0] = float("nan")
    target = FrameTarget(labels=torch.zeros(2, dtype=torch.long),
                         instance_ids=torch.tensor([0, 0, 1, 1, -1, 0, 1, -1, 0, 1]),
                         semantic=torch.zeros(10, dtype=torch.long), boxes=torch.rand(2, 6))
    pred = FramePrediction([layer], semantic_logits=sem)
    cfg = {"num_semantic_classes": 3, "box_loss": None}
    with pytest.raises(ValueError, match=r"predictions\[0\]\.semantic_logits"):
        ESAMCriterion(cfg)([pred], [target])
    out = ESAMCriterion({**cfg, "check_finite": False})([pred], [target])
    assert torch.isnan(out["loss_sem"]) and torch.isnan(out["loss"])


# ---------------------------------------------------------------------------------------------
# 3. Malformed inputs: a ValueError naming the argument.


def _sample(data, items):
    assume(len(items) > 0)
    return data.draw(st.integers(0, len(items) - 1), label="sample")


def _index(data, size: int) -> int:
    assume(size > 0)
    return data.draw(st.integers(0, size - 1), label="index")


def _replace_target(targets, i, **kw):
    targets[i] = dataclasses.replace(targets[i], _cache={}, **kw)


def _replace_layer(preds, i, j, **kw):
    preds[i].layers[j] = dataclasses.replace(preds[i].layers[j], **kw)


def _replace_pred(preds, i, **kw):
    preds[i] = dataclasses.replace(preds[i], **kw)


CORRUPTIONS = []


def corruption(argument: str):
    """Register a corruption; ``argument`` is the name the error must start with."""
    def register(fn):
        fn.argument = argument
        CORRUPTIONS.append(fn)
        return fn
    return register


@corruption("labels")
def _labels_out_of_range(preds, targets, spec, data):
    i = _sample(data, targets)
    k = _index(data, targets[i].num_instances)
    labels = targets[i].labels.clone()
    labels[k] = data.draw(st.sampled_from((spec.c_inst, spec.c_inst + 7, -1, -100)))
    _replace_target(targets, i, labels=labels)


@corruption("labels")
def _labels_float(preds, targets, spec, data):
    i = _sample(data, targets)
    _replace_target(targets, i, labels=targets[i].labels.float())


@corruption("instance_ids")
def _instance_ids_out_of_range(preds, targets, spec, data):
    i = _sample(data, targets)
    ids = targets[i].instance_ids.clone()
    ids[_index(data, ids.numel())] = data.draw(st.sampled_from(
        (targets[i].num_instances, targets[i].num_instances + 3, -2, -50)))
    _replace_target(targets, i, instance_ids=ids)


@corruption("instance_ids")
def _instance_ids_float(preds, targets, spec, data):
    i = _sample(data, targets)
    _replace_target(targets, i, instance_ids=targets[i].instance_ids.float())


@corruption("instance_masks")
def _instance_masks_float(preds, targets, spec, data):
    i = _sample(data, targets)
    t = targets[i]
    _replace_target(targets, i, instance_ids=None,
                    instance_masks=torch.rand(t.num_instances, t.num_points))


@corruption("semantic")
def _semantic_out_of_range(preds, targets, spec, data):
    i = _sample(data, targets)
    sem = targets[i].semantic.clone()
    sem[_index(data, sem.numel())] = data.draw(st.sampled_from(
        (spec.c_sem + 1, spec.c_sem + 9, -1, -7)))  # c_sem itself is ignore_index
    _replace_target(targets, i, semantic=sem)


@corruption("semantic")
def _semantic_float(preds, targets, spec, data):
    i = _sample(data, targets)
    _replace_target(targets, i, semantic=targets[i].semantic.float())


@corruption("superpoints")
def _superpoints_out_of_range(preds, targets, spec, data):
    i = _sample(data, targets)
    sp = targets[i].superpoints.clone()
    s = targets[i].num_superpoints
    sp[_index(data, sp.numel())] = data.draw(st.sampled_from((s, s + 4, -1, -3)))
    _replace_target(targets, i, superpoints=sp)


@corruption("superpoints")
def _superpoints_float(preds, targets, spec, data):
    i = _sample(data, targets)
    _replace_target(targets, i, superpoints=targets[i].superpoints.float())


@corruption("query_masks")
def _query_masks_float(preds, targets, spec, data):
    i = _sample(data, targets)
    _replace_target(targets, i, query_masks=targets[i].query_masks.float() * 0.7)


@corruption("query_masks")
def _query_masks_wrong_q(preds, targets, spec, data):
    assume(spec.config == "esam")  # only the sparse matcher reads them
    i = _sample(data, targets)
    qm = targets[i].query_masks
    _replace_target(targets, i, query_masks=torch.ones(qm.shape[0], qm.shape[1] + 1,
                                                       dtype=torch.bool))


@corruption("boxes")
def _boxes_shape(preds, targets, spec, data):
    i = _sample(data, targets)
    _replace_target(targets, i, boxes=targets[i].boxes[:, :5])


@corruption("global_ids")
def _global_ids_float(preds, targets, spec, data):
    i = _sample(data, targets)
    _replace_target(targets, i, global_ids=torch.zeros(targets[i].num_instances))


@corruption("points")
def _points_shape(preds, targets, spec, data):
    i = _sample(data, targets)
    _replace_target(targets, i, points=targets[i].points[:, :2])


@corruption("mask_logits")
def _mask_logits_columns(preds, targets, spec, data):
    i = _sample(data, preds)
    j = _index(data, len(preds[i].layers))
    m = preds[i].layers[j].mask_logits
    _replace_layer(preds, i, j, mask_logits=torch.zeros(m.shape[0], m.shape[1] + 1))


@corruption("mask_logits")
def _mask_logits_rows(preds, targets, spec, data):
    i = _sample(data, preds)
    j = _index(data, len(preds[i].layers))
    m = preds[i].layers[j].mask_logits
    _replace_layer(preds, i, j, mask_logits=torch.zeros(m.shape[0] + 1, m.shape[1]))


@corruption("mask_logits")
def _mask_logits_int(preds, targets, spec, data):
    i = _sample(data, preds)
    j = _index(data, len(preds[i].layers))
    _replace_layer(preds, i, j, mask_logits=preds[i].layers[j].mask_logits.detach().long())


@corruption("cls_logits")
def _cls_logits_columns(preds, targets, spec, data):
    i = _sample(data, preds)
    j = _index(data, len(preds[i].layers))
    q = preds[i].layers[j].num_queries
    _replace_layer(preds, i, j, cls_logits=torch.zeros(q, spec.c_inst + 2))


@corruption("scores")
def _scores_shape(preds, targets, spec, data):
    i = _sample(data, preds)
    j = _index(data, len(preds[i].layers))
    _replace_layer(preds, i, j, scores=torch.zeros(preds[i].layers[j].num_queries, 2))


@corruption("box_preds")
def _box_preds_shape(preds, targets, spec, data):
    i = _sample(data, preds)
    j = _index(data, len(preds[i].layers))
    _replace_layer(preds, i, j, box_preds=torch.zeros(preds[i].layers[j].num_queries, 4))


@corruption("semantic")
def _semantic_logits_rows(preds, targets, spec, data):
    i = _sample(data, preds)
    sem = preds[i].semantic_logits
    _replace_pred(preds, i, semantic_logits=torch.zeros(sem.shape[0] + 1, sem.shape[1]))


@corruption("semantic_logits")
def _semantic_logits_columns(preds, targets, spec, data):
    i = _sample(data, preds)
    sem = preds[i].semantic_logits
    _replace_pred(preds, i, semantic_logits=torch.zeros(sem.shape[0], spec.c_sem + 2))


@corruption("semantic_logits")
def _semantic_logits_int(preds, targets, spec, data):
    i = _sample(data, preds)
    _replace_pred(preds, i, semantic_logits=preds[i].semantic_logits.detach().long())


@corruption("clip_global")
def _clip_width(preds, targets, spec, data):
    i = _sample(data, preds)
    m = data.draw(st.integers(0, 3))
    _replace_pred(preds, i, fused_global=torch.zeros(m, 4), clip_global=torch.zeros(m, 5))


@corruption("fused_global")
def _clip_width_across_samples(preds, targets, spec, data):
    assume(len(preds) >= 2)
    for i, d in ((0, 4), (1, 6)):
        _replace_pred(preds, i, fused_global=torch.zeros(2, d), clip_global=torch.zeros(2, d))


@corruption("fused_global")
def _fused_int(preds, targets, spec, data):
    i = _sample(data, preds)
    _replace_pred(preds, i, fused_global=torch.zeros(2, 4, dtype=torch.long),
                  clip_global=torch.zeros(2, 4, dtype=torch.long))


@corruption("targets")
def _fewer_targets(preds, targets, spec, data):
    del targets[_sample(data, targets)]


@corruption("targets")
def _fewer_predictions(preds, targets, spec, data):
    assume(len(preds) >= 2)  # with one sample left this is the empty batch
    del preds[_sample(data, preds)]


@corruption("predictions")
def _layer_counts_differ(preds, targets, spec, data):
    assume(len(preds) >= 2)
    _replace_pred(preds, 0, layers=preds[0].layers + [preds[0].layers[-1]])


@settings(HOSTILE, max_examples=200)
@given(corrupt=st.sampled_from(CORRUPTIONS), spec=batch_specs(clip=False), data=st.data())
def test_malformed_inputs_raise_a_value_error_naming_the_argument(corrupt, spec, data):
    preds, targets = build_batch(spec)
    with pytest.raises(ValueError) as err:  # while corrupting (dataclass checks) or in the call
        corrupt(preds, targets, spec, data)
        ESAMCriterion(batch_config(spec))(preds, targets)
    assert re.match(rf"{corrupt.argument}\b", str(err.value)), (corrupt.__name__, str(err.value))


@pytest.mark.parametrize("bad", ["single", "empty"])
def test_a_single_object_or_an_empty_batch_is_a_clear_error(bad):
    preds, targets = build_batch(_SMALL)
    args = (preds[0], targets[0]) if bad == "single" else ([], [])
    with pytest.raises(ValueError, match="predictions"):
        ESAMCriterion(batch_config(_SMALL))(*args)


@settings(HOSTILE, max_examples=30)
@given(spec=seq_specs(), kind=st.sampled_from(("duplicate", "negative", "missing")),
       data=st.data())
def test_sequence_global_ids_are_validated_where_they_are_read(spec, kind, data):
    crit = ESAMCriterion(batch_config(spec))
    assume(crit.merge is not None or crit.config.cross_frame.gt_source == "instance")
    preds, targets = build_sequences(spec)
    b = _sample(data, targets)
    f = _index(data, targets[b].num_frames)
    frame = targets[b].frames[f]
    k = frame.num_instances
    assume(kind == "missing" or k >= (2 if kind == "duplicate" else 1))
    new = {"duplicate": lambda: torch.full((k,), int(frame.global_ids[0])),  # one identity, 2 GTs
           "negative": lambda: frame.global_ids - int(frame.global_ids.max()) - 1,
           "missing": lambda: None}[kind]()
    targets[b].frames[f] = dataclasses.replace(frame, _cache={}, global_ids=new)
    with pytest.raises(ValueError, match="global_ids"):
        crit(preds, targets)


def test_sequence_shape_and_dtype_errors_are_named():
    preds, targets = build_sequences(_SEQ)
    p = preds[0]
    with pytest.raises(ValueError, match=r"tdt_features\[1\]"):
        SequencePrediction(p.frames, p.match_logits,
                           [p.tdt_features[0], torch.zeros(p.frames[1].final.num_queries, 9)]
                           + p.tdt_features[2:])
    with pytest.raises(ValueError, match=r"match_logits\[0\]: expected a floating"):
        SequencePrediction(p.frames, [m.detach().long() for m in p.match_logits],
                           p.tdt_features)
    with pytest.raises(ValueError, match=r"tdt_features\[0\]: expected a floating"):
        SequencePrediction(p.frames, p.match_logits,
                           [t.detach().long() for t in p.tdt_features])
    with pytest.raises(ValueError, match=r"targets\[0\]: expected 3 frames"):
        short = dataclasses.replace(targets[0], frames=targets[0].frames[:2])
        ESAMCriterion(batch_config(_SEQ))([p], [short])


# ---------------------------------------------------------------------------------------------
# 4. Batched == per-sample where the normalisation makes it exact.


def _weight_of(crit: ESAMCriterion, key: str) -> float:
    term = key[len("loss_"):].split("_")[0]
    return getattr(crit.config.loss_weight, term)


@settings(HOSTILE, max_examples=40)
@given(spec=batch_specs(configs=("seed",), clip=False, dtypes=(torch.float64,)))
def test_seed_normalisation_batched_equals_the_mean_of_single_samples(spec):
    crit = ESAMCriterion(batch_config(spec))
    preds, targets = build_batch(spec)
    out = crit(preds, targets)
    singles = [crit([p], [t]) for p, t in zip(preds, targets)]
    expected = {k: sum(s[k].item() for s in singles) / len(singles)
                for k in out if k not in ("loss", "loss_sem")}
    # L_sem averages over the samples that have a labelled position (others have no mean)
    sem = crit.semantic
    labelled = [s["loss_sem"].item() for s, p, t in zip(singles, preds, targets)
                if bool((t.semantic_targets(p.semantic_level, sem.ignore_index, sem.num_classes)
                         != sem.ignore_index).any())]
    expected["loss_sem"] = sum(labelled) / len(labelled) if labelled else 0.0
    expected["loss"] = sum(_weight_of(crit, k) * v for k, v in expected.items())
    for key, value in out.items():
        assert math.isclose(value.item(), expected[key], rel_tol=1e-9, abs_tol=1e-9), key


@settings(HOSTILE, max_examples=25)
@given(spec=batch_specs(configs=("default",), clip=False, dtypes=(torch.float64,)))
def test_matched_normalisation_is_the_pair_weighted_mean_of_single_samples(spec):
    crit = ESAMCriterion(batch_config(spec))
    preds, targets = build_batch(spec)
    out, _ = crit.single_view(preds, targets)
    singles = [crit.single_view([p], [t]) for p, t in zip(preds, targets)]
    pairs = [len(idx[0][0]) for _, idx in singles]
    for key in ("loss_bce", "loss_dice", "loss_score", "loss_bbox"):
        want = sum(s[key].item() * m for (s, _), m in zip(singles, pairs)) / max(sum(pairs), 1)
        assert math.isclose(out[key].item(), want, rel_tol=1e-9, abs_tol=1e-9), key


# ---------------------------------------------------------------------------------------------
# 5. Id and dense GT encodings give equal losses.


@settings(HOSTILE, max_examples=50)
@given(spec=batch_specs(with_options=True, dtypes=(torch.float64,)))
def test_id_and_dense_ground_truth_give_equal_losses(spec):
    crit = ESAMCriterion(batch_config(spec))
    assert_same_terms(crit(*build_batch(spec)), crit(*build_batch(spec, dense=True)))


@settings(HOSTILE, max_examples=50)
@given(spec=batch_specs(with_options=True, dtypes=(torch.float64,)))
def test_sparse_matching_by_gathered_pairs_equals_gemm_sums(spec):
    # the sparse matcher's two ways to get per-instance sums: same terms, same gradients
    def run(pairs: bool):
        preds, targets = build_batch(spec)
        with mock.patch.object(matcher_module, "_PAIR_MODE_MIN_WORK", 0 if pairs else math.inf), \
                mock.patch.object(matcher_module, "_PAIR_MODE_MAX_FRACTION",
                                  math.inf if pairs else 0):
            out = ESAMCriterion(batch_config(spec))(preds, targets)
        out["loss"].backward()
        return out, [t.grad for _, t in prediction_leaves(preds)]
    (a, grads_a), (b, grads_b) = run(True), run(False)
    assert_same_terms(a, b)
    for x, y in zip(grads_a, grads_b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@settings(HOSTILE, max_examples=25)
@given(spec=seq_specs())
def test_id_and_dense_ground_truth_give_equal_sequence_losses(spec):
    crit = ESAMCriterion(batch_config(spec))
    torch.manual_seed(0)  # the Seal merge loss draws its negatives
    ids = crit(*build_sequences(spec, dtype=torch.float64))
    torch.manual_seed(0)
    assert_same_terms(ids, crit(*build_sequences(spec, dtype=torch.float64, dense=True)))


# ---------------------------------------------------------------------------------------------
# 6. Permuting the queries leaves the matched losses unchanged.


@settings(HOSTILE, max_examples=50)
@given(spec=batch_specs(dtypes=(torch.float64,), modes=("normal",), scales=(1.0,)),
       data=st.data())
def test_permuting_queries_leaves_the_matched_losses_unchanged(spec, data):
    # No box term: GT instances with equal masks and labels tie in the cost, and their boxes
    # would make the (equally optimal) choice between them visible.
    crit = ESAMCriterion(batch_config(spec, box_loss=None))
    preds, targets = build_batch(spec)
    permuted = [permute_frame(p, t, torch.tensor(
        data.draw(st.permutations(range(p.final.num_queries)), label="perm"), dtype=torch.long))
        for p, t in zip(preds, targets)]
    assert_same_terms(crit(preds, targets),
                      crit([p for p, _ in permuted], [t for _, t in permuted]))


# ---------------------------------------------------------------------------------------------
# Functional formulas, matchers and stand-alone criteria at extreme values.


@settings(HOSTILE, max_examples=60)
@given(m=st.integers(0, 8), p=st.integers(0, 30), mode=st.sampled_from(MODES),
       scale=st.sampled_from(SCALES), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from((torch.float32, torch.float64)),
       form=st.sampled_from(("seed", "esam")))
def test_functional_formulas_are_finite_at_extreme_values(m, p, mode, scale, seed, dtype, form):
    g = torch.Generator().manual_seed(seed)
    x = values(g, (m, p), mode, scale, dtype).requires_grad_()
    y = values(g, (m, p), mode, scale, dtype).requires_grad_()
    t = (torch.rand(m, p, generator=g) < 0.5).to(dtype)
    boxes = values(g, (m, 6), mode, scale, dtype).requires_grad_()  # negative sizes included
    gt_boxes = torch.rand(m, 6, generator=g, dtype=torch.float64).to(dtype) * 2
    ids = torch.randint(-1, 3, (p,), generator=g)
    gt = InstanceMasks(ids=ids, num_instances=3)
    qi = torch.randint(0, max(m, 1), (m,), generator=g)  # a query may take several pairs
    ki = torch.randint(0, 3, (m,), generator=g)
    terms = {
        "bce": lambda: LF.sigmoid_bce_loss(x, t),
        "dice": lambda: LF.dice_loss(x, t, form),
        "matched": lambda: sum(v.sum() for v in LF.matched_mask_losses(
            x, qi, ki, gt, form, True)[:2]),
        "matched_sums": lambda: sum(v.sum() for v in LF.matched_mask_losses(
            x, qi, ki, gt, form, True, sums=LF.MaskSums(x, gt))[:2]),
        "score": lambda: LF.score_loss(y[:, 0] if p else y.sum(1), LF.mask_iou(x, t)),
        "bce_cost": lambda: LF.mask_bce_cost(x, gt).sum(),
        "l1_cost": lambda: LF.mask_l1_cost(x, gt, as_printed=True).sum(),
        "dice_cost": lambda: LF.mask_dice_cost(x, gt, form).sum(),
        "box_l1": lambda: LF.box_l1_loss(boxes, gt_boxes),
        "box_iou": lambda: LF.box_iou_loss(boxes, gt_boxes),
        "box_giou": lambda: LF.box_giou_loss(boxes, gt_boxes),
        "box_giou_self": lambda: LF.box_giou_loss(boxes, boxes.detach()),
        "pairwise_iou": lambda: LF.axis_aligned_box_iou(boxes, gt_boxes).sum(),
        "merge_iou": lambda: axis_aligned_box_iou(boxes, boxes.detach()).sum(),
        "nt_xent": lambda: LF.nt_xent(x, y, symmetric=True),
        "nt_xent_zero_rows": lambda: LF.nt_xent(x * 0, y),
    }
    if p:
        terms["class_cost"] = lambda: LF.class_cost(x, torch.randint(0, p, (3,), generator=g)).sum()
        terms["semantic"] = lambda: LF.semantic_cross_entropy(
            x, torch.randint(0, p + 1, (m,), generator=g), ignore_index=p)
    for name, fn in terms.items():
        for leaf in (x, y, boxes):
            leaf.grad = None
        value = fn()
        assert torch.isfinite(value).all(), name
        if value.requires_grad:
            value.sum().backward()
            for leaf in (x, y, boxes):
                assert leaf.grad is None or torch.isfinite(leaf.grad).all(), name


@settings(HOSTILE, max_examples=50)
@given(data=st.data(), mode=st.sampled_from(MODES), scale=st.sampled_from(SCALES),
       seed=st.integers(0, 2**31 - 1), topk=st.integers(1, 3))
def test_matchers_give_valid_assignments_for_any_sizes(data, mode, scale, seed, topk):
    g = torch.Generator().manual_seed(seed)
    b = data.draw(st.integers(1, 3))
    q = [data.draw(st.integers(0, 12)) for _ in range(b)]
    k = [data.draw(st.integers(0, 15)) for _ in range(b)]
    p = [data.draw(st.integers(0, 40)) for _ in range(b)]
    cls = [values(g, (qi, 3), mode, scale) for qi in q]
    masks = [values(g, (qi, pi), mode, scale) for qi, pi in zip(q, p)]
    labels = [torch.randint(0, 2, (ki,), generator=g) for ki in k]
    gts = [InstanceMasks(ids=torch.randint(-1, ki, (pi,), generator=g) if ki else
                         torch.full((pi,), -1), num_instances=ki) for ki, pi in zip(k, p)]
    allowed = [torch.rand(ki, qi, generator=g) < 0.5 for ki, qi in zip(k, q)]
    costs = build_costs({"cls": 0.5, "bce": 1.0, "dice": 1.0})
    for (qi, ki), (rows, cols) in zip(zip(q, k), HungarianMatcher(costs)(cls, masks, labels, gts)):
        assert len(rows) == min(qi, ki)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert all(0 <= r < qi for r in rows.tolist()) and all(0 <= c < ki for c in cols.tolist())
    sparse = SparseMatcher(costs, topk=topk)(cls, masks, labels, gts, allowed)
    for qm, (rows, cols) in zip(allowed, sparse):
        assert bool(qm[cols, rows].all())  # only allowed pairs
        per_gt = torch.bincount(cols, minlength=qm.shape[0])
        assert bool((per_gt <= topk).all())
    with pytest.raises(ValueError, match="gt_labels"):
        HungarianMatcher(costs)(cls, masks, labels[:-1], gts)


@settings(HOSTILE, max_examples=50)
@given(data=st.data(), mode=st.sampled_from(MODES), scale=st.sampled_from(SCALES),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from((torch.float32, torch.float64)),
       member_kernel=st.booleans())
def test_merge_criteria_are_finite_for_any_layout(data, mode, scale, seed, dtype, member_kernel):
    # member_kernel: the fused member-centre gradient forced on at every size
    with mock.patch.object(fused, "MIN_MEMBER_ELEMENTS",
                           0 if member_kernel else fused.MIN_MEMBER_ELEMENTS):
        _merge_criteria_are_finite(data, mode, scale, seed, dtype)


def _merge_criteria_are_finite(data, mode, scale, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    b, k = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 5))
    d = data.draw(st.integers(1, 5))
    feats, ins = [], []
    for _ in range(b):
        frames, lists = [], []
        for _ in range(data.draw(st.integers(1, 4))):
            q = data.draw(st.integers(0, 8))
            frames.append(values(g, (q, d), mode, scale, dtype).requires_grad_())
            lists.append([torch.tensor(data.draw(st.lists(st.integers(0, q - 1), max_size=q))
                                       if q else [], dtype=torch.long) for _ in range(k)])
        feats.append(frames)
        ins.append(lists)
    leaves = [f for frames in feats for f in frames]
    for crit in (ScanNetMergeCriterion_Fast(), ScanNetMergeCriterion_Fast(mask_zero_logits=False),
                 ScanNetMergeCriterion_Seal()):
        for leaf in leaves:
            leaf.grad = None
        out = crit(feats, ins)
        for key, value in out.items():
            assert torch.isfinite(value), (type(crit).__name__, key)
        assert out["loss"].requires_grad
        out["loss"].backward()
        assert all(f.grad is None or torch.isfinite(f.grad).all() for f in leaves)
    # the seed's per-point L_merge
    n = data.draw(st.integers(0, 30))
    q = data.draw(st.integers(0, 6))
    kg = data.draw(st.integers(0, 4))
    logits = values(g, (q, n), mode, scale, dtype).requires_grad_()
    out = MergeCECriterion()(logits, torch.randint(0, kg + 1, (q,), generator=g),
                             torch.randint(0, kg + 1, (n,), generator=g), kg)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="global_id_gt"):
        MergeCECriterion()(logits, torch.zeros(q, dtype=torch.long),
                           torch.full((n + 1,), kg + 1), kg)


@settings(HOSTILE, max_examples=50)
@given(data=st.data(), mode=st.sampled_from(MODES), scale=st.sampled_from(SCALES),
       seed=st.integers(0, 2**31 - 1), reduction=st.sampled_from(("sum", "mean")),
       pos_weight=st.sampled_from((None, 10.0)))
def test_cross_frame_criterion_is_finite_for_any_sizes(data, mode, scale, seed, reduction,
                                                       pos_weight):
    g = torch.Generator().manual_seed(seed)
    v, d = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    slot = data.draw(st.booleans())
    q = [data.draw(st.integers(0, 6))] * v if slot else [data.draw(st.integers(0, 6))
                                                         for _ in range(v)]
    match = [values(g, (a, b), mode, scale).requires_grad_() for a, b in zip(q, q[1:])]
    feats = [values(g, (a, d), mode, scale).requires_grad_() for a in q]
    targets = [torch.rand(a, b, generator=g) < 0.3 for a, b in zip(q, q[1:])]
    crit = CrossFrameCriterion(reduction=reduction, pos_weight=pos_weight,
                               consistency="slot" if slot else "matched")
    out = crit(match, feats, targets)
    assert all(torch.isfinite(val) for val in out.values())
    out["loss"].backward()
    assert all(t.grad is None or torch.isfinite(t.grad).all() for t in match + feats)
    if v >= 2:
        with pytest.raises(ValueError, match="match_logits"):
            crit(match[:-1], feats, targets)


# ---------------------------------------------------------------------------------------------
# Config errors name the unknown key and the closest valid one.

_SECTIONS = {"loss_weight": LossWeights, "matcher": MatcherConfig, "cross_frame": CrossFrameConfig,
             "merge": MergeConfig}
KEY_PATHS = [(f.name,) for f in dataclasses.fields(ESAMLossConfig)] + [
    (section, f.name) for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


def _misspell(word: str, edit: str, pos: int) -> str:
    i = pos % len(word)
    if edit == "drop":
        return word[:i] + word[i + 1:]
    if edit == "double":
        return word[:i] + word[i] + word[i:]
    if edit == "upper":
        return word[:i] + word[i].upper() + word[i + 1:]
    i = min(i, len(word) - 2)  # swap two neighbouring characters
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


@settings(HOSTILE, max_examples=60)
@given(path=st.sampled_from(KEY_PATHS), edit=st.sampled_from(("drop", "double", "upper", "swap")),
       pos=st.integers(0, 30), base=st.sampled_from((None, "seed", "esam")))
def test_an_unknown_config_key_is_named_with_the_closest_valid_one(path, edit, pos, base):
    siblings = {p[-1] for p in KEY_PATHS if p[:-1] == path[:-1]}
    key = _misspell(path[-1], edit, pos)
    assume(key not in siblings and key != "preset")
    data = {key: 1} if len(path) == 1 else {path[0]: {key: 1}}
    if base is not None:
        data["preset"] = base
    with pytest.raises(ValueError) as err:
        config_from_dict(data)
    dotted = ".".join((*path[:-1], key))
    assert str(err.value).startswith(f"{dotted}: unknown config key")
    assert f"did you mean {path[-1]!r}" in str(err.value)


LITERALS = [("normalization", ("matched", "seed", "esam")), ("dice_form", ("seed", "esam")),
            ("frame_reduction", ("sum", "mean")), ("merge.type", ("ce", "fast", "seal")),
            ("matcher.type", ("hungarian", "sparse")),
            ("matcher.class_cost", ("one_minus", "negative")),
            ("cross_frame.gt_source", ("mask", "instance")), ("preset", ("seed", "esam"))]


@settings(HOSTILE, max_examples=30)
@given(choice=st.sampled_from(LITERALS), data=st.data(),
       edit=st.sampled_from(("drop", "double", "upper", "swap")), pos=st.integers(0, 30))
def test_a_misspelt_choice_is_named_with_the_closest_valid_one(choice, data, edit, pos):
    dotted, options = choice
    original = data.draw(st.sampled_from(options))
    value = _misspell(original, edit, pos)
    assume(value not in options)
    parts = dotted.split(".")
    cfg = {parts[0]: value} if len(parts) == 1 else {parts[0]: {parts[1]: value}}
    with pytest.raises(ValueError) as err:
        ESAMCriterion(value if dotted == "preset" else cfg)
    assert str(err.value).startswith(dotted)
    assert repr(value) in str(err.value) and f"did you mean {original!r}" in str(err.value)
