"""Checkpoints that lose nothing: atomic, versioned, checksummed, and loaded all or nothing.

A checkpoint is a plain ``torch.save`` dict (``torch.load`` still reads it) with one extra entry,
``"esam_checkpoint": {"version": 1, "sha256": ...}``: the SHA-256 of a canonical walk of every
other entry (tensor bytes, dtypes and shapes; exact ``repr`` of everything else). Writing goes
through a temporary file in the same folder, flushed and fsynced, then `os.replace`, so a reader
sees the old file or the new one, never half of one. Reading checks that the file exists, that
it unpickles (a truncated zip archive does not), the header, the version, the checksum and the
required keys, and raises `CheckpointError` naming the file and what is wrong.

`restore_state` loads a checkpoint's entries into live objects (model, optimizer, scheduler)
all or nothing: if any ``load_state_dict`` fails, the objects already loaded get their previous
state back before the error is raised.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "HEADER_KEY",
    "save_checkpoint",
    "load_checkpoint",
    "restore_state",
    "state_digest",
]

FORMAT_VERSION = 1
HEADER_KEY = "esam_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, of another format or incomplete."""


def _feed(h: Any, x: Any) -> None:
    """Hash ``x`` in a canonical order: type tags, then content."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(x, np.ndarray):
        a = np.ascontiguousarray(x)
        h.update(f"A{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(x, Mapping):
        h.update(f"D{len(x)}".encode())
        for key in sorted(x, key=repr):
            _feed(h, key)
            _feed(h, x[key])
    elif isinstance(x, (list, tuple)):
        h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}".encode())
        for v in x:
            _feed(h, v)
    else:
        h.update(f"S{type(x).__name__}:{x!r};".encode())


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of every entry of ``state`` but the header."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != HEADER_KEY})
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (a dict with string keys) to ``path`` atomically; returns the path.

    The bytes go to a temporary file next to ``path``, are flushed and fsynced, and replace
    ``path`` in one `os.replace`; the folder is fsynced too where the platform allows.
    """
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"state: expected a dict with string keys, got {type(state).__name__}")
    if HEADER_KEY in state:
        raise ValueError(f"state: the key {HEADER_KEY!r} is reserved for the checkpoint header")
    path = Path(path)
    payload = {**state, HEADER_KEY: {"version": FORMAT_VERSION, "sha256": state_digest(state)}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # e.g. folders cannot be opened on Windows
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu",
                    required: Iterable[str] = ()) -> dict:
    """Read and validate a checkpoint written by `save_checkpoint` -> its state dict.

    Raises:
        CheckpointError: the file is missing, truncated or not a torch file, has no esam header
            ("not an esam checkpoint"), another format version, a checksum mismatch, or lacks
            one of the ``required`` keys. The message starts with the path.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # zip / unpickling errors of a truncated or corrupt file
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not isinstance(state.get(HEADER_KEY), dict):
        raise CheckpointError(f"{path}: not an esam checkpoint (no {HEADER_KEY!r} header)")
    header = state.pop(HEADER_KEY)
    if header.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {header.get('version')!r}, "
                              f"expected {FORMAT_VERSION}")
    if header.get("sha256") != state_digest(state):
        raise CheckpointError(f"{path}: checksum mismatch, the checkpoint is corrupt")
    missing = sorted(set(required) - set(state))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks the keys {missing}")
    return state


def restore_state(state: Mapping[str, Any], targets: Mapping[str, Any],
                  path: str | Path = "checkpoint") -> None:
    """``targets[key].load_state_dict(state[key])`` for every key, all or nothing.

    Args:
        state: a validated checkpoint (`load_checkpoint`).
        targets: key -> object with ``state_dict`` / ``load_state_dict`` (module, optimizer,
            scheduler), loaded in this order.
        path: named in the error message.

    Raises:
        CheckpointError: a key is missing or a ``load_state_dict`` fails; every target then holds
            the state it had before the call.
    """
    missing = sorted(set(targets) - set(state))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks the keys {missing}")
    before = {key: copy.deepcopy(obj.state_dict()) for key, obj in targets.items()}
    done: list[str] = []
    try:
        for key, obj in targets.items():
            obj.load_state_dict(state[key])
            done.append(key)
    except Exception as e:
        for key in [*done, key]:
            targets[key].load_state_dict(before[key])
        raise CheckpointError(f"{path}: entry {key!r} does not fit ({type(e).__name__}: "
                              f"{e})") from e
