"""Models: each lives in its own module and registers itself in :data:`MODELS`."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from deepmetric.registry import MODELS

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from deepmetric.models.embedder import Embedder, build_model, count_parameters, model_fingerprint  # noqa: E402

for _name, _obj in MODELS.items():
    if hasattr(_obj, "__name__"):
        globals()[_obj.__name__] = _obj

__all__ = sorted({getattr(o, "__name__", n) for n, o in MODELS.items()} | {"names", "build", "describe", "MODELS"}
                 | {"Embedder", "build_model", "count_parameters", "model_fingerprint"})


def names() -> list[str]:
    """Registered model names."""
    return MODELS.names()


def describe(name: str) -> str:
    """One-line description of a model."""
    return MODELS.describe(name)


def build(name: str, /, *args: Any, **kwargs: Any) -> Any:
    """Build the model ``name`` with validated keyword arguments."""
    return MODELS.build(name, *args, **kwargs)
