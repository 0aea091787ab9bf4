"""Verification (face / signature style): pair scores, ROC, EER, TAR@FAR, the LFW protocol, pair data.

The evaluation half of a verification workflow: embed both images of each pair, score the pairs
(:func:`pair_scores`, larger = same), then :func:`verification_report` computes AUC, EER, TAR at
fixed FARs, the best accuracy and the LFW 10-fold accuracy. Pairs come from LFW's ``pairs.txt``
(:func:`load_lfw_pairs`), a CSV (:func:`load_pairs_csv`) or labelled data
(:func:`make_pairs_from_labels`).

The deployment half (:mod:`deepmetric.verification.workflow`): :func:`calibrate` a threshold for a
target FAR on validation pairs and save it beside the checkpoint, :func:`verify` a checkpoint on pairs
(report, ROC and score-histogram plots), and :func:`fit_pairs` (siamese training from a same/different
pairs file, :mod:`deepmetric.verification.pairs_training`).
"""
from __future__ import annotations

from deepmetric.verification.data import (
    PairSet,
    lfw_image_path,
    load_lfw_pairs,
    load_pair_images,
    load_pairs_csv,
    make_pairs_from_labels,
)
from deepmetric.verification.metrics import (
    best_threshold_accuracy,
    calibrate_threshold,
    eer,
    min_nonzero_far,
    pair_scores,
    roc_auc,
    roc_curve,
    tar_at_far,
)
from deepmetric.verification.pairs_training import fit_pairs
from deepmetric.verification.plots import plot_roc, plot_score_histograms
from deepmetric.verification.protocol import (
    contiguous_folds,
    far_key,
    lfw_protocol,
    scores_report,
    verification_report,
)
from deepmetric.verification.workflow import (
    LoadedPairs,
    Verifier,
    calibrate,
    checkpoint_sha256,
    demo_pairs,
    embed_pairs,
    load_pairs,
    load_threshold,
    threshold_path,
    verify,
)

__all__ = [
    "LoadedPairs",
    "PairSet",
    "Verifier",
    "calibrate",
    "checkpoint_sha256",
    "demo_pairs",
    "embed_pairs",
    "fit_pairs",
    "load_pairs",
    "load_threshold",
    "threshold_path",
    "verify",
    "best_threshold_accuracy",
    "calibrate_threshold",
    "contiguous_folds",
    "eer",
    "far_key",
    "lfw_image_path",
    "lfw_protocol",
    "load_lfw_pairs",
    "load_pair_images",
    "load_pairs_csv",
    "make_pairs_from_labels",
    "min_nonzero_far",
    "pair_scores",
    "plot_roc",
    "plot_score_histograms",
    "roc_auc",
    "roc_curve",
    "scores_report",
    "tar_at_far",
    "verification_report",
]
