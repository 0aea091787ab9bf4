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


class _PairwiseEuclidean(torch.autograd.Function):
    """Fused ``(B, R)`` (squared) euclidean distances with a hand-written backward.

    Forward: one ``addmm`` and in-place clamps/sqrt on its output, so the only ``(B, R)`` tensors
    are the result and (squared case) a boolean mask. Autograd through the elementwise chain would
    keep three ``(B, R)`` float tensors and run three ``(B, R)`` backward kernels. Backward, with
    ``V = ∂L/∂(‖x_i − y_j‖²)``: ``∂L/∂x = rowsum(V)·2x − 2 V y`` and ``∂L/∂y = colsum(V)·2y − 2 Vᵀ x``
    (two matmuls, as for ``x @ y.T``). Gradients equal those of the composed formula
    ``sqrt(clamp_min(clamp_min(|x|² + |y|² − 2x·y, 0), eps))`` except on entries where the squared
    distance is exactly ``eps`` (measure zero).
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, squared: bool, same: bool):  # type: ignore[override]
        x2 = (x * x).sum(1, keepdim=True)
        y2 = x2.T if same else (y * y).sum(1).unsqueeze(0)
        d = torch.addmm(x2, x, y.T, beta=1.0, alpha=-2.0)
        d.add_(y2)
        if squared:
            passes = d >= 0  # clamp_min(0) passes the gradient where its input is >= 0
            d.clamp_min_(0.0)
            ctx.save_for_backward(x, y, passes)
        else:
            passes = d >= _EPS  # clamp_min(0) then clamp_min(eps) pass the gradient where d2 >= eps
            d.clamp_min_(_EPS).sqrt_()
            ctx.save_for_backward(x, y, passes, d)
        ctx.squared, ctx.same = squared, same
        return d

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, y, passes, *rest = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        if ctx.squared:
            v = torch.where(passes, grad, zero).mul_(2.0)
        else:
            # 2 d/d(d2) sqrt(max(d2, eps)) = 1 / d where d2 >= eps, else 0
            v = torch.where(passes, grad, zero).div_(rest[0])
        # v = 2 ∂L/∂d2: ∂L/∂x = rowsum(v)·x − v y ; ∂L/∂y = colsum(v)·y − vᵀ x
        gx = gy = None
        if ctx.needs_input_grad[0] or (ctx.same and ctx.needs_input_grad[1]):
            gx = torch.addmm(x * v.sum(1, keepdim=True), v, y, alpha=-1.0)
        if ctx.needs_input_grad[1]:
            gy = torch.addmm(y * v.sum(0).unsqueeze(1), v.T, x, alpha=-1.0)
        return gx, gy, None, None


def _fused_ok(x: Tensor, y: Tensor) -> bool:
    return x.dim() == 2 and y.dim() == 2 and x.dtype == y.dtype and x.is_floating_point()


@DISTANCES.register("squared_euclidean")
def squared_euclidean(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Squared euclidean distance ||x - y||², computed as |x|² + |y|² - 2 x·y and clamped at 0."""
    same = y is None or y is x
    y = x if y is None else y
    if _fused_ok(x, y):
        return _PairwiseEuclidean.apply(x, y, True, same)
    x2 = (x * x).sum(1, keepdim=True)
    y2 = x2.T if same else (y * y).sum(1).unsqueeze(0)
    d2 = torch.addmm(x2 + y2, x, y.T, beta=1.0, alpha=-2.0)
    return d2.clamp_min(0.0)


@DISTANCES.register("euclidean")
def euclidean(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Euclidean distance ||x - y||₂ (gradient 0, not NaN, where the distance is 0)."""
    same = y is None or y is x
    y = x if y is None else y
    if _fused_ok(x, y):
        return _PairwiseEuclidean.apply(x, y, False, same)
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
