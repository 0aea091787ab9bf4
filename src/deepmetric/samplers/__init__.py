"""Samplers: each lives in its own module and registers itself in :data:`SAMPLERS`."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from deepmetric.registry import SAMPLERS

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

for _name, _obj in SAMPLERS.items():
    if hasattr(_obj, "__name__"):
        globals()[_obj.__name__] = _obj

__all__ = sorted({getattr(o, "__name__", n) for n, o in SAMPLERS.items()} | {"names", "build", "describe", "SAMPLERS"})


def names() -> list[str]:
    """Registered sampler names."""
    return SAMPLERS.names()


def describe(name: str) -> str:
    """One-line description of a sampler."""
    return SAMPLERS.describe(name)


def build(name: str, /, *args: Any, **kwargs: Any) -> Any:
    """Build the sampler ``name`` with validated keyword arguments."""
    return SAMPLERS.build(name, *args, **kwargs)
