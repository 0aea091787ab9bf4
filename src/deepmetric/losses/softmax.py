"""Softmax cross-entropy over a linear classifier with bias, plus the input checks of class losses.

The helpers :func:`check_class_inputs` and :func:`check_class_count` are shared by every loss that
holds per-class state (proxies, centers, classifier weights); they live here, next to the plainest
such loss, so that each class loss imports them from one place.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import LOSSES
from deepmetric.tuples import check_inputs

__all__ = ["SoftmaxLoss", "softmax_loss", "check_class_inputs", "check_class_count"]


def check_class_count(num_classes: int, embedding_dim: int, *, min_classes: int = 1) -> None:
    """Raise ConfigError unless ``num_classes >= min_classes`` and ``embedding_dim >= 1`` are ints."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < min_classes:
        raise ConfigError(f"num_classes must be an integer >= {min_classes}; got {num_classes!r}")
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ConfigError(f"embedding_dim must be a positive integer; got {embedding_dim!r}")


def check_class_inputs(
    embeddings: Tensor,
    labels: Tensor,
    num_classes: int | None,
    embedding_dim: int | None,
    *,
    indices: object = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> None:
    """Validate the call of a class-label loss (one that does not consume mined tuples).

    Args:
        embeddings: ``(B, D)`` batch.
        labels: ``(B,)`` integer class indices.
        num_classes: labels must lie in ``[0, num_classes)``; ``None`` skips the range check.
        embedding_dim: expected ``D``; ``None`` skips the check.
        indices: must be ``None`` (class losses do not take mined tuples).
        ref_embeddings: must be ``None``.
        ref_labels: must be ``None``.

    Raises:
        DataError: tuples or a reference set were given, bad shapes, non-integer labels, or a
            label outside ``[0, num_classes)`` (the message names it).
        NonFiniteError: NaN/inf embeddings.
    """
    if indices is not None:
        raise DataError(
            "this loss works on class labels and per-class parameters; it does not take mined "
            "tuples: call it as loss(embeddings, labels) with indices=None"
        )
    if ref_embeddings is not None or ref_labels is not None:
        raise DataError("this loss does not support ref_embeddings/ref_labels; pass None")
    check_inputs(embeddings, labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if embedding_dim is not None and embeddings.shape[1] != embedding_dim:
        raise DataError(
            f"embeddings have dimension {embeddings.shape[1]} but the loss was built with "
            f"embedding_dim={embedding_dim}"
        )
    if num_classes is not None:
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise DataError(
                f"label {first} is outside [0, {num_classes}): labels must be class indices "
                f"0..num_classes-1 (num_classes={num_classes})"
            )


def softmax_loss(embeddings: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Mean softmax cross-entropy of the logits ``embeddings @ weight.T + bias``.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        weight: ``(C, D)`` classifier weights.
        bias: ``(C,)`` or ``None``.

    Returns:
        Scalar tensor.
    """
    logits = F.linear(embeddings, weight, bias)
    return F.cross_entropy(logits, labels)


@LOSSES.register("softmax")
class SoftmaxLoss(nn.Module):
    """Softmax cross-entropy over a learned linear classifier with bias (the classic baseline).

    $$ L = -\\frac{1}{B}\\sum_{i=1}^{B} \\log \\frac{\\exp(W_{y_i}^\\top x_i + b_{y_i})}
    {\\sum_{j=1}^{C} \\exp(W_j^\\top x_i + b_j)} $$

    The "softmax loss" that center loss, triplet-center loss and the face-recognition margins
    (CosFace, ArcFace) start from; the embeddings are used unnormalised. Reference: the softmax
    loss term $L_S$ of Wen et al., "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016 (eq. 2).

    Args:
        num_classes: number of classes ``C``; labels are indices in ``[0, C)``.
        embedding_dim: embedding size ``D``.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``; output scalar.

    Requirements:
        Class-index labels; no pairs needed (any batch works). Not invariant to relabelling:
        label ``c`` selects classifier row ``c``. The classifier is an ``nn.Parameter``: give the
        loss's parameters to the optimizer.

    Example:
        >>> import torch
        >>> loss_fn = SoftmaxLoss(num_classes=3, embedding_dim=4)
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss.dim(), bool(loss > 0)
        (0, True)
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(self, *, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        linear = nn.Linear(embedding_dim, num_classes, bias=True)  # PyTorch's default init
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: object = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_class_inputs(
            embeddings, labels, self.num_classes, self.embedding_dim,
            indices=indices, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
        )
        dtype = embeddings.dtype
        return softmax_loss(embeddings, labels, self.weight.to(dtype), self.bias.to(dtype))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"
