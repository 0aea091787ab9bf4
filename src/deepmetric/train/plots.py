"""PNG plots of a run: training curves and a 2-D projection of held-out embeddings."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deepmetric.io import atomic_path

__all__ = ["plot_curves", "plot_projection", "project_2d"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, select: str = "map@r") -> None:
    """Training loss and validation Recall@1 / ``select`` per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (epoch mean)")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)
    for key in dict.fromkeys(["recall@1", select]):
        vals = [h.get("val", {}).get(key, np.nan) for h in history]
        ax_val.plot(epochs, vals, marker="o", label=key)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation metric")
    ax_val.set_title("Held-out validation")
    ax_val.grid(alpha=0.3)
    ax_val.legend()
    for ax in (ax_loss, ax_val):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def project_2d(embeddings: np.ndarray, seed: int = 0, method: str = "tsne") -> np.ndarray:
    """2-D coordinates by t-SNE (PCA to 50 dims first) or PCA."""
    from sklearn.decomposition import PCA

    x = np.asarray(embeddings, dtype=np.float32)
    if method == "pca" or len(x) < 10:
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    if x.shape[1] > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30, max(5, (len(x) - 1) // 4)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)


def plot_projection(
    embeddings: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    *,
    title: str = "Held-out embeddings",
    class_names: Sequence[str] | None = None,
    max_points: int = 2000,
    seed: int = 0,
    method: str = "tsne",
) -> None:
    """Scatter of a class-stratified subsample of ``embeddings`` projected to 2-D, coloured by class."""
    plt = _pyplot()
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(labels))
    if len(idx) > max_points:
        idx = np.sort(rng.choice(idx, size=max_points, replace=False))
    xy = project_2d(np.asarray(embeddings)[idx], seed=seed, method=method)
    lab = labels[idx]
    classes = np.unique(lab)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for i, c in enumerate(classes):
        m = lab == c
        name = class_names[int(c)] if class_names is not None and int(c) < len(class_names) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=name)
    ax.set_title(f"{title} ({method.upper()}, {len(idx)} points)")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="best", frameon=True)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
