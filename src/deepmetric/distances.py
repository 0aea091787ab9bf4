"""Pairwise distances. One convention everywhere: **smaller means closer**.

All functions take ``x`` of shape ``(B, D)`` and optional ``y`` of shape ``(R, D)`` (default ``x``) and
return a ``(B, R)`` matrix. Gradients are finite everywhere, including on the diagonal of
``euclidean(x)`` where the distance is 0.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric.registry import DISTANCES

__all__ = [
    "euclidean",
    "squared_euclidean",
    "cosine",
    "cosine_similarity",
    "pairwise_distance",
    "get_distance",
    "names",
]

_EPS = 1e-12


@DISTANCES.register("squared_euclidean")
def squared_euclidean(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Squared euclidean distance ||x - y||², computed as |x|² + |y|² - 2 x·y and clamped at 0."""
    y = x if y is None else y
    x2 = (x * x).sum(1, keepdim=True)
    y2 = x2.T if y is x else (y * y).sum(1).unsqueeze(0)
    d2 = torch.addmm(x2 + y2, x, y.T, beta=1.0, alpha=-2.0)
    return d2.clamp_min(0.0)


@DISTANCES.register("euclidean")
def euclidean(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Euclidean distance ||x - y||₂ (gradient 0, not NaN, where the distance is 0)."""
    return squared_euclidean(x, y).clamp_min(_EPS).sqrt()


def cosine_similarity(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Cosine similarity in [-1, 1] (larger = closer); used by similarity-native losses."""
    xn = F.normalize(x, dim=1)
    yn = xn if y is None else F.normalize(y, dim=1)
    return xn @ yn.T


@DISTANCES.register("cosine")
def cosine(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Cosine distance 1 - cos(x, y) in [0, 2]."""
    return 1.0 - cosine_similarity(x, y)


def get_distance(name: str) -> Callable[[Tensor, Tensor | None], Tensor]:
    """The distance function registered as ``name`` (euclidean, squared_euclidean, cosine)."""
    return DISTANCES.get(name)


def pairwise_distance(x: Tensor, y: Tensor | None = None, metric: str = "euclidean") -> Tensor:
    """``(B, R)`` distance matrix under ``metric``."""
    return get_distance(metric)(x, y)


def names() -> list[str]:
    return DISTANCES.names()
