"""Smoke tests of the benchmark scripts on tiny workloads (figures are not checked: timing
targets live in the benchmarks, never in tests)."""

import pytest
import torch

from benchmarks import bench_core, bench_merge
from esam.losses import fused
from esam.losses import matcher as matcher_module


def test_core_benchmark_runs_and_agrees_with_the_reference():
    w = bench_core.Workload(batch=2, queries=12, superpoints=20, points=200,
                            semantic_classes=5, instances=4)
    r = bench_core.run_one(w, repeats=1, rounds=3)
    assert r["relative_difference"] < 1e-5
    for name in ("ours", "reference"):
        assert r[name]["forward_s"] > 0 and r[name]["forward_backward_s"] > 0
        assert len(r[name]["forward_backward_round_s"]) == 3
    for key in ("forward", "forward_backward"):
        lo, hi = r[f"speedup_{key}_range"]
        assert lo <= r[f"speedup_{key}"] <= hi
        ratios = sorted(a / b for a, b in zip(r["reference"][f"{key}_round_s"],
                                              r["ours"][f"{key}_round_s"]))
        assert r[f"speedup_{key}"] == pytest.approx(ratios[1])  # the median round's ratio
    assert "ours_torch_ops" not in r  # too small for the fused kernels
    assert "speed-up" in bench_core.format_table({"results": [r]})


def test_core_benchmark_times_the_torch_op_path_where_the_kernels_apply(monkeypatch):
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(matcher_module, "_PAIR_MODE_MIN_WORK", 0)
    w = bench_core.Workload(batch=2, queries=12, superpoints=20, points=200,
                            semantic_classes=5, instances=4)
    was = fused.is_enabled()
    r = bench_core.run_one(w, repeats=1)
    assert fused.is_enabled() == was  # restored
    assert r["ours_torch_ops"]["forward_s"] > 0
    assert r["relative_difference"] < 1e-5


def test_merge_benchmark_inputs_and_criteria_run():
    feats, masks = bench_merge.make_inputs(batch=2, frames=3, queries=10, dim=8, instances=4)
    leaves = [f for sample in feats for f in sample]
    from esam.losses import ScanNetMergeCriterion_Fast
    from benchmarks.released_merge_reference import ReferenceMergeFast
    ours = ScanNetMergeCriterion_Fast()(feats, masks)["loss"]
    ref = sum(ReferenceMergeFast()(feats, masks).values())
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    wall, cpu = bench_merge._time(lambda: ScanNetMergeCriterion_Fast()(feats, masks)["loss"],
                                  leaves, 1)
    assert wall > 0 and cpu >= 0
    frames = bench_merge.make_frames(frames=2, points=300, objects=5, dim=8)
    assert len(frames) == 2 and frames[0].masks.shape[1] == 300
