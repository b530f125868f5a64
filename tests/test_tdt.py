"""Tests for the time-divided transformer (esam.models.tdt)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from esam.losses.cross_frame import CrossFrameCriterion
from esam.models.tdt import TDTOutput, TimeDividedTransformer, box_geometry_encoding
from esam.models.tdt import _multi_head_attention, _PairwiseGeometryMLP

DTYPE = torch.float64
D = 8


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one intra-op thread is faster and immune to oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0, **kwargs) -> TimeDividedTransformer:
    torch.manual_seed(seed)
    cfg = dict(d_model=D, num_heads=2, num_layers=2, ffn_dim=12, geometry_hidden=6)
    cfg.update(kwargs)
    return TimeDividedTransformer(**cfg).double().eval()


def _frame(q: int, g: torch.Generator, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    feats = torch.randn(q, d, generator=g, dtype=DTYPE)
    centre = torch.rand(q, 3, generator=g, dtype=DTYPE) * 4 - 2
    size = torch.rand(q, 3, generator=g, dtype=DTYPE) + 0.1
    return feats, torch.cat([centre, size], dim=1)


# --------------------------------------------------------------------------- building blocks
def test_box_geometry_encoding_by_hand():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=DTYPE)
    expected = [1, 2, 3, math.sin(1), math.sin(2), math.sin(3), math.sin(2), math.sin(4), math.sin(6), 4, 5, 6]
    assert box_geometry_encoding(boxes, 2)[0].tolist() == pytest.approx(expected, rel=1e-15)
    assert box_geometry_encoding(boxes, 1).shape == (1, 9)
    assert box_geometry_encoding(boxes[:0], 1).shape == (0, 9)


def test_pairwise_geometry_mlp_equals_mlp_over_concatenation():
    torch.manual_seed(0)
    mlp = _PairwiseGeometryMLP(9, 5, 3).double()
    g = torch.Generator().manual_seed(1)
    _, rows = _frame(4, g)
    _, cols = _frame(3, g)
    row_enc, col_enc = box_geometry_encoding(rows), box_geometry_encoding(cols)
    got = mlp(row_enc, rows[:, :3], col_enc, cols[:, :3])
    weight = torch.cat([mlp.row_proj.weight, mlp.col_proj.weight, mlp.offset_proj.weight], dim=1)  # (h, 9 + 9 + 3)
    for i in range(4):
        for j in range(3):
            pair = torch.cat([row_enc[i], col_enc[j], rows[i, :3] - cols[j, :3]])
            hidden = F.gelu(weight @ pair + mlp.row_proj.bias)
            ref = mlp.out.weight @ hidden + mlp.out.bias
            torch.testing.assert_close(got[i, j], ref, rtol=1e-12, atol=1e-12)


def test_attention_matches_loop_and_zero_keys_give_zero():
    g = torch.Generator().manual_seed(2)
    heads, dh = 2, 3
    q = torch.randn(4, heads * dh, generator=g, dtype=DTYPE)
    k = torch.randn(5, heads * dh, generator=g, dtype=DTYPE)
    v = torch.randn(5, heads * dh, generator=g, dtype=DTYPE)
    bias = torch.randn(heads, 4, 5, generator=g, dtype=DTYPE)
    got = _multi_head_attention(q, k, v, heads, bias, torch.nn.Dropout(0.0))
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        for i in range(4):
            scores = [float(q[i, cols] @ k[j, cols]) / math.sqrt(dh) + float(bias[h, i, j]) for j in range(5)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            ref = sum((w / total) * v[j, cols] for j, w in enumerate(weights))
            torch.testing.assert_close(got[i, cols], ref, rtol=1e-12, atol=1e-12)
    empty = _multi_head_attention(q, k[:0], v[:0], heads, bias[:, :, :0], torch.nn.Dropout(0.0))
    assert empty.shape == (4, heads * dh) and torch.equal(empty, torch.zeros_like(empty))


# --------------------------------------------------------------------------- forward
def test_forward_shapes_and_logits_unbounded():
    model = _model()
    g = torch.Generator().manual_seed(3)
    prev, prev_box = _frame(5, g)
    cur, cur_box = _frame(3, g)
    out = model(prev, prev_box, cur, cur_box)
    assert isinstance(out, TDTOutput)
    assert out.features.shape == (3, D) and out.match_logits.shape == (5, 3)
    assert out.features.dtype == DTYPE
    # Logits, not probabilities: a scaled-up match head leaves [0, 1].
    with torch.no_grad():
        model.match_prev.weight.mul_(50.0)
    assert not ((model(prev, prev_box, cur, cur_box).match_logits >= 0) & (out.match_logits <= 1)).all()


def test_permutation_equivariance_in_current_queries():
    model = _model(num_layers=3)
    g = torch.Generator().manual_seed(4)
    prev, prev_box = _frame(6, g)
    cur, cur_box = _frame(5, g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    base = model(prev, prev_box, cur, cur_box)
    permuted = model(prev, prev_box, cur[perm], cur_box[perm])
    torch.testing.assert_close(permuted.features, base.features[perm], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(permuted.match_logits, base.match_logits[:, perm], rtol=1e-10, atol=1e-12)
    # The queries interact (self-attention): changing one current query moves the others too.
    cur2 = cur.clone()
    cur2[0] += 1.0
    moved = model(prev, prev_box, cur2, cur_box).features
    assert not torch.allclose(moved[1:], base.features[1:])


def test_previous_queries_are_a_set():
    model = _model()
    g = torch.Generator().manual_seed(5)
    prev, prev_box = _frame(6, g)
    cur, cur_box = _frame(4, g)
    perm = torch.randperm(6, generator=g)
    base = model(prev, prev_box, cur, cur_box)
    permuted = model(prev[perm], prev_box[perm], cur, cur_box)
    torch.testing.assert_close(permuted.features, base.features, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(permuted.match_logits, base.match_logits[perm], rtol=1e-10, atol=1e-12)


def test_geometry_is_used():
    model = _model()
    g = torch.Generator().manual_seed(6)
    prev, prev_box = _frame(4, g)
    cur, cur_box = _frame(3, g)
    base = model(prev, prev_box, cur, cur_box)
    moved_box = prev_box.clone()
    moved_box[:, :3] += torch.randn(4, 3, generator=g, dtype=DTYPE)
    moved = model(prev, moved_box, cur, cur_box)
    assert not torch.allclose(moved.features, base.features)  # through the attention bias
    assert not torch.allclose(moved.match_logits, base.match_logits)  # through the match geometry term


def test_empty_previous_frame_gives_zero_message():
    model = _model()
    g = torch.Generator().manual_seed(7)
    cur, cur_box = _frame(4, g)
    cur.requires_grad_(True)
    prev, prev_box = _frame(0, g)
    out = model(prev, prev_box, cur, cur_box)
    assert out.features.shape == (4, D) and out.match_logits.shape == (0, 4)
    assert torch.isfinite(out.features).all()
    out.features.sum().backward()
    assert torch.isfinite(cur.grad).all()
    # A zero message is what a model whose cross-attention output is switched off sees.
    silenced = _model()
    with torch.no_grad():
        for layer in silenced.layers:
            layer.cross_out.weight.zero_()
    other_prev, other_box = _frame(3, g)
    ref = silenced(other_prev, other_box, cur.detach(), cur_box).features
    torch.testing.assert_close(out.features.detach(), ref, rtol=1e-12, atol=1e-12)


def test_empty_current_frame():
    model = _model()
    g = torch.Generator().manual_seed(8)
    prev, prev_box = _frame(3, g)
    prev.requires_grad_(True)
    cur, cur_box = _frame(0, g)
    out = model(prev, prev_box, cur, cur_box)
    assert out.features.shape == (0, D) and out.match_logits.shape == (3, 0)
    (out.features.sum() + out.match_logits.sum()).backward()
    assert prev.grad is not None and torch.isfinite(prev.grad).all()


def test_huge_inputs_stay_finite():
    model = _model()
    g = torch.Generator().manual_seed(9)
    prev, prev_box = _frame(4, g)
    cur, cur_box = _frame(3, g)
    out = model(prev * 1e4, prev_box, cur * -1e4, cur_box)
    assert torch.isfinite(out.features).all() and torch.isfinite(out.match_logits).all()


# --------------------------------------------------------------------------- sequences
def test_forward_sequence_chains_updated_features():
    model = _model()
    g = torch.Generator().manual_seed(10)
    frames = [_frame(q, g) for q in (3, 4, 2, 5)]
    feats, boxes = [f for f, _ in frames], [b for _, b in frames]
    updated, logits = model.forward_sequence(feats, boxes)
    assert len(updated) == 4 and len(logits) == 3
    assert torch.equal(updated[0], feats[0])
    assert [tuple(x.shape) for x in logits] == [(3, 4), (4, 2), (2, 5)]
    state = feats[0]
    for t in range(3):
        out = model(state, boxes[t], feats[t + 1], boxes[t + 1])
        torch.testing.assert_close(updated[t + 1], out.features, rtol=0, atol=0)
        torch.testing.assert_close(logits[t], out.match_logits, rtol=0, atol=0)
        state = out.features
    # Frame 2 attends to frame 1's updated features, not to its raw ones.
    raw = model(feats[1], boxes[1], feats[2], boxes[2]).features
    assert not torch.allclose(raw, updated[2])
    single_updated, single_logits = model.forward_sequence(feats[:1], boxes[:1])
    assert len(single_updated) == 1 and single_logits == []


def test_forward_sequence_with_empty_frame_and_loss():
    model = _model()
    g = torch.Generator().manual_seed(11)
    frames = [_frame(q, g) for q in (3, 0, 3)]
    feats = [f.requires_grad_(True) for f, _ in frames]
    updated, logits = model.forward_sequence(feats, [b for _, b in frames])
    targets = [torch.zeros(3, 0, dtype=torch.bool), torch.zeros(0, 3, dtype=torch.bool)]
    loss = CrossFrameCriterion(consistency="matched")(logits, updated, targets)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batched_use_per_sample_is_independent():
    model = _model()
    g = torch.Generator().manual_seed(12)
    a = [_frame(3, g) for _ in range(2)]
    b = [_frame(4, g) for _ in range(2)]
    out_a = model(*a[0], *a[1])
    model(*b[0], *b[1])  # another sample in between leaves no state behind
    torch.testing.assert_close(model(*a[0], *a[1]).features, out_a.features, rtol=0, atol=0)


def test_dropout_only_in_training():
    model = _model(dropout=0.5)
    g = torch.Generator().manual_seed(13)
    prev, prev_box = _frame(4, g)
    cur, cur_box = _frame(4, g)
    eval_out = model(prev, prev_box, cur, cur_box).features
    torch.testing.assert_close(model(prev, prev_box, cur, cur_box).features, eval_out, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(prev, prev_box, cur, cur_box).features, eval_out)


def test_learns_to_match_a_shuffled_noisy_copy():
    """Trained on fresh random pairs, the match logits pick the right partner on unseen ones."""
    torch.manual_seed(0)
    model = TimeDividedTransformer(d_model=16, num_heads=2, num_layers=1, ffn_dim=32, geometry_hidden=16)
    crit = CrossFrameCriterion(reduction="mean", cons_weight=0.0, gt_source="instance")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(14)
    q = 8

    def sample():
        feats = torch.randn(q, 16, generator=g)
        boxes = torch.cat([torch.rand(q, 3, generator=g) * 4, torch.rand(q, 3, generator=g) + 0.2], dim=1)
        perm = torch.randperm(q, generator=g)
        noisy = feats[perm] + 0.3 * torch.randn(q, 16, generator=g)
        noisy_boxes = boxes[perm] + torch.cat([0.05 * torch.randn(q, 3, generator=g), torch.zeros(q, 3)], dim=1)
        targets = crit.build_targets(instance_ids=[torch.arange(q), perm])
        return feats, boxes, noisy, noisy_boxes, perm, targets

    def accuracy(n=20):
        hits = 0
        with torch.no_grad():
            for _ in range(n):
                feats, boxes, noisy, noisy_boxes, perm, _ = sample()
                logits = model(feats, boxes, noisy, noisy_boxes).match_logits  # (Q, Q)
                hits += int((logits.argmax(dim=0) == perm).sum())
        return hits / (n * q)

    before = accuracy()
    for _ in range(100):
        feats, boxes, noisy, noisy_boxes, _, targets = sample()
        out = model(feats, boxes, noisy, noisy_boxes)
        loss = crit([out.match_logits], [feats, out.features], targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    assert after > 0.9 and after > before + 0.3


# --------------------------------------------------------------------------- validation
def test_validation_errors():
    model = _model()
    g = torch.Generator().manual_seed(15)
    prev, prev_box = _frame(3, g)
    cur, cur_box = _frame(2, g)
    with pytest.raises(ValueError, match="prev_features"):
        model(prev[:, :5], prev_box, cur, cur_box)
    with pytest.raises(ValueError, match="prev_geometry"):
        model(prev, prev_box[:2], cur, cur_box)
    with pytest.raises(ValueError, match="cur_geometry"):
        model(prev, prev_box, cur, cur_box[:, :3])
    with pytest.raises(ValueError, match="cur_features"):
        model(prev, prev_box, cur[0], cur_box)
    with pytest.raises(ValueError, match="equal length"):
        model.forward_sequence([prev, cur], [prev_box])
    with pytest.raises(ValueError, match="equal length"):
        model.forward_sequence([], [])
    with pytest.raises(ValueError, match=r"geometry\[1\]"):
        model.forward_sequence([prev, cur], [prev_box, prev_box])
    with pytest.raises(ValueError, match="num_heads"):
        TimeDividedTransformer(d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="geometry_dim"):
        TimeDividedTransformer(geometry_dim=10)
    with pytest.raises(ValueError, match="num_layers"):
        TimeDividedTransformer(num_layers=0)
    with pytest.raises(TypeError):
        TimeDividedTransformer(256)  # keyword-only
