"""Checkpoints: written atomically, read with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict of plain data and tensors with ``format == "deepmetric-checkpoint"``; anything
else is refused with :class:`~deepmetric.errors.CheckpointError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deepmetric.errors import CheckpointError
from deepmetric.io import atomic_torch_save

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint"]

FORMAT = "deepmetric-checkpoint"
VERSION = 1
_REQUIRED = ("config", "model")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus format/version tags) atomically to ``path``."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **payload}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a deepmetric checkpoint.

    Raises:
        CheckpointError: missing, unreadable/corrupt, not a deepmetric checkpoint, or a newer version.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many types on bad bytes (IndexError, RuntimeError, ...)
        raise CheckpointError(
            f"{p} is not a readable checkpoint (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{p} is not a deepmetric checkpoint (no 'format: {FORMAT}' tag); "
            "it may come from another program"
        )
    if int(data.get("version", 0)) > VERSION:
        raise CheckpointError(f"{p} was written by a newer deepmetric (version {data.get('version')})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"{p} lacks required entries: {', '.join(missing)}")
    return data
