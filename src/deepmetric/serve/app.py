"""The search service: a FastAPI app over a saved index (``create_app``), with a web page at ``/``.

Endpoints (OpenAPI documentation at ``/docs`` and ``/openapi.json``):

* ``POST /search``: either ``multipart/form-data`` with an image ``file`` (plus optional form fields
  ``k`` and ``label``, the query's true label, used to mark results correct/incorrect), or
  ``application/json`` ``{"vector": [...], "k": 10, "label": 3}`` or ``{"id": 42, "k": 10}`` (search
  with a stored item's vector; the item itself is left out of its results). ``k`` is 1..``max_k``
  (100). Answers: 413 when the body exceeds ``max_upload_bytes``; 415 for another content type;
  422 for a bad vector (not a list, wrong dimension, non-numeric, NaN/inf), a bad ``k``/``label``,
  unknown or missing fields; 400 for malformed JSON/multipart or a file that is not a decodable
  image; 404 for an unknown item id; 503 for an image when no model is available.
* ``GET /items/{id}``: label, class name, metadata and thumbnail URL of a stored item (404 if absent).
* ``GET /items/{id}/thumbnail.png``: the thumbnail stored in the index at build time, as PNG (404
  if absent or the index has no thumbnails).
* ``GET /samples``: a few stored items (one per class, in turn) for the page to offer as queries.
* ``GET /health``, ``GET /info``: liveness and what the index holds.

The app serves requests concurrently; searches and image embedding run in a worker thread (faiss
and torch release the GIL). The index is read-only while served.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepmetric.errors import CheckpointError, ConfigError, DataError, DeepMetricError
from deepmetric.index import Index, SearchIndexError
from deepmetric.index.query import QueryEncoder
from deepmetric.serve.schemas import HealthOut, InfoOut, ItemOut, SearchOut

__all__ = ["create_app", "DEFAULT_MAX_UPLOAD_BYTES", "MAX_K", "STATIC_DIR"]

DEFAULT_MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_K = 100
STATIC_DIR = Path(__file__).parent / "static"
_JSON_KEYS = ("vector", "id", "k", "label")
_FORM_KEYS = ("file", "k", "label")
_log = logging.getLogger("deepmetric.serve")


class _Reject(Exception):
    """An HTTP error answer with a message (turned into ``{"detail": message}``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _Reject(400, f"bad Content-Length header {declared!r}") from None
        if size > limit:
            raise _Reject(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _Reject(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_k(value: Any, max_k: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _Reject(422, f"k must be an integer between 1 and {max_k}; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_k:
        raise _Reject(422, f"k must be an integer between 1 and {max_k}; got {value!r}")
    return value


def _parse_label(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _Reject(422, f"label must be an integer class id; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Reject(422, f"label must be an integer class id; got {value!r}")
    return value


def _parse_vector(value: Any, dim: int) -> np.ndarray:
    if not isinstance(value, list):
        raise _Reject(422, f"'vector' must be a list of {dim} numbers; got {type(value).__name__}")
    if len(value) != dim:
        raise _Reject(422, f"'vector' has {len(value)} values; this index holds vectors of dimension {dim}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Reject(422, f"'vector'[{i}] is not a number: {v!r}")
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(value, dtype=np.float64).astype(np.float32)
    except (OverflowError, ValueError):
        raise _Reject(422, "'vector' holds a number too large to represent") from None
    if not np.isfinite(array).all():
        raise _Reject(422, "'vector' holds non-finite values (NaN, Infinity or beyond float32 range)")
    return array.reshape(1, dim)


def _png(thumbnail: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray(thumbnail[0] if thumbnail.shape[0] == 1 else thumbnail.transpose(1, 2, 0))
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _Service:
    """What the routes share: the index, the query encoder and the limits."""

    def __init__(self, index: Index, encoder: QueryEncoder | None, encoder_error: str | None,
                 max_upload_bytes: int, max_k: int) -> None:
        self.index = index
        self.encoder = encoder
        self.encoder_error = encoder_error
        self.max_upload_bytes = max_upload_bytes
        self.max_k = max_k
        self.class_names: list[str] | None = index.provenance.get("class_names")
        self.thumbnail_png = lru_cache(maxsize=4096)(self._thumbnail_png)

    def label_name(self, label: int | None) -> str | None:
        if label is None or label < 0:
            return None
        if self.class_names and label < len(self.class_names):
            return str(self.class_names[label])
        return str(label)

    def thumbnail_url(self, item_id: int) -> str | None:
        return f"/items/{item_id}/thumbnail.png" if self.index.has_thumbnails else None

    def item(self, item_id: int) -> dict[str, Any]:
        try:
            item = self.index.get(item_id)
        except SearchIndexError:
            raise _Reject(404, f"no item with id {item_id}") from None
        return {"id": item.id, "label": item.label if item.label >= 0 else None,
                "label_name": self.label_name(item.label), "metadata": item.metadata,
                "thumbnail_url": self.thumbnail_url(item.id)}

    def _thumbnail_png(self, item_id: int) -> bytes:
        try:
            thumb = self.index.thumbnail(item_id)
        except SearchIndexError:
            raise _Reject(404, f"no item with id {item_id}") from None
        if thumb is None:
            raise _Reject(404, "this index stores no thumbnails (it was built from vectors or with --no-thumbnails)")
        return _png(thumb)

    def samples(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` items, one per class in turn (lowest ids first); unlabelled indexes: the first ids."""
        ids, labels = self.index.ids, self.index.labels
        order = np.argsort(ids, kind="stable")
        ids, labels = ids[order], labels[order]
        picked: list[int] = []
        classes = [c for c in np.unique(labels) if c >= 0]
        if classes:
            per_class = {c: ids[labels == c].tolist() for c in classes}
            round_ = 0
            while len(picked) < n and any(round_ < len(v) for v in per_class.values()):
                for c in classes:
                    if round_ < len(per_class[c]) and len(picked) < n:
                        picked.append(per_class[c][round_])
                round_ += 1
        else:
            picked = ids[:n].tolist()
        return [self.item(i) for i in picked]

    def search(self, query: np.ndarray, k: int, query_info: dict[str, Any], exclude: int | None) -> dict[str, Any]:
        try:
            result = self.index.search(query, k + (1 if exclude is not None else 0))
        except (SearchIndexError, ConfigError) as exc:
            raise _Reject(422, str(exc)) from None
        rows = [r for r in result.rows(0) if r["id"] != exclude][:k]
        label = query_info.get("label")
        out = []
        for rank, row in enumerate(rows, start=1):
            item_label = row["label"] if row["label"] >= 0 else None
            out.append({
                "rank": rank, "id": row["id"], "distance": row["distance"], "label": item_label,
                "label_name": self.label_name(item_label), "metadata": row["metadata"],
                "thumbnail_url": self.thumbnail_url(row["id"]),
                "correct": None if label is None or item_label is None else bool(item_label == label),
            })
        query_info["label_name"] = self.label_name(label)
        return {"query": query_info, "k": k, "metric": self.index.metric, "backend": self.index.backend_name,
                "results": out}

    def embed_image(self, data: bytes) -> np.ndarray:
        if self.encoder is None:
            raise _Reject(503, f"image search is not available: {self.encoder_error}")
        try:
            return self.encoder.encode_bytes(data)
        except DataError as exc:
            raise _Reject(400, str(exc)) from None


_SEARCH_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object",
                "properties": {
                    "vector": {"type": "array", "items": {"type": "number"},
                               "description": "a query embedding of the index's dimension"},
                    "id": {"type": "integer", "description": "search with this stored item (left out of results)"},
                    "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
                    "label": {"type": "integer", "description": "the query's true label (marks results)"},
                },
                "description": "exactly one of 'vector' and 'id'",
            }},
            "multipart/form-data": {"schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "a query image"},
                    "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
                    "label": {"type": "integer", "description": "the query's true label (marks results)"},
                },
            }},
        },
    }
}


def create_app(
    index_dir: str | Path,
    checkpoint: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    *,
    max_k: int = MAX_K,
    device: str = "cpu",
    num_threads: int | None = None,
) -> FastAPI:
    """A FastAPI app serving the index in ``index_dir`` (see the module docstring for the endpoints).

    Args:
        index_dir: a directory written by :meth:`deepmetric.index.Index.save` (verified on load).
        checkpoint: model for image queries; None = the checkpoint recorded in the index. When that one
            is missing or foreign, the app still serves vector and item searches and answers image
            searches with 503 (an explicitly given checkpoint that fails raises instead).
        max_upload_bytes: largest accepted request body (413 above).
        max_k: largest ``k`` (422 above).
        device: torch device of the model.
        num_threads: set torch's and faiss' thread counts (None = leave them).

    Raises:
        SearchIndexError: the index cannot be loaded or verified, or ``checkpoint`` is not its model.
        CheckpointError: ``checkpoint`` is unreadable.
    """
    from deepmetric import __version__

    if isinstance(max_upload_bytes, bool) or not isinstance(max_upload_bytes, int) or max_upload_bytes < 1:
        raise ConfigError(f"max_upload_bytes must be a positive integer; got {max_upload_bytes!r}")
    if num_threads is not None:
        import faiss
        import torch

        torch.set_num_threads(num_threads)
        faiss.omp_set_num_threads(num_threads)
    index = Index.load(index_dir)
    encoder: QueryEncoder | None = None
    encoder_error: str | None = None
    try:
        encoder = QueryEncoder.for_index(index, checkpoint, device=device)
    except (SearchIndexError, CheckpointError, DataError) as exc:
        if checkpoint is not None:
            raise
        encoder_error = str(exc)
        _log.warning("image search disabled: %s", exc)
    service = _Service(index, encoder, encoder_error, max_upload_bytes, max_k)

    local_docs = _swagger_assets()
    app = FastAPI(
        docs_url=None if local_docs else "/docs",
        title="deepmetric search",
        version=__version__,
        description=(f"Nearest-neighbour search over {len(index)} items ({index.metric} distance, smaller = "
                     f"closer; {index.backend_name} index). Query with an image or an embedding vector."),
    )
    app.state.service = service

    @app.exception_handler(_Reject)
    async def _on_reject(request: Request, exc: _Reject) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(DeepMetricError)
    async def _on_deepmetric_error(request: Request, exc: DeepMetricError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers.setdefault(
                "Content-Security-Policy",
                "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                "connect-src 'self'; frame-ancestors 'none'",
            )
        return response

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health", response_model=HealthOut, summary="Liveness and index size")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "items": len(index), "dim": index.dim, "metric": index.metric,
                "backend": index.backend_name, "image_search": encoder is not None}

    @app.get("/info", response_model=InfoOut, summary="What the index holds and the service's limits")
    async def info() -> dict[str, Any]:
        return {
            "items": len(index), "dim": index.dim, "metric": index.metric, "backend": index.backend_name,
            "backend_params": index.backend_params, "image_search": encoder is not None,
            "image_search_error": encoder_error, "model_fingerprint": index.provenance.get("model_fingerprint"),
            "input_shape": index.provenance.get("input_shape"), "class_names": service.class_names,
            "data": index.provenance.get("data"), "split": index.provenance.get("split"),
            "thumbnails": index.has_thumbnails, "max_k": max_k, "max_upload_bytes": max_upload_bytes,
        }

    @app.get("/samples", response_model=list[ItemOut], summary="A few stored items to use as queries")
    async def samples(n: int = 12) -> list[dict[str, Any]]:
        if not 1 <= n <= 100:
            raise _Reject(422, f"n must be between 1 and 100; got {n}")
        return service.samples(n)

    @app.get("/items/{item_id}", response_model=ItemOut, summary="A stored item")
    async def item(item_id: int) -> dict[str, Any]:
        return service.item(item_id)

    @app.get("/items/{item_id}/thumbnail.png", summary="A stored item's thumbnail (PNG)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def thumbnail(item_id: int) -> Response:
        png = await run_in_threadpool(service.thumbnail_png, item_id)
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.post("/search", response_model=SearchOut, summary="k nearest neighbours of an image or a vector",
              openapi_extra=_SEARCH_BODY_DOC)
    async def search(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        mime = content_type.split(";")[0].strip().lower()
        if mime not in ("application/json", "multipart/form-data"):
            raise _Reject(415, f"unsupported content type {mime or '(none)'!r}: send multipart/form-data with an "
                               "image 'file', or application/json with a 'vector' or an 'id'")
        body = await _read_body(request, service.max_upload_bytes)
        if mime == "application/json":
            return await _search_json(body)
        return await _search_multipart(request, body)

    async def _search_json(body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body.decode("utf-8")) if body else None
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Reject(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise _Reject(422, "the JSON body must be an object with a 'vector' (or an 'id') and optionally 'k'")
        unknown = sorted(set(payload) - set(_JSON_KEYS))
        if unknown:
            raise _Reject(422, f"unknown field(s) {unknown}; valid fields: {', '.join(_JSON_KEYS)}")
        if ("vector" in payload) == ("id" in payload):
            raise _Reject(422, "give exactly one of 'vector' (an embedding) and 'id' (a stored item)")
        k = _parse_k(payload.get("k", 10), service.max_k)
        label = _parse_label(payload.get("label"))
        if "vector" in payload:
            vector = _parse_vector(payload["vector"], index.dim)
            return await run_in_threadpool(service.search, vector, k, {"type": "vector", "label": label}, None)
        item_id = payload["id"]
        if isinstance(item_id, bool) or not isinstance(item_id, int):
            raise _Reject(422, f"'id' must be an integer; got {item_id!r}")
        try:
            stored = index.get(item_id)
        except SearchIndexError:
            raise _Reject(404, f"no item with id {item_id}") from None
        query_label = label if label is not None else (stored.label if stored.label >= 0 else None)
        info = {"type": "item", "id": stored.id, "label": query_label, "thumbnail_url": service.thumbnail_url(stored.id)}
        return await run_in_threadpool(service.search, stored.vector[None], k, info, stored.id)

    async def _search_multipart(request: Request, body: bytes) -> dict[str, Any]:
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=len(_FORM_KEYS))
        except StarletteHTTPException as exc:
            raise _Reject(400, f"malformed multipart body: {exc.detail}") from None
        except Exception as exc:  # the multipart parser's own errors
            raise _Reject(400, f"malformed multipart body: {exc}") from None
        try:
            unknown = sorted(set(form.keys()) - set(_FORM_KEYS))
            if unknown:
                raise _Reject(422, f"unknown form field(s) {unknown}; valid fields: {', '.join(_FORM_KEYS)}")
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise _Reject(422, "the multipart body needs an image file in the field 'file'")
            k = _parse_k(form.get("k", "10"), service.max_k)
            label = _parse_label(form.get("label"))
            data = await upload.read()
            filename = upload.filename
        finally:
            await form.close()
        query = await run_in_threadpool(service.embed_image, data)
        info = {"type": "image", "label": label, "filename": filename}
        return await run_in_threadpool(service.search, query, k, info, None)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if local_docs:
        # Swagger UI from the installed swagger-ui-bundle package: /docs works offline (no CDN).
        from fastapi.openapi.docs import get_swagger_ui_html

        app.mount("/_swagger", StaticFiles(directory=local_docs), name="swagger")

        @app.get("/docs", include_in_schema=False)
        async def _docs() -> Any:
            return get_swagger_ui_html(
                openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} — API",
                swagger_js_url="/_swagger/swagger-ui-bundle.js", swagger_css_url="/_swagger/swagger-ui.css",
                swagger_favicon_url="/_swagger/favicon-32x32.png",
            )
    return app


def _swagger_assets() -> str | None:
    """Folder of the swagger-ui files shipped by ``swagger-ui-bundle``, or None when it is absent."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return str(path) if (path / "swagger-ui-bundle.js").is_file() else None
