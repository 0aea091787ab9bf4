"""Evaluation protocols: turn a dataset into train / validation / test splits.

``load_splits(name, protocol)`` with ``name`` one of ``fashion_mnist``, ``digits``,
``image_folder:<path>``, ``csv:<path>``, ``npz:<path>`` or ``npz:<train.npz>,<test.npz>``, and
``protocol``:

* ``"closed"``: the test set holds *other images of the training classes*. Data with a predefined
  split (Fashion-MNIST, ``train/`` + ``test/`` folders, a CSV ``split`` column, two npz files) uses it;
  otherwise a fixed stratified :data:`CLOSED_TEST_FRACTION` (20 %) of every class becomes the test set
  (its seed is fixed, independent of ``seed``, so every run is evaluated on the same images).
* ``"disjoint"`` (class-disjoint, as CUB-200 / Cars-196 / SOP): the sorted class ids are cut in two,
  the first ``ceil(K / 2)`` for training and the rest for testing (or ``train_classes=[...]``, the rest
  being test classes). With a predefined split the test set is the *test-split* images of the test
  classes (Fashion-MNIST: 30,000 training images of classes 0-4, 5,000 test images of classes 5-9);
  without one it is all images of the test classes.

In both, the validation set is a seeded, stratified ``val_fraction`` of the training part (removed
from it; ``val_fraction=0`` gives ``val=None``). It contains *seen* classes, also for ``disjoint``:
class-disjoint validation would need more classes than these small datasets have. Each class keeps
at least one training image.

Training and validation labels are remapped to ``0..C-1`` (proxy and classification losses need it);
``info["train_classes"][i]`` is the original id of training label ``i`` and ``info["label_map"]`` maps
original -> new. **Test labels keep the original ids** (retrieval only compares them with each other).

Normalisation: Fashion-MNIST uses mean 0.2860 / std 0.3530; other datasets are normalised with
per-channel (images) or per-feature (vectors) statistics of the training part (image folders and CSV
manifests: from a seeded sample of at most :data:`STATS_SAMPLE` images). The training dataset gets
:func:`~deepmetric.data.default_augment` as its ``transform``; validation and test get none.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from deepmetric.data.arrays import ArrayDataset, compute_normalization, encode_labels, read_npz_arrays
from deepmetric.data.augment import default_augment
from deepmetric.data.digits import load_digits_dataset
from deepmetric.data.fashion_mnist import load_fashion_mnist
from deepmetric.data.files import CsvManifestDataset, ImageFolderDataset
from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import DATASETS

__all__ = [
    "DataSplits",
    "DataSource",
    "PROTOCOLS",
    "CLOSED_TEST_FRACTION",
    "STATS_SAMPLE",
    "load_splits",
    "stratified_split",
    "dataset_names",
]

PROTOCOLS = ("closed", "disjoint")
CLOSED_TEST_FRACTION = 0.2
STATS_SAMPLE = 1000
_TEST_SPLIT_SEED = 0


@dataclass(frozen=True)
class DataSplits:
    """The datasets of one experiment.

    Attributes:
        train: training data (labels ``0..num_train_classes-1``, default augmentation attached).
        val: validation data from the training classes (same labels as ``train``), or None.
        test: test data (original label ids).
        num_train_classes: number of training classes (size of a proxy / classifier layer).
        info: name, protocol, class lists, label map, sizes, input shape, kind, normalisation.
    """

    train: Any
    val: Any | None
    test: Any
    num_train_classes: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSource:
    """What a registered dataset loader returns.

    Attributes:
        train: all data, or the predefined training split.
        test: the predefined test split (same label ids as ``train``), or None.
        fixed_normalization: keep the loader's mean/std instead of computing them from training data.
    """

    train: Any
    test: Any | None
    fixed_normalization: bool = False


def _resolve(path: str | None, root: str | os.PathLike[str] | None, key: str) -> Path:
    if not path:
        raise ConfigError(f"dataset {key!r} needs a path: use '{key}:<path>'")
    p = Path(os.path.expanduser(path))
    if root is not None and not p.is_absolute():
        p = Path(root) / p
    return p


def _no_arg(arg: str | None, key: str) -> None:
    if arg:
        raise ConfigError(f"dataset {key!r} takes no ':<argument>'; got {key}:{arg}")


def _resize(ds: ArrayDataset, image_size: int | Sequence[int] | None, key: str) -> ArrayDataset:
    if image_size is None:
        return ds
    if ds.kind != "image":
        raise ConfigError(f"image_size does not apply to {key!r}: it holds vectors")
    return ds.resized(image_size if isinstance(image_size, int) else tuple(image_size))  # type: ignore[arg-type]


@DATASETS.register("fashion_mnist")
def fashion_mnist_source(
    arg: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    image_size: int | Sequence[int] | None = None,
    download: bool = True,
) -> DataSource:
    """Fashion-MNIST: 70k 28×28 grayscale clothing images, 10 classes, predefined 60k/10k split."""
    _no_arg(arg, "fashion_mnist")
    train, test = load_fashion_mnist(root, download=download)
    return DataSource(_resize(train, image_size, "fashion_mnist"), _resize(test, image_size, "fashion_mnist"),
                      fixed_normalization=True)


@DATASETS.register("digits")
def digits_source(
    arg: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    image_size: int | Sequence[int] | None = None,
    download: bool = True,
) -> DataSource:
    """scikit-learn digits: 1,797 8×8 handwritten digit images, 10 classes, no predefined split."""
    _no_arg(arg, "digits")
    return DataSource(_resize(load_digits_dataset(), image_size, "digits"), None)


@DATASETS.register("image_folder")
def image_folder_source(
    arg: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    image_size: int | Sequence[int] | None = None,
    download: bool = True,
) -> DataSource:
    """Images in <path>/<class>/ folders, or <path>/train/<class>/ + <path>/test/<class>/ (predefined split)."""
    path = _resolve(arg, root, "image_folder")
    train_dir, test_dir = path / "train", path / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        names = sorted({p.name for d in (train_dir, test_dir) for p in d.iterdir()
                        if p.is_dir() and not p.name.startswith(".")})
        train = ImageFolderDataset(train_dir, image_size=image_size, class_names=names)
        test = ImageFolderDataset(test_dir, image_size=train.image_size, grayscale=train.grayscale,
                                  class_names=names)
        return DataSource(train, test)
    return DataSource(ImageFolderDataset(path, image_size=image_size), None)


@DATASETS.register("csv")
def csv_source(
    arg: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    image_size: int | Sequence[int] | None = None,
    download: bool = True,
) -> DataSource:
    """Images listed in a CSV manifest (path,label[,split]); the split column, if any, is the predefined split."""
    full = CsvManifestDataset(_resolve(arg, root, "csv"), image_size=image_size)
    if full.splits is None:
        return DataSource(full, None)
    is_train = torch.tensor([s == "train" for s in full.splits], dtype=torch.bool)
    if not bool(is_train.any()) or bool(is_train.all()):
        raise DataError(f"CSV manifest {str(full.csv_path)!r}: the split column must have both 'train' and "
                        "'test' rows (or drop the column to let the protocol split the data)")
    return DataSource(full.subset(is_train), full.subset(~is_train))


@DATASETS.register("npz")
def npz_source(
    arg: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    image_size: int | Sequence[int] | None = None,
    download: bool = True,
) -> DataSource:
    """Feature vectors from npz files (features/labels): one file, or '<train.npz>,<test.npz>'."""
    if image_size is not None:
        raise ConfigError("image_size does not apply to 'npz': it holds vectors")
    parts = [p for p in (arg or "").split(",") if p.strip()]
    if len(parts) not in (1, 2):
        raise ConfigError("use 'npz:<file.npz>' or 'npz:<train.npz>,<test.npz>'")
    arrays = [read_npz_arrays(_resolve(p.strip(), root, "npz")) for p in parts]
    if len(arrays) == 2 and arrays[0][0].shape[1] != arrays[1][0].shape[1]:
        raise DataError(f"train and test npz features differ in dimension: {arrays[0][0].shape[1]} vs "
                        f"{arrays[1][0].shape[1]}")
    # One label encoding for both files (string labels get ids over their union).
    labels, names = encode_labels(np.concatenate([a[1] for a in arrays]), f"npz:{arg}")
    sizes = [a[0].shape[0] for a in arrays]
    datasets = [
        ArrayDataset(torch.as_tensor(a[0].astype(np.float32)), part, kind="vector", class_names=names)
        for a, part in zip(arrays, torch.split(labels, sizes))
    ]
    return DataSource(datasets[0], datasets[1] if len(datasets) == 2 else None)


def dataset_names() -> list[str]:
    """The accepted forms of ``name`` (``image_folder:<path>`` etc.)."""
    forms = {"image_folder": "image_folder:<path>", "csv": "csv:<path>",
             "npz": "npz:<file>[,<test file>]"}
    return [forms.get(n, n) for n in DATASETS.names()]


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices per class: ``floor(fraction * n_c + 0.5)`` of each class (at most ``n_c - 1``).

    Returns:
        ``(kept, taken)`` sorted index tensors; ``taken`` is the stratified fraction.
    """
    generator = torch.Generator().manual_seed(int(seed))
    taken: list[Tensor] = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        n = members.numel()
        k = min(int(math.floor(fraction * n + 0.5)), n - 1)
        if k > 0:
            taken.append(members[torch.randperm(n, generator=generator)[:k]])
    taken_idx = torch.cat(taken).sort().values if taken else torch.zeros(0, dtype=torch.long)
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[taken_idx] = False
    return mask.nonzero().flatten(), taken_idx


