"""Miners: each lives in its own module and registers itself in :data:`MINERS`."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from deepmetric.registry import MINERS

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

for _name, _obj in MINERS.items():
    if hasattr(_obj, "__name__"):
        globals()[_obj.__name__] = _obj

__all__ = sorted({getattr(o, "__name__", n) for n, o in MINERS.items()} | {"names", "build", "describe", "MINERS"})


def names() -> list[str]:
    """Registered miner names."""
    return MINERS.names()


def describe(name: str) -> str:
    """One-line description of a miner."""
    return MINERS.describe(name)


def build(name: str, /, *args: Any, **kwargs: Any) -> Any:
    """Build the miner ``name`` with validated keyword arguments."""
    return MINERS.build(name, *args, **kwargs)
