"""Reading and writing IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

Layout: two zero bytes, one type byte (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
``0x0D`` float32, ``0x0E`` float64), one byte with the number of dimensions, then each dimension as a
big-endian uint32, then the values in row-major, big-endian order. The magic number of a uint8
image file is therefore ``0x00000803`` and that of a label file ``0x00000801``.
"""
from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

from deepmetric.errors import DataError

__all__ = ["read_idx", "write_idx", "IDX_DTYPES"]

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("=") if dt.itemsize > 1 else dt: code for code, dt in IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {str(path)!r}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"corrupt IDX file {str(path)!r}: the gzip stream cannot be decompressed ({exc}); "
                "delete the file and fetch it again"
            ) from exc
    return raw


def read_idx(path: str | os.PathLike[str], *, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or uncompressed, detected from its first bytes).

    Args:
        path: the file.
        expected_ndim: if given, the number of dimensions the file must declare (3 for images,
            1 for labels), i.e. the magic number must be ``0x000008{expected_ndim:02x}`` for uint8 data.

    Returns:
        The array in native byte order.

    Raises:
        DataError: unreadable file, bad magic number, wrong number of dimensions, or a data size
            that does not match the header (truncated or trailing bytes). The message names the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    name = str(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        magic = int.from_bytes(raw[:4].ljust(4, b"\0"), "big")
        raise DataError(
            f"corrupt IDX file {name!r}: bad magic number 0x{magic:08x} (expected 0x0000TTNN with a type "
            f"byte TT in {sorted(hex(c) for c in IDX_DTYPES)}); delete the file and fetch it again"
        )
    dtype = IDX_DTYPES[raw[2]]
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(
            f"corrupt IDX file {name!r}: magic number 0x{int.from_bytes(raw[:4], 'big'):08x} declares {ndim} "
            f"dimension(s), expected {expected_ndim}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"corrupt IDX file {name!r}: truncated header ({len(raw)} bytes, need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise DataError(
            f"corrupt IDX file {name!r}: header declares shape {shape} ({expected} data bytes) but the file "
            f"holds {actual} data bytes ({'truncated' if actual < expected else 'trailing data'}); "
            "delete the file and fetch it again"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file, atomically (temporary file in the same folder, then rename).

    Args:
        path: destination; gzip-compressed when ``compress`` is True, or when it is None and the
            name ends in ``.gz``.
        array: uint8, int8, int16, int32, float32 or float64 array with at most 255 dimensions.
    """
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=") if array.dtype.itemsize > 1 else array.dtype
    if native not in _CODES:
        raise DataError(f"IDX cannot store dtype {array.dtype}; use one of {sorted(str(d) for d in _CODES)}")
    code = _CODES[native]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress if compress is not None else path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
