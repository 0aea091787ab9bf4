"""Evaluation of embeddings: exact k-NN retrieval metrics and clustering metrics.

Main entry point: :func:`evaluate` (Recall@K, P@1, R-Precision, MAP@R, NMI, AMI). :func:`knn` is
the exact blocked k-nearest-neighbour search it uses, public for index/search features.
"""
from __future__ import annotations

from deepmetric.metrics.clustering import expected_mutual_information, kmeans_assign, nmi_ami
from deepmetric.metrics.evaluate import evaluate
from deepmetric.metrics.knn import knn
from deepmetric.metrics.retrieval import retrieval_metrics, retrieval_scores

__all__ = [
    "evaluate",
    "knn",
    "retrieval_metrics",
    "retrieval_scores",
    "kmeans_assign",
    "nmi_ami",
    "expected_mutual_information",
]
