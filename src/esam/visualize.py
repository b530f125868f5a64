"""Plots of a training run: loss curves and predicted vs true instances (matplotlib, Agg).

Shape vocabulary: N points.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["instance_colors", "plot_instances", "plot_loss_curves"]

_AUX_SUFFIX = re.compile(r"^(?P<base>.+)_(?P<layer>\d+)$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def instance_colors(ids: Tensor, background: tuple[float, float, float] = (0.82, 0.82, 0.82)
                    ) -> np.ndarray:
    """RGB ``(N, 3)`` for instance ids ``(N,)``: a fixed colour per id, grey for ids < 0.

    Colours come from the golden-ratio hue sequence, so neighbouring ids differ clearly.
    """
    ids = ids.detach().cpu().long().numpy()
    hue = (ids * 0.618033988749895) % 1.0
    sat = 0.65 + 0.35 * ((ids * 7) % 3) / 2
    val = 0.95 - 0.25 * ((ids * 5) % 2)
    import matplotlib.colors as mcolors

    rgb = mcolors.hsv_to_rgb(np.stack([hue, sat, val], axis=1))
    rgb[ids < 0] = background
    return rgb


def plot_instances(points: Tensor, panels: Mapping[str, Tensor], path: str | Path, *,
                   title: str | None = None, max_points: int = 60000) -> Path:
    """Top-down scatter of ``points (N, 3)`` coloured by instance, one panel per entry.

    Args:
        points: ``(N, 3)`` world-frame xyz (z up).
        panels: panel title -> ``(N,)`` instance id per point (< 0: none), e.g. true and
            predicted.
        path: the PNG to write.
        title: figure title.
        max_points: points drawn at most (an even subsample beyond), lower first so that tall
            objects are drawn over the floor.

    Returns:
        The path written.
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points: expected shape (N, 3), got {tuple(points.shape)}")
    for name, ids in panels.items():
        if ids.shape != (points.shape[0],):
            raise ValueError(f"panels[{name!r}]: expected shape (N={points.shape[0]},), got "
                             f"{tuple(ids.shape)}")
    plt = _pyplot()
    pts = points.detach().cpu().float()
    keep = torch.arange(pts.shape[0])
    if pts.shape[0] > max_points:
        keep = torch.linspace(0, pts.shape[0] - 1, max_points).long()
    keep = keep[pts[keep, 2].argsort()]
    xy = pts[keep, :2].numpy()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.2), squeeze=False)
    for ax, (name, ids) in zip(axes[0], panels.items()):
        ids = ids.detach().cpu()[keep]
        ax.scatter(xy[:, 0], xy[:, 1], c=instance_colors(ids), s=1.0, linewidths=0)
        n = int(torch.unique(ids[ids >= 0]).numel())
        ax.set_title(f"{name} ({n} instances)")
        ax.set_aspect("equal")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(history: Sequence[Mapping[str, float]], out_dir: str | Path, *,
                     x_key: str = "epoch") -> list[Path]:
    """One PNG per loss term: ``loss_<term>.png`` in ``out_dir``.

    Args:
        history: per epoch ``{x_key: epoch, 'loss_cls': value, 'loss_cls_0': value, ...}``.
            Auxiliary-layer terms (suffix ``_<i>``) are drawn in their term's figure.
        out_dir: the folder to write.
        x_key: the key of the x axis.

    Returns:
        The paths written, sorted.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    for rec in history:
        for key in rec:
            if not key.startswith("loss"):
                continue
            m = _AUX_SUFFIX.match(key)
            base = m.group("base") if m and m.group("base").startswith("loss_") else key
            members = groups.setdefault(base, [])
            if key not in members:
                members.append(key)
    written = []
    for base, keys in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for key in sorted(keys, key=lambda k: (k != base, k)):
            xs = [rec[x_key] for rec in history if key in rec]
            ys = [rec[key] for rec in history if key in rec]
            label = "final layer" if key == base else f"layer {key.rsplit('_', 1)[1]}"
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3,
                    lw=2.0 if key == base else 1.0, label=label)
        ax.set_xlabel(x_key)
        ax.set_ylabel(base)
        ax.set_title(base)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{base}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return sorted(written)
