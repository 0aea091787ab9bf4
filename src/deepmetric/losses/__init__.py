"""Loss functions. Each loss lives in its own module and registers itself in :data:`LOSSES`.

Every loss is an ``nn.Module`` called as ``loss(embeddings, labels)`` (plus ``indices=`` for mined
tuples where it applies) returning a scalar tensor. Use :func:`names` to list them and :func:`build`
to construct one from a name and keyword arguments.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from deepmetric.registry import LOSSES

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

for _name, _obj in LOSSES.items():
    globals()[_obj.__name__] = _obj

__all__ = sorted({obj.__name__ for _, obj in LOSSES.items()} | {"names", "build", "describe", "LOSSES"})


def names() -> list[str]:
    """Registered loss names."""
    return LOSSES.names()


def describe(name: str) -> str:
    """One-line description of a loss."""
    return LOSSES.describe(name)


def build(name: str, /, **kwargs: Any) -> Any:
    """Build the loss ``name`` with validated keyword arguments."""
    return LOSSES.build(name, **kwargs)
