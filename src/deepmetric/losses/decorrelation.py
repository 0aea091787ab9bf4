"""Decorrelation regulariser (DeCov, Cogswell et al., ICLR 2016) on the batch correlation matrix."""
from __future__ import annotations

import math
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.registry import LOSSES
from deepmetric.tuples import check_label_free_inputs

__all__ = ["DecorrelationLoss", "decorrelation_loss"]


def decorrelation_loss(embeddings: Tensor, normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """Mean squared off-diagonal correlation of the embedding dimensions over the batch; see
    :class:`DecorrelationLoss`. Memory O(B·D + D²)."""
    batch, dim = embeddings.shape
    if batch < 2 or dim < 2:
        return embeddings.sum() * 0.0
    u = F.normalize(embeddings, dim=1) if normalize else embeddings
    z = u - u.mean(0, keepdim=True)
    std = z.pow(2).mean(0).add(eps).sqrt()
    zs = z / std
    corr = zs.T @ zs / batch
    off = corr.pow(2).sum() - corr.diagonal().pow(2).sum()
    return off / (dim * (dim - 1))


@LOSSES.register("decorrelation")
class DecorrelationLoss(nn.Module):
    r"""Decorrelation regulariser: the embedding dimensions should not be redundant (labels ignored).

    With $u_i = f_i / \|f_i\|$ the L2-normalised embeddings of a batch of $B$ samples in $D$
    dimensions, $z_{ik} = u_{ik} - \bar u_k$ centred per dimension and
    $\sigma_k = \sqrt{\tfrac{1}{B}\sum_i z_{ik}^2 + \epsilon}$, the correlation matrix is
    $R_{kl} = \tfrac{1}{B} \sum_i z_{ik} z_{il} / (\sigma_k \sigma_l)$ and

    $$ \mathcal{L}_{decorr} = \frac{1}{D(D-1)} \sum_{k \ne l} R_{kl}^2 ,$$

    the mean squared correlation between two different dimensions (0 when they are uncorrelated).
    DeCov (Cogswell et al. 2016) penalises $\tfrac12(\|C\|_F^2 - \|\mathrm{diag}\,C\|^2)$ of the
    *covariance* $C$ of a layer's activations to reduce over-fitting; this is the same penalty on
    the correlation matrix (scale-free, so one weight fits any embedding scale), averaged over the
    $D(D-1)$ off-diagonal entries. In metric learning it keeps the embedding from collapsing onto
    the few directions that separate the training classes (a flat singular-value spectrum: Roth et
    al. 2020 relate it to generalisation to unseen classes). Use it as an ``[[extra_losses]]`` term.

    Reference:
        M. Cogswell, F. Ahmed, R. Girshick, L. Zitnick, D. Batra, "Reducing Overfitting in Deep
        Networks by Decorrelating Representations", ICLR 2016 (DeCov, eq. 1). Related: K. Roth et
        al., "Revisiting Training Strategies and Generalization Performance in Deep Metric
        Learning", ICML 2020; J. Zbontar et al., "Barlow Twins", ICML 2021 (redundancy reduction).

    Args:
        normalize: L2-normalise the embeddings first (default, as the retrieval space is the
            sphere); ``False`` uses them as given.
        eps: added to each dimension's variance ($\epsilon$; a constant dimension then gives 0
            correlations instead of NaN).

    Shape:
        Input ``embeddings (B, D)``, ``labels (B,)`` (checked, not used). Output: a scalar in
        $[0, 1]$.

    Requirements:
        ``B >= 2`` and ``D >= 2`` (else 0). Batches much smaller than ``D`` make the correlation
        estimate noisy (rank ≤ B − 1). Mined ``indices`` are not taken.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0], [-2.0, -2.0]])  # one direction
        >>> round(float(DecorrelationLoss(normalize=False)(x, torch.tensor([0, 0, 1, 1]))), 4)
        1.0
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "none"

    def __init__(self, normalize: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ConfigError(f"eps must be a finite number > 0; got {eps!r}")
        self.normalize = bool(normalize)
        self.eps = float(eps)

    def forward(self, embeddings: Tensor, labels: Tensor, indices: object = None) -> Tensor:
        check_label_free_inputs("decorrelation", embeddings, labels, indices)
        return decorrelation_loss(embeddings, self.normalize, self.eps)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, eps={self.eps}"
