"""Facility-location clustering loss (Oh Song et al., CVPR 2017)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.distances import euclidean
from deepmetric.errors import ConfigError
from deepmetric.losses.softmax import check_class_inputs
from deepmetric.registry import LOSSES
from deepmetric.tuples import zero_loss

__all__ = [
    "FacilityLocationLoss",
    "facility_location_loss",
    "loss_augmented_medoids",
    "normalized_mutual_info",
]


def _sum_xlogx(counts: Tensor) -> Tensor:
    counts = counts.to(torch.float64)
    return counts * torch.log(counts.clamp_min(1.0))


def _nmi_batched(true: Tensor, preds: Tensor, num_true: int, num_pred: int) -> Tensor:
    """Exact NMI (geometric normalisation) between ``true`` ``(B,)`` and each row of ``preds`` ``(M, B)``.

    Labels are indices in ``[0, num_true)`` / ``[0, num_pred)``. Convention: 1 when both labelings
    have a single cluster, 0 when exactly one of them does (its entropy is 0). Uses
    ``N I = sum n_kc log n_kc - sum a_k log a_k - sum b_c log b_c + N log N`` over the non-empty
    contingency cells only (at most ``M * B``, found by one sort), so the cost does not grow with
    ``num_true * num_pred``.
    """
    m, b = preds.shape
    row = torch.arange(m, device=preds.device).unsqueeze(1)
    cells = ((row * num_true + true.unsqueeze(0)) * num_pred + preds).reshape(-1)
    keys, counts = torch.unique(cells, return_counts=True)
    joint = torch.zeros(m, dtype=torch.float64, device=preds.device)
    joint = joint.index_add(0, keys // (num_true * num_pred), _sum_xlogx(counts))
    pred_counts = torch.bincount((row * num_pred + preds).reshape(-1), minlength=m * num_pred)
    pred_term = _sum_xlogx(pred_counts.view(m, num_pred)).sum(1)
    true_term = _sum_xlogx(torch.bincount(true, minlength=num_true)).sum()
    log_n = torch.log(torch.tensor(float(b), dtype=torch.float64, device=preds.device))
    mi = (joint - true_term - pred_term) / b + log_n
    h_true = log_n - true_term / b
    h_pred = log_n - pred_term / b
    tol = 1e-12
    denom = torch.sqrt((h_true * h_pred).clamp_min(0.0))
    degenerate = torch.where((h_true <= tol) & (h_pred <= tol), 1.0, 0.0).to(torch.float64)
    nmi = torch.where((h_true > tol) & (h_pred > tol), mi / denom.clamp_min(1e-300), degenerate)
    return nmi.clamp(0.0, 1.0)


def normalized_mutual_info(labels_true: Tensor, labels_pred: Tensor) -> float:
    """Exact NMI $= I(U;V)/\\sqrt{H(U)H(V)}$ between two labelings (arbitrary integer values)."""
    _, t = torch.unique(labels_true, return_inverse=True)
    _, p = torch.unique(labels_pred, return_inverse=True)
    return float(_nmi_batched(t, p.unsqueeze(0), int(t.max()) + 1, int(p.max()) + 1)[0])


def _assign(distances: Tensor, medoids: Tensor) -> Tensor:
    """Cluster index (position in ``medoids``) of the nearest medoid; each medoid in its own cluster."""
    assign = distances.index_select(0, medoids).argmin(dim=0)
    assign[medoids] = torch.arange(medoids.numel(), device=medoids.device)
    return assign


@torch.no_grad()
def loss_augmented_medoids(
    distances: Tensor, labels: Tensor, gamma: float, pam_iterations: int = 5
) -> Tensor:
    """Loss-augmented inference $\\arg\\max_{|S|=K} F(X, S) + \\gamma (1 - \\mathrm{NMI})$, approximately.

    Greedy (the paper's algorithm): starting from $S = \\emptyset$, add the point that maximises
    $F(X, S \\cup \\{j\\}) + \\gamma\\Delta$ until $|S| = K$ (classes in the batch); every step is
    vectorised over all candidates (contingency tables by one ``bincount``). Then
    ``pam_iterations`` rounds of the paper's refinement (as the official code): with the
    assignment fixed at the start of a round, each cluster's medoid in turn is replaced by the
    member $j$ maximising $-\\sum_{i \\in \\text{cluster}} d_{ij} + \\gamma\\Delta$.

    Args:
        distances: ``(B, B)`` pairwise distances, zero diagonal.
        labels: ``(B,)`` class indices in ``[0, K)``, every index present.
        gamma: margin multiplier $\\gamma$.
        pam_iterations: refinement rounds (0: greedy only).

    Returns:
        ``(K,)`` long tensor of medoid indices, position = cluster index.
    """
    b = distances.shape[0]
    k = int(labels.max()) + 1
    device = distances.device
    rows = torch.arange(b, device=device)
    chosen = torch.empty(0, dtype=torch.long, device=device)
    available = torch.ones(b, dtype=torch.bool, device=device)
    min_dist = torch.full((b,), float("inf"), dtype=distances.dtype, device=device)
    assign = torch.zeros(b, dtype=torch.long, device=device)
    for step in range(k):
        cand = available.nonzero().squeeze(1)  # (M,)
        dc = distances.index_select(0, cand)  # (M, B)
        moved = dc < min_dist.unsqueeze(0)
        moved[torch.arange(cand.numel(), device=device), cand] = True
        new_min = torch.where(moved, dc, min_dist.unsqueeze(0))
        new_assign = torch.where(moved, step, assign.unsqueeze(0))
        nmi = _nmi_batched(labels, new_assign, k, step + 1)
        score = -new_min.sum(1).to(torch.float64) + gamma * (1.0 - nmi)
        best = int(score.argmax())
        chosen = torch.cat([chosen, cand[best : best + 1]])
        available[cand[best]] = False
        min_dist, assign = new_min[best], new_assign[best]

    for _ in range(pam_iterations):
        assign = _assign(distances, chosen)
        for c in range(k):
            members = (assign == c).nonzero().squeeze(1)  # (M,), contains chosen[c]
            others = torch.cat([chosen[:c], chosen[c + 1 :]])
            other_pos = torch.cat([rows[:c], rows[c + 1 : k]])
            d_other = distances.index_select(0, others)  # (K-1, B)
            m_other, arg_other = d_other.min(dim=0)
            base = other_pos[arg_other]
            base[others] = other_pos  # other medoids stay in their own clusters
            dc = distances.index_select(0, members)  # (M, B)
            moved = dc < m_other.unsqueeze(0)
            moved[:, others] = False
            moved[torch.arange(members.numel(), device=device), members] = True
            new_assign = torch.where(moved, c, base.unsqueeze(0))
            nmi = _nmi_batched(labels, new_assign, k, k)
            within = dc.index_select(1, members).sum(1).to(torch.float64)
            score = -within + gamma * (1.0 - nmi)
            chosen = chosen.clone()
            chosen[c] = members[int(score.argmax())]
    return chosen


def facility_location_loss(
    embeddings: Tensor, labels: Tensor, gamma: float = 1.0, pam_iterations: int = 5
) -> Tensor:
    """Structured facility-location loss of one batch (see :class:`FacilityLocationLoss`).

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` integer labels (any values).
        gamma: margin multiplier $\\gamma$.
        pam_iterations: refinement rounds after the greedy inference.

    Returns:
        Scalar tensor (zero with a graph when the batch has a single class).
    """
    _, target = torch.unique(labels, return_inverse=True)
    k = int(target.max()) + 1
    if k < 2:
        return zero_loss(embeddings)
    b = embeddings.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=embeddings.device)
    dist = euclidean(embeddings).masked_fill(eye, 0.0)  # (B, B), differentiable
    medoids = loss_augmented_medoids(dist.detach(), target, gamma, pam_iterations)
    score_pred = -dist.index_select(0, medoids).amin(dim=0).sum()
    with torch.no_grad():
        nmi = _nmi_batched(target, _assign(dist.detach(), medoids).unsqueeze(0), k, k)[0]
    one_hot = (target.unsqueeze(0) == torch.arange(k, device=labels.device).unsqueeze(1))  # (K, B)
    travel = one_hot.to(dist.dtype) @ dist  # (K, B): sum over class k of distances to each j
    score_true = -travel.masked_fill(~one_hot, float("inf")).amin(dim=1).sum()
    margin = gamma * (1.0 - nmi.to(dist.dtype))
    return torch.relu(score_pred + margin - score_true)


@LOSSES.register("facility_location")
class FacilityLocationLoss(nn.Module):
    """Facility-location clustering loss: the true per-class medoids must beat any clustering by a NMI margin.

    $$ \\ell(X, y^*) = \\Big[\\max_{S,\\,|S| = K} \\big\\{F(X, S)
    + \\gamma\\,(1 - \\mathrm{NMI}(y(S), y^*))\\big\\}
    - \\tilde F(X, y^*)\\Big]_+, \\qquad F(X, S) = -\\sum_{i} \\min_{j \\in S} \\|f(x_i) - f(x_j)\\|_2 $$

    $\\tilde F(X, y^*) = \\sum_k \\max_{j:\\, y^*_j = k} F(X_{\\{i: y^*_i = k\\}}, \\{j\\})$ is the score
    of the
    per-class medoids, $y(S)$ assigns each point to its nearest medoid in $S$, $K$ is the number
    of classes in the batch, NMI $= I/\\sqrt{H(y)H(y^*)}$ computed exactly. The maximisation over $S$
    is the paper's greedy loss-augmented inference followed by ``pam_iterations`` rounds of its
    pairwise-exchange (PAM-style) refinement, as in the official TensorFlow op; gradients flow
    through $F$ of the chosen medoids and through $\\tilde F$ (the choices themselves are
    constants). Distances are (non-squared) euclidean, as in the official code. The loss is a sum
    over the batch (not averaged), as in the paper.

    Reference: H. Oh Song, S. Jegelka, V. Rathod, K. Murphy, "Deep Metric Learning via Facility
    Location", CVPR 2017.

    Args:
        gamma: margin multiplier $\\gamma$ (the official op has no default; 1.0 here).
        pam_iterations: refinement rounds after the greedy step (official code: 5; 0 disables).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer; output scalar.

    Requirements:
        At least two classes in the batch (else a zero loss with a graph). The paper works on
        L2-normalised embeddings; normalise them in the model. The inference costs about
        ``K`` steps of ``O(B^2)`` work, fine for ``B <= 256``. No learnable parameters.

    Example:
        >>> import torch
        >>> loss_fn = FacilityLocationLoss()
        >>> x = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
        >>> loss = loss_fn(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        >>> loss.dim(), bool(loss >= 0)
        (0, True)
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(self, *, gamma: float = 1.0, pam_iterations: int = 5) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"gamma must be >= 0; got {gamma}")
        if isinstance(pam_iterations, bool) or not isinstance(pam_iterations, int) or pam_iterations < 0:
            raise ConfigError(f"pam_iterations must be an integer >= 0; got {pam_iterations!r}")
        self.gamma = float(gamma)
        self.pam_iterations = pam_iterations

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: object = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_class_inputs(
            embeddings, labels, None, None,
            indices=indices, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
        )
        return facility_location_loss(embeddings, labels, self.gamma, self.pam_iterations)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, pam_iterations={self.pam_iterations}"
