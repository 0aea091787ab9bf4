"""The search service: ``create_app(index_dir)`` → a FastAPI app with a web page, and ``deepmetric serve``.

Example (a server on the loopback interface)::

    from deepmetric.serve import create_app
    import uvicorn
    uvicorn.run(create_app("runs/fmnist-index"), host="127.0.0.1", port=8080)

FastAPI is imported on first use of :func:`create_app` (so ``deepmetric --help`` does not need it).
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app", "DEFAULT_MAX_UPLOAD_BYTES", "MAX_K", "STATIC_DIR"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from deepmetric.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
