import pytest
import torch

from esam.losses import ClipConsCriterion, ScanNetSemanticCriterion
from esam.structures import FramePrediction, FrameTarget, LayerOutput, pool_to_superpoints

import loops


def _frame(logits, level="point"):
    layer = LayerOutput(torch.zeros(2, 2, dtype=logits.dtype), torch.zeros(2, 3, dtype=logits.dtype))
    return FramePrediction([layer], semantic_logits=logits, semantic_level=level)


def _target(sem, sp=None, s=None):
    n = sem.shape[0]
    return FrameTarget(labels=torch.zeros(0, dtype=torch.long), instance_ids=torch.full((n,), -1),
                       semantic=sem, superpoints=sp, num_superpoints=s)


def test_point_level_matches_loop_and_averages_samples():
    g = torch.Generator().manual_seed(0)
    c = 4
    crit = ScanNetSemanticCriterion(num_classes=c)
    preds, targets, ref = [], [], []
    for n in (9, 13):
        z = torch.randn(n, c + 1, generator=g, dtype=torch.float64)
        y = torch.randint(0, c + 1, (n,), generator=g)
        preds.append(_frame(z))
        targets.append(_target(y))
        valid = [i for i in range(n) if int(y[i]) != c]
        ref.append(sum(loops.cross_entropy(z[i, :c].tolist(), int(y[i])) for i in valid) / len(valid))
    assert crit(preds, targets)["loss_sem"].item() == pytest.approx(sum(ref) / 2)


def test_superpoint_targets_pool_by_plurality_with_unlabeled_votes():
    sem = torch.tensor([0, 0, 1, 3, 3, 3, 2, 2, 3])
    sp = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pooled = pool_to_superpoints(sem, sp, 3, 3, ignore_value=3)
    assert pooled.tolist() == [0, 3, 2]
    crit = ScanNetSemanticCriterion(num_classes=3)
    z = torch.randn(3, 3, dtype=torch.float64)
    out = crit([_frame(z, "superpoint")], [_target(sem, sp, 3)])["loss_sem"]
    ref = (loops.cross_entropy(z[0].tolist(), 0) + loops.cross_entropy(z[2].tolist(), 2)) / 2
    assert out.item() == pytest.approx(ref)


def _loop_pool(labels, sp, s, v, ignore, mode):
    out = []
    for j in range(s):
        votes = [int(labels[i]) for i in range(len(sp)) if int(sp[i]) == j]
        valid = [x for x in votes if 0 <= x < v and x != ignore]
        counts = [valid.count(x) for x in range(v)]
        if mode == "plurality":
            counts.append(len(votes) - len(valid))  # unlabeled points vote for "ignore"
            best = max(range(v + 1), key=lambda x: (counts[x], -x))  # ties: smallest label
            out.append(best if votes and best < v else ignore)
        else:
            best = max(range(v), key=lambda x: (counts[x], -x)) if v else 0
            out.append(best if v and 2 * counts[best] > len(votes) else ignore)
    return out


@pytest.mark.parametrize("mode", ["plurality", "majority"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ignore", [-1, 1, 3])  # below, inside and at the end of [0, v)
def test_pooling_to_superpoints_equals_a_loop_over_votes(mode, seed, ignore):
    g = torch.Generator().manual_seed(seed)
    n, s, v = 60, 9, 3  # few labels per superpoint: many ties
    labels = torch.randint(-1, v + 1, (n,), generator=g)  # -1 and v: unlabeled / ignore
    sp = torch.randint(0, s - 1, (n,), generator=g)  # the last superpoint gets no point
    got = pool_to_superpoints(labels, sp, s, v, ignore_value=ignore, mode=mode)
    assert got.tolist() == _loop_pool(labels, sp, s, v, ignore, mode)


def test_all_unlabeled_sample_is_skipped_not_nan():
    crit = ScanNetSemanticCriterion(num_classes=3)
    z1 = torch.randn(4, 3, requires_grad=True)
    z2 = torch.randn(4, 3, requires_grad=True)
    y1 = torch.full((4,), 3)
    y2 = torch.tensor([0, 1, 2, 3])
    both = crit([_frame(z1), _frame(z2)], [_target(y1), _target(y2)])["loss_sem"]
    alone = crit([_frame(z2)], [_target(y2)])["loss_sem"]
    assert both.item() == pytest.approx(alone.item())
    none = crit([_frame(z1)], [_target(y1)])["loss_sem"]
    assert none.item() == 0.0
    none.backward()
    assert z1.grad is not None


def test_semantic_errors():
    crit = ScanNetSemanticCriterion(num_classes=3)
    with pytest.raises(ValueError, match="semantic_logits"):
        crit([_frame(torch.randn(4, 7))], [_target(torch.zeros(4, dtype=torch.long))])
    with pytest.raises(ValueError, match="semantic targets"):
        crit([_frame(torch.randn(4, 3))], [_target(torch.tensor([0, 1, 5, 3]))])


def test_clip_pools_samples_into_one_set_of_negatives():
    g = torch.Generator().manual_seed(1)
    f = [torch.randn(3, 5, generator=g) for _ in range(2)]
    c = [torch.randn(3, 5, generator=g) for _ in range(2)]
    preds = [FramePrediction([LayerOutput(torch.zeros(1, 2), torch.zeros(1, 2))],
                             fused_global=a, clip_global=b) for a, b in zip(f, c)]
    crit = ClipConsCriterion(temperature=0.1)
    got = crit(preds)["loss_clip"]
    ref = crit.loss(torch.cat(f), torch.cat(c))
    assert got.item() == pytest.approx(ref.item())
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: ClipConsCriterion(symmetric=True).loss(x, y),
                                    (a, b))
    with pytest.raises(ValueError, match="clip_global"):
        crit.loss(torch.randn(3, 5), torch.randn(2, 5))
