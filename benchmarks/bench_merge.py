"""Benchmark of the merge criteria (vectorised vs the loop reference) and of OnlineMerge.

Inputs in ESAM's released layout: B = 4 samples of V = 8 frames, Q = 128 queries per frame with
d = 256 L2-normalised merge features, K = 30 ground-truth instances per sample, each absent from
a frame with probability 0.2, each query in one instance with probability 0.8. Times are the
median forward + backward wall time. OnlineMerge runs 8 frames of 20,000 points with ~30
predicted instances each and reports the median time per frame.

Run: ``python -m benchmarks.bench_merge`` (prints JSON).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.released_merge_reference import ReferenceMergeFast, ReferenceMergeSeal
from esam.losses.merge import (ScanNetMergeCriterion_Fast, ScanNetMergeCriterion_Seal,
                               sample_seal_negatives)
from esam.merge.online_merge import FrameInstances, OnlineMerge


def make_inputs(batch: int = 4, frames: int = 8, queries: int = 128, dim: int = 256,
                instances: int = 30, p_absent: float = 0.2, p_member: float = 0.8, seed: int = 0,
                device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Random merge features and instance->query lists in the released layout."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, frames, queries, dim, generator=g, dtype=dtype)
    raw = F.normalize(raw, dim=-1).to(device)
    # one leaf per frame, as a merge head called frame by frame produces them
    feats = [[raw[b, v].clone().requires_grad_() for v in range(frames)] for b in range(batch)]
    masks = []
    for _ in range(batch):
        sample = []
        for _ in range(frames):
            inst = torch.randint(0, instances, (queries,), generator=g)  # (Q,)
            member = torch.rand(queries, generator=g) < p_member
            present = torch.rand(instances, generator=g) >= p_absent  # (K,)
            keep = member & present[inst]
            sample.append([torch.nonzero(keep & (inst == k)).flatten().to(device)
                           for k in range(instances)])
        masks.append(sample)
    return feats, masks


def _time(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], repeats: int
          ) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of forward + backward, after one untimed warm-up
    (first calls page-fault their buffers in)."""
    for leaf in leaves:
        leaf.grad = None
    fn().backward()
    wall, cpu = [], []
    for _ in range(repeats):
        for leaf in leaves:
            leaf.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        fn().backward()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _entry(ours: tuple[float, float], ref: tuple[float, float]) -> dict:
    return {"ours_ms": 1e3 * ours[0], "reference_ms": 1e3 * ref[0], "speedup": ref[0] / ours[0],
            "ours_cpu_ms": 1e3 * ours[1], "reference_cpu_ms": 1e3 * ref[1],
            "speedup_cpu": ref[1] / ours[1]}


def bench_criteria(device: str = "cpu", repeats: int = 5, ref_repeats: int = 3) -> dict:
    """Ours is timed over ``4 * repeats`` calls (each takes milliseconds: more samples give a
    steadier median), the loop reference over ``ref_repeats`` (one for ``_Seal``)."""
    repeats *= 4
    feats, masks = make_inputs(device=device)
    leaf = [f for sample in feats for f in sample]
    out = {}
    for name, tmp, p2s in (("fast_tmp", True, False), ("fast_tmp_p2s", True, True)):
        ours = ScanNetMergeCriterion_Fast(tmp=tmp, p2s=p2s)
        ref = ReferenceMergeFast(tmp=tmp, p2s=p2s)
        t_ours = _time(lambda: ours(feats, masks)["loss"], leaf, repeats)
        t_ref = _time(lambda: sum(ref(feats, masks).values()), leaf, ref_repeats)
        out[name] = _entry(t_ours, t_ref)
    negatives = sample_seal_negatives(masks, torch.Generator().manual_seed(1))
    ours = ScanNetMergeCriterion_Seal()
    ref = ReferenceMergeSeal(np.random.default_rng(0))
    t_ours = _time(lambda: ours(feats, masks, negatives=negatives)["loss"], leaf, repeats)
    t_draw = _time(lambda: ours(feats, masks)["loss"], leaf, repeats)
    t_ref = _time(lambda: ref(feats, masks, negatives)["merge_loss"], leaf, 1)
    out["seal"] = {**_entry(t_ours, t_ref), "ours_drawing_negatives_ms": 1e3 * t_draw[0]}
    return out


def make_frames(frames: int = 8, points: int = 20_000, objects: int = 30, dim: int = 256,
                seed: int = 0, device: str = "cpu") -> list[FrameInstances]:
    """A camera sweeping a room of box-shaped objects: each frame sees a subset of them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(objects, 3, generator=g) * 8  # (K, 3)
    sizes = 0.3 + torch.rand(objects, 3, generator=g)  # (K, 3)
    labels = torch.randint(0, 5, (objects,), generator=g)
    codes = F.normalize(torch.randn(objects, dim, generator=g), dim=-1)
    out = []
    for _ in range(frames):
        seen = torch.nonzero(torch.rand(objects, generator=g) < 0.8).flatten()  # (P,)
        p = seen.numel()
        owner = torch.randint(-1, p, (points,), generator=g)  # (N_t,)
        xyz = torch.rand(points, 3, generator=g) * 8
        inside = owner >= 0
        o = seen[owner[inside]]
        xyz[inside] = centres[o] + (torch.rand(int(inside.sum()), 3, generator=g) - 0.5) * sizes[o]
        masks = owner.unsqueeze(0) == torch.arange(p).unsqueeze(1)  # (P, N_t)
        feats = codes[seen] + 0.1 * torch.randn(p, dim, generator=g)
        scores = torch.rand(p, generator=g)
        out.append(FrameInstances(masks=masks.to(device), scores=scores.to(device),
                                  labels=labels[seen].to(device), features=feats.to(device),
                                  points=xyz.to(device)))
    return out


def bench_online_merge(device: str = "cpu", repeats: int = 3) -> dict:
    frames = make_frames(device=device)
    per_frame = []
    merged = 0
    for _ in range(repeats):
        merger = OnlineMerge(topk=100)
        for fr in frames:
            t0 = time.perf_counter()
            res = merger.merge(fr)
            per_frame.append(time.perf_counter() - t0)
            merged += int(res.matched.sum())
    return {"ms_per_frame": 1e3 * statistics.median(per_frame), "points_per_frame": 20_000,
            "instances_per_frame": statistics.mean(f.masks.shape[0] for f in frames),
            "global_instances": merger.num_global}


def run(device: str = "cpu", repeats: int = 5, threads: int | None = 1) -> dict:
    """Run every benchmark; returns a JSON-ready dict (targets: Fast >= 20x, Seal >= 100x).

    ``threads`` sets ``torch.set_num_threads`` for the run (None: leave it). One thread by
    default: the reference is bound by Python overhead, and one thread gives stable figures on
    a shared machine. Times are medians of wall time; ``*_cpu_ms`` are process CPU time, less
    sensitive to other load on the machine.
    """
    torch.manual_seed(0)
    if threads is not None:
        torch.set_num_threads(threads)
    return {"device": device, "threads": torch.get_num_threads(),
            "criteria": bench_criteria(device, repeats),
            "online_merge": bench_online_merge(device, max(1, repeats // 2))}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(args.device, args.repeats, args.threads), indent=2))
