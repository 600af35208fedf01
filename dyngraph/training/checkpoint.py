"""Checkpoints: atomic writes (temporary file, then rename), safe loads (weights_only)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomic(obj: dict, path: Path) -> None:
    """Write `obj` so that `path` always holds a whole checkpoint, even if killed mid-write."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
