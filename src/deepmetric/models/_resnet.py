"""ResNet building blocks with torchvision's exact module and parameter names, and its weight loading.

Shared by :mod:`deepmetric.models.resnet18` and :mod:`deepmetric.models.resnet50`. The layout follows
``torchvision.models.resnet`` (v1.5: the stride of a Bottleneck is in its 3×3 convolution), so a
state dict saved by torchvision loads key for key; only ``fc`` is absent.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Union

import torch
from torch import Tensor, nn

from deepmetric.errors import CheckpointError, ConfigError, DataError

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "build_resnet",
    "resnet_features",
    "load_torchvision_weights",
    "check_resnet_args",
]

_MAX_NAMED = 5


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (ResNet-18/34)."""

    expansion: ClassVar[int] = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided) → 1×1 convolutions with a residual connection (ResNet-50/101/152, v1.5)."""

    expansion: ClassVar[int] = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[type[BasicBlock], type[Bottleneck]]


def check_resnet_args(in_channels: int, small_input: bool, weights_path: str | Path | None) -> None:
    """ConfigError for a bad ``in_channels``/``small_input``/``weights_path`` value."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer; got {in_channels!r}")
    if not isinstance(small_input, bool):
        raise ConfigError(f"small_input must be True or False; got {small_input!r}")
    if weights_path is not None and not isinstance(weights_path, (str, Path)):
        raise ConfigError(f"weights_path must be a file path or None; got {weights_path!r}")


def _make_layer(inplanes: int, block: Block, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            _conv1x1(inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
        )
    layers: list[nn.Module] = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    layers.extend(block(inplanes, planes) for _ in range(1, blocks))
    return nn.Sequential(*layers), inplanes


def build_resnet(
    module: nn.Module, block: Block, layers: tuple[int, int, int, int], in_channels: int, small_input: bool
) -> None:
    """Create torchvision's ResNet sub-modules on ``module`` (without ``fc``), initialised like torchvision.

    Attributes set, in torchvision's order: ``conv1, bn1, relu, maxpool, layer1..layer4, avgpool``, plus
    ``out_features = 512 * block.expansion``. ``small_input`` replaces the 7×7 stride-2 stem and its
    max-pool by a 3×3 stride-1 convolution and an identity, for 28–64 px images.
    """
    if small_input:
        module.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        module.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    module.bn1 = nn.BatchNorm2d(64)
    module.relu = nn.ReLU(inplace=True)
    module.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    inplanes = 64
    for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        layer, inplanes = _make_layer(inplanes, block, planes, blocks, stride=1 if index == 1 else 2)
        setattr(module, f"layer{index}", layer)
    module.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    module.out_features = 512 * block.expansion
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(sub, nn.BatchNorm2d):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def resnet_features(module: nn.Module, x: Tensor) -> Tensor:
    """``(B, C, H, W)`` images → ``(B, out_features)`` globally average-pooled features."""
    expected = module.conv1.in_channels
    if x.dim() != 4 or x.shape[1] != expected:
        raise DataError(
            f"{type(module).__name__} expects images (B, {expected}, H, W); got shape {tuple(x.shape)}"
        )
    x = module.maxpool(module.relu(module.bn1(module.conv1(x))))
    x = module.layer4(module.layer3(module.layer2(module.layer1(x))))
    return torch.flatten(module.avgpool(x), 1)


def _named(items: list[str]) -> str:
    more = f" and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED else ""
    return ", ".join(items[:_MAX_NAMED]) + more


def load_torchvision_weights(module: nn.Module, weights_path: str | Path) -> None:
    """Load a torchvision-format ResNet state dict from a local file into ``module``.

    ``fc.*`` keys are ignored; ``num_batches_tracked`` buffers may be absent (old torchvision files).
    When the file's ``conv1.weight`` has 3 input channels and ``module`` has ``in_channels = k ≠ 3``,
    each of the ``k`` input filters becomes the sum of the three RGB filters divided by ``k`` (their
    mean repeated ``k`` times and scaled by ``3 / k``): an input whose ``k`` channels all equal a grey
    image then gives the same response as that grey image replicated to RGB in the original network.
    With ``small_input=True`` a 7×7 ``conv1.weight`` cannot fit the 3×3 stem: it is skipped with a
    warning and the stem keeps its random initialisation.

    Raises:
        DataError: the file does not exist.
        CheckpointError: the file is not a readable state dict, or has missing or unexpected keys or
            shape mismatches (a few of each are named).
    """
    path = Path(weights_path)
    if not path.is_file():
        raise DataError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"cannot read weights file {str(path)!r}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"weights file {str(path)!r} is not a torchvision-format state dict (a mapping of names to tensors)"
        )
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = module.state_dict()
    skipped: set[str] = set()

    weight = state.get("conv1.weight")
    target = own["conv1.weight"]
    if weight is not None and weight.dim() == 4 and weight.shape != target.shape:
        if weight.shape[2:] != target.shape[2:] and weight.shape[2:] == (7, 7) and target.shape[2:] == (3, 3):
            warnings.warn(
                f"{path.name}: 7×7 conv1.weight skipped because small_input=True uses a 3×3 stem; "
                "the stem stays randomly initialised",
                stacklevel=3,
            )
            del state["conv1.weight"]
            skipped.add("conv1.weight")
        elif weight.shape[1] == 3 and weight.shape[0] == target.shape[0] and weight.shape[2:] == target.shape[2:]:
            channels = target.shape[1]
            state["conv1.weight"] = (weight.sum(1, keepdim=True) / channels).repeat(1, channels, 1, 1)

    missing = [k for k in own if k not in state and k not in skipped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_named(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_named(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (file vs model): {_named(mismatched)}")
    if problems:
        raise CheckpointError(
            f"weights file {str(path)!r} does not fit {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=False)
