"""Embedding a whole dataset in batches (no augmentation, eval mode, no gradients)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["embed_dataset", "raw_features"]


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: object,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "embed",
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(embeddings float32 N×dim, labels N)`` for every item of ``dataset`` in order."""
    was_training = model.training
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]
    chunks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            x, y = dataset.get_batch(idx)  # type: ignore[attr-defined]
            emb = model(x.to(device, non_blocking=True))
            chunks.append(emb.float().cpu().numpy())
            labels.append(np.asarray(y))
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    if not chunks:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(chunks), np.concatenate(labels)


def raw_features(dataset: object, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The raw inputs (pixels in [0, 1], or the feature vectors) flattened and L2-normalised: the
    'no learning at all' baseline."""
    n = len(dataset)  # type: ignore[arg-type]
    mean = getattr(dataset, "mean", None)
    std = getattr(dataset, "std", None)
    out: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        x, y = dataset.get_batch(torch.arange(start, min(n, start + batch_size)))  # type: ignore[attr-defined]
        if mean is not None and std is not None and getattr(dataset, "kind", "image") == "image":
            m = torch.as_tensor(mean, dtype=x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
            s = torch.as_tensor(std, dtype=x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
            x = x * s + m
        flat = x.reshape(len(x), -1).float()
        flat = torch.nn.functional.normalize(flat, dim=1)
        out.append(flat.numpy())
        labels.append(np.asarray(y))
    return np.concatenate(out), np.concatenate(labels)
