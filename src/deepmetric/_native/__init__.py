"""Optional C kernels, compiled on first use with the system C compiler and loaded with ctypes.

deepmetric stays a pure-Python install: a kernel's source ships with the package, and the first
call that wants it compiles it (``$CC`` or ``cc``, about a second) into a per-user cache,
``$DEEPMETRIC_CACHE_DIR`` or ``$XDG_CACHE_HOME/deepmetric`` or ``~/.cache/deepmetric``, under
``native/<name>-<hash>.so`` (the hash covers the source, the compiler, the flags and the
platform, so a changed source is rebuilt). The library is written to a temporary file and renamed
into place, so concurrent first calls never load a half-written file.

Where no compiler works (or ``DEEPMETRIC_NATIVE=0``), :func:`load` returns ``None`` and callers use
their pure faiss / torch path; the reason is given once per process as a ``RuntimeWarning``.
No ``-march=native``: the kernels use portable 4-wide vector types, and the few AVX2 + FMA
functions are compiled with a function-level target attribute and chosen at run time on CPUs that
have them, so one cached build runs on any CPU of the platform (a cache shared between machines
stays valid).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["load", "cache_dir", "NativeUnavailable"]

_FLAGS = ("-O3", "-std=gnu11", "-fno-math-errno", "-fPIC", "-shared")
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# every kernel's exported functions: (argument types, result type), set once when the library loads
_SIGNATURES: dict[str, dict[str, tuple[list, object]]] = {
    "knn_select": {
        "dm_scan": ([_P, _I, _I, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P], None),
        "dm_finish": ([_I, _I, _I, _I, _P, _P, _P, _P], None),
    },
    "rows_select": {
        "dm_batch_hard": ([_P, _I, _I, _I, _I, _P, _P, _I, _I, _P, _P, _P], ctypes.c_int),
        "dm_triplet_terms": ([_P, _I, _P, _P, _P, _I, _F, _I, _F, _P, _P], None),
    },
    "pair_rows": {
        "dm_normalize_rows": ([_P, _I, _I, _P, _P, _P], ctypes.c_int64),
        "dm_normalize_backward": ([_P, _P, _P, _P, _I, _I, _F], None),
        "dm_pair_finalize": ([_P, _I, _I, _P, _P, _P, _P, _I, _I], None),
        "dm_pair_list_grad": ([_P, _P, _P, _I, _P, _I, _I, _P, _F, _P, _F], ctypes.c_int),
        "dm_supcon_rows": ([_P, _I, _I, _P, _F, _P, _P, _P], None),
        "dm_ms_rows": ([_P, _I, _I, _P, _F, _F, _F, _P, _P, _P], None),
        "dm_supcon_upper": ([_P, _I, _I, _P, _P, _I, _F, _I, _P], None),
        "dm_dense_labels": ([_P, _I, _P], _I),
        "dm_first_pairs": ([_P, _I, _P], _I),
        "dm_npair_rows": ([_P, _I, _I, _F, _P], ctypes.c_double),
        "dm_npair_gather": ([_P, _P, _I, _I, _P, _P], None),
        "dm_scatter_rows": ([_P, _P, _I, _I, _P, _I], None),
        "dm_force_generic": ([_I], _I),
        "dm_ranked_list_rows": ([_P, _I, _I, _P, _F, _F, _F, _F, _P, _P, _P], None),
        "dm_contrastive_rows": ([_P, _I, _I, _P, _P, _F, _F, _I, _I, _P, _P, _P, _I, _I, _P], None),
    },
}
_SOURCES = Path(__file__).resolve().parent
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_warned: set[str] = set()


class NativeUnavailable(RuntimeError):
    """A native kernel could not be built or loaded (the message says why)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if os.environ.get("DEEPMETRIC_CACHE_DIR"):
        return Path(os.environ["DEEPMETRIC_CACHE_DIR"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepmetric" / "native"


def _compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    path = shutil.which(cc.split()[0])
    if path is None:
        raise NativeUnavailable(f"no C compiler found (looked for {cc!r} on PATH; set CC to choose one)")
    return cc


def _build(name: str) -> Path:
    source = _SOURCES / f"{name}.c"
    text = source.read_bytes()
    cc = _compiler()
    tag = hashlib.sha256(
        b"\0".join([text, cc.encode(), " ".join(_FLAGS).encode(), platform.machine().encode(), sys.platform.encode()])
    ).hexdigest()[:16]
    target_dir = cache_dir()
    try:
        target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:  # unwritable cache: a private temporary directory for this process
        target_dir = Path(tempfile.mkdtemp(prefix="deepmetric-native-"))
    target = target_dir / f"{name}-{tag}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target_dir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [*cc.split(), *_FLAGS, str(source), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise NativeUnavailable(f"{cc} failed to compile {source.name}: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"could not compile {source.name} with {cc}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``name`` (``<name>.c`` in this package, its functions typed), or
    ``None`` if unavailable.

    Builds it on the first call (cached on disk and in this process). ``DEEPMETRIC_NATIVE=0`` turns
    native kernels off. A failure is warned once per process and then remembered."""
    switch = os.environ.get("DEEPMETRIC_NATIVE")
    if switch is not None and switch.strip().lower() in ("0", "false", "no", "off"):
        return None
    lib = _loaded.get(name, _loaded)  # (a dict read is atomic: no lock once loaded, or once failed)
    if lib is not _loaded:
        return lib  # type: ignore[return-value]
    with _lock:
        if name in _loaded:
            return _loaded[name]
        try:
            lib: ctypes.CDLL | None = ctypes.CDLL(str(_build(name)))
            for func, (argtypes, restype) in _SIGNATURES.get(name, {}).items():
                getattr(lib, func).argtypes = argtypes
                getattr(lib, func).restype = restype
        except (NativeUnavailable, OSError) as exc:
            lib = None
            if name not in _warned:
                _warned.add(name)
                warnings.warn(
                    f"deepmetric: native kernel {name!r} unavailable, using the slower fallback ({exc})",
                    RuntimeWarning, stacklevel=3,
                )
        _loaded[name] = lib
        return lib
