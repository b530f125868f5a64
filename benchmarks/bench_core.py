"""Single-view objective benchmark: `esam` preset vs a straightforward port of the released code.

Workload (the realistic ESAM single-view setting): B=4 samples; Q=128 and Q=375 queries; four
decoder layers with mask levels SP, SP, P, P; S=500 superpoints; N=20,000 points; C=200 semantic
classes; class-agnostic instance head; K=30 GT instances; box head on.

Reports forward and forward+backward median times, peak memory, the speed-up over the reference
(dense one-hot GT, einsum costs, per-sample loops; the median over rounds in which the
implementations take turns, of the ratio within each round), and the time the forward pass
would take if it only had to stream its inputs once at the measured memory bandwidth. Where the
fused CPU kernels (`esam.losses.fused`) apply, ``ours_torch_ops`` times the same code with them
off.

    python -m benchmarks.bench_core [--json] [--device cuda] [--repeats 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks.released_reference import released_mixed_instance_loss, released_semantic_loss
from esam.config import esam_preset
from esam.losses import ESAMCriterion, fused
from esam.structures import FramePrediction, FrameTarget, LayerOutput

MODES = ("superpoint", "superpoint", "point", "point")


@dataclass
class Workload:
    batch: int = 4
    queries: int = 128
    superpoints: int = 500
    points: int = 20_000
    semantic_classes: int = 200
    instances: int = 30


def make_inputs(w: Workload, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    preds, targets, ref_pred, ref_insts, sem_preds, sem_masks = [], [], None, [], [], []
    layer_dicts = [dict(cls_preds=[], scores=[], masks=[], bboxes=[], centers=[]) for _ in MODES]
    for _ in range(w.batch):
        sp = torch.randint(0, w.superpoints, (w.points,), generator=g)
        sp_inst = torch.randint(-1, w.instances, (w.superpoints,), generator=g)
        ids = sp_inst[sp]  # superpoint-aligned instances, as in ESAM's data
        sem = torch.randint(0, w.semantic_classes + 1, (w.points,), generator=g)
        seeds = torch.randperm(w.superpoints, generator=g)[: w.queries]
        query_masks = sp_inst[seeds].unsqueeze(0) == torch.arange(w.instances).unsqueeze(1)
        xyz = torch.rand(w.points, 3, generator=g) * 5
        centers = xyz[torch.randint(0, w.points, (w.queries,), generator=g)]
        boxes = torch.cat([torch.rand(w.instances, 3, generator=g) * 5,
                           torch.rand(w.instances, 3, generator=g) + 0.2], 1)
        layers = []
        for d, mode in zip(layer_dicts, MODES):
            p = w.points if mode == "point" else w.superpoints
            layer = LayerOutput(
                cls_logits=torch.randn(w.queries, 2, generator=g).to(device),
                mask_logits=torch.randn(w.queries, p, generator=g).to(device),
                mask_level=mode,
                scores=torch.rand(w.queries, 1, generator=g).to(device),
                box_preds=torch.cat([torch.randn(w.queries, 3, generator=g) * 0.1,
                                     torch.rand(w.queries, 3, generator=g) + 0.2], 1).to(device),
                query_centers=centers.to(device))
            layers.append(layer)
            d["cls_preds"].append(layer.cls_logits)
            d["scores"].append(layer.scores)
            d["masks"].append(layer.mask_logits)
            d["bboxes"].append(layer.box_preds)
            d["centers"].append(layer.query_centers)
        sem_logits = torch.randn(w.superpoints, w.semantic_classes + 1, generator=g).to(device)
        preds.append(FramePrediction(layers, semantic_logits=sem_logits,
                                     semantic_level="superpoint"))
        target = FrameTarget(labels=torch.zeros(w.instances, dtype=torch.long, device=device),
                             instance_ids=ids.to(device), superpoints=sp.to(device),
                             num_superpoints=w.superpoints, semantic=sem.to(device),
                             boxes=boxes.to(device), query_masks=query_masks.to(device))
        targets.append(target)
        # the reference's inputs: dense one-hot masks, built ahead as its data pipeline does
        ref_insts.append({"labels_3d": target.labels,
                          "sp_masks": target.superpoint_masks().to_dense(),
                          "p_masks": target.point_masks().to_dense(),
                          "bboxes_3d": target.boxes, "query_masks": target.query_masks})
        counts = torch.zeros(w.semantic_classes + 1, w.superpoints)
        counts.index_put_((sem, sp), torch.ones(w.points), accumulate=True)
        sem_preds.append(sem_logits)
        sem_masks.append(counts.to(device))
        target._cache.clear()  # our side derives its superpoint targets inside the timed call
    ref_pred = dict(layer_dicts[-1])
    ref_pred["aux_outputs"] = layer_dicts[:-1]
    return preds, targets, (ref_pred, ref_insts, sem_preds, sem_masks)


def _leaves(preds):
    out = []
    for p in preds:
        out.append(p.semantic_logits)
        for l in p.layers:
            out += [l.cls_logits, l.mask_logits, l.scores, l.box_preds]
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 while the profiler starts and stops: its C++ side logs a line
    on each (``profiler_start``/``profiler_stop``) that Python cannot turn off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class PeakMemory:
    """Peak extra memory a block allocates through PyTorch: the CUDA allocator's peak, or on
    CPU the peak of live bytes replayed from the profiler's allocation events (op by op).

    Process RSS would not do on CPU: memory the allocator kept from earlier calls is reused
    without growing it, so a call can show no growth at all.
    """

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            with _quiet_stderr():
                self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
            return
        with _quiet_stderr():
            self.prof.__exit__(*exc)
        # each op's own allocations (children excluded) and the frees between ops, in order
        events = sorted(((e.time_range.start, e.self_cpu_memory_usage)
                         for e in self.prof.events() if e.self_cpu_memory_usage),
                        key=lambda t: t[0])
        live = peak = 0
        for _, change in events:
            live += change
            peak = max(peak, live)
        self.bytes = peak


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(fn, device: str, reset=None, external=None) -> int:
    """Peak memory of one call of ``fn``, tracked on its own (the tracking slows the code it
    watches); ``reset`` runs before it, ``external()`` adds the bytes held outside PyTorch's
    allocator after it."""
    if reset is not None:
        reset()  # frees the previous call's gradients before the peak is tracked
    with PeakMemory(device) as mem:
        fn()
    return mem.bytes + (external() if external is not None else 0)


@contextlib.contextmanager
def _kernels(enabled: bool):
    """The fused kernels on or off inside the block (`fused.set_enabled`), restored after."""
    previous = fused.set_enabled(enabled)
    try:
        yield
    finally:
        fused.set_enabled(previous)


def _rounds(fns: dict, device: str, rounds: int, repeats: int) -> dict[str, list[float]]:
    """Per round, the median wall time of ``repeats`` back-to-back calls of each function in
    ``fns`` (name -> (fn, whether the fused kernels are on)), the functions taking turns round
    by round (in alternating order) after one warm-up call each.

    Each function runs in its own steady state within a round, as a training loop would run it,
    while the rounds spread every function over the whole measurement: this machine's speed
    drifts by tens of percent over seconds, and timing one implementation after the other
    would fold that drift into their ratio.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn, use_fused in fns.values():
        with _kernels(use_fused):
            fn()  # warm-up
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, use_fused = fns[name]
            with _kernels(use_fused):
                fn()  # back into this function's steady state after the others ran
                samples = []
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    samples.append(time.perf_counter() - t0)
            times[name].append(statistics.median(samples))
    return times


