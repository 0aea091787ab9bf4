"""Margin loss with a learnable boundary β (Wu et al., "Sampling Matters", ICCV 2017)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.distances import euclidean
from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import LOSSES
from deepmetric.losses._pairs import paired_distance
from deepmetric.losses._pairs import self_free_pair_masks as _pair_masks
from deepmetric.losses.triplet_margin import PairCells, pair_cells
from deepmetric.miners._blocks import LabelGroups, Scratch, block_loss, block_rows, supported
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["MarginLoss", "margin_loss"]


class _MarginTerms:
    """Block kernel of ``Σ pos·[α + D − β_a]₊ + Σ neg·[α − D + β_a]₊``, the active count, ``∂/∂D`` and ``∂/∂β_a``.

    ``pos_fill`` / ``neg_fill`` write a block's 0/1 pair masks (built per block, never ``(B, R)``);
    ``pairs`` (if given) receives each row's number of pairs (for the ν term).
    """

    def __init__(self, pos_fill, neg_fill, beta_rows: Tensor, margin: float, pairs: Tensor | None) -> None:
        self.pos_fill, self.neg_fill, self.beta, self.margin, self.pairs = pos_fill, neg_fill, beta_rows, margin, pairs
        self.scratch = Scratch("_MarginTerms")

    def __call__(self, d: Tensor, start: int, end: int, want_grad: bool):
        sc = self.scratch
        shape = d.shape
        pos = self.pos_fill(sc.get("pos", shape, d.dtype, d.device), start, end)
        neg = self.neg_fill(sc.get("neg", shape, d.dtype, d.device), start, end)
        if self.pairs is not None:
            self.pairs[start:end] = torch.count_nonzero(torch.add(pos, neg, out=sc.get("sum", shape, d.dtype, d.device)), dim=1)
        beta = self.beta[start:end, None]
        # (α + D) − β and (α − D) + β, as in the reference formula
        pos_loss = torch.add(d, self.margin, out=sc.get("pl", shape, d.dtype, d.device)).sub_(beta).clamp_min_(0.0).mul_(pos)
        neg_loss = torch.neg(d, out=sc.get("nl", shape, d.dtype, d.device)).add_(self.margin).add_(beta).clamp_min_(0.0).mul_(neg)
        value = pos_loss.sum(1).double().sum() + neg_loss.sum(1).double().sum()
        count = torch.count_nonzero(torch.add(pos_loss, neg_loss, out=pos))  # both terms are >= 0
        if not want_grad:
            return value, count, None, None
        grad = pos_loss.sign_().sub_(neg_loss.sign_())  # +1 active positive, -1 active negative
        return value, count, grad, grad.sum(1).neg_()


def _label_fills(labels: Tensor, ref_labels: Tensor, same_set: bool, dtype: torch.dtype):
    groups = LabelGroups(labels, ref_labels, same_set)
    pvalid = groups.pvalid.to(dtype)
    same_valid = groups.same_valid.to(dtype)

    def pos_fill(out: Tensor, start: int, end: int) -> Tensor:
        return out.zero_().scatter_add_(1, groups.pidx[start:end], pvalid[start:end])

    def neg_fill(out: Tensor, start: int, end: int) -> Tensor:
        return out.fill_(1.0).scatter_add_(1, groups.same_idx[start:end], same_valid[start:end].neg())

    return pos_fill, neg_fill, bool(groups.pvalid.any())


def _cell_fill(cells: PairCells, same_set: bool):
    def fill(out: Tensor, start: int, end: int) -> Tensor:
        cells.fill(out.zero_(), start, 1.0)
        if same_set:  # never a self-pair
            i = torch.arange(start, min(end, out.shape[1]), device=out.device)
            out[i - start, i] = 0.0
        return out

    return fill


# With fewer than (B·R) / this many distinct pairs the distances are computed per pair (O(pairs·D)).
_PER_PAIR_RATIO = 32


def _distinct_cells(cells: PairCells, ref_size: int, same_set: bool) -> Tensor:
    """Sorted distinct keys ``row·R + col`` of the pairs (self-pairs dropped for the batch itself)."""
    keys = torch.add(cells.cols, cells.rows, alpha=ref_size)
    if same_set:
        keys = keys[cells.rows != cells.cols]
    return torch.unique(keys)


def _margin_loss_pairs(
    queries: Tensor, ref: Tensor, beta_rows: Tensor, pos_keys: Tensor, neg_keys: Tensor, margin: float, nu: float
) -> Tensor:
    """The margin loss over few given pairs: distances of exactly those pairs, autograd for the rest."""
    ref_size = ref.shape[0]

    def terms(keys: Tensor, sign: float) -> tuple[Tensor, Tensor]:
        rows = torch.div(keys, ref_size, rounding_mode="floor")
        d = paired_distance(queries[rows], ref[keys - rows * ref_size], "euclidean")
        beta = beta_rows[rows]
        # (α + D) − β for positives, (α − D) + β for negatives, as in the reference formula
        return (F.relu(margin + d - beta) if sign > 0 else F.relu(margin - d + beta)), rows

    pos_loss, pos_rows = terms(pos_keys, 1.0)
    neg_loss, neg_rows = terms(neg_keys, -1.0)
    active = (pos_loss > 0).sum() + (neg_loss > 0).sum()
    both = torch.isin(pos_keys, neg_keys)
    if bool(both.any()):  # a pair given as positive and as negative is one active pair, not two
        shared_pos = pos_loss[both] > 0
        shared_neg = neg_loss[torch.isin(neg_keys, pos_keys)] > 0
        active = active - (shared_pos & shared_neg).sum()
    total = pos_loss.sum() + neg_loss.sum()
    if nu != 0.0:
        union = torch.unique(torch.cat([pos_keys, neg_keys]))
        per_row = torch.bincount(torch.div(union, ref_size, rounding_mode="floor"), minlength=queries.shape[0])
        total = total + nu * (beta_rows * per_row.to(beta_rows.dtype)).sum()
    return total / active.clamp_min(1).to(queries.dtype)


def _beta_rows(beta: Tensor, labels: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    if beta.numel() == 1:
        return beta.reshape(1).to(dtype).expand(batch).contiguous()
    return beta.to(dtype)[labels]


def _margin_loss_blocked(
    embeddings: Tensor, queries: Tensor, ref: Tensor, same_set: bool, labels: Tensor, ref_labels: Tensor | None,
    beta: Tensor, indices: Indices | None, margin: float, nu: float,
) -> Tensor | None:
    batch, ref_size = queries.shape[0], ref.shape[0]
    device, dtype = queries.device, queries.dtype
    step = block_rows(batch, ref_size, device)
    if indices is None:
        pos_fill, neg_fill, any_pos = _label_fills(labels.to(device), labels.to(device) if same_set else ref_labels.to(device), same_set, dtype)
    else:
        if isinstance(indices, (tuple, list)) and len(indices) in (3, 4) and all(isinstance(t, Tensor) for t in indices):
            # well-formed index tensors only: anything else keeps the mask path (and its errors)
            if any(t.is_floating_point() for t in indices) or len({t.numel() for t in indices[:2]}) > 1:
                return None
            if indices[-2].numel() != indices[-1].numel() or (len(indices) == 3 and indices[0].numel() != indices[2].numel()):
                return None
        pos_cells, neg_cells = pair_cells(indices, batch, ref_size, step, device)
        if (pos_cells.rows.numel() + neg_cells.rows.numel()) * _PER_PAIR_RATIO <= batch * ref_size:
            pos_keys = _distinct_cells(pos_cells, ref_size, same_set)
            if pos_keys.numel() == 0:
                return zero_loss(embeddings, ref, beta)
            return _margin_loss_pairs(
                queries, ref, _beta_rows(beta, labels, batch, dtype), pos_keys,
                _distinct_cells(neg_cells, ref_size, same_set), margin, nu,
            )
        any_pos = bool((pos_cells.rows != pos_cells.cols).any()) if same_set else pos_cells.rows.numel() > 0
        pos_fill, neg_fill = _cell_fill(pos_cells, same_set), _cell_fill(neg_cells, same_set)
    if not any_pos:
        return zero_loss(embeddings, ref, beta)
    beta_rows = _beta_rows(beta, labels, batch, dtype)
    pairs = torch.zeros(batch, dtype=torch.long, device=device) if nu != 0.0 else None
    kernel = _MarginTerms(pos_fill, neg_fill, beta_rows.detach(), margin, pairs)
    total, active = block_loss(kernel, queries, None if same_set else ref, "euclidean", aux=beta_rows, step=step)
    if pairs is not None:
        total = total + nu * (beta_rows * pairs.to(dtype)).sum()
    return total / active.clamp_min(1).to(dtype)


def margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    beta: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 0.2,
    nu: float = 0.0,
) -> Tensor:
    """Margin loss value; see :class:`MarginLoss`. Inputs are assumed validated.

    Args:
        beta: ``(1,)`` shared boundary or ``(C,)`` class-specific boundaries (indexed by the
            anchor's label).
    """
    same_set = ref_embeddings is None
    queries = F.normalize(embeddings, dim=1)
    ref = queries if same_set else F.normalize(ref_embeddings, dim=1)  # type: ignore[arg-type]
    if supported(queries, None if same_set else ref, "euclidean"):
        out = _margin_loss_blocked(embeddings, queries, ref, same_set, labels, ref_labels, beta, indices, margin, nu)
        if out is not None:
            return out
    dist = euclidean(queries, ref)
    pos, neg = _pair_masks(labels, None if same_set else ref_labels, indices, dist.shape[0], dist.shape[1])
    if not bool(pos.any()):
        return zero_loss(embeddings, ref, beta)
    if beta.numel() == 1:
        beta_rows = beta.reshape(1).to(dist.dtype).expand(dist.shape[0])
    else:
        beta_rows = beta.to(dist.dtype)[labels]
    beta_col = beta_rows.unsqueeze(1)
    zero = dist.new_zeros(())
    pos_loss = torch.where(pos, F.relu(margin + dist - beta_col), zero)
    neg_loss = torch.where(neg, F.relu(margin - dist + beta_col), zero)
    active = ((pos_loss > 0) | (neg_loss > 0)).sum()
    pairs_per_row = (pos | neg).sum(1).to(dist.dtype)
    regulariser = nu * (beta_rows * pairs_per_row).sum()
    return (pos_loss.sum() + neg_loss.sum() + regulariser) / active.clamp_min(1).to(dist.dtype)


@LOSSES.register("margin")
class MarginLoss(nn.Module):
    r"""Margin loss: positives inside a learnable boundary $\beta - \alpha$, negatives beyond $\beta + \alpha$.

    With $D_{ij}$ the euclidean distance between L2-normalised embeddings and $y_{ij} = +1$ for a
    positive pair, $-1$ for a negative pair,

    $$ \ell(i,j) = \big[\alpha + y_{ij}(D_{ij} - \beta_{c(i)})\big]_+ ,\qquad
       L = \frac{\sum_{(i,j)} \ell(i,j) + \nu \sum_{(i,j)} \beta_{c(i)}}
                {\#\{(i,j) : \ell(i,j) > 0\}} . $$

    Reference: C.-Y. Wu, R. Manmatha, A. J. Smola, P. Krähenbühl, "Sampling Matters in Deep
    Embedding Learning", ICCV 2017 (loss Eq. 4, objective with the $\nu$ term Eq. 6; normalising by
    the number of pairs with non-zero loss follows the authors' released code). Pair it with
    ``DistanceWeightedMiner`` (the paper's sampler); its triplets are reduced to their unique
    positive and negative pairs, so each pair counts once.

    Choices: $\beta = \beta^{(0)}$ (one shared value) by default, or class-specific
    $\beta^{(class)}_c$ with ``num_classes=C`` (the image-specific $\beta^{(img)}$ is not provided);
    $\beta$ is an ``nn.Parameter`` (``learn_beta=True``, the paper learns it; give it its own
    learning rate as the paper does). The $\nu$ penalty is taken per pair as written in Eq. 6 (the
    authors' code adds $\nu\beta$ once per triplet, i.e. $\nu/2$ per pair). Without ``indices`` all
    ordered pairs of the batch are used. No active pair gives the regulariser alone (divided by 1).

    Distances are computed in blocks of a few anchor rows with the gradient formed block by block
    (no ``(B, R)`` matrix is held); with few mined pairs, per pair.

    PML mapping: ``pml.MarginLoss(margin=α, nu=0, beta=β, learn_beta=True, num_classes=...)`` with
    triplets whose (a, p) and (a, n) pairs are all distinct gives the same value and gradients (PML
    turns "all pairs" into all triplets, which repeats pairs, so only that case is comparable).

    Args:
        margin: $\alpha$, half-width of the separation band.
        beta: initial $\beta$ (boundary between positive and negative distances).
        nu: $\nu$, weight of the $\beta$ regulariser.
        num_classes: if given, one $\beta$ per class (labels must be in ``[0, num_classes)``).
        learn_beta: keep $\beta$ trainable (``nn.Parameter``) or fixed (buffer).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``, optional ref ``(R, D)`` / ``(R,)``; output scalar.

    Requirements:
        ≥ 2 samples per class in a batch; a batch without any positive pair gives 0.

    Example:
        >>> import torch
        >>> loss_fn = MarginLoss()
        >>> embeddings = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(embeddings, labels)
        >>> loss.backward()
        >>> loss_fn.beta.grad is not None
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(
        self,
        margin: float = 0.2,
        beta: float = 1.2,
        nu: float = 0.0,
        num_classes: int | None = None,
        learn_beta: bool = True,
    ) -> None:
        super().__init__()
        if margin < 0:
            raise ConfigError(f"margin must be >= 0; got {margin}")
        if num_classes is not None and int(num_classes) < 1:
            raise ConfigError(f"num_classes must be a positive integer; got {num_classes}")
        self.margin = float(margin)
        self.nu = float(nu)
        self.num_classes = None if num_classes is None else int(num_classes)
        init = torch.full((self.num_classes or 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_inputs(embeddings, labels, ref_embeddings, ref_labels)
        if self.num_classes is not None and labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) >= self.num_classes
        ):
            raise DataError(
                f"MarginLoss(num_classes={self.num_classes}) needs labels in [0, {self.num_classes}); "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        return margin_loss(
            embeddings,
            labels,
            self.beta,
            indices,
            ref_embeddings,
            ref_labels,
            margin=self.margin,
            nu=self.nu,
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, nu={self.nu}, num_classes={self.num_classes}"
