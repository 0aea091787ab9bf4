"""Multi-layer perceptron backbone for feature vectors (pre-computed features, tabular data)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import MODELS

__all__ = ["MLP"]


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    return value


@MODELS.register("mlp")
class MLP(nn.Module):
    """MLP for feature vectors: [Linear → BatchNorm → ReLU → Dropout] per hidden layer.

    Each hidden layer is ``Linear`` (without bias when ``batch_norm``, which has its own shift), then
    ``BatchNorm1d`` if ``batch_norm``, ``ReLU``, and ``Dropout`` if ``dropout > 0``. With no hidden
    layers the backbone is the identity and the ``Embedder`` head is a linear projection.

    Args:
        input_dim: dimension of the input vectors.
        hidden_dims: sizes of the hidden layers; the last one is ``out_features``.
        dropout: dropout probability after each hidden layer, in ``[0, 1)``.
        batch_norm: batch normalisation after each hidden ``Linear``.

    Shape:
        input ``(B, input_dim)``, output ``(B, hidden_dims[-1])`` (``(B, input_dim)`` without hidden layers).

    Example:
        >>> import torch
        >>> MLP(input_dim=10, hidden_dims=(32, 16))(torch.zeros(4, 10)).shape
        torch.Size([4, 16])
    """

    def __init__(
        self, input_dim: int, hidden_dims: Sequence[int] = (256,), dropout: float = 0.0, batch_norm: bool = True
    ) -> None:
        super().__init__()
        self.input_dim = _positive_int(input_dim, "input_dim")
        if isinstance(hidden_dims, (str, bytes)) or not isinstance(hidden_dims, Sequence):
            raise ConfigError(f"hidden_dims must be a sequence of positive integers; got {hidden_dims!r}")
        dims = tuple(_positive_int(h, "every hidden_dims entry") for h in hidden_dims)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1); got {dropout!r}")
        if not isinstance(batch_norm, bool):
            raise ConfigError(f"batch_norm must be True or False; got {batch_norm!r}")
        layers: list[nn.Module] = []
        previous = self.input_dim
        for size in dims:
            layers.append(nn.Linear(previous, size, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(float(dropout)))
            previous = size
        self.layers = nn.Sequential(*layers)
        self.out_features = previous

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:  # images or other tensors: flattened per sample
            x = x.flatten(1)
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise DataError(f"MLP expects vectors (B, {self.input_dim}); got shape {tuple(x.shape)}")
        return self.layers(x)