def memory_bandwidth(device: str, mb: int = 256) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(mb * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def run_one(w: Workload, device: str = "cpu", repeats: int = 3, rounds: int = 5) -> dict:
    preds, targets, (ref_pred, ref_insts, sem_preds, sem_masks) = make_inputs(w, device)
    crit = ESAMCriterion(esam_preset(num_semantic_classes=w.semantic_classes,
                                     num_instance_classes=1)).to(device)
    leaves = _leaves(preds)

    def reset():
        for t in targets:
            t._cache.clear()
        for t in leaves:
            t.grad = None

    def mapped_grads() -> int:
        # gradients the fused kernels return in memory mappings (`fused.reusable_zeros`, which
        # the profiler does not see), counted at full size
        return sum(t.grad.nbytes for t in leaves
                   if t.grad is not None and not t.grad.untyped_storage().resizable())

    def ours(backward: bool):
        reset()
        for t in leaves:
            t.requires_grad_(backward)
        loss = crit(preds, targets)["loss"]
        if backward:
            loss.backward()
        return loss

    def reference(backward: bool):
        for t in leaves:
            t.requires_grad_(backward)
            t.grad = None
        loss = released_mixed_instance_loss(ref_pred, ref_insts, ["SP", "SP", "P"]) + \
            released_semantic_loss(sem_preds, sem_masks, ignore_index=w.semantic_classes)
        if backward:
            loss.backward()
        return loss

    with torch.no_grad():
        a, b = ours(False).item(), reference(False).item()
    result = {"workload": vars(w), "device": device, "loss_ours": a, "loss_reference": b,
              "relative_difference": abs(a - b) / max(abs(b), 1e-12)}
    runs = {"ours": (ours, fused.is_enabled()), "reference": (reference, False)}
    if any(fused.applies(l.mask_logits) for p in preds for l in p.layers):
        runs["ours_torch_ops"] = (ours, False)  # the same without the fused kernels

    for key, backward in (("forward", False), ("forward_backward", True)):
        grad = contextlib.nullcontext if backward else torch.no_grad
        fns = {name: (lambda fn=fn: fn(backward), k) for name, (fn, k) in runs.items()}
        with grad():
            times = _rounds(fns, device, rounds, repeats)
        for name, (fn, use_fused) in runs.items():
            with grad(), _kernels(use_fused):
                peak = _peak(lambda: fn(backward), device, reset,
                             mapped_grads if backward else None)
            entry = result.setdefault(name, {})
            entry[f"{key}_s"] = statistics.median(times[name])
            entry[f"{key}_round_s"] = times[name]
            entry[f"peak_{key}_mb"] = peak / 2**20
        ratios = [r / o for r, o in zip(times["reference"], times["ours"])]
        # the median of the per-round ratios: each compares the two under the same conditions
        result[f"speedup_{key}"] = statistics.median(ratios)
        result[f"speedup_{key}_range"] = [min(ratios), max(ratios)]
    # Lower bound: read every mask / class / semantic logit once.
    input_bytes = sum(t.numel() * t.element_size() for t in leaves)
    bw = memory_bandwidth(device)
    result["bandwidth_gb_s"] = bw / 1e9
    result["forward_bandwidth_bound_s"] = input_bytes / bw
    result["forward_vs_bound"] = result["ours"]["forward_s"] / result["forward_bandwidth_bound_s"]
    return result


def run(device: str = "cpu", repeats: int = 3, queries=(128, 375), rounds: int = 5) -> dict:
    out = {"benchmark": "single-view objective (esam preset)", "threads": torch.get_num_threads(),
           "results": []}
    for q in queries:
        out["results"].append(run_one(Workload(queries=q), device, repeats, rounds))
    return out


def format_table(res: dict) -> str:
    lines = [f"{'Q':>4} {'impl':>14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd peak MB':>12} "
             f"{'fwd+bwd peak MB':>16}"]
    for r in res["results"]:
        for name in ("ours", "ours_torch_ops", "reference"):
            if name not in r:
                continue
            x = r[name]
            lines.append(f"{r['workload']['queries']:>4} {name:>14} {x['forward_s'] * 1e3:>9.1f} "
                         f"{x['forward_backward_s'] * 1e3:>11.1f} "
                         f"{x['peak_forward_mb']:>12.1f} {x['peak_forward_backward_mb']:>16.1f}")
        lo_f, hi_f = r["speedup_forward_range"]
        lo_fb, hi_fb = r["speedup_forward_backward_range"]
        lines.append(f"     speed-up fwd {r['speedup_forward']:.1f}x ({lo_f:.1f}-{hi_f:.1f}), "
                     f"fwd+bwd {r['speedup_forward_backward']:.1f}x ({lo_fb:.1f}-{hi_fb:.1f}) "
                     f"over {len(r['ours']['forward_round_s'])} rounds; forward at "
                     f"{r['forward_vs_bound']:.1f}x the bandwidth bound; "
                     f"rel. diff {r['relative_difference']:.1e}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds in which the implementations take turns")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.device, args.repeats, rounds=args.rounds)
    print(json.dumps(res, indent=2) if args.json else format_table(res))


if __name__ == "__main__":
    main()
