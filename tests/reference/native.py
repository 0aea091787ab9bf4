"""Whether the native kernels (``deepmetric._native``) can be built here: tests of a kernel are
skipped, with this reason, on a machine without a C compiler (the library then uses its torch /
faiss paths, which the other tests cover)."""
from __future__ import annotations

import os
import shutil

import pytest

HAVE_CC = shutil.which((os.environ.get("CC") or "cc").split()[0]) is not None
requires_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler ($CC or cc): the native kernels cannot be built")
