"""ROC and score-histogram plots (matplotlib, Agg canvas; files written atomically).

The figures are drawn on a :class:`matplotlib.figure.Figure` with an Agg canvas, so nothing touches
pyplot's global state or needs a display. Each file is written to a temporary file in the target
folder and then moved into place with :func:`os.replace`, so a reader never sees a half-written plot.
The format follows the file suffix (``.png``, ``.pdf``, ``.svg``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.errors import DataError
from deepmetric.verification.metrics import _check_scores_same, _to_numpy

__all__ = ["plot_roc", "plot_score_histograms"]


def _new_figure(width: float = 5.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save_atomic(figure: Any, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = target.suffix.lower().lstrip(".") or "png"
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            figure.savefig(handle, format=suffix, bbox_inches="tight")
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; a plot is an ordinary readable file
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return target


def plot_roc(far: Any, tar: Any, path: str | os.PathLike[str], label: str | None = None) -> Path:
    """Plot a ROC (TAR against FAR, FAR on a log axis) to ``path``.

    Points with FAR = 0 cannot be shown on a log axis and are left out; the FAR axis starts at the
    smallest positive FAR.

    Args:
        far: false accept rates, e.g. from :func:`~deepmetric.verification.metrics.roc_curve`.
        tar: true accept rates, same length.
        path: output file (``.png``, ``.pdf`` or ``.svg``).
        label: legend entry for the curve.

    Returns:
        The written path.
    """
    x = _to_numpy(far, "far").astype(np.float64)
    y = _to_numpy(tar, "tar").astype(np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise DataError(f"far and tar must be 1-D of equal length; got {x.shape} and {y.shape}")
    keep = x > 0.0
    if not keep.any():
        raise DataError("no ROC point has FAR > 0; nothing to draw on a log FAR axis")
    figure = _new_figure()
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(x[keep], y[keep], label=label, linewidth=1.5)
    axes.set_xscale("log")
    axes.set_xlim(x[keep].min(), 1.0)
    axes.set_ylim(0.0, 1.01)
    axes.set_xlabel("false accept rate (FAR)")
    axes.set_ylabel("true accept rate (TAR)")
    axes.grid(True, which="both", alpha=0.3)
    if label is not None:
        axes.legend(loc="lower right")
    return _save_atomic(figure, path)


def plot_score_histograms(
    scores: Any,
    same: Any,
    path: str | os.PathLike[str],
    threshold: float | None = None,
    bins: int = 50,
) -> Path:
    """Histograms of genuine and impostor scores (density-normalised, shared bins) to ``path``.

    Args:
        scores: one score per pair, larger = more likely the same identity.
        same: ``True`` for a genuine pair.
        path: output file (``.png``, ``.pdf`` or ``.svg``).
        threshold: draw a vertical line at this decision threshold.
        bins: number of bins.

    Returns:
        The written path.
    """
    s, y = _check_scores_same(scores, same)
    edges = np.histogram_bin_edges(s, bins=bins)
    figure = _new_figure()
    axes = figure.add_subplot(1, 1, 1)
    axes.hist(s[y], bins=edges, density=True, alpha=0.6, label=f"genuine ({int(y.sum())})")
    axes.hist(s[~y], bins=edges, density=True, alpha=0.6, label=f"impostor ({int((~y).sum())})")
    if threshold is not None and np.isfinite(threshold):
        axes.axvline(float(threshold), color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    axes.set_xlabel("score (larger = more likely the same)")
    axes.set_ylabel("density")
    axes.legend(loc="best")
    return _save_atomic(figure, path)
