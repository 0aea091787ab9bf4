"""Batch-wise image augmentation in plain torch (no torchvision).

A transform is a callable ``(batch, generator) -> batch`` on a float ``(B, C, H, W)`` batch with values
in ``[0, 1]`` (datasets apply it *before* mean/std normalisation, so padding with 0 means black).
All randomness comes from ``generator``: the same generator state gives the same output. With
``generator=None`` torch's global generator is used. Random numbers are always drawn on the CPU
(then moved to the batch's device), so results do not depend on the device.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric.errors import ConfigError, DataError

__all__ = [
    "Transform",
    "RandomCropWithPadding",
    "RandomHorizontalFlip",
    "Compose",
    "default_augment",
]

Transform = Callable[[Tensor, "torch.Generator | None"], Tensor]


def _check_images(batch: Tensor, who: str) -> None:
    if not isinstance(batch, Tensor) or batch.dim() != 4:
        raise DataError(
            f"{who} expects an image batch of shape (B, C, H, W); got {tuple(getattr(batch, 'shape', ()))}"
        )


class RandomCropWithPadding:
    """Zero-pad each side by ``padding`` pixels, then crop back to ``H × W`` at a random offset.

    Equivalent to a random translation by up to ``padding`` pixels in each direction, with the
    uncovered border filled with ``fill``. Every image of the batch gets its own offset; the crop is
    one gather over the whole batch (no Python loop).

    Args:
        padding: pixels added on each side (0 makes the transform the identity).
        fill: value of the padded border (in the ``[0, 1]`` scale).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> RandomCropWithPadding(2)(torch.rand(4, 1, 28, 28), g).shape
        torch.Size([4, 1, 28, 28])
    """

    def __init__(self, padding: int, fill: float = 0.0) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"padding must be an integer >= 0; got {padding!r}")
        self.padding = padding
        self.fill = float(fill)

    def __call__(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_images(batch, "RandomCropWithPadding")
        p = self.padding
        if p == 0 or batch.shape[0] == 0:
            return batch
        b, _, h, w = batch.shape
        offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator).to(batch.device)
        padded = F.pad(batch, (p, p, p, p), value=self.fill)
        rows = offsets[0].unsqueeze(1) + torch.arange(h, device=batch.device)  # (B, H)
        cols = offsets[1].unsqueeze(1) + torch.arange(w, device=batch.device)  # (B, W)
        batch_index = torch.arange(b, device=batch.device).view(b, 1, 1)
        # Advanced indices separated by a slice: the result is (B, H, W, C).
        out = padded[batch_index, :, rows.unsqueeze(2), cols.unsqueeze(1)]
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomCropWithPadding(padding={self.padding}, fill={self.fill})"


class RandomHorizontalFlip:
    """Mirror each image left/right with probability ``p`` (independently per image).

    Args:
        p: flip probability in ``[0, 1]``.

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 1, 4)
        >>> RandomHorizontalFlip(p=1.0)(x, None).flatten().tolist()
        [3.0, 2.0, 1.0, 0.0]
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"p must be in [0, 1]; got {p!r}")
        self.p = float(p)

    def __call__(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_images(batch, "RandomHorizontalFlip")
        flip = torch.rand(batch.shape[0], generator=generator) < self.p
        flip = flip.to(batch.device).view(-1, 1, 1, 1)
        return torch.where(flip, batch.flip(-1), batch)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms one after another, passing the same generator to each.

    Args:
        transforms: the transforms, applied in order.
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise ConfigError(f"Compose expects callables (batch, generator) -> batch; got {t!r}")

    def __call__(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for t in self.transforms:
            batch = t(batch, generator)
        return batch

    def __repr__(self) -> str:
        return f"Compose([{', '.join(map(repr, self.transforms))}])"


def default_augment(
    name: str, kind: str = "image", input_shape: tuple[int, ...] | None = None
) -> Transform | None:
    """The default training augmentation for a dataset.

    * ``fashion_mnist``: crop with padding 2 + horizontal flip (clothes are left/right symmetric).
    * ``digits``: crop with padding 1 only (digits are not mirror-symmetric).
    * other image data: crop with padding ``max(1, round(min(H, W) / 8))`` (4 when the shape is
      unknown) + horizontal flip.
    * vectors: ``None`` (no augmentation).

    Args:
        name: dataset name as given to :func:`~deepmetric.data.load_splits` (anything after ``:`` is
            ignored, so ``"image_folder:/data/cub"`` works).
        kind: ``"image"`` or ``"vector"``.
        input_shape: ``(C, H, W)`` of the images, used to scale the padding of generic image data.
    """
    if kind not in ("image", "vector"):
        raise ConfigError(f"kind must be 'image' or 'vector'; got {kind!r}")
    if kind == "vector":
        return None
    key = name.partition(":")[0]
    if key == "fashion_mnist":
        return Compose([RandomCropWithPadding(2), RandomHorizontalFlip(0.5)])
    if key == "digits":
        return RandomCropWithPadding(1)
    padding = 4 if input_shape is None else max(1, round(min(input_shape[-2:]) / 8))
    return Compose([RandomCropWithPadding(padding), RandomHorizontalFlip(0.5)])
