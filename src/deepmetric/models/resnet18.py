"""ResNet-18 backbone with torchvision's module names (no ``fc``): 512-d pooled features."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from deepmetric.models._resnet import (
    BasicBlock,
    build_resnet,
    check_resnet_args,
    load_torchvision_weights,
    resnet_features,
)
from deepmetric.registry import MODELS

__all__ = ["ResNet18"]


@MODELS.register("resnet18")
class ResNet18(nn.Module):
    """ResNet-18 backbone (torchvision layout, ``fc`` removed): images → 512-d features.

    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. Module and parameter names
    match ``torchvision.models.resnet18`` (``conv1``, ``bn1``, ``layer1``–``layer4`` of ``BasicBlock``
    with ``conv1/bn1/conv2/bn2`` and ``downsample.0/1``), so its state dicts load key for key
    (120 entries including ``num_batches_tracked``; 11,176,512 parameters).

    Args:
        weights_path: local torchvision-format state dict to load (``fc.*`` ignored); None keeps
            torchvision's random initialisation. See
            :func:`~deepmetric.models._resnet.load_torchvision_weights` for how 3-channel ``conv1``
            weights are adapted to ``in_channels ≠ 3`` and what ``small_input`` does to them.
        in_channels: input image channels.
        small_input: 3×3 stride-1 stem without max-pool, for 28–64 px images.

    Shape:
        input ``(B, in_channels, H, W)``, output ``(B, 512)``.

    Example:
        >>> import torch
        >>> ResNet18(small_input=True)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 512])
    """

    def __init__(
        self, weights_path: str | Path | None = None, in_channels: int = 3, small_input: bool = False
    ) -> None:
        super().__init__()
        check_resnet_args(in_channels, small_input, weights_path)
        self.out_features: int
        build_resnet(self, BasicBlock, (2, 2, 2, 2), in_channels, small_input)
        if weights_path is not None:
            load_torchvision_weights(self, weights_path)

    def forward(self, x: Tensor) -> Tensor:
        return resnet_features(self, x)
