"""Tests of OnlineMerge: per-frame instances folded into global instances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from esam.merge.online_merge import (
    FrameInstances,
    OnlineMerge,
    boxes_from_masks,
    merge_similarity,
)


def box_points(centre, size, n, g):
    """n points uniformly inside an axis-aligned box, plus its two corners (exact extent)."""
    centre, size = torch.tensor(centre), torch.tensor(size)
    pts = centre + (torch.rand(n, 3, generator=g) - 0.5) * size
    pts[0], pts[1] = centre - size / 2, centre + size / 2
    return pts


def frame(objects, g, noise=0.0, extra_points=5):
    """A frame observing `objects`: list of (centre, size, feature, label, score)."""
    pts, owner = [], []
    for j, (centre, size, _, _, _) in enumerate(objects):
        p = box_points(centre, size, 20, g) + noise
        pts.append(p)
        owner += [j] * len(p)
    pts.append(torch.rand(extra_points, 3, generator=g) * 100 + 50)  # background, far away
    owner += [-1] * extra_points
    pts = torch.cat(pts)
    owner = torch.tensor(owner)
    masks = owner.unsqueeze(0) == torch.arange(len(objects)).unsqueeze(1)
    feats = torch.stack([torch.as_tensor(o[2], dtype=torch.float32) for o in objects]) \
        if objects else torch.zeros(0, 4)
    return FrameInstances(
        masks=masks,
        scores=torch.tensor([o[4] for o in objects], dtype=torch.float32),
        labels=torch.tensor([o[3] for o in objects], dtype=torch.long),
        features=feats,
        points=pts,
    )


CHAIR = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], 3, 0.9)
TABLE = ([5.0, 0.0, 0.0], [2.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], 1, 0.8)
LAMP = ([0.0, 6.0, 0.0], [0.5, 0.5, 2.0], [0.0, 0.0, 1.0, 0.0], 2, 0.7)


def test_same_object_in_two_frames_gets_one_id():
    g = torch.Generator().manual_seed(0)
    merger = OnlineMerge()
    r0 = merger.merge(frame([CHAIR, TABLE], g))
    r1 = merger.merge(frame([TABLE, CHAIR], g, noise=0.1))
    assert r0.instance_ids.tolist() == [1, 2]
    assert r1.instance_ids.tolist() == [2, 1]  # matched across the swapped order
    assert r1.matched.tolist() == [True, True]
    assert merger.num_global == 2
    assert merger.counts.tolist() == [2, 2]
    assert torch.allclose(merger.scores, torch.tensor([0.9, 0.8]))
    # per-point ids of the second frame: chair points -> 1, table points -> 2, background 0
    f1 = frame([TABLE, CHAIR], torch.Generator().manual_seed(0))
    assert r1.global_ids.shape == (f1.masks.shape[1],)
    assert set(r1.global_ids[:20].tolist()) == {2} and set(r1.global_ids[20:40].tolist()) == {1}
    assert set(r1.global_ids[40:].tolist()) == {0}
    # memory masks cover both frames' points
    masks = merger.masks
    assert masks.shape == (2, merger.num_points_seen)
    assert masks.sum(1).tolist() == [40, 40]
    assert masks[0, :20].all() and masks[0, 45 + 20:45 + 40].all()  # chair in both frames
    # the merged box is the union of both observations
    lo = merger.boxes[0, :3] - merger.boxes[0, 3:] / 2
    hi = merger.boxes[0, :3] + merger.boxes[0, 3:] / 2
    assert torch.allclose(lo, torch.tensor([-0.5, -0.5, -0.5]), atol=1e-6)
    assert torch.allclose(hi, torch.tensor([0.6, 0.6, 0.6]), atol=1e-6)


def test_running_mean_by_merge_count():
    g = torch.Generator().manual_seed(1)
    merger = OnlineMerge()
    feats = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.2, 0.0, 0.0], [1.0, 0.0, 0.4, 0.0]]
    scores = [0.9, 0.6, 0.3]
    for f, s in zip(feats, scores):
        merger.merge(frame([(CHAIR[0], CHAIR[1], f, 3, s)], g))
    assert merger.num_global == 1 and merger.counts.tolist() == [3]
    assert torch.allclose(merger.features[0], torch.tensor(feats).mean(0))
    assert math.isclose(merger.scores.item(), sum(scores) / 3, rel_tol=1e-6)


def test_different_labels_never_merge():
    g = torch.Generator().manual_seed(2)
    merger = OnlineMerge()
    merger.merge(frame([CHAIR], g))
    r = merger.merge(frame([(CHAIR[0], CHAIR[1], CHAIR[2], 7, 0.9)], g))
    assert r.instance_ids.tolist() == [2] and not r.matched.any()
    assert merger.labels.tolist() == [3, 7]
    ungated = OnlineMerge(label_gate=False)
    ungated.merge(frame([CHAIR], g))
    r = ungated.merge(frame([(CHAIR[0], CHAIR[1], CHAIR[2], 7, 0.9)], g))
    assert r.instance_ids.tolist() == [1] and ungated.labels.tolist() == [3]


def test_new_object_gets_new_id_and_absent_object_keeps_its_id():
    g = torch.Generator().manual_seed(3)
    merger = OnlineMerge()
    merger.merge(frame([CHAIR, TABLE], g))
    r = merger.merge(frame([LAMP, CHAIR], g))  # table unseen, lamp new
    assert r.instance_ids.tolist() == [3, 1]
    r = merger.merge(frame([TABLE], g))  # table comes back
    assert r.instance_ids.tolist() == [2]
    assert merger.counts.tolist() == [2, 2, 1]


def test_dissimilar_features_or_disjoint_boxes_do_not_merge():
    g = torch.Generator().manual_seed(4)
    merger = OnlineMerge()
    merger.merge(frame([CHAIR], g))
    opposite = (CHAIR[0], CHAIR[1], [-1.0, 0.0, 0.0, 0.0], 3, 0.9)  # negative cosine
    assert merger.merge(frame([opposite], g)).instance_ids.tolist() == [2]
    moved = ([20.0, 0.0, 0.0], CHAIR[1], CHAIR[2], 3, 0.9)  # IoU 0
    assert merger.merge(frame([moved], g)).instance_ids.tolist() == [3]
    # with the distance geometry a far, similar object still scores > 0
    far = OnlineMerge(geometry="distance")
    far.merge(frame([CHAIR], g))
    assert far.merge(frame([moved], g)).instance_ids.tolist() == [1]
    strict = OnlineMerge(geometry="distance", threshold=0.5)
    strict.merge(frame([CHAIR], g))
    assert strict.merge(frame([moved], g)).instance_ids.tolist() == [2]


def test_hungarian_is_one_to_one():
    g = torch.Generator().manual_seed(5)
    merger = OnlineMerge()
    merger.merge(frame([CHAIR], g))
    twin = ([0.05, 0.0, 0.0], CHAIR[1], [1.0, 0.1, 0.0, 0.0], 3, 0.5)
    r = merger.merge(frame([twin, CHAIR], g))
    assert sorted(r.instance_ids.tolist()) == [1, 2]
    assert r.instance_ids[1].item() == 1  # the exact copy wins the memory entry


def test_similarity_override():
    g = torch.Generator().manual_seed(6)
    merger = OnlineMerge()
    merger.merge(frame([CHAIR, TABLE], g))
    moved = ([20.0, 0.0, 0.0], CHAIR[1], CHAIR[2], 3, 0.9)
    sim = torch.tensor([[0.9], [0.0]])  # (K=2, P=1): say it is the chair after all
    f = frame([moved], g)
    f.similarity = sim
    assert merger.merge(f).instance_ids.tolist() == [1]
    f = frame([moved], g)
    f.similarity = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="similarity"):
        merger.merge(f)


def test_point_covered_twice_goes_to_highest_score():
    g = torch.Generator().manual_seed(7)
    f = frame([CHAIR, TABLE], g)
    f.masks[1, :5] = True  # the table also claims 5 chair points
    r = OnlineMerge().merge(f)
    assert r.global_ids[:5].tolist() == [1] * 5  # chair scores 0.9 > 0.8
    f = frame([CHAIR, TABLE], g)
    f.masks[1, :5] = True
    f.scores = torch.tensor([0.1, 0.8])
    assert OnlineMerge().merge(f).global_ids[:5].tolist() == [2] * 5
    f = frame([TABLE, CHAIR], g)
    f.masks[0, 20:25] = True  # tie: equal scores, the lower global id wins
    f.scores = torch.tensor([0.5, 0.5])
    assert OnlineMerge().merge(f).global_ids[20:25].tolist() == [1] * 5
    merger = OnlineMerge()
    first = frame([CHAIR, TABLE], g)  # chair -> id 1, table -> id 2
    first.scores = torch.tensor([0.5, 0.5])
    merger.merge(first)
    second = frame([TABLE, CHAIR], g)
    second.scores = torch.tensor([0.5, 0.5])
    second.masks[0, 20:25] = True  # the table (frame instance 0) claims chair points
    assert merger.merge(second).global_ids[20:25].tolist() == [1] * 5


def test_topk_output_and_memory_modes():
    g = torch.Generator().manual_seed(8)
    out = OnlineMerge(topk=2)
    r = out.merge(frame([CHAIR, TABLE, LAMP], g))
    assert r.kept.tolist() == [0, 1] and out.num_global == 3
    assert set(r.global_ids.tolist()) == {0, 1, 2}  # the lamp (lowest score) is not reported
    r = out.merge(frame([LAMP], g))  # still in memory: it merges
    assert r.instance_ids.tolist() == [3] and out.counts.tolist() == [1, 1, 2]
    mem = OnlineMerge(topk=2, topk_mode="memory")
    mem.merge(frame([CHAIR, TABLE, LAMP], g))
    assert mem.num_global == 2 and mem.masks.shape[0] == 2
    r = mem.merge(frame([LAMP], g))  # pruned: comes back as new, lowest score pruned again
    assert mem.num_global == 2 and r.instance_ids.tolist() == [0]
    assert mem.point_global_ids().max().item() <= 2


def test_reset_clears():
    g = torch.Generator().manual_seed(9)
    merger = OnlineMerge()
    merger.merge(frame([CHAIR, TABLE], g))
    merger.reset()
    assert merger.num_global == 0 and merger.num_points_seen == 0
    assert merger.masks.shape == (0, 0) and merger.point_global_ids().numel() == 0
    r = merger.merge(frame([LAMP], g))
    assert r.instance_ids.tolist() == [1]


def test_empty_frames():
    g = torch.Generator().manual_seed(10)
    merger = OnlineMerge()
    r = merger.merge(frame([], g))  # P = 0
    assert r.global_ids.tolist() == [0] * 5 and r.num_global == 0
    merger.merge(frame([CHAIR], g))
    no_points = FrameInstances(masks=torch.zeros(2, 0, dtype=torch.bool), scores=torch.rand(2),
                               labels=torch.tensor([3, 1]), features=torch.rand(2, 4),
                               points=torch.zeros(0, 3))
    r = merger.merge(no_points)  # N_t = 0: nothing to merge, instances without points dropped
    assert r.global_ids.shape == (0,) and r.instance_ids.tolist() == [0, 0]
    assert merger.num_global == 1
    assert merger.masks.shape == (1, merger.num_points_seen)
    nothing = FrameInstances(masks=torch.zeros(0, 0, dtype=torch.bool), scores=torch.zeros(0),
                             labels=torch.zeros(0, dtype=torch.long), features=torch.zeros(0, 4),
                             points=torch.zeros(0, 3))
    assert merger.merge(nothing).global_ids.shape == (0,)


def test_given_boxes_and_average_update():
    g = torch.Generator().manual_seed(11)
    merger = OnlineMerge(box_update="average")
    for dx in (0.0, 0.2):
        f = frame([CHAIR], g)
        f.points = None
        f.boxes = torch.tensor([[dx, 0.0, 0.0, 1.0, 1.0, 1.0]])
        merger.merge(f)
    assert torch.allclose(merger.boxes, torch.tensor([[0.1, 0.0, 0.0, 1.0, 1.0, 1.0]]))


def test_bad_inputs_raise():
    g = torch.Generator().manual_seed(12)
    f = frame([CHAIR], g)
    with pytest.raises(ValueError, match="scores"):
        OnlineMerge().merge(FrameInstances(f.masks, torch.zeros(2), f.labels, f.features,
                                           f.points))
    with pytest.raises(ValueError, match="labels"):
        OnlineMerge().merge(FrameInstances(f.masks, f.scores, f.labels.float(), f.features,
                                           f.points))
    with pytest.raises(ValueError, match="points"):
        OnlineMerge().merge(FrameInstances(f.masks, f.scores, f.labels, f.features))
    with pytest.raises(ValueError, match="masks"):
        OnlineMerge().merge(FrameInstances(f.masks[0], f.scores, f.labels, f.features, f.points))
    merger = OnlineMerge()
    merger.merge(f)
    with pytest.raises(ValueError, match="features"):
        merger.merge(FrameInstances(f.masks, f.scores, f.labels, f.features[:, :3], f.points))
    with pytest.raises(ValueError, match="geometry"):
        OnlineMerge(geometry="giou")
    with pytest.raises(ValueError, match="threshold"):
        OnlineMerge(threshold=-0.1)


def test_boxes_from_masks_and_similarity_match_loops():
    g = torch.Generator().manual_seed(13)
    points = torch.randn(40, 3, generator=g)
    masks = torch.rand(5, 40, generator=g) < 0.3
    masks[4] = False
    boxes = boxes_from_masks(points, masks)
    for p in range(5):
        if masks[p].any():
            sel = points[masks[p]]
            lo, hi = sel.min(0).values, sel.max(0).values
            assert torch.allclose(boxes[p], torch.cat([(lo + hi) / 2, hi - lo]))
        else:
            assert torch.all(boxes[p] == 0)
    mem_f, f = torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g)
    mem_b = torch.cat([torch.randn(3, 3, generator=g), torch.rand(3, 3, generator=g) + 1], 1)
    b = torch.cat([torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 1], 1)
    for geometry in ("iou", "distance"):
        sim = merge_similarity(mem_f, mem_b, f, b, geometry)
        for k in range(3):
            for p in range(4):
                cos = float(mem_f[k] @ f[p] / (mem_f[k].norm() * f[p].norm()))
                if geometry == "distance":
                    geo = 1 / (1 + float((mem_b[k, :3] - b[p, :3]).norm()))
                else:
                    lo = torch.maximum(mem_b[k, :3] - mem_b[k, 3:] / 2, b[p, :3] - b[p, 3:] / 2)
                    hi = torch.minimum(mem_b[k, :3] + mem_b[k, 3:] / 2, b[p, :3] + b[p, 3:] / 2)
                    inter = float((hi - lo).clamp(min=0).prod())
                    geo = inter / (float(mem_b[k, 3:].prod() + b[p, 3:].prod()) - inter)
                assert abs(sim[k, p].item() - cos * geo) < 1e-5


class LoopMerge:
    """Straightforward per-instance reference of the merge rule (lists and loops)."""

    def __init__(self):
        self.entries = []  # dicts: feat, lo, hi, score, label, count, points (list of ids)
        self.offset = 0

    def merge(self, f: FrameInstances) -> None:
        p_count, n = f.masks.shape
        inst = []
        for p in range(p_count):
            idx = [i for i in range(n) if f.masks[p, i]]
            if not idx:
                continue
            pts = f.points[idx]
            inst.append(dict(feat=f.features[p].clone(), lo=pts.min(0).values,
                             hi=pts.max(0).values, score=float(f.scores[p]),
                             label=int(f.labels[p]), count=1,
                             points=[self.offset + i for i in idx]))
        gain = np.zeros((len(self.entries), len(inst)))
        for k, e in enumerate(self.entries):
            for p, q in enumerate(inst):
                if e["label"] != q["label"]:
                    continue
                cos = float(e["feat"] @ q["feat"] / (e["feat"].norm() * q["feat"].norm()))
                inter = float((torch.minimum(e["hi"], q["hi"])
                               - torch.maximum(e["lo"], q["lo"])).clamp(min=0).prod())
                union = float((e["hi"] - e["lo"]).prod() + (q["hi"] - q["lo"]).prod()) - inter
                sim = cos * inter / max(union, 1e-12)
                gain[k, p] = sim if sim > 0 else 0.0
        rows, cols = linear_sum_assignment(gain, maximize=True)
        taken = set()
        for k, p in zip(rows, cols):
            if gain[k, p] <= 0:
                continue
            e, q, c = self.entries[k], inst[p], self.entries[k]["count"]
            e["feat"] = (e["feat"] * c + q["feat"]) / (c + 1)
            e["score"] = (e["score"] * c + q["score"]) / (c + 1)
            e["lo"], e["hi"] = torch.minimum(e["lo"], q["lo"]), torch.maximum(e["hi"], q["hi"])
            e["points"] += q["points"]
            e["count"] = c + 1
            taken.add(p)
        self.entries += [q for p, q in enumerate(inst) if p not in taken]
        self.offset += n

    def point_ids(self) -> list[int]:
        best = [(-math.inf, 0)] * self.offset
        for k, e in enumerate(self.entries):
            for i in e["points"]:
                if e["score"] > best[i][0]:
                    best[i] = (e["score"], k + 1)
        return [gid for _, gid in best]


def test_matches_loop_reference_on_random_scenes():
    g = torch.Generator().manual_seed(14)
    objects = [([float(x) for x in torch.rand(3, generator=g) * 6],
                [float(s) for s in 0.5 + torch.rand(3, generator=g)],
                torch.randn(8, generator=g).tolist(), int(torch.randint(0, 3, (1,), generator=g)),
                float(torch.rand(1, generator=g))) for _ in range(8)]
    ours, loop = OnlineMerge(), LoopMerge()
    for _ in range(5):
        seen = [o for o in objects if torch.rand(1, generator=g) < 0.7]
        jittered = [(c, s, (torch.tensor(f) + 0.3 * torch.randn(8, generator=g)).tolist(), lab,
                     float(torch.rand(1, generator=g))) for c, s, f, lab, _ in seen]
        f = frame(jittered, g, noise=float(torch.rand(1, generator=g)) * 0.2)
        ours.merge(f)
        loop.merge(f)
    assert ours.num_global == len(loop.entries)
    assert ours.point_global_ids().tolist() == loop.point_ids()
    assert torch.allclose(ours.scores, torch.tensor([e["score"] for e in loop.entries]))
