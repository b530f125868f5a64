"""The ``esam`` command line: help, train, eval (model and baselines), demo, bench wiring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from esam.cli import _load_benchmark, build_parser, format_metrics, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--config", str(TINY), "--out", str(out), "--no-progress"]) == 0
    return out / "last.pt"


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["demo"], ["bench"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: esam" in capsys.readouterr().out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "esam", "eval", "--help"], cwd=ROOT,
                            capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert result.returncode == 0 and "--baseline" in result.stdout


def test_train_writes_a_run_folder(checkpoint, capsys):
    assert checkpoint.is_file() and (checkpoint.parent / "metrics.json").is_file()
    assert (checkpoint.parent / "instances.png").is_file()


def test_eval_prints_the_metric_keys(checkpoint, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["reference model"]
    for view in ("multi_view", "per_frame"):
        assert set(res[view]["class_agnostic"]) == {"ap", "ap50", "ap25"}
        assert {"ap", "ap50", "ap25", "per_class"} <= set(res[view]["per_class"])
    assert "miou" in res["semantic"]


def test_eval_table_and_baselines(checkpoint, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--baseline"]) == 0
    out = capsys.readouterr().out
    table, payload = out.split("\n\n", 1)
    assert "reference model" in table and "baseline: superpoints" in table
    assert "baseline: components" in table and "semantic mIoU" in table
    data = json.loads(payload)
    assert set(data) == {"reference model", "baseline: superpoints", "baseline: components"}


def test_eval_baseline_alone(capsys):
    assert main(["eval", "--baseline", "superpoints", "--config", str(TINY), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["baseline: superpoints"]
    assert set(data["baseline: superpoints"]["multi_view"]["class_agnostic"]) == {"ap", "ap50",
                                                                                  "ap25"}


def test_eval_needs_something_to_evaluate(capsys):
    assert main(["eval"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_demo_writes_a_png(checkpoint, tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(["demo", "--checkpoint", str(checkpoint), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["demo", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_bad_config_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "epochz" in capsys.readouterr().err


def test_bench_finds_the_benchmarks_folder():
    assert _load_benchmark("no_such_benchmark") is None
    for name in ("bench_core", "bench_merge"):
        if (ROOT / "benchmarks" / f"{name}.py").exists():
            assert callable(_load_benchmark(name).run)


def test_format_metrics_rows():
    r = {"ap": 0.25, "ap50": 0.5, "ap25": float("nan")}
    text = format_metrics({"m": {"multi_view": {"class_agnostic": r}}})
    assert "0.250" in text and "0.500" in text and "n/a" in text
    assert build_parser().parse_args(["eval", "--baseline"]).baseline == "all"
