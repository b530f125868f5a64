"""Training loop: run folder, checkpoints, resuming, schedules, configs, evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from esam.training import (
    RunConfig,
    _lr_lambda,
    evaluate_baseline,
    evaluate_model,
    load_checkpoint,
    load_data,
    load_run_config,
    prepare_scene,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config(tmp_path: Path, name: str = "run", **overrides) -> RunConfig:
    return load_run_config(TINY, out=str(tmp_path / name), **overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_config(tmp)
    return cfg, train(cfg)


def test_two_iterations_write_the_run_folder(tiny_run):
    cfg, metrics = tiny_run
    out = Path(cfg.out)
    assert (out / "last.pt").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["timings"]["steps"] == 2 == metrics["timings"]["steps"]
    epoch = saved["epochs"][0]
    for key in ("loss", "loss_cls", "loss_bce", "loss_dice", "loss_score", "loss_bbox", "loss_sem",
                "loss_clip", "loss_match", "loss_cons", "loss_cls_0", "lr", "seconds"):
        assert key in epoch and math.isfinite(epoch[key]), key
    assert any(k.startswith("loss_merge") for k in epoch)
    final = saved["final"]["multi_view"]["class_agnostic"]
    assert set(final) == {"ap", "ap50", "ap25"}
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    assert {"loss.png", "loss_cls.png", "loss_dice.png", "loss_match.png"} <= pngs
    assert (out / "instances.png").stat().st_size > 1000
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_checkpoint_loads_into_a_model(tiny_run):
    cfg, _ = tiny_run
    model, ckpt = load_checkpoint(Path(cfg.out) / "last.pt")
    assert not model.training
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][name])
    with pytest.raises(ValueError, match="not an esam checkpoint"):
        bad = Path(cfg.out) / "bad.pt"
        torch.save({"x": 1}, bad)
        load_checkpoint(bad)


def test_resume_restores_model_and_optimizer(tmp_path):
    # 2 scenes: 2 steps per epoch, all in warm-up; no held-out scenes, no plots (speed)
    common = dict(max_steps=100, plots=False, data={"val_scenes": 0})
    full = train(tiny_config(tmp_path, "full", epochs=2, **common))
    train(tiny_config(tmp_path, "half", epochs=1, **common))
    resumed = train(tiny_config(tmp_path, "resumed", epochs=2,
                                resume=str(tmp_path / "half" / "last.pt"), **common))
    assert resumed["timings"]["steps"] == full["timings"]["steps"] == 4
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], atol=1e-6), name
    for pid, state in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[key], b["optimizer"]["state"][pid][key], atol=1e-6)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    assert [e["epoch"] for e in b["history"]] == [1, 2]


def test_lr_schedule():
    cfg = RunConfig(warmup_steps=4, min_lr_ratio=0.1)
    f = _lr_lambda(cfg, total_steps=14)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(f(4), 1.0) and math.isclose(f(14), 0.1)
    assert math.isclose(f(9), 0.1 + 0.9 * 0.5)  # half way down the cosine
    poly = _lr_lambda(dataclasses.replace(cfg, lr_schedule="poly"), total_steps=14)
    assert math.isclose(poly(9), max(0.5 ** 0.9, 0.1))


def test_run_config_loading(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nmodel: {d_model: 32}\ndata: {window: 2}\n")
    cfg = load_run_config(path, epochs=5, data={"val_scenes": 2}, seed=None)
    assert cfg.epochs == 5 and cfg.model.d_model == 32
    assert cfg.data.window == 2 and cfg.data.val_scenes == 2
    path.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_run_config(path)
    with pytest.raises(ValueError, match="preset"):
        RunConfig(preset="mine")
    with pytest.raises(ValueError, match="window"):
        RunConfig(data={"window": 9, "frames_per_scene": 4})
    with pytest.raises(ValueError, match="unknown keys"):
        RunConfig(data={"scenes": 3})


def test_default_yaml_is_the_built_in_default():
    assert load_run_config(ROOT / "configs" / "default.yaml").to_dict() == RunConfig().to_dict()


def test_evaluation_returns_every_metric(tiny_run):
    cfg, _ = tiny_run
    model, ckpt = load_checkpoint(Path(cfg.out) / "last.pt")
    _, val = load_data(cfg.data)
    things = ckpt["thing_classes"]
    res = evaluate_model(model, [prepare_scene(s, model.config, things) for s in val],
                         inference=cfg.inference, thing_classes=things, min_region_size=5)
    for view in ("multi_view", "per_frame"):
        assert set(res[view]["class_agnostic"]) == {"ap", "ap50", "ap25"}
        assert set(res[view]["per_class"]["per_class"]) <= set(val[0].class_names)
    assert 0.0 <= res["semantic"]["miou"] <= 1.0
    assert res["num_frames"] == 3
    for kind in ("superpoints", "components"):
        base = evaluate_baseline(val, kind, thing_classes=things, min_region_size=5)
        assert set(base["multi_view"]["class_agnostic"]) == {"ap", "ap50", "ap25"}
    with pytest.raises(ValueError, match="kind"):
        evaluate_baseline(val, "random", thing_classes=things)


def test_evaluation_scores_a_perfect_prediction(tiny_run):
    """Superpoints are pure, so grouping them by their GT instance is a perfect prediction."""
    cfg, _ = tiny_run
    _, val = load_data(cfg.data)
    from esam.training import _instance_results

    scene = val[0]
    preds, gts = [], []
    for f in scene.frames:
        ids = torch.unique(f.instance[f.instance >= 0])
        masks = f.instance.unsqueeze(0) == ids.unsqueeze(1)
        preds.append({"masks": masks, "labels": torch.zeros(len(ids), dtype=torch.long),
                      "scores": torch.ones(len(ids)), "class_labels": scene.instance_labels[ids]})
        gts.append({"instance_ids": f.instance, "semantic": f.semantic,
                    "instance_labels": scene.instance_labels})
    things = sorted(set(scene.instance_labels.tolist()))
    res = _instance_results(preds, gts, things, scene.class_names, 1, True)
    assert res["class_agnostic"]["ap"] == pytest.approx(1.0)
    assert res["per_class"]["ap50"] == pytest.approx(1.0)
