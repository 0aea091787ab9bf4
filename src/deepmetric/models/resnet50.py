"""ResNet-50 backbone with torchvision's module names (no ``fc``): 2048-d pooled features."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from deepmetric.models._resnet import (
    Bottleneck,
    build_resnet,
    check_resnet_args,
    load_torchvision_weights,
    resnet_features,
)
from deepmetric.registry import MODELS

__all__ = ["ResNet50"]


@MODELS.register("resnet50")
class ResNet50(nn.Module):
    """ResNet-50 backbone (torchvision layout, ``fc`` removed): images → 2048-d features.

    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. Module and parameter names
    match ``torchvision.models.resnet50`` (``conv1``, ``bn1``, ``layer1``–``layer4`` of ``Bottleneck``
    with ``conv1/bn1/conv2/bn2/conv3/bn3`` and ``downsample.0/1``), so its state dicts load key for key
    (318 entries including ``num_batches_tracked``; 23,508,032 parameters).

    Args:
        weights_path: local torchvision-format state dict to load (``fc.*`` ignored); None keeps
            torchvision's random initialisation. See
            :func:`~deepmetric.models._resnet.load_torchvision_weights` for how 3-channel ``conv1``
            weights are adapted to ``in_channels ≠ 3`` and what ``small_input`` does to them.
        in_channels: input image channels.
        small_input: 3×3 stride-1 stem without max-pool, for 28–64 px images.

    Shape:
        input ``(B, in_channels, H, W)``, output ``(B, 2048)``.

    Example:
        >>> import torch
        >>> ResNet50(small_input=True)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 2048])
    """

    def __init__(
        self, weights_path: str | Path | None = None, in_channels: int = 3, small_input: bool = False
    ) -> None:
        super().__init__()
        check_resnet_args(in_channels, small_input, weights_path)
        self.out_features: int
        build_resnet(self, Bottleneck, (3, 4, 6, 3), in_channels, small_input)
        if weights_path is not None:
            load_torchvision_weights(self, weights_path)

    def forward(self, x: Tensor) -> Tensor:
        return resnet_features(self, x)
