"""Training: :func:`fit` runs a configured job and writes a run directory."""
from __future__ import annotations

from deepmetric.train.checkpoint import load_checkpoint, save_checkpoint
from deepmetric.train.embed import embed_dataset, raw_features
from deepmetric.train.loop import FitResult, build_components, fit, load_model_from_checkpoint, resolve_device

__all__ = [
    "fit",
    "FitResult",
    "build_components",
    "load_model_from_checkpoint",
    "resolve_device",
    "embed_dataset",
    "raw_features",
    "load_checkpoint",
    "save_checkpoint",
]
