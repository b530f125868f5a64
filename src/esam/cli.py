"""The ``esam`` command line: ``train``, ``eval``, ``demo``, ``bench``.

``esam train`` is the main job: train the reference model on synthetic streaming scenes with the
full objective and write a run folder (checkpoint, metrics.json, loss curves, a picture of
predicted vs true instances). ``esam eval`` scores a checkpoint (and/or a non-learned baseline)
on the held-out scenes; ``esam demo`` draws predicted vs true instances; ``esam bench`` runs the
speed benchmarks of ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "format_metrics"]

_BASELINE_CHOICES = ("superpoints", "components", "all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esam", description="ESAM objective: train, evaluate and inspect the reference model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the reference model (the main job)",
                       description="Train the reference model with the full ESAM objective on "
                                   "synthetic streaming scenes.")
    p.add_argument("--config", type=Path, help="YAML run config (default: built-in defaults)")
    p.add_argument("--preset", choices=("seed", "esam"), help="loss preset (default: esam)")
    p.add_argument("--out", help="run folder (default: runs/default)")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--resume", help="checkpoint to continue from (e.g. runs/default/last.pt); "
                                    "SIGINT / SIGTERM save one after the current step")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = sub.add_parser("eval", help="evaluate a checkpoint and/or a non-learned baseline",
                       description="ScanNet instance AP (AP 0.50:0.95, AP50, AP25; class-agnostic "
                                   "and per class) on the merged online output and per frame, "
                                   "and semantic mIoU, on the held-out scenes.")
    p.add_argument("--checkpoint", help="checkpoint to evaluate (e.g. runs/default/last.pt)")
    p.add_argument("--baseline", nargs="?", const="all", choices=_BASELINE_CHOICES,
                   help="also evaluate a non-learned baseline (default when given: all)")
    p.add_argument("--config", type=Path, help="YAML run config for the data (default: the "
                                               "checkpoint's, else built-in defaults)")
    p.add_argument("--scenes", type=int, help="number of held-out scenes (default: the run's)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")

    p = sub.add_parser("demo", help="render predicted vs true instances of a held-out sequence",
                       description="Draw a held-out sequence top-down, coloured by true and by "
                                   "predicted (online-merged) instances.")
    p.add_argument("--checkpoint", default="runs/default/last.pt",
                   help="checkpoint (default: runs/default/last.pt)")
    p.add_argument("--out", default=None, help="PNG to write (default: next to the checkpoint)")
    p.add_argument("--scene", type=int, default=0, help="held-out scene index")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")

    p = sub.add_parser("bench", help="run the benchmarks in benchmarks/",
                       description="Speed and memory of the objective and of the merge against "
                                   "straightforward references (benchmarks/bench_core.py, "
                                   "benchmarks/bench_merge.py).")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------

def _fmt(x: object) -> str:
    if isinstance(x, float):
        return "  n/a" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def format_metrics(results: dict[str, dict]) -> str:
    """A table: one row per (model, view, label mode) with AP, AP50, AP25; mIoU when known."""
    lines = [f"{'model':<24} {'view':<11} {'labels':<15} {'AP':>6} {'AP50':>6} {'AP25':>6}"]
    for name, res in results.items():
        for view in ("multi_view", "per_frame"):
            if view not in res:
                continue
            for mode in ("class_agnostic", "per_class"):
                if mode not in res[view]:
                    continue
                r = res[view][mode]
                lines.append(f"{name:<24} {view.replace('_', '-'):<11} "
                             f"{mode.replace('_', '-'):<15} {_fmt(r['ap']):>6} "
                             f"{_fmt(r['ap50']):>6} {_fmt(r['ap25']):>6}")
        if "semantic" in res:
            lines.append(f"{name:<24} semantic mIoU {_fmt(res['semantic']['miou'])}, "
                         f"accuracy {_fmt(res['semantic']['acc'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from esam.training import load_run_config, train

    cfg = load_run_config(args.config, preset=args.preset, out=args.out, epochs=args.epochs,
                          device=args.device, seed=args.seed, num_threads=args.threads,
                          resume=args.resume, progress=False if args.no_progress else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with logging_redirect_tqdm():
        metrics = train(cfg)
    if metrics.get("interrupted") is not None:
        # 128 + the signal number, as if the signal had ended the process (130, 143)
        name = metrics["interrupted"]
        code = 128 + signal.Signals[name].value if name in ("SIGINT", "SIGTERM") else 1
        print(f"interrupted ({name}) at step {metrics['timings']['steps']}; continue with "
              f"--resume {Path(cfg.out) / 'last.pt'}", file=sys.stderr)
        return code
    if metrics.get("world_size", 1) > 1 and os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    final = metrics.get("final")
    print(f"run folder: {cfg.out}")
    t = metrics["timings"]
    print(f"time: {t['total_s']:.1f} s (data {t['data_s']:.1f} s, training {t['train_s']:.1f} s, "
          f"evaluation {t['eval_s']:.1f} s)")
    if final:
        print(format_metrics({"reference model": final}))
    return 0


def _eval_data(config: Path | None, scenes: int | None, ckpt: dict | None):
    """The run config (``config``, else the checkpoint's, else the defaults), its held-out
    scenes and the thing classes (the checkpoint's, else those of the held-out scenes)."""
    import dataclasses

    from esam.training import RunConfig, load_data, load_run_config, thing_classes_of

    if config is not None:
        cfg = load_run_config(config)
    elif ckpt is not None:
        cfg = RunConfig(**{**ckpt["run_config"], "resume": None})
    else:
        cfg = RunConfig()
    data = dataclasses.replace(cfg.data, train_scenes=0,
                               val_scenes=cfg.data.val_scenes if scenes is None else scenes)
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    _, val_scenes = load_data(data)
    things = ckpt["thing_classes"] if ckpt is not None else thing_classes_of(val_scenes)
    return cfg, val_scenes, things


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from esam.training import (
        evaluate_baseline,
        evaluate_model,
        json_ready,
        load_checkpoint,
        prepare_scene,
    )

    if args.checkpoint is None and args.baseline is None:
        print("esam eval: give --checkpoint PATH and/or --baseline", file=sys.stderr)
        return 2
    device = torch.device(args.device or "cpu")
    model, ckpt = (None, None)
    if args.checkpoint is not None:
        model, ckpt = load_checkpoint(args.checkpoint, device)
    cfg, val_scenes, things = _eval_data(args.config, args.scenes, ckpt)
    results: dict[str, dict] = {}
    if model is not None:
        prepared = [prepare_scene(s, model.config, things, device) for s in val_scenes]
        results["reference model"] = evaluate_model(
            model, prepared, inference=cfg.inference, thing_classes=things,
            min_region_size=cfg.eval_min_region_size)
    if args.baseline is not None:
        kinds = ("superpoints", "components") if args.baseline == "all" else (args.baseline,)
        for kind in kinds:
            results[f"baseline: {kind}"] = evaluate_baseline(
                val_scenes, kind, thing_classes=things, min_region_size=cfg.eval_min_region_size)
    payload = json_ready(results)
    if not args.json:
        print(format_metrics(results))
        print()
    print(json.dumps(payload, indent=None if args.json else 2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from esam.training import load_checkpoint, prepare_scene, render_prediction

    if not Path(args.checkpoint).exists():
        print(f"esam demo: checkpoint {args.checkpoint} not found; run `esam train` first",
              file=sys.stderr)
        return 2
    device = torch.device(args.device or "cpu")
    model, ckpt = load_checkpoint(args.checkpoint, device)
    cfg, val_scenes, things = _eval_data(None, max(args.scene + 1, 1), ckpt)
    if not 0 <= args.scene < len(val_scenes):
        print(f"esam demo: --scene must be in [0, {len(val_scenes)}), got {args.scene}",
              file=sys.stderr)
        return 2
    scene = prepare_scene(val_scenes[args.scene], model.config, things, device)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(
        f"demo_scene{args.scene}.png")
    render_prediction(model, scene, out, inference=cfg.inference)
    print(out)
    return 0


def _load_benchmark(name: str):
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (root / f"{name}.py").exists():
        return None
    if str(root.parent) not in sys.path:
        sys.path.insert(0, str(root.parent))
    return importlib.import_module(f"benchmarks.{name}")


def _cmd_bench(args: argparse.Namespace) -> int:
    results = {}
    for name, key in (("bench_core", "core"), ("bench_merge", "merge")):
        module = _load_benchmark(name)
        if module is None:
            results[key] = None
            continue
        results[key] = module.run(device=args.device)
        if not args.json:
            fmt = getattr(module, "format_table", None)
            print(f"== {name} ==")
            print(fmt(results[key]) if fmt else json.dumps(results[key], indent=2,
                                                            default=str))
    if args.json:
        print(json.dumps(results, default=str))
    elif all(v is None for v in results.values()):
        print("no benchmarks found next to the package (benchmarks/bench_core.py, "
              "benchmarks/bench_merge.py)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``esam`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    commands = {"train": _cmd_train, "eval": _cmd_eval, "demo": _cmd_demo, "bench": _cmd_bench}
    try:
        return commands[args.command](args)
    except ValueError as e:
        print(f"esam {args.command}: {e}", file=sys.stderr)
        return 2
