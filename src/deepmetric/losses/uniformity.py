"""Uniformity regulariser on the unit hypersphere (Wang & Isola, ICML 2020)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.registry import LOSSES
from deepmetric.tuples import check_label_free_inputs

__all__ = ["UniformityLoss", "uniformity_loss"]


def uniformity_loss(embeddings: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity of the L2-normalised rows of ``embeddings``; see :class:`UniformityLoss`.

    Uses $\\|u-v\\|^2 = 2 - 2\\,u^\\top v$ for unit vectors (no square root, so identical rows have a
    finite gradient) and a log-sum-exp over the off-diagonal entries of the ``(B, B)`` similarity
    matrix: each unordered pair is counted twice, which leaves the mean unchanged.
    """
    batch = embeddings.shape[0]
    if batch < 2:
        return embeddings.sum() * 0.0
    u = F.normalize(embeddings, dim=1)
    sq = (2.0 - 2.0 * (u @ u.T)).clamp_min(0.0)
    logits = sq.mul(-t)
    eye = torch.eye(batch, dtype=torch.bool, device=embeddings.device)
    logits = logits.masked_fill(eye, float("-inf"))
    return torch.logsumexp(logits.reshape(-1), dim=0) - math.log(batch * (batch - 1))


@LOSSES.register("uniformity")
class UniformityLoss(nn.Module):
    r"""Uniformity regulariser: spread the embeddings over the unit hypersphere (labels ignored).

    With $u_i = f_i / \|f_i\|$ the L2-normalised embeddings of a batch of $B$ samples,

    $$ \mathcal{L}_{uniform} = \log \frac{1}{B(B-1)} \sum_{i \ne j} e^{-t\,\|u_i - u_j\|_2^2} ,$$

    the log of the mean Gaussian potential over all pairs of distinct samples (a pair counted in both
    orders, which does not change the mean). It is minimised by the uniform distribution on the
    sphere and does not look at labels: it is a *regulariser*, meant as an ``[[extra_losses]]`` term
    beside a supervised loss. In deep metric learning it keeps the training classes from
    collapsing onto a few points and keeps the intra-class spread that unseen classes are told apart
    by (Roth et al. 2020 tie that spread to generalisation; their ρ-regulariser has the same aim).
    On Fashion-MNIST class-disjoint (train on 5 classes, retrieve the 5 others) a weight of 0.3
    beside the default triplet recipe raises test MAP@R; see ``benchmarks/results/``.

    Reference:
        T. Wang and P. Isola, "Understanding Contrastive Representation Learning through Alignment
        and Uniformity on the Hypersphere", ICML 2020 (eq. 4 and its code ``lunif``, $t = 2$).
        Related: K. Roth et al., "Revisiting Training Strategies and Generalization Performance in
        Deep Metric Learning", ICML 2020.

    Args:
        t: the potential's sharpness $t > 0$ (paper: 2).

    Shape:
        Input ``embeddings (B, D)``, ``labels (B,)`` (checked, not used). Output: a scalar
        $\le 0$ (it is $-t \cdot$ mean squared distance at best when all pairs are equally far).

    Requirements:
        ``B >= 2`` (a single sample gives 0). Embeddings are normalised inside, so the model may or
        may not normalise. Mined ``indices`` are not taken.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> round(float(UniformityLoss()(x, torch.tensor([0, 1]))), 4)  # distance² 4: log e^-8
        -8.0
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "none"

    def __init__(self, t: float = 2.0) -> None:
        super().__init__()
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ConfigError(f"t must be a finite number > 0; got {t!r}")
        self.t = float(t)

    def forward(self, embeddings: Tensor, labels: Tensor, indices: object = None) -> Tensor:
        check_label_free_inputs("uniformity", embeddings, labels, indices)
        return uniformity_loss(embeddings, self.t)

    def extra_repr(self) -> str:
        return f"t={self.t}"
