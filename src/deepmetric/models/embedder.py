"""The embedder (backbone + linear head, L2-normalised output) and model utilities.

:data:`~deepmetric.registry.MODELS` holds *backbones* (modules with an ``out_features`` attribute);
:func:`build_model` turns a registered backbone into an :class:`Embedder`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import MODELS

__all__ = ["Embedder", "build_model", "count_parameters", "model_fingerprint"]

#: ``build_model`` arguments that do not change the architecture (left out of the fingerprint).
NON_ARCHITECTURE_KEYS = frozenset({"weights_path"})


class Embedder(nn.Module):
    """Backbone → Linear head → optional L2 normalisation: images or vectors → ``(B, dim)`` embeddings.

    Args:
        backbone: module mapping inputs to ``(B, backbone.out_features)`` features; it must expose an
            integer ``out_features``.
        dim: embedding dimension (the head is ``Linear(backbone.out_features, dim)``).
        normalize: L2-normalise the embeddings (unit norm; euclidean and cosine distances then rank
            neighbours identically).

    Attributes:
        backbone, head: the two sub-modules.
        embedding_dim, normalize: as given.
        config: ``{"name", "embedding_dim", "normalize", **backbone_kwargs}`` when built by
            :func:`build_model` (``build_model(**config)`` rebuilds the architecture), else None.

    Shape:
        input: whatever the backbone takes; output ``(B, dim)``.

    Example:
        >>> import torch
        >>> from deepmetric.models.mlp import MLP
        >>> model = Embedder(MLP(input_dim=8, hidden_dims=(16,)), dim=4)
        >>> out = model(torch.randn(3, 8))
        >>> out.shape, bool(torch.allclose(out.norm(dim=1), torch.ones(3)))
        (torch.Size([3, 4]), True)
    """

    def __init__(self, backbone: nn.Module, dim: int, normalize: bool = True) -> None:
        super().__init__()
        out_features = getattr(backbone, "out_features", None)
        if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
            raise ConfigError(
                f"the backbone {type(backbone).__name__} must expose a positive integer out_features; "
                f"got {out_features!r}"
            )
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"embedding dimension must be a positive integer; got {dim!r}")
        if not isinstance(normalize, bool):
            raise ConfigError(f"normalize must be True or False; got {normalize!r}")
        self.backbone = backbone
        self.head = nn.Linear(out_features, dim)
        self.embedding_dim = dim
        self.normalize = normalize
        self.config: dict[str, Any] | None = None

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        if features.dim() != 2 or features.shape[1] != self.head.in_features:
            raise DataError(
                f"backbone {type(self.backbone).__name__} returned shape {tuple(features.shape)}; "
                f"expected (B, {self.head.in_features})"
            )
        embeddings = self.head(features)
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, normalize={self.normalize}"


def build_model(
    name: str, embedding_dim: int = 64, *, normalize: bool = True, **backbone_kwargs: Any
) -> Embedder:
    """Build the registered backbone ``name`` with ``backbone_kwargs`` and put an :class:`Embedder` on it.

    Args:
        name: registered backbone (``deepmetric.models.names()``: e.g. ``small_cnn``, ``resnet18``,
            ``resnet50``, ``mlp``).
        embedding_dim: output dimension.
        normalize: L2-normalise the embeddings.
        **backbone_kwargs: the backbone's constructor arguments, validated before anything is built.

    Raises:
        ConfigError: unknown name or unknown/bad argument (the message names the valid ones).

    Example:
        >>> import torch
        >>> model = build_model("mlp", 16, input_dim=10)
        >>> model(torch.randn(4, 10)).shape, model.config
        (torch.Size([4, 16]), {'name': 'mlp', 'embedding_dim': 16, 'normalize': True, 'input_dim': 10})
    """
    backbone = MODELS.build(name, **backbone_kwargs)
    model = Embedder(backbone, embedding_dim, normalize)
    model.config = {"name": name, "embedding_dim": embedding_dim, "normalize": normalize, **backbone_kwargs}
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_fingerprint(model: nn.Module, *, include_weights: bool = False) -> str:
    """Hex SHA-256 identifying ``model``'s architecture, stable across processes and machines.

    Hashed: the module's class name; its ``config`` (as set by :func:`build_model`) without
    ``weights_path``; for an :class:`Embedder` the backbone class, ``embedding_dim`` and
    ``normalize``; and the name and shape of every ``state_dict`` entry (parameters and buffers),
    in order. Two models built from the same config share a fingerprint whatever their weights;
    pass ``include_weights=True`` to also hash every tensor's dtype and bytes, which identifies one
    trained model (sensitive to any weight update, and slower).
    """
    description: dict[str, Any] = {"class": type(model).__qualname__}
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        description["config"] = {k: v for k, v in config.items() if k not in NON_ARCHITECTURE_KEYS}
    if isinstance(model, Embedder):
        description["backbone"] = type(model.backbone).__qualname__
        description["embedding_dim"] = model.embedding_dim
        description["normalize"] = model.normalize
    state = model.state_dict()
    description["state"] = [[name, list(tensor.shape)] for name, tensor in state.items()]
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    if include_weights:
        for name, tensor in state.items():
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{data.dtype}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
