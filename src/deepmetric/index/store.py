"""The on-disk format of an index: one directory, verified when read, replaced atomically when written.

A saved index is a directory holding

* ``index.faiss``: the faiss index (``faiss.serialize_index``; empty for an untrained empty IVF index);
* ``items.npz``: ``ids`` (int64), ``labels`` (int64, -1 = none), ``vectors`` (float32, as stored:
  L2-normalised for cosine) and back-end state (HNSW ``tombstones``);
* ``metadata.json``: ``{"<id>": {...}}`` for the items that have metadata;
* ``thumbnails.npz`` (only when thumbnails were added): ``thumbnails`` uint8 ``(N, C, H, W)`` aligned
  with ``ids``;
* ``manifest.json``, written last: ``format`` (``"deepmetric-index"``), ``version``, dimension, metric,
  back-end and its parameters, counts, ``model_fingerprint`` and ``checkpoint`` (when built from a
  checkpoint), ``provenance`` (input shape, normalisation, class names, data) and the SHA-256 and size
  of every other file.

Writing (:func:`save_index`) fills a temporary sibling directory ``.<name>.new-*``, then swaps it in:
the previous directory is renamed aside to ``.<name>.old-*``, the new one renamed into place, and the
old one deleted. An exception or a kill while the files are written leaves the previous index
untouched (and the temporary directory is removed on exceptions). A kill in the instant between the
two renames leaves the previous index in ``.<name>.old-*``; :func:`load_index` names it in its error.

Reading (:func:`load_index`) hashes every file listed in the manifest and parses the bytes it hashed;
a mismatch names the file. Arrays are read with ``allow_pickle=False``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.index.core import BACKENDS, METRICS, Index
from deepmetric.index.errors import SearchIndexError
from deepmetric.io import atomic_write_bytes, atomic_write_text

__all__ = ["FORMAT", "VERSION", "MANIFEST", "save_index", "load_index", "read_manifest", "is_index_dir"]

FORMAT = "deepmetric-index"
VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FILES = ("index.faiss", "items.npz", "metadata.json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_index_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory with a ``manifest.json`` tagged ``deepmetric-index``."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_files(index: Index, folder: Path) -> dict[str, Any]:
    from deepmetric import __version__

    faiss_bytes, state, ntotal = index._backend_state()
    files: dict[str, bytes] = {
        "index.faiss": faiss_bytes,
        "items.npz": _npz_bytes(ids=index._ids, labels=index._labels, vectors=index._vectors, **state),
        "metadata.json": json.dumps(
            {str(int(i)): m for i, m in zip(index._ids, index._metadata) if m is not None},
            allow_nan=False, separators=(",", ":"),
        ).encode("utf-8"),
    }
    if index._thumbnails is not None:
        files["thumbnails.npz"] = _npz_bytes(thumbnails=index._thumbnails)
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    labels = index._labels[index._labels >= 0]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "deepmetric_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dim": index.dim,
        "metric": index.metric,
        "backend": index.backend_name,
        "backend_params": index.backend_params,
        "counts": {"items": len(index), "faiss_vectors": ntotal, "labelled": int(len(labels)),
                   "classes": int(len(np.unique(labels))),
                   "with_metadata": sum(m is not None for m in index._metadata)},
        "model_fingerprint": index.provenance.get("model_fingerprint"),
        "checkpoint": index.provenance.get("checkpoint"),
        "provenance": index.provenance,
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest


def save_index(index: Index, directory: str | Path) -> Path:
    """Write ``index`` to ``directory``, replacing a previous index there atomically.

    Raises:
        SearchIndexError: ``directory`` is a file, or a non-empty directory that is not an index
            (it is never replaced, to protect unrelated data).
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise SearchIndexError(f"cannot save an index to {str(target)!r}: it is a file")
    if target.is_dir() and any(target.iterdir()) and not is_index_dir(target):
        raise SearchIndexError(f"refusing to replace {str(target)!r}: it is a non-empty directory that is not a "
                               "deepmetric index; choose another output directory")
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; give it a normal directory's mode
        _write_files(index, staging)
        _fsync_dir(staging)
        _swap(staging, target.absolute())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap(staging: Path, target: Path) -> None:
    """Put ``staging`` in ``target``'s place: old aside, new in, old deleted."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of an index directory, with its format checked (files not verified).

    Raises:
        SearchIndexError: no directory, no manifest, not JSON, another format or a newer version.
    """
    folder = Path(directory)
    if not folder.is_dir():
        leftovers = sorted(folder.absolute().parent.glob(f".{folder.name}.old-*")) if folder.name else []
        hint = (f"; an interrupted save left the previous index in {str(leftovers[-1])!r}: rename it to "
                f"{str(folder)!r} to use it" if leftovers else "")
        raise SearchIndexError(f"no index directory at {str(folder)!r}{hint}")
    path = folder / MANIFEST
    if not path.is_file():
        raise SearchIndexError(f"{str(folder)!r} is not a deepmetric index: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SearchIndexError(f"{str(path)!r} is not readable JSON (corrupt?): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SearchIndexError(f"{str(path)!r} is not a deepmetric index manifest (no 'format: {FORMAT}' tag)")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise SearchIndexError(f"{str(folder)!r} was written by a newer deepmetric (index format version "
                               f"{version}; this one reads up to {VERSION})")
    for key in ("dim", "metric", "backend", "backend_params", "files"):
        if key not in manifest:
            raise SearchIndexError(f"{str(path)!r} lacks the entry {key!r}")
    return manifest


def _verified_files(folder: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    listed = manifest["files"]
    if not isinstance(listed, dict):
        raise SearchIndexError(f"{str(folder / MANIFEST)!r}: 'files' must map file names to checksums")
    missing = [name for name in REQUIRED_FILES if name not in listed]
    if missing:
        raise SearchIndexError(f"{str(folder / MANIFEST)!r} does not list {', '.join(missing)}")
    data: dict[str, bytes] = {}
    for name, entry in listed.items():
        if not isinstance(name, str) or name != Path(name).name or name in ("", ".", "..", MANIFEST):
            raise SearchIndexError(f"{str(folder / MANIFEST)!r} lists an invalid file name {name!r}")
        path = folder / name
        if not path.is_file():
            raise SearchIndexError(f"index file {str(path)!r} is missing")
        content = path.read_bytes()
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        actual = _sha256(content)
        if actual != expected:
            raise SearchIndexError(
                f"checksum mismatch for {str(path)!r}: the file was modified or corrupted after the index was "
                f"written (sha256 {actual[:16]}…, manifest says {str(expected)[:16]}…). Rebuild the index."
            )
        data[name] = content
    return data


def load_index(directory: str | Path, expected_fingerprint: str | None = None) -> Index:
    """Read and verify an index directory written by :func:`save_index`.

    Args:
        directory: the index directory.
        expected_fingerprint: the :func:`~deepmetric.models.model_fingerprint` of the model whose
            embeddings will query this index; None = not checked.

    Raises:
        SearchIndexError: missing or foreign directory, newer format, a missing file, a checksum
            mismatch (naming the file), inconsistent contents, or a model fingerprint different from
            ``expected_fingerprint`` (naming both).
    """
    folder = Path(directory)
    manifest = read_manifest(folder)
    recorded = manifest.get("model_fingerprint")
    if expected_fingerprint is not None and recorded != expected_fingerprint:
        raise SearchIndexError(
            f"index {str(folder)!r} was built with another model: its embeddings come from a model with "
            f"fingerprint {recorded or '(none recorded)'}, but the model given has fingerprint "
            f"{expected_fingerprint}. Rebuild the index with this model (deepmetric index build)."
        )
    files = _verified_files(folder, manifest)
    dim, metric, backend = manifest["dim"], manifest["metric"], manifest["backend"]
    if metric not in METRICS or backend not in BACKENDS or not isinstance(dim, int) or dim < 1:
        raise SearchIndexError(f"{str(folder / MANIFEST)!r}: bad dim/metric/backend {dim!r}/{metric!r}/{backend!r}")
    try:
        with np.load(io.BytesIO(files["items.npz"]), allow_pickle=False) as items:
            ids, labels, vectors = items["ids"], items["labels"], items["vectors"]
            state = {k: items[k] for k in items.files if k not in ("ids", "labels", "vectors")}
        thumbnails = None
        if "thumbnails.npz" in files:
            with np.load(io.BytesIO(files["thumbnails.npz"]), allow_pickle=False) as thumbs:
                thumbnails = thumbs["thumbnails"]
        metadata_map = json.loads(files["metadata.json"].decode("utf-8"))
    except (OSError, ValueError, KeyError) as exc:
        raise SearchIndexError(f"index {str(folder)!r} has unreadable item files: {exc}") from exc
    n = len(ids)
    if (ids.ndim != 1 or labels.shape != (n,) or vectors.shape != (n, dim) or ids.dtype.kind != "i"
            or len(np.unique(ids)) != n or (thumbnails is not None and len(thumbnails) != n)
            or not isinstance(metadata_map, dict)):
        raise SearchIndexError(f"index {str(folder)!r} is inconsistent: {n} ids, labels {labels.shape}, vectors "
                               f"{vectors.shape} (dim {dim}), thumbnails "
                               f"{None if thumbnails is None else thumbnails.shape}")
    metadata = [metadata_map.get(str(int(i))) for i in ids]
    try:
        index = Index._restore(
            dim=dim, metric=metric, backend=backend, backend_params=dict(manifest["backend_params"]),
            faiss_bytes=files["index.faiss"], state=state, vectors=vectors, ids=ids, labels=labels,
            metadata=metadata, thumbnails=thumbnails, provenance=dict(manifest.get("provenance") or {}),
        )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise SearchIndexError(f"index {str(folder)!r}: cannot restore the faiss index: {exc}") from exc
    _, _, ntotal = index._backend_state()
    tombstones = len(state.get("tombstones", ()))
    if ntotal != n + tombstones:
        raise SearchIndexError(f"index {str(folder)!r} is inconsistent: the faiss index holds {ntotal} vectors, "
                               f"items.npz {n} (+{tombstones} removed)")
    return index
