"""Log-ratio loss for continuous labels, with dense triplet sampling (Kim et al., CVPR 2019)."""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from deepmetric.distances import squared_euclidean
from deepmetric.errors import ConfigError, DataError, NonFiniteError
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, is_triplets, pair_masks_from_indices, zero_loss

__all__ = ["LogRatioLoss", "log_ratio_loss", "dense_triplet_batch", "DenseTripletBatch"]


class DenseTripletBatch(NamedTuple):
    """A mini-batch built by :func:`dense_triplet_batch`.

    Attributes:
        indices: ``(batch_size,)`` dataset indices of the batch, group after group.
        anchors: ``(anchor_count,)`` positions (within the batch) of the groups' anchors.
    """

    indices: Tensor
    anchors: Tensor


def _as_label_matrix(labels: Tensor, dtype: torch.dtype) -> Tensor:
    labels = labels.detach().to(dtype)
    return labels.unsqueeze(1) if labels.dim() == 1 else labels.reshape(labels.shape[0], -1)


def _anchor_rows(anchors: Tensor | None, batch_size: int, device: torch.device) -> Tensor | None:
    """``(B,)`` boolean mask of the rows used as anchors (None = all)."""
    if anchors is None:
        return None
    anchors = torch.as_tensor(anchors, device=device)
    if anchors.dtype == torch.bool:
        if anchors.shape != (batch_size,):
            raise DataError(f"boolean anchors must have shape ({batch_size},); got {tuple(anchors.shape)}")
        return anchors
    anchors = anchors.long().reshape(-1)
    if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= batch_size):
        raise DataError(f"anchor positions must be in [0, {batch_size}); got {anchors.tolist()}")
    rows = torch.zeros(batch_size, dtype=torch.bool, device=device)
    rows[anchors] = True
    return rows


