"""scikit-learn's bundled handwritten digits (UCI optical digits test set): 1,797 8×8 images, 10 classes."""
from __future__ import annotations

import numpy as np
import torch

from deepmetric.data.arrays import ArrayDataset

__all__ = ["load_digits_dataset"]


def load_digits_dataset(as_vectors: bool = False) -> ArrayDataset:
    """The 1,797 sklearn digits, as uint8 ``(N, 1, 8, 8)`` images or 64-d float vectors.

    Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``) for images; vectors keep the
    raw 0..16 values. No normalisation is set (:func:`~deepmetric.data.load_splits` computes it from
    the training part) and there is no predefined train/test split.

    Args:
        as_vectors: return ``(N, 64)`` float vectors (kind ``"vector"``) instead of images.

    Example:
        >>> load_digits_dataset().input_shape
        (1, 8, 8)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels = torch.as_tensor(bunch.target.astype(np.int64))
    names = [str(i) for i in range(10)]
    if as_vectors:
        return ArrayDataset(torch.as_tensor(bunch.data.astype(np.float32)), labels, kind="vector",
                            class_names=names)
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return ArrayDataset(torch.from_numpy(images).unsqueeze(1), labels, kind="image", class_names=names)
