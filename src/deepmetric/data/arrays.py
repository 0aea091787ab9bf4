"""In-memory datasets (:class:`ArrayDataset`), ``.npz`` feature files and the shared batch pipeline.

Every deepmetric dataset follows the :class:`BatchDataset` protocol. A batch is produced in three
steps, identical for all datasets:

1. images are scaled to ``[0, 1]`` (uint8 / 255), vectors converted to float32;
2. if ``augment=True`` and the dataset has a ``transform``, it is applied to the whole batch with the
   given ``torch.Generator`` (the only source of randomness);
3. ``(x - mean) / std`` with the dataset's per-channel (images) or per-feature (vectors) statistics,
   skipped when ``mean``/``std`` are ``None``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from deepmetric.data.augment import Transform
from deepmetric.errors import ConfigError, DataError

__all__ = [
    "BatchDataset",
    "ArrayDataset",
    "IndexLike",
    "StatsLike",
    "load_npz",
    "read_npz_arrays",
    "compute_normalization",
    "encode_labels",
]

IndexLike = Union[Tensor, Sequence[int], np.ndarray]
StatsLike = Union[float, Sequence[float], Tensor, None]


@runtime_checkable
class BatchDataset(Protocol):
    """What the trainer, samplers and evaluation need from a dataset."""

    labels: Tensor
    kind: str
    input_shape: tuple[int, ...]
    transform: Transform | None
    mean: Tensor | None
    std: Tensor | None
    class_names: list[str] | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...

    def get_batch(
        self, indices: IndexLike, generator: torch.Generator | None = None, augment: bool = False
    ) -> tuple[Tensor, Tensor]: ...

    def subset(self, indices: IndexLike) -> Any: ...

    def with_transform(self, transform: Transform | None) -> Any: ...

    def with_labels(self, labels: Tensor) -> Any: ...

    def with_normalization(self, mean: StatsLike, std: StatsLike) -> Any: ...


def as_index(indices: IndexLike, length: int) -> Tensor:
    """``indices`` as a 1-D long tensor, checked against ``length`` (negative indices rejected)."""
    idx = indices if isinstance(indices, Tensor) else torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if idx.dtype == torch.bool:
        if idx.shape != (length,):
            raise DataError(f"a boolean mask must have length {length}; got shape {tuple(idx.shape)}")
        return idx.nonzero().flatten()
    if idx.is_floating_point() or idx.is_complex():
        raise DataError(f"indices must be integers; got dtype {idx.dtype}")
    idx = idx.to(device="cpu", dtype=torch.long).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= length):
        raise DataError(f"indices out of range for a dataset of {length} items: min {int(idx.min())}, "
                        f"max {int(idx.max())}")
    return idx


def as_stats(value: StatsLike, size: int, name: str, what: str) -> Tensor | None:
    """Normalisation statistic as a float32 tensor of length 1 or ``size`` (channels or features)."""
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).flatten().clone()
    if t.numel() not in (1, size):
        raise DataError(f"{name} must have 1 or {size} values (one per {what}); got {t.numel()}")
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"{name} must be finite; got {t.tolist()}")
    if name == "std" and bool((t <= 0).any()):
        raise DataError(f"std must be > 0; got {t.tolist()}")
    return t


def finish_batch(
    x: Tensor,
    *,
    kind: str,
    transform: Transform | None,
    mean: Tensor | None,
    std: Tensor | None,
    generator: torch.Generator | None,
    augment: bool,
) -> Tensor:
    """Scale, augment and normalise a raw batch (steps 1-3 of the module docstring)."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
    if augment and transform is not None:
        x = transform(x, generator)
    if mean is not None or std is not None:
        shape = (1, -1, 1, 1) if kind == "image" else (1, -1)
        if mean is not None:
            x = x - mean.view(shape)
        if std is not None:
            x = x / std.view(shape)
    return x