def log_ratio_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    label_distances: Tensor | None = None,
    anchors: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Log-ratio loss value; see :class:`LogRatioLoss`. Inputs are assumed validated.

    Memory is O(B·R): the sum over all pairs ``(i, j)`` of an anchor's squared log-ratio
    differences is expanded as ``|J| Σ_I x² + |I| Σ_J x² − 2 (Σ_I x)(Σ_J x)`` (with ``x`` centred
    per anchor for numerical stability, which leaves the sum unchanged), so no B×R×R tensor exists.
    """
    same_set = ref_embeddings is None
    ref = embeddings if same_set else ref_embeddings
    batch_size, ref_size = embeddings.shape[0], ref.shape[0]  # type: ignore[union-attr]
    emb_dist = squared_euclidean(embeddings, None if same_set else ref)
    if label_distances is None:
        if labels is None:
            raise DataError("log_ratio_loss needs labels (continuous vectors) or label_distances=")
        label_rows = _as_label_matrix(labels, emb_dist.dtype)
        label_ref = None if same_set else _as_label_matrix(ref_labels, emb_dist.dtype)  # type: ignore[arg-type]
        label_dist = squared_euclidean(label_rows, label_ref)
    else:
        label_dist = label_distances.detach().to(emb_dist.dtype)
    x = torch.log(emb_dist + eps) - torch.log(label_dist + eps)
    rows = _anchor_rows(anchors, batch_size, embeddings.device)

    if indices is not None and is_triplets(indices):
        a, i, j = (t.long() for t in indices)
        if rows is not None:
            keep = rows[a]
            a, i, j = a[keep], i[keep], j[keep]
        if a.numel() == 0:
            return zero_loss(embeddings, ref)  # type: ignore[arg-type]
        return (x[a, i] - x[a, j]).pow(2).mean()

    if indices is None:
        first = torch.ones(batch_size, ref_size, dtype=torch.bool, device=embeddings.device)
        if same_set:
            first.fill_diagonal_(False)
        second = first
    else:
        first, second = pair_masks_from_indices(indices, batch_size, ref_size)
        if same_set:
            eye = torch.eye(batch_size, dtype=torch.bool, device=first.device)
            first, second = first & ~eye, second & ~eye
    if rows is not None:
        first, second = first & rows.unsqueeze(1), second & rows.unsqueeze(1)

    n_first = first.sum(1).to(x.dtype)
    n_second = second.sum(1).to(x.dtype)
    count = n_first * n_second - (first & second).sum(1).to(x.dtype)
    total_count = count.sum()
    if float(total_count) <= 0:
        return zero_loss(embeddings, ref)  # type: ignore[arg-type]
    zero = x.new_zeros(())
    with torch.no_grad():
        centre = (torch.where(first, x, zero).sum(1) + torch.where(second, x, zero).sum(1)) / (
            n_first + n_second
        ).clamp_min(1)
    xc = x - centre.unsqueeze(1)
    x_first = torch.where(first, xc, zero)
    x_second = torch.where(second, xc, zero)
    per_anchor = (
        n_second * x_first.pow(2).sum(1)
        + n_first * x_second.pow(2).sum(1)
        - 2.0 * x_first.sum(1) * x_second.sum(1)
    )
    return per_anchor.sum() / total_count


@LOSSES.register("log_ratio")
class LogRatioLoss(nn.Module):
    r"""Log-ratio loss: embedding distance ratios match label distance ratios (continuous labels).

    For an anchor $a$ and two other samples $i, j$ with $D$ the squared euclidean distance,

    $$ \ell_{lr}(a,i,j) = \Big(\log\frac{D(f_a,f_i)}{D(f_a,f_j)} - \log\frac{D(y_a,y_i)}{D(y_a,y_j)}\Big)^2 ,$$

    averaged over all triplets $(a, i, j)$, $i \ne j$, $i, j \ne a$, of the batch (every sample is
    an anchor), or over the anchors given by ``anchors=``, or over mined ``indices``. An $\epsilon$
    is added inside every log: $\log(D + \epsilon)$, $\epsilon = 10^{-6}$ as in the authors' code.

    Reference: S. Kim, M. Seo, I. Laptev, M. Cho, S. Kwak, "Deep Metric Learning Beyond Binary
    Supervision", CVPR 2019. No margin and no embedding normalisation (the loss is invariant to a
    rescaling of the embedding). The authors' code takes the non-squared embedding distance, which
    only scales the embedding log term by 1/2; this class follows the paper (squared).

    The paper's **dense triplet mining** builds each mini-batch from an anchor, its $k$ nearest
    neighbours in label space and random other samples, and uses every triplet with that anchor:
    use :func:`dense_triplet_batch` for the indices and pass ``anchors=batch.anchors`` to restrict
    the anchors as the paper does (without ``anchors`` every sample of the batch is an anchor).

    Labels: continuous vectors ``(B, L)`` or ``(B,)`` floats (label distance = squared euclidean),
    or a precomputed ``(B, R)`` label-distance matrix via ``label_distances=`` (then ``labels`` may be
    None). Mined ``indices``: triplets ``(a, i, j)`` are used as given; pairs ``(a1, p, a2, n)`` give
    the triplets $(a, p, n)$ of each anchor's first and second sets.

    Args:
        eps: $\epsilon$ added to distances inside the logs.

    Shape:
        embeddings ``(B, D)``; labels ``(B, L)`` or ``(B,)`` float, or ``label_distances`` ``(B, R)``;
        optional ``ref_embeddings`` ``(R, D)`` with ``ref_labels`` ``(R, L)``; output scalar.

    Requirements:
        ≥ 3 samples (an anchor and two others); distinct label vectors within a batch (equal label
        vectors have label distance 0, whose log is $\log\epsilon$).

    Example:
        >>> import torch
        >>> loss_fn = LogRatioLoss()
        >>> embeddings = torch.randn(6, 4, requires_grad=True)
        >>> poses = torch.rand(6, 3)
        >>> loss = loss_fn(embeddings, poses)
        >>> loss.backward()
        >>> bool(loss.item() >= 0)
        True
    """

    tuple_kind: ClassVar[str | None] = "triplets"
    label_kind: ClassVar[str] = "continuous"

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        if eps <= 0:
            raise ConfigError(f"eps must be > 0; got {eps}")
        self.eps = float(eps)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        label_distances: Tensor | None = None,
        anchors: Tensor | None = None,
    ) -> Tensor:
        if label_distances is None:
            if labels is None:
                raise DataError("LogRatioLoss needs labels (continuous vectors) or label_distances=")
            check_inputs(embeddings, labels, ref_embeddings, ref_labels, continuous_labels=True)
            if ref_labels is not None and _as_label_matrix(ref_labels, torch.float64).shape[1] != (
                _as_label_matrix(labels, torch.float64).shape[1]
            ):
                raise DataError("labels and ref_labels must have the same label dimension")
        else:
            dummy = embeddings.new_zeros(embeddings.shape[0] if embeddings.dim() else 0)
            ref_dummy = None if ref_embeddings is None else ref_embeddings.new_zeros(ref_embeddings.shape[0])
            check_inputs(embeddings, dummy, ref_embeddings, ref_dummy, continuous_labels=True)
            ref_size = embeddings.shape[0] if ref_embeddings is None else ref_embeddings.shape[0]
            if tuple(label_distances.shape) != (embeddings.shape[0], ref_size):
                raise DataError(
                    f"label_distances must be ({embeddings.shape[0]}, {ref_size}); "
                    f"got {tuple(label_distances.shape)}"
                )
            if not bool(torch.isfinite(label_distances).all()):
                raise NonFiniteError("label_distances contain NaN or infinite values")
            if bool((label_distances < 0).any()):
                raise DataError("label_distances must be non-negative")
        if labels is not None and label_distances is None and not bool(torch.isfinite(labels.float()).all()):
            raise NonFiniteError("labels contain NaN or infinite values")
        return log_ratio_loss(
            embeddings,
            labels,
            indices,
            ref_embeddings,
            ref_labels,
            label_distances=label_distances,
            anchors=anchors,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def dense_triplet_batch(
    label_vectors: Tensor | np.ndarray,
    anchor_count: int,
    k: int,
    batch_size: int,
    seed: int,
) -> DenseTripletBatch:
    """Mini-batch indices for the log-ratio loss by the paper's dense triplet mining.

    The batch is ``anchor_count`` groups of ``batch_size // anchor_count`` samples: a random anchor,
    its ``k`` nearest neighbours in label space (squared euclidean distance between label vectors,
    ties broken by index) and random other samples drawn uniformly without replacement. This is the
    paper's mini-batch (one anchor per batch in the authors' code: ``anchor_count=1``, e.g.
    ``k=5``, ``batch_size=150``). Samples already in the batch are skipped so no sample appears twice
    (the neighbours are then the ``k`` nearest among the samples not yet used).

    Args:
        label_vectors: ``(N, L)`` or ``(N,)`` continuous labels of the whole dataset.
        anchor_count: number of anchors (groups) in the batch.
        k: nearest neighbours per anchor.
        batch_size: total batch size, a multiple of ``anchor_count``.
        seed: seed of the random generator (same seed, same batch).

    Returns:
        :class:`DenseTripletBatch` with the dataset ``indices`` and the batch positions of the
        ``anchors`` (pass them to :class:`LogRatioLoss` as ``anchors=`` to use the paper's triplets).

    Raises:
        ConfigError: inconsistent sizes.

    Example:
        >>> import torch
        >>> batch = dense_triplet_batch(torch.rand(100, 3), anchor_count=2, k=3, batch_size=10, seed=0)
        >>> batch.indices.shape, batch.anchors.tolist()
        (torch.Size([10]), [0, 5])
    """
    vectors = torch.as_tensor(np.asarray(label_vectors), dtype=torch.float64)
    vectors = vectors.unsqueeze(1) if vectors.dim() == 1 else vectors.reshape(vectors.shape[0], -1)
    num = vectors.shape[0]
    if anchor_count < 1 or k < 0 or batch_size < 1:
        raise ConfigError(f"need anchor_count >= 1, k >= 0, batch_size >= 1; got {anchor_count}, {k}, {batch_size}")
    if batch_size % anchor_count:
        raise ConfigError(f"batch_size ({batch_size}) must be a multiple of anchor_count ({anchor_count})")
    group = batch_size // anchor_count
    if group < k + 1:
        raise ConfigError(f"each group has {group} samples, fewer than the anchor plus k={k} neighbours")
    if batch_size > num:
        raise ConfigError(f"batch_size ({batch_size}) exceeds the number of samples ({num})")
    rng = np.random.default_rng(seed)
    used = torch.zeros(num, dtype=torch.bool)
    chosen: list[Tensor] = []
    for _ in range(anchor_count):
        free = (~used).nonzero().squeeze(1)
        anchor = int(free[int(rng.integers(len(free)))])
        used[anchor] = True
        dist = ((vectors - vectors[anchor]) ** 2).sum(1)
        dist[used] = float("inf")
        order = torch.sort(dist, stable=True).indices
        neighbours = order[:k]
        used[neighbours] = True
        free = (~used).nonzero().squeeze(1)
        others = free[torch.as_tensor(rng.choice(len(free), size=group - 1 - k, replace=False), dtype=torch.long)]
        used[others] = True
        chosen.append(torch.cat([torch.tensor([anchor]), neighbours, others.reshape(-1)]))
    indices = torch.cat(chosen).long()
    anchors = torch.arange(0, batch_size, group, dtype=torch.long)
    return DenseTripletBatch(indices=indices, anchors=anchors)
