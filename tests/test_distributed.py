"""Two gloo processes on halves of a batch reproduce one process on the whole batch.

Each rank computes the loss of its half; DDP would average parameter gradients over ranks, so
the single-process gradient of an input equals the rank's gradient divided by the world size
(normalisers are all-reduced; the CLIP term gathers the other ranks' rows with gradients), and
the single-process loss equals the mean of the rank losses.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from esam.config import seed_preset
from esam.losses import ESAMCriterion
from esam.structures import FramePrediction

HERE = Path(__file__).resolve().parent
WORLD = 2


def _config():
    cfg = seed_preset(num_semantic_classes=4, num_instance_classes=3)
    cfg.normalization = "matched"
    cfg.no_object_weight = 0.1
    cfg.loss_weight.clip = 1.0
    return cfg


def _batch():
    sys.path.insert(0, str(HERE))
    from test_instance import make_batch

    preds, targets = make_batch([(6, 3, 20), (5, 4, 17), (4, 0, 9), (6, 2, 14)], seed=3,
                                levels=("superpoint", "point"), c=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    out = []
    for p in preds:
        out.append(FramePrediction(
            p.layers, fused_global=torch.randn(3, 8, generator=g, dtype=torch.float64),
            clip_global=torch.randn(3, 8, generator=g, dtype=torch.float64)))
    for p in out:
        for t in _leaves(p):
            t.requires_grad_()
    return out, targets


def _leaves(p):
    ts = [p.fused_global, p.clip_global]
    for layer in p.layers:
        ts += [layer.cls_logits, layer.mask_logits, layer.scores, layer.box_preds]
    return ts


def _sequence_config():
    cfg = seed_preset(num_semantic_classes=5, num_instance_classes=1)
    cfg.normalization = "matched"
    cfg.merge.type = "fast"
    cfg.box_loss = None
    return cfg


def _sequences():
    sys.path.insert(0, str(HERE))
    from test_multiview import make_sequence

    # float64: the merge losses' temperatures (0.02, 0.07) make gradients of ~20 whose fp32
    # rounding depends on the summation order, which differs between one and two processes
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pairs = [make_sequence(seed=10 + i, present=[[0, 1, 2], [1, 2, 3], [0, 3]])
                 for i in range(4)]
    finally:
        torch.set_default_dtype(default)
    return [p for p, _ in pairs], [t for _, t in pairs]


def _sequence_leaves(p):
    ts = list(p.match_logits) + list(p.tdt_features)
    for f in p.frames:
        ts += [f.merge_features] + [l.mask_logits for l in f.layers] + \
            [l.cls_logits for l in f.layers]
    return ts


def _run(rank, init_file, out_dir, kind="frames"):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        if kind == "frames":
            preds, targets = _batch()
            crit, leaves = ESAMCriterion(_config()), _leaves
        else:
            preds, targets = _sequences()
            crit, leaves = ESAMCriterion(_sequence_config()), _sequence_leaves
        half = len(preds) // WORLD
        mine = slice(rank * half, (rank + 1) * half)
        crit.semantic = None
        out = crit(preds[mine], targets[mine])
        out["loss"].backward()
        grads = [t.grad.clone() if t.grad is not None else torch.zeros_like(t)
                 for p in preds[mine] for t in leaves(p)]
        torch.save({"terms": {k: v.detach() for k, v in out.items()}, "grads": grads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_equal_one_process(tmp_path):
    mp.start_processes(_run, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    preds, targets = _batch()
    crit = ESAMCriterion(_config())
    crit.semantic = None
    single = crit(preds, targets)
    single["loss"].backward()
    for name, value in single.items():
        mean = sum(r["terms"][name] for r in ranks) / WORLD
        assert mean.item() == pytest.approx(value.item(), rel=1e-9), name
    expected = [t.grad if t.grad is not None else torch.zeros_like(t)
                for p in preds for t in _leaves(p)]
    got = [g / WORLD for r in ranks for g in r["grads"]]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_equal_one_process_on_sequences(tmp_path):
    # per-frame terms, the cross-frame loss and the contrastive merge loss over B sequences
    mp.start_processes(_run, args=(str(tmp_path / "init"), str(tmp_path), "sequences"),
                       nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    preds, targets = _sequences()
    crit = ESAMCriterion(_sequence_config())
    crit.semantic = None
    single = crit(preds, targets)
    single["loss"].backward()
    assert {"loss_match", "loss_cons", "loss_merge_tmp", "loss_merge_p2s"} <= single.keys()
    for name, value in single.items():
        mean = sum(r["terms"][name] for r in ranks) / WORLD
        assert mean.item() == pytest.approx(value.item(), rel=1e-9), name
    expected = [t.grad if t.grad is not None else torch.zeros_like(t)
                for p in preds for t in _sequence_leaves(p)]
    got = [g / WORLD for r in ranks for g in r["grads"]]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
