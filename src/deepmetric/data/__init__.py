"""Datasets, evaluation protocols and batch-wise augmentation.

Importing this package registers the built-in dataset loaders in :data:`deepmetric.registry.DATASETS`
(``fashion_mnist``, ``digits``, ``image_folder``, ``csv``, ``npz``).

Example:
    >>> from deepmetric.data import load_splits
    >>> splits = load_splits("digits", "closed", val_fraction=0.1, seed=0)
    >>> x, y = splits.train.get_batch([0, 1, 2], torch.Generator().manual_seed(0), augment=True)
    >>> tuple(x.shape), splits.num_train_classes
    ((3, 1, 8, 8), 10)
"""
from __future__ import annotations

import torch  # noqa: F401  (used by the doctest above)

from deepmetric.data.arrays import (
    ArrayDataset,
    BatchDataset,
    compute_normalization,
    load_npz,
)
from deepmetric.data.augment import (
    Compose,
    RandomCropWithPadding,
    RandomHorizontalFlip,
    Transform,
    default_augment,
)
from deepmetric.data.digits import load_digits_dataset
from deepmetric.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_search_paths,
    load_fashion_mnist,
)
from deepmetric.data.files import CsvManifestDataset, ImageFolderDataset
from deepmetric.data.idx import read_idx, write_idx
from deepmetric.data.protocols import (
    PROTOCOLS,
    DataSource,
    DataSplits,
    dataset_names,
    load_splits,
    stratified_split,
)

__all__ = [
    "ArrayDataset",
    "BatchDataset",
    "ImageFolderDataset",
    "CsvManifestDataset",
    "load_npz",
    "load_fashion_mnist",
    "fashion_mnist_search_paths",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_digits_dataset",
    "read_idx",
    "write_idx",
    "Transform",
    "RandomCropWithPadding",
    "RandomHorizontalFlip",
    "Compose",
    "default_augment",
    "compute_normalization",
    "DataSplits",
    "DataSource",
    "PROTOCOLS",
    "load_splits",
    "dataset_names",
    "stratified_split",
]
