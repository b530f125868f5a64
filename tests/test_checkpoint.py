"""Checkpoints: atomic writes, corruption detection, all-or-nothing loading, signals, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from esam.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_state,
    save_checkpoint,
)
from esam.training import _StopSignals, epoch_order, load_run_config, train
from esam.training import load_checkpoint as load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5.0)},
            "step": 7, "lr": 0.1, "name": "run", "none": None,
            "rng": {"numpy": np.random.RandomState(1).get_state(), "torch": g.get_state()},
            "history": [{"loss": 1.5}, {"loss": float("nan")}]}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


# ------------------------------------------------------------------------------------------------
# esam.checkpoint
# ------------------------------------------------------------------------------------------------

def test_round_trip_is_exact_and_leaves_no_temporaries(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _state())
    loaded = load_checkpoint(path, required=("model", "step"))
    assert _same(loaded, _state())
    assert not list(tmp_path.glob(".*.tmp"))
    plain = torch.load(path, weights_only=False)  # still an ordinary torch file
    assert plain["esam_checkpoint"]["version"] == 1 and plain["step"] == 7


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", _state())
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {**_state(), "bad": lambda: 0})  # not picklable
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(path, {**_state(), "step": 8})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncated_file_is_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _state())
    data = path.read_bytes()
    for size in (0, 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=r"c\.pt: unreadable checkpoint, truncated"):
            load_checkpoint(path)


def test_flipped_byte_in_tensor_data_is_detected(tmp_path):
    marker = torch.arange(64, dtype=torch.float64) + 0.5
    path = save_checkpoint(tmp_path / "c.pt", {**_state(), "marker": marker})
    data = bytearray(path.read_bytes())
    at = bytes(data).find(marker.numpy().tobytes())
    assert at > 0
    data[at + 100] ^= 0x10  # one bit of one stored float
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c\.pt: (checksum mismatch|unreadable)"):
        load_checkpoint(path)


def test_wrong_format_version_missing_keys_and_missing_file(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"model": {}}, plain)
    with pytest.raises(CheckpointError, match=r"plain\.pt: not an esam checkpoint"):
        load_checkpoint(plain)
    path = save_checkpoint(tmp_path / "c.pt", _state())
    raw = torch.load(path, weights_only=False)
    raw["esam_checkpoint"]["version"] = 99
    torch.save(raw, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match=r"v99\.pt: checkpoint format version 99"):
        load_checkpoint(tmp_path / "v99.pt")
    raw["esam_checkpoint"]["version"] = 1
    raw["step"] = 8  # edited after the checksum was taken
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"edited\.pt: checksum mismatch"):
        load_checkpoint(tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"c\.pt: checkpoint lacks the keys \['optimizer'\]"):
        load_checkpoint(path, required=("model", "optimizer"))
    with pytest.raises(CheckpointError, match=r"nothing\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, {"esam_checkpoint": 1})


def _net_and_opt(width: int):
    torch.manual_seed(width)
    net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return net, opt


def _snapshot(net, opt):
    return ({k: v.clone() for k, v in net.state_dict().items()},
            [{k: v.clone() for k, v in s.items()} for s in opt.state_dict()["state"].values()])


def test_restore_is_all_or_nothing(tmp_path):
    other_net, other_opt = _net_and_opt(5)  # a different hidden width: the weights do not fit
    save_checkpoint(tmp_path / "c.pt", {"model": other_net.state_dict(),
                                        "optimizer": other_opt.state_dict()})
    ckpt = load_checkpoint(tmp_path / "c.pt")
    net, opt = _net_and_opt(4)
    before = _snapshot(net, opt)
    # the model fails half-way (the first layer's weight does not fit): nothing changes
    with pytest.raises(CheckpointError, match=r"c\.pt: entry 'model' does not fit"):
        restore_state(ckpt, {"model": net, "optimizer": opt}, tmp_path / "c.pt")
    assert _same(_snapshot(net, opt), before)
    # the model loads, then the optimizer fails: the model gets its weights back
    good = {"model": {k: v + 1 for k, v in net.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []}}
    with pytest.raises(CheckpointError, match="entry 'optimizer' does not fit"):
        restore_state(good, {"model": net, "optimizer": opt})
    assert _same(_snapshot(net, opt), before)
    with pytest.raises(CheckpointError, match=r"lacks the keys \['optimizer'\]"):
        restore_state({"model": good["model"]}, {"model": net, "optimizer": opt})
    assert _same(_snapshot(net, opt), before)


# ------------------------------------------------------------------------------------------------
# Training: resume, corrupt checkpoints, signals
# ------------------------------------------------------------------------------------------------

def _cfg(tmp_path: Path, name: str, **overrides):
    # 2 training scenes, batch 1: 2 steps per epoch; a short warm-up so the cosine part counts
    base = dict(epochs=3, max_steps=100, plots=False, warmup_steps=2, data={"val_scenes": 0})
    return load_run_config(TINY, out=str(tmp_path / name), **{**base, **overrides})


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("stop_at", [3, 4])  # in the middle of epoch 2, at its end
def test_resume_reproduces_the_uninterrupted_losses(tmp_path, deterministic, stop_at):
    full = train(_cfg(tmp_path, "full"))
    assert len(full["step_losses"]) == 6 and full["interrupted"] is None
    stopped = train(_cfg(tmp_path, "resumed"), on_step=lambda step, _: step == stop_at)
    assert stopped["interrupted"] == "requested"
    assert len(stopped["step_losses"]) == stop_at
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert ckpt["step"] == stop_at and ckpt["epoch"] == 2
    assert (ckpt["partial_epoch"] is None) == (stop_at == 4)
    saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert saved["interrupted"] == "requested" and len(saved["step_losses"]) == stop_at

    resumed = train(_cfg(tmp_path, "resumed", resume=str(tmp_path / "resumed" / "last.pt")))
    a, b = np.array(full["step_losses"]), np.array(resumed["step_losses"])
    assert a.shape == b.shape == (6,)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max(), (a, b)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    for x, y in zip(full["epochs"], resumed["epochs"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    end_a = load_checkpoint(tmp_path / "full" / "last.pt")
    end_b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for name, value in end_a["model"].items():
        torch.testing.assert_close(end_b["model"][name], value, rtol=0, atol=1e-6)


def test_corrupt_checkpoint_names_the_file_and_loads_nothing(tmp_path):
    train(_cfg(tmp_path, "run", epochs=1))
    path = tmp_path / "run" / "last.pt"
    model, _ = load_model(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cut\.pt: unreadable checkpoint"):
        load_model(cut)
    with pytest.raises(CheckpointError, match=r"cut\.pt"):
        train(_cfg(tmp_path, "again", resume=str(cut)))
    # weights of another model size: the fresh model keeps its parameters
    ckpt = load_checkpoint(path)
    from esam.models.reference import ESAMReferenceModel

    fresh = ESAMReferenceModel(type(model.config).from_dict(
        {**ckpt["model_config"], "d_model": 8, "num_heads": 2}))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"last\.pt: entry 'model' does not fit"):
        restore_state(ckpt, {"model": fresh}, path)
    assert _same(fresh.state_dict(), before)
    with pytest.raises(CheckpointError, match=r"last\.pt: entry 'model' does not fit"):
        train(_cfg(tmp_path, "other", model={"d_model": 8}, resume=str(path)))


def test_stop_signals_are_caught_then_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with _StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.caught == signal.SIGTERM and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_mid_run_leaves_a_valid_checkpoint(tmp_path):
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "run"
    cfg.write_text(TINY.read_text().replace("out: runs/tiny", f"out: {out}")
                   .replace("max_steps: 2", "max_steps: 100000\nplots: false")
                   .replace("epochs: 1", "epochs: 50000")
                   .replace("val_scenes: 1", "val_scenes: 0"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "esam", "train", "--config", str(cfg)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.json").exists():  # after the first epoch
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in err and "--resume" in err
    ckpt = load_checkpoint(out / "last.pt", required=("model", "optimizer", "rng"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["interrupted"] == "SIGTERM"
    assert ckpt["step"] == saved["timings"]["steps"] == len(ckpt["step_losses"]) >= 2
    done = ckpt["epoch"] - (ckpt["partial_epoch"] is not None)
    assert 2 * done + (ckpt["partial_epoch"] or {}).get("batches_done", 0) == ckpt["step"]
    model, _ = load_model(out / "last.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# The data order
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, world", [(7, 1), (7, 2), (6, 3), (2, 4)])
def test_epoch_order_splits_global_batches_across_ranks(n, world):
    b = 2
    single = epoch_order(n, seed=5, epoch=3)
    assert sorted(i for _, i in single) == list(range(n))
    assert single != epoch_order(n, seed=5, epoch=4)  # set_epoch reshuffles
    shards = [epoch_order(n, seed=5, epoch=3, rank=r, world_size=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    padded = -(-n // world) * world
    assert sorted(p for s in shards for p, _ in s) == list(range(padded))
    scene_at = dict(single)
    for s in shards:
        for p, i in s:
            assert i == scene_at[p % n]  # wrap-around padding repeats the permutation
    for j in range(len(shards[0]) // b):  # local batch j of every rank = global batch j
        got = sorted(p for s in shards for p, _ in s[j * b:(j + 1) * b])
        assert got == list(range(j * b * world, (j + 1) * b * world))
    with pytest.raises(ValueError, match="rank"):
        epoch_order(n, seed=0, epoch=0, rank=world, world_size=world)