def _resolve_classes(requested: Sequence[int | str], all_classes: list[int], names: list[str] | None) -> list[int]:
    lookup = {n: i for i, n in enumerate(names)} if names else {}
    out: list[int] = []
    for c in requested:
        if isinstance(c, str):
            if c in lookup:
                value = lookup[c]  # a class name (looked up first: CSV labels "10" may have id 1)
            elif c.strip().lstrip("+-").isdigit() and not names:
                value = int(c)
            else:
                raise ConfigError(f"train_classes: unknown class name {c!r}; valid names: {names}")
        else:
            value = int(c)
        if value not in all_classes:
            raise ConfigError(f"train_classes: class {c!r} is not in the dataset; valid class ids: {all_classes}")
        if value in out:
            raise ConfigError(f"train_classes: class {c!r} is listed twice")
        out.append(value)
    if not out:
        raise ConfigError("train_classes must not be empty")
    return sorted(out)


def _of_classes(ds: Any, classes: Sequence[int]) -> Any:
    return ds.subset(torch.isin(ds.labels, torch.tensor(list(classes), dtype=torch.long)))


def _unique(labels: Tensor) -> list[int]:
    return [int(v) for v in torch.unique(labels).tolist()]


def load_splits(
    name: str,
    protocol: str = "closed",
    *,
    root: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_classes: Sequence[int | str] | None = None,
    image_size: int | Sequence[int] | None = None,
    download: bool = True,
) -> DataSplits:
    """Train / validation / test datasets of ``name`` under ``protocol`` (see the module docstring).

    Args:
        name: ``fashion_mnist``, ``digits``, ``image_folder:<path>``, ``csv:<path>``, ``npz:<path>`` or
            ``npz:<train.npz>,<test.npz>``. Relative paths are taken relative to ``root`` when given.
        protocol: ``"closed"`` or ``"disjoint"``.
        root: Fashion-MNIST: a folder searched first; other datasets: base of relative paths.
        val_fraction: stratified fraction of the training part held out for validation, in ``[0, 1)``.
        seed: seed of the validation split.
        train_classes: class ids (or class names) used for training; ``disjoint``: the test classes
            are all the others; ``closed``: train and test are restricted to these classes.
        image_size: resize images to this ``int`` or ``(height, width)``.
        download: allow downloading Fashion-MNIST when it is not found locally.

    Raises:
        ConfigError: unknown dataset or protocol (the message names the valid ones), bad arguments.
        DataError: missing or corrupt data, or a split that would be empty.

    Example:
        >>> s = load_splits("digits", "disjoint", val_fraction=0.1)
        >>> s.num_train_classes, s.info["test_classes"], len(s.test)
        (5, [5, 6, 7, 8, 9], 896)
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    if isinstance(val_fraction, bool) or not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1); got {val_fraction!r}")
    key, _, arg = name.partition(":")
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(dataset_names())}")
    source: DataSource = DATASETS.get(key)(arg or None, root=root, image_size=image_size, download=download)
    train_all, test_src = source.train, source.test
    names = train_all.class_names
    classes = sorted(set(_unique(train_all.labels)) | (set(_unique(test_src.labels)) if test_src is not None else set()))
    info: dict[str, Any] = {"name": name, "protocol": protocol, "predefined_split": test_src is not None}

    if protocol == "closed":
        chosen = _resolve_classes(train_classes, classes, names) if train_classes is not None else classes
        if test_src is not None:
            train_part = _of_classes(train_all, chosen)
            seen = _unique(train_part.labels)
            test = _of_classes(test_src, seen)
            dropped = sorted(set(_unique(test_src.labels)) - set(seen))
            if dropped and train_classes is None:
                warnings.warn(f"closed protocol on {name!r}: test classes {dropped} have no training images "
                              "and were left out of the test set", stacklevel=2)
            info["dropped_test_classes"] = dropped
        else:
            pool = _of_classes(train_all, chosen)
            keep, held = stratified_split(pool.labels, CLOSED_TEST_FRACTION, _TEST_SPLIT_SEED)
            train_part, test = pool.subset(keep), pool.subset(held)
            info["test_fraction"] = CLOSED_TEST_FRACTION
    else:
        if len(classes) < 2:
            raise DataError(f"the disjoint protocol needs at least 2 classes; {name!r} has {len(classes)}")
        if train_classes is not None:
            chosen = _resolve_classes(train_classes, classes, names)
        else:
            chosen = classes[: math.ceil(len(classes) / 2)]
        test_classes = [c for c in classes if c not in set(chosen)]
        if not test_classes:
            raise ConfigError("train_classes lists every class: the disjoint protocol needs test classes")
        train_part = _of_classes(train_all, chosen)
        test = _of_classes(test_src if test_src is not None else train_all, test_classes)

    if len(train_part) == 0:
        raise DataError(f"{name!r} ({protocol}): the training split is empty")
    if len(test) == 0:
        raise DataError(f"{name!r} ({protocol}): the test split is empty")
    val = None
    if val_fraction > 0:
        keep, held = stratified_split(train_part.labels, float(val_fraction), seed)
        if held.numel() == 0:
            raise DataError(f"val_fraction={val_fraction} leaves no validation image in {name!r} (too few images "
                            "per class); use val_fraction=0 or a larger fraction")
        train_part, val = train_part.subset(keep), train_part.subset(held)

    # Contiguous training labels 0..C-1.
    train_ids = _unique(train_part.labels)
    sorted_ids = torch.tensor(train_ids, dtype=torch.long)
    train = train_part.with_labels(torch.searchsorted(sorted_ids, train_part.labels))
    if val is not None:
        val = val.with_labels(torch.searchsorted(sorted_ids, val.labels))

    if source.fixed_normalization and train.mean is not None:
        mean, std = train.mean.tolist(), train.std.tolist() if train.std is not None else None
    else:
        sample = STATS_SAMPLE if not isinstance(train, ArrayDataset) else None
        mean, std = compute_normalization(train, max_items=sample, seed=0)
    train = train.with_normalization(mean, std)
    val = val.with_normalization(mean, std) if val is not None else None
    test = test.with_normalization(mean, std).with_transform(None)
    augment = default_augment(key, train.kind, train.input_shape)
    train = train.with_transform(augment)
    if val is not None:
        val = val.with_transform(None)

    test_ids = _unique(test.labels)
    info.update(
        train_classes=train_ids,
        test_classes=test_ids,
        label_map={c: i for i, c in enumerate(train_ids)},
        sizes={"train": len(train), "val": len(val) if val is not None else 0, "test": len(test)},
        input_shape=tuple(train.input_shape),
        kind=train.kind,
        mean=list(mean),
        std=list(std) if std is not None else None,
        val_fraction=float(val_fraction),
        seed=int(seed),
        augment=repr(augment),
    )
    if names is not None:
        info["train_class_names"] = [names[c] for c in train_ids]
        info["test_class_names"] = [names[c] for c in test_ids]
    return DataSplits(train=train, val=val, test=test, num_train_classes=len(train_ids), info=info)
