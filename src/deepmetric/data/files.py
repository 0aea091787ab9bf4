"""Image files on disk, decoded lazily with PIL: an image folder or a CSV manifest.

Both datasets hold a list of file paths and labels; an image is decoded only when an item or a
batch asks for it, converted to grayscale or RGB, resized to ``image_size`` (bilinear) and then
goes through the same scale / augment / normalise pipeline as :class:`~deepmetric.data.ArrayDataset`.
"""
from __future__ import annotations

import copy
import csv
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from deepmetric.data.arrays import ArrayDataset, IndexLike, StatsLike, as_index, as_stats, finish_batch
from deepmetric.data.augment import Transform
from deepmetric.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "CsvManifestDataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _size_pair(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        pair = (image_size, image_size)
    else:
        pair = tuple(int(s) for s in image_size)
    if len(pair) != 2 or min(pair) < 1:
        raise DataError(f"image_size must be a positive int or (height, width); got {image_size!r}")
    return pair  # type: ignore[return-value]


class _FileImageDataset(Dataset):
    """Shared implementation of the lazily decoded image datasets (not public)."""

    kind = "image"

    def _setup(
        self,
        paths: list[Path],
        labels: Tensor,
        class_names: list[str],
        *,
        image_size: int | Sequence[int] | None,
        grayscale: bool | None,
        mean: StatsLike,
        std: StatsLike,
        transform: Transform | None,
    ) -> None:
        if not paths:
            raise DataError(f"{type(self).__name__}: no images found")
        size = _size_pair(image_size)
        if size is None or grayscale is None:
            try:
                with Image.open(paths[0]) as first:
                    width, height = first.size
                    mode = first.mode
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot read image {str(paths[0])!r}: {exc}") from exc
            size = size or (height, width)
            grayscale = mode in _GRAY_MODES if grayscale is None else grayscale
        self.paths: list[Path] = paths
        self.labels: Tensor = labels
        self.class_names: list[str] | None = class_names
        self.image_size: tuple[int, int] = size
        self.grayscale: bool = bool(grayscale)
        channels = 1 if self.grayscale else 3
        self.input_shape: tuple[int, ...] = (channels, *size)
        self.transform: Transform | None = transform
        self.mean: Tensor | None = as_stats(mean, channels, "mean", "channel")
        self.std: Tensor | None = as_stats(std, channels, "std", "channel")

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> Tensor:
        """Image ``index`` as a uint8 ``(C, H, W)`` tensor (converted and resized, not normalised)."""
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.grayscale else "RGB")
                h, w = self.image_size
                if image.size != (w, h):
                    image = image.resize((w, h), Image.BILINEAR)
                array = np.array(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """One normalised, non-augmented item ``(x, label)``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        x, y = self.get_batch([index % len(self)])
        return x[0], int(y[0])

    def get_batch(
        self, indices: IndexLike, generator: torch.Generator | None = None, augment: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Items ``indices`` decoded, as a float32 batch, and their labels (see ``ArrayDataset.get_batch``)."""
        idx = as_index(indices, len(self))
        if idx.numel():
            raw = torch.stack([self.decode(int(i)) for i in idx])
        else:
            raw = torch.zeros((0, *self.input_shape), dtype=torch.uint8)
        x = finish_batch(raw, kind="image", transform=self.transform, mean=self.mean, std=self.std,
                         generator=generator, augment=augment)
        return x, self.labels[idx]

    def _replace(self, **fields: Any) -> Any:
        new = copy.copy(self)
        new.__dict__.update(fields)
        return new

    def subset(self, indices: IndexLike) -> Any:
        """The items ``indices``, same class of dataset, transform, statistics and class names."""
        idx = as_index(indices, len(self))
        fields: dict[str, Any] = {"paths": [self.paths[int(i)] for i in idx], "labels": self.labels[idx]}
        splits = getattr(self, "splits", None)
        if splits is not None:
            fields["splits"] = [splits[int(i)] for i in idx]
        return self._replace(**fields)

    def with_transform(self, transform: Transform | None) -> Any:
        """The same items with another augmentation."""
        return self._replace(transform=transform)

    def with_labels(self, labels: Tensor) -> Any:
        """The same items with new labels (e.g. remapped to ``0..C-1``)."""
        labels = torch.as_tensor(labels)
        if labels.shape != self.labels.shape or labels.is_floating_point():
            raise DataError(f"new labels must be integers of shape {tuple(self.labels.shape)}; "
                            f"got {tuple(labels.shape)} {labels.dtype}")
        return self._replace(labels=labels.to(torch.long))

    def with_normalization(self, mean: StatsLike, std: StatsLike) -> Any:
        """The same items with other normalisation statistics (None disables that step)."""
        c = self.input_shape[0]
        return self._replace(mean=as_stats(mean, c, "mean", "channel"), std=as_stats(std, c, "std", "channel"))

    def to_array(self) -> ArrayDataset:
        """Decode every image once into an in-memory :class:`ArrayDataset` (faster epochs, more memory)."""
        data = (torch.stack([self.decode(i) for i in range(len(self))]) if len(self)
                else torch.zeros((0, *self.input_shape), dtype=torch.uint8))
        return ArrayDataset(data, self.labels.clone(), mean=self.mean, std=self.std, transform=self.transform,
                            kind="image", class_names=self.class_names)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(items={len(self)}, input_shape={self.input_shape}, "
                f"classes={len(self.class_names or [])}, transform={self.transform!r})")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolderDataset(_FileImageDataset):
    """Images in one sub-folder per class (``root/<class>/**/<image>``), class ids by sorted folder name.

    Files with an extension in :data:`IMAGE_EXTENSIONS` are collected recursively, in sorted order.

    Args:
        root: the folder holding the class folders.
        image_size: ``int`` or ``(height, width)`` every image is resized to; None = the size of the
            first image.
        grayscale: decode as one channel (True) or RGB (False); None = grayscale iff the first image is.
        class_names: fix the class-name -> id mapping (``class_names[id]``), e.g. to share it between a
            ``train/`` and a ``test/`` folder; every class folder must be listed. None = sorted folders.
        mean: per-channel normalisation mean (``[0, 1]`` scale); None = none.
        std: per-channel normalisation std; None = none.
        transform: batch augmentation used by ``get_batch(..., augment=True)``.

    Raises:
        DataError: missing folder, no class folder, a class folder without images.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        image_size: int | Sequence[int] | None = None,
        grayscale: bool | None = None,
        class_names: Sequence[str] | None = None,
        mean: StatsLike = None,
        std: StatsLike = None,
        transform: Transform | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {str(root)!r} does not exist or is not a folder")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"image folder {str(root)!r} has no class sub-folders (expected root/<class>/<image>)")
        names = list(class_names) if class_names is not None else folders
        lookup = {n: i for i, n in enumerate(names)}
        unknown = [f for f in folders if f not in lookup]
        if unknown:
            raise DataError(f"class folder(s) {unknown} of {str(root)!r} are not in class_names {names}")
        paths: list[Path] = []
        labels: list[int] = []
        for folder in folders:
            files: list[Path] = []
            for dirpath, dirnames, filenames in os.walk(root / folder):
                dirnames.sort()
                files.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
            if not files:
                raise DataError(
                    f"class folder {str(root / folder)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})"
                )
            paths.extend(files)
            labels.extend([lookup[folder]] * len(files))
        self.root = root
        self._setup(paths, torch.tensor(labels, dtype=torch.long), names, image_size=image_size,
                    grayscale=grayscale, mean=mean, std=std, transform=transform)


_INT_RE = re.compile(r"^[+-]?\d+$")
SPLIT_VALUES = ("train", "test")


class CsvManifestDataset(_FileImageDataset):
    """Images listed in a CSV file with a header ``path,label[,split]``.

    Paths are relative to the CSV file's folder (absolute paths are kept). Labels are mapped to ids
    over the *whole* manifest (so every split shares one mapping): numerically sorted when every
    label is an integer, otherwise sorted as strings; ``class_names[id]`` is the label as written.
    Other columns are ignored. The optional ``split`` column takes the values ``train`` or ``test``.

    Args:
        csv_path: the manifest.
        split: keep only the rows of this split (needs a ``split`` column); None = all rows.
        image_size: ``int`` or ``(height, width)``; None = size of the first image.
        grayscale: one channel (True) or RGB (False); None = as the first image.
        mean: per-channel normalisation mean; None = none.
        std: per-channel normalisation std; None = none.
        transform: batch augmentation used by ``get_batch(..., augment=True)``.

    Attributes:
        splits: the ``split`` value of each item, or None without a split column.

    Raises:
        DataError: missing columns, empty label, bad split value, or image files that do not exist
            (the message names the CSV lines).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike[str],
        *,
        split: str | None = None,
        image_size: int | Sequence[int] | None = None,
        grayscale: bool | None = None,
        mean: StatsLike = None,
        std: StatsLike = None,
        transform: Transform | None = None,
    ) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(f"CSV manifest {str(csv_path)!r} not found")
        base = csv_path.parent
        rows: list[tuple[int, str, str, str | None]] = []
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "path" not in fields or "label" not in fields:
                raise DataError(f"CSV manifest {str(csv_path)!r} needs a header with 'path' and 'label' "
                                f"columns (and optionally 'split'); found columns {fields}")
            reader.fieldnames = fields
            has_split = "split" in fields
            for row in reader:
                line = reader.line_num
                path_value = (row.get("path") or "").strip()
                label_value = (row.get("label") or "").strip()
                if not path_value and not label_value and not any((v or "").strip() for v in row.values()):
                    continue  # blank line
                if not path_value or not label_value:
                    raise DataError(f"{str(csv_path)!r} line {line}: empty path or label ({dict(row)})")
                split_value = (row.get("split") or "").strip().lower() if has_split else None
                if has_split and split_value not in SPLIT_VALUES:
                    raise DataError(f"{str(csv_path)!r} line {line}: split must be one of {list(SPLIT_VALUES)}; "
                                    f"got {row.get('split')!r}")
                rows.append((line, path_value, label_value, split_value))
        if not rows:
            raise DataError(f"CSV manifest {str(csv_path)!r} lists no images")
        if split is not None:
            if not has_split:
                raise DataError(f"split={split!r} asked but {str(csv_path)!r} has no 'split' column")
            if split not in SPLIT_VALUES:
                raise DataError(f"split must be one of {list(SPLIT_VALUES)}; got {split!r}")
        label_strings = [r[2] for r in rows]
        if all(_INT_RE.match(v) for v in label_strings):
            ordered = sorted({int(v) for v in label_strings})
            names = [str(v) for v in ordered]
            lookup = {v: i for i, v in enumerate(ordered)}
            ids = [lookup[int(v)] for v in label_strings]
        else:
            names = sorted(set(label_strings))
            lookup_s = {n: i for i, n in enumerate(names)}
            ids = [lookup_s[v] for v in label_strings]
        keep = [i for i, r in enumerate(rows) if split is None or r[3] == split]
        if not keep:
            raise DataError(f"CSV manifest {str(csv_path)!r} has no row with split {split!r}")
        paths = [(base / rows[i][1]) if not os.path.isabs(rows[i][1]) else Path(rows[i][1]) for i in keep]
        missing = [(rows[i][0], rows[i][1], p) for i, p in zip(keep, paths) if not p.is_file()]
        if missing:
            shown = "; ".join(f"line {ln}: {raw!r} (looked for {str(p)!r})" for ln, raw, p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(f"CSV manifest {str(csv_path)!r}: {len(missing)} image file(s) not found: "
                            f"{shown}{more}. Paths are relative to the CSV file's folder.")
        self.csv_path = csv_path
        self.splits: list[str] | None = [rows[i][3] for i in keep] if has_split else None  # type: ignore[misc]
        self._setup(paths, torch.tensor([ids[i] for i in keep], dtype=torch.long), names,
                    image_size=image_size, grayscale=grayscale, mean=mean, std=std, transform=transform)
