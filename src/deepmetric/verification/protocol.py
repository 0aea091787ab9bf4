"""The LFW 10-fold verification protocol and a one-call verification report.

LFW "View 2" (Huang et al., "Labeled Faces in the Wild: A Database for Studying Face Recognition in
Unconstrained Environments", UMass TR 07-49, 2007): 6,000 pairs in 10 folds of 600 (300 genuine, 300
impostor). For each fold the decision threshold is chosen on the other nine folds (the one maximising
their accuracy) and applied to the held-out fold; the mean and standard deviation of the ten held-out
accuracies are reported.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from deepmetric.errors import ConfigError, DataError
from deepmetric.verification.metrics import (
    _check_scores_same,
    _to_numpy,
    best_threshold_accuracy,
    eer,
    min_nonzero_far,
    pair_scores,
    roc_auc,
    tar_at_far,
)

__all__ = ["contiguous_folds", "lfw_protocol", "verification_report", "scores_report", "far_key"]


def contiguous_folds(num_pairs: int, num_folds: int = 10) -> np.ndarray:
    """Fold id of each pair when ``num_pairs`` pairs are cut into ``num_folds`` contiguous folds.

    Folds are equal when ``num_folds`` divides ``num_pairs`` (the layout of LFW's pairs.txt: pairs
    ``0..599`` are fold 0, ...); otherwise their sizes differ by at most one.

    Example:
        >>> contiguous_folds(6, 3).tolist()
        [0, 0, 1, 1, 2, 2]
    """
    if num_folds < 1:
        raise ConfigError(f"num_folds must be >= 1; got {num_folds}")
    if num_pairs < num_folds:
        raise DataError(f"cannot cut {num_pairs} pairs into {num_folds} folds")
    return (np.arange(num_pairs, dtype=np.int64) * num_folds) // num_pairs


def lfw_protocol(scores: Any, same: Any, folds: Any = None) -> dict[str, Any]:
    """Cross-validated verification accuracy (the standard LFW 10-fold "View 2" protocol).

    For each fold ``k`` the threshold is :func:`~deepmetric.verification.metrics.best_threshold_accuracy`
    on all pairs **not** in fold ``k``; fold ``k``'s accuracy is that of ``score >= threshold`` on its
    own pairs:
    $$ \\mathrm{acc}_k = \\frac{1}{|F_k|} \\sum_{p \\in F_k} [\\,(s_p \\ge t_k) = \\mathrm{same}_p\\,], \\quad
       t_k = \\arg\\max_t \\mathrm{acc}(t;\\ \\text{pairs} \\notin F_k). $$
    The threshold is a score of the training folds (ties in training accuracy go to the highest
    one, see ``best_threshold_accuracy``), so in the example below fold 1's genuine score 0.7 falls
    just under the threshold 0.8 learnt on fold 0. The standard deviation is the population one
    (``ddof=0``), as in the usual LFW evaluation scripts.

    Args:
        scores: one score per pair, larger = more likely the same identity.
        same: ``True`` for a genuine pair.
        folds: integer fold id of each pair; ``None`` = 10 contiguous equal folds, the order of
            LFW's pairs.txt (see :func:`contiguous_folds`).

    Returns:
        ``{"mean_accuracy", "std_accuracy", "fold_accuracies", "thresholds"}``; the last two are
        numpy arrays ordered by sorted fold id.

    Requirements:
        At least two folds; genuine and impostor pairs present.

    Example:
        >>> r = lfw_protocol([0.9, 0.8, 0.2, 0.1, 0.7, 0.3], [1, 1, 0, 0, 1, 0], folds=[0, 0, 0, 1, 1, 1])
        >>> r["fold_accuracies"].tolist(), r["thresholds"].tolist()
        ([1.0, 0.6666666666666666], [0.7, 0.8])
    """
    s, y = _check_scores_same(scores, same)
    if folds is None:
        fold_ids = contiguous_folds(s.shape[0], 10)
    else:
        fold_ids = _to_numpy(folds, "folds")
        if fold_ids.shape != s.shape:
            raise DataError(f"folds must have one entry per pair ({s.shape[0]}); got shape {fold_ids.shape}")
        if not np.issubdtype(fold_ids.dtype, np.integer):
            raise DataError(f"folds must be integers; got dtype {fold_ids.dtype}")
    unique = np.unique(fold_ids)
    if unique.shape[0] < 2:
        raise DataError("the protocol needs at least two folds; all pairs are in one fold")
    accuracies = np.empty(unique.shape[0])
    thresholds = np.empty(unique.shape[0])
    for n, fold in enumerate(unique):
        test = fold_ids == fold
        _, threshold = best_threshold_accuracy(s[~test], y[~test])
        accuracies[n] = np.mean((s[test] >= threshold) == y[test])
        thresholds[n] = threshold
    return {
        "mean_accuracy": float(accuracies.mean()),
        "std_accuracy": float(accuracies.std()),
        "fold_accuracies": accuracies,
        "thresholds": thresholds,
    }


def far_key(far: float) -> str:
    """Report key for the TAR at a FAR: ``far_key(1e-3) == "tar@far=0.001"``."""
    return f"tar@far={float(far):g}"


def scores_report(
    scores: Any,
    same: Any,
    folds: Any = None,
    fars: Sequence[float] = (1e-1, 1e-2, 1e-3),
) -> dict[str, Any]:
    """Every verification metric of pair scores in one flat dict (see :func:`verification_report`)."""
    s, y = _check_scores_same(scores, same)
    eer_value, eer_threshold = eer(s, y)
    best_accuracy, best_threshold = best_threshold_accuracy(s, y)
    report: dict[str, Any] = {
        "num_genuine": int(y.sum()),
        "num_impostor": int((~y).sum()),
        "auc": roc_auc(s, y),
        "eer": eer_value,
        "eer_threshold": eer_threshold,
    }
    tars = tar_at_far(s, y, fars)
    for far, tar in tars.items():
        report[far_key(far)] = tar
    report["min_far"] = min_nonzero_far(s, y)
    report["unmeasurable_fars"] = [far for far, tar in tars.items() if math.isnan(tar)]
    report["best_accuracy"] = best_accuracy
    report["best_threshold"] = best_threshold
    num_pairs = s.shape[0]
    if folds is not None or num_pairs >= 10:
        lfw = lfw_protocol(s, y, folds)
        report["lfw_mean_accuracy"] = lfw["mean_accuracy"]
        report["lfw_std_accuracy"] = lfw["std_accuracy"]
    else:
        report["lfw_mean_accuracy"] = math.nan
        report["lfw_std_accuracy"] = math.nan
    return report


def verification_report(
    e1: Any,
    e2: Any,
    same: Any,
    folds: Any = None,
    metric: str = "cosine",
    fars: Sequence[float] = (1e-1, 1e-2, 1e-3),
) -> dict[str, Any]:
    """All verification metrics for embedded pairs ``(e1[k], e2[k])``.

    Scores are :func:`~deepmetric.verification.metrics.pair_scores` under ``metric`` (cosine
    similarity or negative euclidean distance: larger = same). Keys:

    * ``num_genuine``, ``num_impostor``;
    * ``auc``; ``eer`` and ``eer_threshold``;
    * ``"tar@far=0.1"``, ``"tar@far=0.01"``, ... (one per entry of ``fars``, see :func:`far_key`);
      NaN where the FAR is below ``min_far``, the smallest FAR the impostor pairs can measure; those
      FARs are listed in ``unmeasurable_fars`` (empty when every TAR@FAR is measured);
    * ``best_accuracy``, ``best_threshold`` (threshold chosen on all pairs: optimistic);
    * ``lfw_mean_accuracy``, ``lfw_std_accuracy`` (:func:`lfw_protocol` over ``folds``; default 10
      contiguous folds; NaN when there are fewer than 10 pairs and no ``folds``).

    Args:
        e1: first embeddings, ``(N, D)`` numpy array or tensor.
        e2: second embeddings, ``(N, D)``.
        same: ``True`` for a genuine pair, ``(N,)``.
        folds: integer fold id per pair, or ``None``.
        metric: ``"cosine"`` or ``"euclidean"``.
        fars: target FARs for the TAR@FAR entries.

    Example:
        >>> import numpy as np
        >>> e = np.eye(4)
        >>> r = verification_report(e, e[[0, 1, 3, 2]], [True, True, False, False], folds=[0, 1, 0, 1])
        >>> r["auc"], r["eer"], r["lfw_mean_accuracy"], r["unmeasurable_fars"]
        (1.0, 0.0, 1.0, [0.1, 0.01, 0.001])
    """
    scores = pair_scores(e1, e2, metric)
    return scores_report(scores, same, folds, fars)
