"""`SyntheticStreamingDataset`: seeded synthetic scenes as a `torch.utils.data.Dataset`, cached on
disk, with helpers for V-frame windows and train / validation splits whose seeds never overlap."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .structures import SceneSequence
from .synthetic import SyntheticSceneConfig, generate_scene

__all__ = ["SyntheticStreamingDataset", "scene_seed", "window", "sample_window",
           "train_val_split"]

_CACHE_FORMAT = 1  # bump when generated data change, so stale caches are not reused
_SEED_SPACE = 2 ** 32  # torch's CPU generator keeps the low 32 bits of a seed
_STREAM_SPAN = 2 ** 30  # scenes per stream
STREAM_TRAIN, STREAM_VAL, STREAM_TEST = 0, 1, 2


def scene_seed(seed: int, index: int, stream: int = STREAM_TRAIN) -> int:
    """Seed of scene ``index`` of stream ``stream`` (0 train, 1 validation, 2 test) under base
    ``seed``.

    ``(h(seed) + stream * 2**30 + index) mod 2**32`` with ``h`` a bijective multiplicative hash
    (``h(0) = 0``): for one base seed, the streams occupy disjoint seed ranges, so a training and
    a validation set never share a scene.
    """
    if not 0 <= seed < _SEED_SPACE:
        raise ValueError(f"seed: expected an int in [0, 2**32), got {seed}")
    if not 0 <= stream < _SEED_SPACE // _STREAM_SPAN:
        raise ValueError(f"stream: expected an int in [0, 4), got {stream}")
    if not 0 <= index < _STREAM_SPAN:
        raise ValueError(f"index: expected an int in [0, 2**30), got {index}")
    base = (seed * 0x9E3779B1) % _SEED_SPACE  # odd multiplier: a bijection of 32-bit ints
    return (base + stream * _STREAM_SPAN + index) % _SEED_SPACE


def window(scene: SceneSequence, start: int, length: int) -> SceneSequence:
    """The ``length`` (V) consecutive frames of ``scene`` beginning at frame ``start``."""
    return scene.window(start, length)


def sample_window(scene: SceneSequence, length: int, generator: torch.Generator | None = None
                  ) -> SceneSequence:
    """A random V-frame window of ``scene`` (uniform start; needs ``length <= V``)."""
    if not 1 <= length <= scene.num_frames:
        raise ValueError(f"length: expected in [1, V={scene.num_frames}], got {length}")
    start = int(torch.randint(0, scene.num_frames - length + 1, (), generator=generator))
    return scene.window(start, length)


class SyntheticStreamingDataset(Dataset):
    """``num_scenes`` synthetic scenes; item i is the `SceneSequence` of scene i.

    Args:
        num_scenes: number of scenes.
        seed: base seed; scene i is generated from ``scene_seed(seed, i, stream)``.
        frames_per_scene: V frames per scene (default ``config.num_frames``).
        config: generation options (default `SyntheticSceneConfig()`).
        cache_dir: where generated scenes are saved (``{key}.pt``, the key hashing the config,
            the scene seed and the data format) and loaded from on later requests; ``None``
            generates every time.
        stream: 0 train, 1 validation, 2 test; `train_val_split` picks it for you.
    """

    def __init__(self, num_scenes: int, *, seed: int = 0, frames_per_scene: int | None = None,
                 config: SyntheticSceneConfig | None = None, cache_dir: str | Path | None = None,
                 stream: int = STREAM_TRAIN):
        if num_scenes < 0:
            raise ValueError(f"num_scenes: expected >= 0, got {num_scenes}")
        config = SyntheticSceneConfig() if config is None else config
        if frames_per_scene is not None:
            if frames_per_scene < 1:
                raise ValueError(f"frames_per_scene: expected >= 1, got {frames_per_scene}")
            config = dataclasses.replace(config, num_frames=frames_per_scene)
        scene_seed(seed, 0, stream)  # validates seed and stream
        self.num_scenes = num_scenes
        self.seed = seed
        self.stream = stream
        self.config = config
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._config_json = json.dumps(dataclasses.asdict(config), sort_keys=True)

    def __len__(self) -> int:
        return self.num_scenes

    def scene_seed(self, index: int) -> int:
        return scene_seed(self.seed, index, self.stream)

    def cache_key(self, index: int) -> str:
        text = f"{_CACHE_FORMAT}|{self._config_json}|{self.scene_seed(index)}"
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    def cache_path(self, index: int) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{self.cache_key(index)}.pt"

    def _generate(self, index: int) -> SceneSequence:
        return generate_scene(self.scene_seed(index), self.config,
                              scene_id=f"synthetic_s{self.seed}_t{self.stream}_{index:05d}")

    def __getitem__(self, index: int) -> SceneSequence:
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"index: expected in [0, {self.num_scenes}), got {index}")
        path = self.cache_path(index)
        if path is not None and path.exists():
            try:
                return SceneSequence.from_dict(torch.load(path, weights_only=True))
            except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError,
                    pickle.UnpicklingError):
                pass  # unreadable cache entry: generate again and overwrite it
        scene = self._generate(index)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(scene.to_dict(), tmp)
            os.replace(tmp, path)  # atomic, so concurrent workers never read half a file
        return scene

    window = staticmethod(window)


def train_val_split(num_train: int, num_val: int, *, seed: int = 0, **kwargs
                    ) -> tuple[SyntheticStreamingDataset, SyntheticStreamingDataset]:
    """Training and validation datasets drawn from disjoint seed streams (no shared scene).

    ``kwargs`` go to both `SyntheticStreamingDataset` constructors (frames, config, cache).
    """
    if "stream" in kwargs:
        raise ValueError("stream: chosen by train_val_split, do not pass it")
    train = SyntheticStreamingDataset(num_train, seed=seed, stream=STREAM_TRAIN, **kwargs)
    val = SyntheticStreamingDataset(num_val, seed=seed, stream=STREAM_VAL, **kwargs)
    return train, val