def encode_labels(values: Sequence[Any] | np.ndarray, source: str) -> tuple[Tensor, list[str] | None]:
    """Integer labels as they are; anything else mapped to ids in sorted order (names returned).

    Returns:
        ``(labels, class_names)``; ``class_names`` is None for integer labels.
    """
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataError(f"{source}: labels must be 1-D; got shape {array.shape}")
    if array.dtype.kind in "iu":
        return torch.as_tensor(array.astype(np.int64)), None
    if array.dtype.kind == "b" or array.dtype.kind in "fc":
        if array.dtype.kind == "f" and array.size and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            return torch.as_tensor(array.astype(np.int64)), None
        raise DataError(f"{source}: labels must be integers or strings; got dtype {array.dtype}")
    names = sorted({str(v) for v in array.tolist()})
    lookup = {n: i for i, n in enumerate(names)}
    return torch.tensor([lookup[str(v)] for v in array.tolist()], dtype=torch.long), names


class ArrayDataset(Dataset):
    """A labelled dataset held in memory: uint8 images ``(N, C, H, W)`` or float vectors ``(N, D)``.

    Images are scaled to ``[0, 1]``, augmented (training batches only) and normalised with
    ``mean``/``std`` (per channel); vectors are normalised per feature. Float images are accepted and
    taken to be already in ``[0, 1]``.

    Args:
        data: ``(N, C, H, W)`` (or ``(N, H, W)``, given one channel) images, or ``(N, D)`` vectors.
        labels: ``(N,)`` integer class labels.
        mean: normalisation mean: a number or one value per channel (images) / feature (vectors);
            None = no centring.
        std: normalisation scale, same forms; None = no scaling.
        transform: batch augmentation ``(batch, generator) -> batch``, used by ``get_batch(...,
            augment=True)`` only.
        kind: ``"image"`` or ``"vector"``.
        class_names: optional name of each label id (``class_names[label]``).

    Example:
        >>> ds = ArrayDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]))
        >>> x, y = ds.get_batch([0, 3])
        >>> tuple(x.shape), y.tolist(), ds.input_shape
        ((2, 1, 8, 8), [0, 1], (1, 8, 8))
    """

    def __init__(
        self,
        data: Tensor,
        labels: Tensor,
        *,
        mean: StatsLike = None,
        std: StatsLike = None,
        transform: Transform | None = None,
        kind: str = "image",
        class_names: Sequence[str] | None = None,
    ) -> None:
        if kind not in ("image", "vector"):
            raise ConfigError(f"kind must be 'image' or 'vector'; got {kind!r}")
        data = data if isinstance(data, Tensor) else torch.as_tensor(np.asarray(data))
        if not isinstance(labels, Tensor):
            labels, names = encode_labels(np.asarray(labels), "ArrayDataset")
            class_names = class_names if class_names is not None else names
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"labels must be a 1-D integer tensor; got shape {tuple(labels.shape)}, "
                            f"dtype {labels.dtype}")
        if kind == "image":
            if data.dim() == 3:
                data = data.unsqueeze(1)
            if data.dim() != 4:
                raise DataError(f"image data must be (N, C, H, W) or (N, H, W); got shape {tuple(data.shape)}")
            if data.dtype != torch.uint8:
                if not data.is_floating_point():
                    raise DataError(f"image data must be uint8 (0..255) or float in [0, 1]; got {data.dtype}")
                data = data.to(torch.float32)
        else:
            if data.dim() != 2:
                raise DataError(f"vector data must be (N, D); got shape {tuple(data.shape)}")
            data = data.to(torch.float32)
        if data.shape[0] != labels.shape[0]:
            raise DataError(f"data has {data.shape[0]} items but labels has {labels.shape[0]}")
        self.data: Tensor = data
        self.labels: Tensor = labels.to(device="cpu", dtype=torch.long)
        self.kind = kind
        self.input_shape: tuple[int, ...] = tuple(int(s) for s in data.shape[1:])
        self.transform: Transform | None = transform
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        width = self.input_shape[0]
        what = "channel" if kind == "image" else "feature"
        self.mean: Tensor | None = as_stats(mean, width, "mean", what)
        self.std: Tensor | None = as_stats(std, width, "std", what)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """One normalised, non-augmented item ``(x, label)``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        x, y = self.get_batch([index % len(self)])
        return x[0], int(y[0])

    def get_batch(
        self, indices: IndexLike, generator: torch.Generator | None = None, augment: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Items ``indices`` as a float32 batch and their labels.

        Args:
            indices: item indices (tensor, list or array).
            generator: the source of randomness of the augmentation (same state => same batch).
            augment: apply :attr:`transform` (ignored when it is None).

        Returns:
            ``(x, y)``: ``x`` float32 ``(B, *input_shape)``, ``y`` long ``(B,)``.
        """
        idx = as_index(indices, len(self))
        x = finish_batch(self.data[idx], kind=self.kind, transform=self.transform, mean=self.mean,
                         std=self.std, generator=generator, augment=augment)
        return x, self.labels[idx]

    def _replace(self, **fields: Any) -> ArrayDataset:
        new = copy.copy(self)
        new.__dict__.update(fields)
        return new

    def subset(self, indices: IndexLike) -> ArrayDataset:
        """The items ``indices`` (copied), with the same transform, statistics and class names."""
        idx = as_index(indices, len(self))
        return self._replace(data=self.data[idx], labels=self.labels[idx])

    def with_transform(self, transform: Transform | None) -> ArrayDataset:
        """The same data with another augmentation (the data tensor is shared, not copied)."""
        return self._replace(transform=transform)

    def with_labels(self, labels: Tensor) -> ArrayDataset:
        """The same data with new labels (e.g. remapped to ``0..C-1``)."""
        labels = torch.as_tensor(labels)
        if labels.shape != self.labels.shape or labels.is_floating_point():
            raise DataError(f"new labels must be integers of shape {tuple(self.labels.shape)}; "
                            f"got {tuple(labels.shape)} {labels.dtype}")
        return self._replace(labels=labels.to(torch.long))

    def with_normalization(self, mean: StatsLike, std: StatsLike) -> ArrayDataset:
        """The same data with other normalisation statistics (None disables that step)."""
        what = "channel" if self.kind == "image" else "feature"
        width = self.input_shape[0]
        return self._replace(mean=as_stats(mean, width, "mean", what), std=as_stats(std, width, "std", what))

    def resized(self, image_size: int | tuple[int, int]) -> ArrayDataset:
        """Images resized to ``image_size`` (bilinear with antialiasing; uint8 stays uint8)."""
        if self.kind != "image":
            raise ConfigError("image_size applies to image data only; this dataset holds vectors")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if (h, w) == tuple(self.input_shape[1:]):
            return self
        chunks = []
        for start in range(0, len(self), 4096):
            part = self.data[start : start + 4096].float()
            out = F.interpolate(part, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            chunks.append(out.round_().clamp_(0, 255).to(torch.uint8) if self.data.dtype == torch.uint8 else out)
        data = torch.cat(chunks) if chunks else self.data.new_zeros((0, self.input_shape[0], h, w))
        return self._replace(data=data, input_shape=(self.input_shape[0], h, w))

    def __repr__(self) -> str:
        return (f"ArrayDataset(kind={self.kind!r}, items={len(self)}, input_shape={self.input_shape}, "
                f"classes={int(self.labels.unique().numel())}, transform={self.transform!r})")


def compute_normalization(
    dataset: Any, *, max_items: int | None = None, seed: int = 0, batch_size: int = 1024
) -> tuple[list[float], list[float]]:
    """Per-channel (images) or per-feature (vectors) mean and std of a dataset, without augmentation.

    Images are measured in the ``[0, 1]`` scale. A standard deviation of 0 (a constant feature) is
    reported as 1 so that normalising by it is harmless.

    Args:
        dataset: any :class:`BatchDataset`.
        max_items: measure a random subset of at most this many items (seeded by ``seed``); useful
            for lazily decoded image folders. None = all items.
        seed: seed of that subset.
        batch_size: items decoded at a time.
    """
    n = len(dataset)
    if n == 0:
        raise DataError("cannot compute normalisation statistics of an empty dataset")
    raw = dataset.with_normalization(None, None)
    if max_items is not None and n > max_items:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_items].sort().values
    else:
        order = torch.arange(n)
    total = torch.zeros((), dtype=torch.float64)
    sums: Tensor | None = None
    squares: Tensor | None = None
    for start in range(0, order.numel(), batch_size):
        x, _ = raw.get_batch(order[start : start + batch_size])
        x = x.to(torch.float64)
        if dataset.kind == "image":
            x = x.transpose(0, 1).reshape(x.shape[1], -1).T  # (pixels, C)
        s, q = x.sum(0), (x * x).sum(0)
        sums = s if sums is None else sums + s
        squares = q if squares is None else squares + q
        total += x.shape[0]
    assert sums is not None and squares is not None
    mean = sums / total
    var = (squares / total - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [float(v) for v in mean], [float(v) for v in std]


_FEATURE_KEYS = ("features", "embeddings")


def read_npz_arrays(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(features, labels)`` arrays of an ``.npz`` file (features under ``features`` or ``embeddings``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            key = next((k for k in _FEATURE_KEYS if k in archive.files), None)
            if key is None or "labels" not in archive.files:
                raise DataError(
                    f"{str(path)!r} must hold a 'features' (or 'embeddings') array and a 'labels' array; "
                    f"keys present: {', '.join(keys) if keys else '(none)'}"
                )
            features, labels = archive[key], archive["labels"]
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read npz file {str(path)!r}: {exc}") from exc
    if features.ndim != 2:
        raise DataError(f"{str(path)!r}: features must be 2-D (N, D); got shape {features.shape}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise DataError(f"{str(path)!r}: labels must be 1-D with {features.shape[0]} entries; "
                        f"got shape {labels.shape}")
    if features.dtype.kind not in "iuf":
        raise DataError(f"{str(path)!r}: features must be numeric; got dtype {features.dtype}")
    if not np.all(np.isfinite(features)):
        raise DataError(f"{str(path)!r}: features contain NaN or infinite values")
    return features, labels


def load_npz(path: str | os.PathLike[str], *, class_names: Sequence[str] | None = None) -> ArrayDataset:
    """An ``.npz`` file of ``features`` (or ``embeddings``) ``(N, D)`` and ``labels`` ``(N,)`` as vectors.

    Integer labels are kept; string labels are mapped to ids in sorted order (or to their position
    in ``class_names`` when given) and the names stored in ``class_names``. No normalisation is set
    (:func:`~deepmetric.data.load_splits` computes it from the training part).

    Raises:
        DataError: missing file, missing keys (the message lists the keys present), bad shapes.
    """
    features, raw_labels = read_npz_arrays(path)
    if class_names is not None and raw_labels.dtype.kind not in "iu":
        lookup = {str(n): i for i, n in enumerate(class_names)}
        unknown = sorted({str(v) for v in raw_labels.tolist()} - set(lookup))
        if unknown:
            raise DataError(f"{str(path)!r}: labels {unknown[:5]} are not in class_names")
        labels = torch.tensor([lookup[str(v)] for v in raw_labels.tolist()], dtype=torch.long)
        names: list[str] | None = [str(n) for n in class_names]
    else:
        labels, names = encode_labels(raw_labels, repr(str(path)))
    return ArrayDataset(torch.as_tensor(features.astype(np.float32)), labels, kind="vector", class_names=names)
