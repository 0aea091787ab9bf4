"""The exception raised by :mod:`deepmetric.index`."""
from __future__ import annotations

from deepmetric.errors import DataError

__all__ = ["SearchIndexError"]


class SearchIndexError(DataError):
    """A bad operation on an index or a saved index that cannot be trusted.

    Raised for duplicate or unknown ids, vectors of the wrong dimension or with NaN/inf, and for a saved
    index directory that is missing, incomplete, tampered with (a checksum mismatch names the file),
    written by a newer deepmetric, or built with another model than the one expected (the message
    names both fingerprints). It is a :class:`~deepmetric.errors.DataError`, so the command line exits
    with code 1.
    """
