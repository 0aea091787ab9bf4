"""Helpers shared by the batch samplers: label conversion, argument checks, per-epoch generators."""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from deepmetric.errors import ConfigError, DataError

__all__ = ["as_label_array", "check_positive_int", "check_seed", "epoch_generator"]


def as_label_array(labels: Any) -> np.ndarray:
    """Return ``labels`` (list, NumPy array or tensor) as a 1-D NumPy array.

    Raises:
        DataError: labels that are not one-dimensional or are empty.
    """
    if hasattr(labels, "detach") and hasattr(labels, "cpu"):  # torch.Tensor without importing torch here
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise DataError(f"labels must be one-dimensional (one label per sample); got shape {array.shape}")
    if array.size == 0:
        raise DataError("labels are empty: a sampler needs at least one sample")
    return array


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` ≥ 1, else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as an ``int`` ≥ 0, else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer; got {value!r}")
    return int(value)


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """A NumPy generator that depends only on ``(seed, epoch)`` (independent streams per pair)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
