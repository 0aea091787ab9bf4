"""Building an index from a checkpoint and a dataset split (what ``deepmetric index build`` runs).

Every item of the split is embedded in batches (:func:`~deepmetric.train.embed_dataset`, eval mode,
no augmentation) after normalising it with the *checkpoint's* training statistics, and stored under
its position in the split (``id = dataset index``) with its label and metadata
``{"dataset_index", "split"}`` (plus ``"path"``, the source file, for image-folder and CSV datasets).

Thumbnails: for image data the un-normalised images are stored in the index (``thumbnails.npz``),
downscaled to at most :data:`THUMBNAIL_SIZE` pixels a side, so that the search service can render
any item without access to the original files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deepmetric.errors import ConfigError, DataError
from deepmetric.index.core import Index

__all__ = ["build_index", "load_data_split", "make_thumbnails", "THUMBNAIL_SIZE"]

THUMBNAIL_SIZE = 64


def load_data_split(config: Any, data: str | None, split: str) -> Any:
    """The ``split`` of ``data`` (default: the checkpoint's dataset) under the checkpoint's protocol."""
    from deepmetric.data import load_splits

    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test; got {split!r}")
    d = config.data
    splits = load_splits(
        data or d.name, d.protocol, root=d.root or None, val_fraction=d.val_fraction, seed=config.seed,
        train_classes=list(d.train_classes) or None, image_size=d.image_size or None, download=d.download,
    )
    dataset = getattr(splits, split, None)
    if dataset is None or len(dataset) == 0:
        raise ConfigError(f"split {split!r} of {data or d.name!r} is empty for protocol {d.protocol!r}")
    return dataset


def make_thumbnails(dataset: Any, *, size: int = THUMBNAIL_SIZE, batch_size: int = 1024,
                    progress: bool = False) -> np.ndarray:
    """Un-normalised uint8 ``(N, C, h, w)`` images of an image dataset, at most ``size`` pixels a side."""
    raw = dataset.with_normalization(None, None).with_transform(None)
    n = len(raw)
    out: list[np.ndarray] = []
    bar = tqdm(total=n, desc="thumbnails", unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, n, batch_size):
            x, _ = raw.get_batch(torch.arange(start, min(n, start + batch_size)))
            h, w = x.shape[-2:]
            scale = min(1.0, size / max(h, w))
            if scale < 1.0:
                x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                                  antialias=True, align_corners=False)
            out.append((x.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
            bar.update(len(x))
    finally:
        bar.close()
    return np.concatenate(out)


def build_index(
    checkpoint: str | Path,
    data: str | None = None,
    *,
    split: str = "test",
    backend: str = "flat",
    metric: str | None = None,
    backend_params: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    thumbnails: bool = True,
    progress: bool = False,
) -> Index:
    """Embed a dataset split with a checkpoint's model and index it.

    Args:
        checkpoint: a deepmetric checkpoint.
        data: ``fashion_mnist``, ``digits``, ``image_folder:DIR``, ``csv:FILE`` or ``npz:FILE``; None = the
            checkpoint's dataset. Its inputs must have the checkpoint's input shape.
        split: ``test``, ``val`` or ``train`` (as defined by the checkpoint's protocol and seed).
        backend: ``flat``, ``ivf`` or ``hnsw``.
        metric: ``euclidean``, ``cosine`` or ``inner_product``; None = the checkpoint's ``eval.metric``.
        backend_params: back-end arguments (see :class:`~deepmetric.index.Index`).
        device: torch device for embedding.
        batch_size: embedding batch size; None = the checkpoint's ``train.embed_batch_size``.
        thumbnails: store thumbnails of image data (see the module docstring).
        progress: show progress bars.

    Returns:
        The index (not saved), with :attr:`~deepmetric.index.Index.provenance` filled: model fingerprint
        (with weights), absolute checkpoint path, input shape, kind, normalisation, class names, data,
        split.

    Raises:
        CheckpointError: unreadable checkpoint. ConfigError: bad arguments. DataError: missing data or
        inputs whose shape differs from the model's.
    """
    from deepmetric.models import model_fingerprint
    from deepmetric.train import embed_dataset, load_model_from_checkpoint

    model, config, ckpt = load_model_from_checkpoint(checkpoint, device)
    meta = ckpt.get("data", {}) or {}
    info = meta.get("info", {}) or {}
    dataset = load_data_split(config, data, split)
    kind = getattr(dataset, "kind", "image")
    input_shape = tuple(int(s) for s in meta.get("input_shape", dataset.input_shape))
    if tuple(dataset.input_shape) != input_shape or kind != meta.get("kind", kind):
        raise DataError(f"{data or config.data.name!r} has {kind} inputs of shape {tuple(dataset.input_shape)}, "
                        f"the model in {str(checkpoint)!r} takes {meta.get('kind', kind)} inputs of shape "
                        f"{input_shape}")
    mean, std = info.get("mean"), info.get("std")
    if mean is not None or std is not None:
        dataset = dataset.with_normalization(mean, std)
    else:
        mean = dataset.mean.tolist() if getattr(dataset, "mean", None) is not None else None
        std = dataset.std.tolist() if getattr(dataset, "std", None) is not None else None
    embeddings, labels = embed_dataset(model, dataset, batch_size=batch_size or config.train.embed_batch_size,
                                       device=device, progress=progress, desc="embed")
    n = len(dataset)
    paths = getattr(dataset, "paths", None)
    metadata = [
        {"dataset_index": i, "split": split, **({"path": str(paths[i])} if paths is not None else {})}
        for i in range(n)
    ]
    thumbs = make_thumbnails(dataset, progress=progress) if thumbnails and kind == "image" else None
    index = Index(int(embeddings.shape[1]), metric or config.eval.metric, backend, **(backend_params or {}))
    index.add(embeddings, np.arange(n, dtype=np.int64), labels=labels.astype(np.int64), metadata=metadata,
              thumbnails=thumbs)
    index.provenance = {
        "model_fingerprint": model_fingerprint(model, include_weights=True),
        "checkpoint": str(Path(checkpoint).resolve()),
        "model": config.model.name,
        "embedding_dim": int(embeddings.shape[1]),
        "input_shape": list(input_shape),
        "kind": kind,
        "mean": [float(v) for v in mean] if mean is not None else None,
        "std": [float(v) for v in std] if std is not None else None,
        "class_names": list(dataset.class_names) if getattr(dataset, "class_names", None) else None,
        "data": data or config.data.name,
        "protocol": config.data.protocol,
        "split": split,
    }
    return index
