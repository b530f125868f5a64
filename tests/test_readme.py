"""README.md's quick start runs as written."""

import re
from pathlib import Path

import torch


def test_quick_start_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert len(code.strip().splitlines()) <= 15
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    losses = scope["losses"]
    assert torch.isfinite(losses["loss"])
    assert {"loss_cls", "loss_bce", "loss_dice", "loss_bbox", "loss_sem"} <= losses.keys()
    assert scope["layer"].mask_logits.grad is not None
