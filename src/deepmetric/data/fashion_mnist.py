"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 70,000 28×28 grayscale clothing images, 10 classes.

The four standard gzip'd IDX files are looked for, in this order, in

1. ``root`` (when given),
2. ``$DEEPMETRIC_DATA`` and ``$DEEPMETRIC_DATA/fashion-mnist`` (when the variable is set),
3. the user cache, ``$XDG_CACHE_HOME/deepmetric/fashion-mnist`` (default ``~/.cache/deepmetric/fashion-mnist``),
4. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).

If none holds them and ``download=True``, they are fetched from Zalando's official location into the
user cache (short timeout, MD5 checked against the checksums published in the
zalandoresearch/fashion-mnist README, written atomically). Files found locally are validated by their
IDX headers and sizes (the Debian package re-compresses them, so their MD5 differs).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from deepmetric.data.arrays import ArrayDataset
from deepmetric.data.idx import read_idx
from deepmetric.errors import DataError

__all__ = [
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_URL",
    "fashion_mnist_search_paths",
    "fashion_mnist_cache_dir",
    "load_fashion_mnist",
]

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# name -> MD5 of the official .gz file (zalandoresearch/fashion-mnist README, "Get the Data").
FASHION_MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 15.0


def fashion_mnist_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/deepmetric/fashion-mnist`` (default ``~/.cache/deepmetric/fashion-mnist``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "deepmetric" / "fashion-mnist"


def fashion_mnist_search_paths(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for the four IDX files, in order (see the module docstring)."""
    paths: list[Path] = []
    if root is not None:
        paths.append(Path(root))
    env = os.environ.get("DEEPMETRIC_DATA")
    if env:
        paths += [Path(env), Path(env) / "fashion-mnist"]
    paths += [fashion_mnist_cache_dir(), SYSTEM_DIR]
    unique: list[Path] = []
    for p in paths:
        if p not in unique:
            unique.append(p)
    return unique


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FASHION_MNIST_FILES)


def _download_file(url: str, dest: Path, md5: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` to ``dest`` atomically, verifying its MD5; on any failure nothing is left behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"checksum mismatch for {url}: MD5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download(folder: Path) -> None:
    for name, md5 in FASHION_MNIST_FILES.items():
        if not (folder / name).is_file():
            _download_file(FASHION_MNIST_URL + name, folder / name, md5)


def _load_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise DataError(f"corrupt Fashion-MNIST file {str(images_path)!r}: expected uint8 images of 28×28, "
                        f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape[0] != images.shape[0]:
        raise DataError(f"corrupt Fashion-MNIST file {str(labels_path)!r}: {labels.shape[0]} uint8 labels "
                        f"expected to match {images.shape[0]} images in {str(images_path)!r}")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"corrupt Fashion-MNIST file {str(labels_path)!r}: label {int(labels.max())} > 9")
    return images, labels


def _dataset(images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
    return ArrayDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, kind="image",
                        class_names=FASHION_MNIST_CLASSES)


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[ArrayDataset, ArrayDataset]:
    """The Fashion-MNIST train (60,000) and test (10,000) splits as uint8 ``(N, 1, 28, 28)`` datasets.

    Normalisation: mean 0.2860, std 0.3530. Labels 0-9 (names in ``class_names``). No augmentation
    is attached (see :func:`~deepmetric.data.default_augment`).

    Args:
        root: a folder to look in first.
        download: fetch the files into the user cache when no searched folder has them.

    Raises:
        DataError: files not found (the message lists every folder searched and how to fix it), a
            failed download, or a corrupt file (named).
    """
    searched = fashion_mnist_search_paths(root)
    folder = next((p for p in searched if _complete(p)), None)
    failure = ""
    if folder is None and download:
        cache = fashion_mnist_cache_dir()
        try:
            _download(cache)
            folder = cache
        except (OSError, DataError) as exc:  # URLError and timeouts are OSErrors
            failure = f"Download from {FASHION_MNIST_URL} into {str(cache)!r} failed: {exc}. "
    if folder is None:
        listed = "\n".join(f"  - {p}" for p in searched)
        env_note = "" if os.environ.get("DEEPMETRIC_DATA") else " ($DEEPMETRIC_DATA is not set.)"
        raise DataError(
            "Fashion-MNIST not found. Looked for " + ", ".join(FASHION_MNIST_FILES) + " in:\n"
            + listed + "\n" + env_note.strip() + ("\n" if env_note else "")
            + (failure if download else "Downloading is off (download=False). ")
            + "Fix: `sudo apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), "
            "or set DEEPMETRIC_DATA to a folder holding the four files."
        )
    train = _dataset(*_load_split(folder, "train"))
    test = _dataset(*_load_split(folder, "t10k"))
    return train, test
