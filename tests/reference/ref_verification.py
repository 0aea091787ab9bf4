"""Deliberately naive verification metrics: explicit loops over thresholds, pairs and folds.

Written from the definitions (accept a pair when score >= threshold; FAR = accepted impostors /
impostors; TAR = accepted genuine / genuine), not from deepmetric's vectorised code.
"""
from __future__ import annotations

import math

__all__ = [
    "ref_candidate_thresholds",
    "ref_rates",
    "ref_roc",
    "ref_best_accuracy",
    "ref_calibrate",
    "ref_eer",
    "ref_lfw_protocol",
]


def ref_candidate_thresholds(scores: list[float]) -> list[float]:
    """+inf (reject all) followed by every distinct score, largest first."""
    return [math.inf] + sorted(set(scores), reverse=True)


def ref_rates(scores: list[float], same: list[bool], threshold: float) -> tuple[float, float]:
    """(FAR, TAR) at ``threshold`` by counting pair by pair."""
    accepted_genuine = accepted_impostor = genuine = impostor = 0
    for score, is_same in zip(scores, same):
        if is_same:
            genuine += 1
            if score >= threshold:
                accepted_genuine += 1
        else:
            impostor += 1
            if score >= threshold:
                accepted_impostor += 1
    return accepted_impostor / impostor, accepted_genuine / genuine


def ref_roc(scores: list[float], same: list[bool]) -> tuple[list[float], list[float], list[float]]:
    far, tar = [], []
    thresholds = ref_candidate_thresholds(scores)
    for t in thresholds:
        f, r = ref_rates(scores, same, t)
        far.append(f)
        tar.append(r)
    return far, tar, thresholds


def ref_accuracy(scores: list[float], same: list[bool], threshold: float) -> float:
    correct = 0
    for score, is_same in zip(scores, same):
        if (score >= threshold) == is_same:
            correct += 1
    return correct / len(scores)


def ref_best_accuracy(scores: list[float], same: list[bool]) -> tuple[float, float]:
    """Try every candidate threshold; keep the first (highest) one with the best accuracy."""
    best, best_threshold = -1.0, math.nan
    for t in ref_candidate_thresholds(scores):
        acc = ref_accuracy(scores, same, t)
        if acc > best:
            best, best_threshold = acc, t
    return best, best_threshold


def ref_calibrate(scores: list[float], same: list[bool], target_far: float) -> float:
    """Highest TAR with FAR <= target; ties in TAR -> lower FAR."""
    best_tar, best_far, best_threshold = -1.0, math.inf, math.nan
    for t in ref_candidate_thresholds(scores):
        far, tar = ref_rates(scores, same, t)
        if far > target_far:
            continue
        if tar > best_tar or (tar == best_tar and far < best_far):
            best_tar, best_far, best_threshold = tar, far, t
    return best_threshold


def ref_eer(scores: list[float], same: list[bool]) -> float:
    """Walk the ROC segments; on the segment where FAR - FRR changes sign, solve FAR(w) = FRR(w)."""
    far, tar, _ = ref_roc(scores, same)
    for k in range(1, len(far)):
        f0, f1 = far[k - 1], far[k]
        r0, r1 = 1.0 - tar[k - 1], 1.0 - tar[k]  # FRR
        if f1 - r1 >= 0.0:
            if f1 - r1 == 0.0:
                return f1
            # f0 + w (f1 - f0) = r0 + w (r1 - r0)
            w = (r0 - f0) / ((f1 - f0) - (r1 - r0))
            return f0 + w * (f1 - f0)
    raise AssertionError("FAR - FRR never reached 0")


def ref_lfw_protocol(scores: list[float], same: list[bool], folds: list[int]) -> tuple[list[float], list[float]]:
    """(held-out accuracies, thresholds) per fold, in sorted fold order."""
    accuracies, thresholds = [], []
    for fold in sorted(set(folds)):
        train_s = [s for s, f in zip(scores, folds) if f != fold]
        train_y = [y for y, f in zip(same, folds) if f != fold]
        test_s = [s for s, f in zip(scores, folds) if f == fold]
        test_y = [y for y, f in zip(same, folds) if f == fold]
        _, t = ref_best_accuracy(train_s, train_y)
        accuracies.append(ref_accuracy(test_s, test_y, t))
        thresholds.append(t)
    return accuracies, thresholds
