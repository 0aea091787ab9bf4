"""deepmetric: deep metric learning on PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

from deepmetric import distances, errors, registry  # noqa: E402

__all__ = ["distances", "errors", "registry", "__version__"]
