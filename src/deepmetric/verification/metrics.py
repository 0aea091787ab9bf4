"""Verification metrics on pair scores: ROC, AUC, EER, TAR@FAR, best accuracy, threshold calibration.

Conventions used by every function here:

* ``scores``: one score per pair, **larger = more likely the same identity** (cosine similarity, or
  the negative euclidean distance, see :func:`pair_scores`).
* ``same``: one boolean per pair, ``True`` for a genuine pair (same identity), ``False`` for an
  impostor pair. Integer 0/1 arrays are accepted.
* A pair is **accepted** at threshold ``t`` when ``score >= t``. Then
  $$ \\mathrm{TAR}(t) = \\frac{\\#\\{\\text{genuine}: s \\ge t\\}}{\\#\\text{genuine}}, \\qquad
     \\mathrm{FAR}(t) = \\frac{\\#\\{\\text{impostor}: s \\ge t\\}}{\\#\\text{impostor}}, \\qquad
     \\mathrm{FRR} = 1 - \\mathrm{TAR}. $$
* Inputs may be numpy arrays, torch tensors or sequences; outputs are numpy arrays / Python floats.

The ROC has one point per distinct score (ties are one point, so ties are handled exactly as
scikit-learn's ``roc_curve(..., drop_intermediate=False)`` and ``roc_auc_score`` handle them), plus
the starting point ``(0, 0)`` at threshold ``+inf`` (reject everything).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from deepmetric.errors import ConfigError, DataError, NonFiniteError

__all__ = [
    "pair_scores",
    "roc_curve",
    "roc_auc",
    "eer",
    "tar_at_far",
    "min_nonzero_far",
    "best_threshold_accuracy",
    "calibrate_threshold",
]

_METRICS = ("cosine", "euclidean")


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} cannot be converted to an array: {exc}") from exc


def _check_scores_same(
    scores: Any, same: Any, *, require_both: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``scores`` (float64, finite) and ``same`` (bool), both 1-D and of equal length."""
    s = _to_numpy(scores, "scores")
    y = _to_numpy(same, "same")
    if s.ndim != 1 or y.ndim != 1:
        raise DataError(f"scores and same must be 1-D; got shapes {s.shape} and {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise DataError(f"scores has {s.shape[0]} entries but same has {y.shape[0]}")
    if s.shape[0] == 0:
        raise DataError("no pairs: scores and same are empty")
    if not (np.issubdtype(s.dtype, np.number) or s.dtype == bool):
        raise DataError(f"scores must be numeric; got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise NonFiniteError(f"scores must be finite; pair {bad} has score {s[bad]}")
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number) or not np.all((y == 0) | (y == 1)):
            raise DataError("same must be boolean (or 0/1): True for a genuine pair, False for an impostor pair")
        y = y.astype(bool)
    if require_both:
        num_genuine = int(y.sum())
        if num_genuine == 0 or num_genuine == y.shape[0]:
            kind = "impostor" if num_genuine == 0 else "genuine"
            raise DataError(
                f"all {y.shape[0]} pairs are {kind}: the ROC (and EER, AUC, TAR@FAR) needs at least one "
                "genuine and one impostor pair"
            )
    return s, y


def pair_scores(e1: Any, e2: Any, metric: str = "cosine") -> np.ndarray:
    """Score of each pair ``(e1[k], e2[k])``, larger = more likely the same identity.

    ``metric="cosine"`` gives the cosine similarity $\\cos(e_1, e_2) \\in [-1, 1]$;
    ``metric="euclidean"`` gives the **negative** euclidean distance $-\\lVert e_1 - e_2 \\rVert_2$, so
    that larger still means "same". Computed in float64.

    Args:
        e1: embeddings of the first images, numpy array or tensor.
        e2: embeddings of the second images, same shape as ``e1``.
        metric: ``"cosine"`` or ``"euclidean"``.

    Shape:
        e1, e2: ``(N, D)``; returns ``(N,)`` float64 numpy array.

    Example:
        >>> pair_scores([[1.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [1.0, 0.0]]).tolist()
        [1.0, 0.0]
        >>> pair_scores([[0.0, 0.0]], [[3.0, 4.0]], metric="euclidean").tolist()
        [-5.0]
    """
    if metric not in _METRICS:
        raise ConfigError(f"unknown pair metric {metric!r}; valid metrics: {', '.join(_METRICS)}")
    a = _to_numpy(e1, "e1").astype(np.float64)
    b = _to_numpy(e2, "e2").astype(np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise DataError(f"e1 and e2 must be 2-D arrays of the same shape (N, D); got {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise NonFiniteError("embeddings contain NaN or infinity")
    if metric == "euclidean":
        return -np.sqrt(((a - b) ** 2).sum(axis=1))
    na = np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(axis=1) / (na * nb)


def _roc_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (true accepts, false accepts, thresholds), one entry per distinct score, descending.

    The first entry is the reject-all point at threshold ``+inf``.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    # last position of each run of equal scores
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.shape[0] - 1]
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    thresholds = s_sorted[last]
    return (
        np.r_[0, tp].astype(np.int64),
        np.r_[0, fp].astype(np.int64),
        np.r_[np.inf, thresholds],
    )


def roc_curve(scores: Any, same: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of a verification score: ``(far, tar, thresholds)``, one point per distinct score.

    Point ``k`` is obtained by accepting every pair with ``score >= thresholds[k]``. Thresholds are
    decreasing, starting at ``+inf`` (point ``(0, 0)``); FAR and TAR are non-decreasing and end at 1.
    Equal to ``sklearn.metrics.roc_curve(same, scores, drop_intermediate=False)`` (``fpr, tpr,
    thresholds``).

    Args:
        scores: one score per pair, larger = more likely the same identity.
        same: ``True`` for a genuine pair.

    Shape:
        scores, same: ``(N,)``; outputs: ``(U + 1,)`` with ``U`` the number of distinct scores.

    Requirements:
        At least one genuine and one impostor pair (else :class:`DataError`).

    Example:
        >>> far, tar, thr = roc_curve([0.9, 0.8, 0.8, 0.1], [True, True, False, False])
        >>> far.tolist(), tar.tolist(), thr.tolist()
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0], [inf, 0.9, 0.8, 0.1])
    """
    s, y = _check_scores_same(scores, same)
    tp, fp, thresholds = _roc_counts(s, y)
    return fp / fp[-1], tp / tp[-1], thresholds


def roc_auc(scores: Any, same: Any) -> float:
    """Area under the ROC (trapezoidal rule; a tie between a genuine and an impostor counts 1/2).

    $$ \\mathrm{AUC} = P(s_g > s_i) + \\tfrac12 P(s_g = s_i) $$
    for a random genuine score $s_g$ and impostor score $s_i$; equal to
    ``sklearn.metrics.roc_auc_score(same, scores)``.

    Args:
        scores: one score per pair, larger = more likely the same identity.
        same: ``True`` for a genuine pair.

    Example:
        >>> roc_auc([0.9, 0.8, 0.8, 0.1], [True, True, False, False])
        0.875
    """
    far, tar, _ = roc_curve(scores, same)
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def eer(scores: Any, same: Any) -> tuple[float, float]:
    """Equal error rate and its threshold: the point of the ROC where FAR = FRR (= 1 − TAR).

    Along the ROC (thresholds decreasing) $d = \\mathrm{FAR} - \\mathrm{FRR}$ rises from −1 at the
    reject-all point to +1 at the accept-all point. Let ``k`` be the first ROC point with
    $d_k \\ge 0$. If $d_k = 0$ the EER is $\\mathrm{FAR}_k$ at threshold ``thresholds[k]``. Otherwise
    the ROC segment between points ``k-1`` and ``k`` is interpolated linearly,
    $$ w = \\frac{-d_{k-1}}{d_k - d_{k-1}}, \\quad
       \\mathrm{EER} = \\mathrm{FAR}_{k-1} + w\\,(\\mathrm{FAR}_k - \\mathrm{FAR}_{k-1})
                    = \\mathrm{FRR}_{k-1} + w\\,(\\mathrm{FRR}_k - \\mathrm{FRR}_{k-1}), $$
    and the threshold with the same weight, ``thr[k-1] + w (thr[k] - thr[k-1])``; when point ``k-1``
    is the reject-all point (threshold ``+inf``) the threshold is ``thresholds[k]``.

    Args:
        scores: one score per pair, larger = more likely the same identity.
        same: ``True`` for a genuine pair.

    Returns:
        ``(eer, threshold)``.

    Example:
        >>> eer([0.9, 0.7, 0.6, 0.2, 0.8, 0.4, 0.3, 0.1], [1, 1, 1, 1, 0, 0, 0, 0])
        (0.25, 0.6)
    """
    far, tar, thr = roc_curve(scores, same)
    d = far - (1.0 - tar)
    k = int(np.argmax(d >= 0.0))  # exists: d[-1] = 1
    if d[k] == 0.0:
        return float(far[k]), float(thr[k])
    w = -d[k - 1] / (d[k] - d[k - 1])
    rate = far[k - 1] + w * (far[k] - far[k - 1])
    if np.isinf(thr[k - 1]):
        threshold = thr[k]
    else:
        threshold = thr[k - 1] + w * (thr[k] - thr[k - 1])
    return float(rate), float(threshold)


def min_nonzero_far(scores: Any, same: Any) -> float:
    """The smallest non-zero FAR any threshold achieves (``1 / #impostors`` unless the top impostors tie).

    Example:
        >>> min_nonzero_far([0.9, 0.5, 0.5, 0.1], [True, False, False, False])
        0.6666666666666666
    """
    far, _, _ = roc_curve(scores, same)
    return float(far[far > 0.0][0])


def _check_far(far: float, name: str = "far") -> float:
    value = float(far)
    if not (0.0 < value <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1]; got {far!r}")
    return value


def tar_at_far(
    scores: Any, same: Any, fars: Sequence[float] = (1e-1, 1e-2, 1e-3)
) -> dict[float, float]:
    """TAR at given FARs, read off the ROC by linear interpolation.

    For a target FAR $f$: if some ROC points have $\\mathrm{FAR} = f$ exactly, the highest TAR among
    them is returned (the top of a vertical ROC segment). Otherwise, with ``k`` the last point with
    $\\mathrm{FAR}_k < f$,
    $$ \\mathrm{TAR}(f) = \\mathrm{TAR}_k + \\frac{f - \\mathrm{FAR}_k}{\\mathrm{FAR}_{k+1} - \\mathrm{FAR}_k}
       (\\mathrm{TAR}_{k+1} - \\mathrm{TAR}_k). $$
    **NaN** is returned when $f$ is below the smallest non-zero FAR the data can achieve
    (:func:`min_nonzero_far`, normally ``1 / #impostor pairs``): there are too few impostor pairs to
    measure that operating point, and interpolating towards (0, 0) would invent it.

    Args:
        scores: one score per pair, larger = more likely the same identity.
        same: ``True`` for a genuine pair.
        fars: target FARs, each in ``(0, 1]``.

    Returns:
        ``{far: tar}`` with the targets as given (as floats) for keys.

    Example:
        >>> s = [0.9, 0.7, 0.6, 0.2, 0.8, 0.4, 0.3, 0.1]
        >>> tar_at_far(s, [1, 1, 1, 1, 0, 0, 0, 0], fars=(0.5, 0.375, 0.1))
        {0.5: 0.75, 0.375: 0.75, 0.1: nan}
    """
    targets = [_check_far(f, "each target FAR") for f in fars]
    far, tar, _ = roc_curve(scores, same)
    smallest = far[far > 0.0][0]
    out: dict[float, float] = {}
    for f in targets:
        if f < smallest:
            out[f] = math.nan
            continue
        hi = int(np.searchsorted(far, f, side="right"))  # first index with far > f
        k = hi - 1  # last index with far <= f (top of the vertical segment when far == f)
        if far[k] == f or hi == far.shape[0]:
            out[f] = float(tar[k])
        else:
            w = (f - far[k]) / (far[hi] - far[k])
            out[f] = float(tar[k] + w * (tar[hi] - tar[k]))
    return out


def best_threshold_accuracy(scores: Any, same: Any) -> tuple[float, float]:
    """Highest verification accuracy over all thresholds, and the threshold reaching it.

    Every distinct score is tried as a threshold (accept ``score >= t``), and ``+inf`` (reject all);
    accuracy is $(\\mathrm{TA} + \\mathrm{TR}) / N$. Vectorised: one sort, then cumulative counts. Ties
    in accuracy go to the **highest** threshold (the most conservative one). The returned threshold is
    a score value of this data (or ``+inf``).

    Args:
        scores: one score per pair, larger = more likely the same identity.
        same: ``True`` for a genuine pair. A single class is allowed here (the accuracy is defined).

    Returns:
        ``(accuracy, threshold)``.

    Example:
        >>> best_threshold_accuracy([0.9, 0.4, 0.6, 0.1], [True, True, False, False])
        (0.75, 0.9)
    """
    s, y = _check_scores_same(scores, same, require_both=False)
    tp, fp, thresholds = _roc_counts(s, y)
    num_impostor = int(fp[-1])
    correct = tp + (num_impostor - fp)
    k = int(np.argmax(correct))
    return float(correct[k] / s.shape[0]), float(thresholds[k])


def calibrate_threshold(scores: Any, same: Any, target_far: float) -> float:
    """Operating threshold for a target FAR, chosen on a validation set.

    Returns the threshold ``t`` (pairs with ``score >= t`` are accepted) whose FAR on these pairs is
    ``<= target_far`` and whose TAR is the highest; among thresholds with that TAR the one with the
    lowest FAR is taken. The result is one of the scores, or ``+inf`` (reject everything) when even
    the best such threshold accepts no genuine pair (e.g. the highest score is an impostor's and
    ``target_far < min_nonzero_far``). The FAR reached on unseen pairs is only estimated by this.

    Args:
        scores: validation scores, larger = more likely the same identity.
        same: ``True`` for a genuine pair.
        target_far: largest acceptable FAR, in ``[0, 1]``.

    Example:
        >>> s = [0.9, 0.7, 0.6, 0.2, 0.8, 0.4, 0.3, 0.1]
        >>> calibrate_threshold(s, [1, 1, 1, 1, 0, 0, 0, 0], target_far=0.25)
        0.6
    """
    f = float(target_far)
    if not (0.0 <= f <= 1.0):
        raise ConfigError(f"target_far must be in [0, 1]; got {target_far!r}")
    far, tar, thr = roc_curve(scores, same)
    allowed = far <= f  # a prefix of the ROC (far is non-decreasing)
    last = int(np.flatnonzero(allowed)[-1])
    best_tar = tar[last]  # tar is non-decreasing, so the prefix's maximum is at its end
    k = int(np.argmax(tar[: last + 1] == best_tar))  # first point with that TAR = lowest FAR
    return float(thr[k])
