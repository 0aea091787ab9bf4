"""Small CNN for 28×28 grayscale images (Fashion-MNIST, MNIST, digits): 128-d pooled features."""
from __future__ import annotations

from torch import Tensor, nn

from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import MODELS

__all__ = ["SmallCNN"]


def _block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
    """Small CNN for small images: 3× [conv 3×3 → BN → ReLU], 2 max-pools, global average pool.

    Channels ``width, 2·width, 4·width`` (32/64/128 by default); a 2×2 max-pool follows the first
    and second blocks, then global average pooling, so any image of at least 4×4 pixels works. This
    is the network of the project's PML baseline (research notes, env.md §3d): with the default
    arguments and an ``Embedder`` head of 64 dimensions it has 101,376 parameters (93,120 here).

    Args:
        in_channels: input image channels (1 for grayscale).
        width: channels of the first convolution; the output has ``4 * width`` features.

    Shape:
        input ``(B, in_channels, H, W)`` with ``H, W ≥ 4``, output ``(B, 4 * width)``.

    Example:
        >>> import torch
        >>> SmallCNN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 128])
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        self.in_channels = in_channels
        self.out_features = 4 * width
        self.features = nn.Sequential(
            *_block(in_channels, width),
            nn.MaxPool2d(2),
            *_block(width, 2 * width),
            nn.MaxPool2d(2),
            *_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise DataError(f"SmallCNN expects images (B, {self.in_channels}, H, W); got shape {tuple(x.shape)}")
        if min(x.shape[2:]) < 4:
            raise DataError(f"SmallCNN needs images of at least 4×4 pixels; got {tuple(x.shape[2:])}")
        return self.features(x)
