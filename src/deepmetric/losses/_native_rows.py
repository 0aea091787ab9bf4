"""Native kernels of pair-matrix losses of a batch against itself (CPU, float32).

``deepmetric/_native/pair_rows.c`` holds one C function per loss that reads the batch's ``(B, B)``
matrix from one torch GEMM row by row — a few passes over a row that stays in the L1 cache instead
of a dozen torch operations over the whole matrix — adds the loss up and writes its gradient:

* contrastive: ``X Xᵀ``'s upper triangle (the lower-left quarter is never computed); the few pairs
  with a gradient are also listed, and the backward works from that list when it is short;
* SupCon (``τ >= 1/40``): the upper triangle of ``S = X̂ X̂ᵀ`` (:func:`upper_gram`) in, ``exp(S/τ)``
  once per unordered pair (8-lane AVX2 + FMA where the CPU has them, a portable path elsewhere),
  the symmetric gradient of both sides out, so the backward is one GEMM instead of two;
* multi-similarity: ``exp(βS)`` (torch's vectorised ``exp``) in, the symmetric gradient out;
* ranked list (and SupCon at smaller ``τ``): the rows' gradients up to per-row factors, which
  :func:`finalize` turns into ``g + gᵀ`` in place (one GEMM in the backward too).

SupCon and multi-similarity run through :class:`~deepmetric.losses._fused.NativeGramLoss`; the
fused similarity losses' row normalisation runs in the same library (:mod:`deepmetric.losses._fused`). Used only where it applies: CPU float32, the batch against itself
with label-defined pairs, at most :data:`MAX_ELEMS` matrix entries (one ``(B, B)`` float32 buffer,
64 MiB), and the kernels built (:func:`deepmetric._native.load`; ``DEEPMETRIC_NATIVE=0`` turns them
off). Elsewhere the losses use their blocked torch paths, which the tests compare against.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from deepmetric._native import load
from deepmetric._native.labels import dense_label_ids

__all__ = ["MAX_ELEMS", "native_lib", "pair_rows_lib", "int32_labels", "upper_gram", "finalize", "ptr"]

#: Largest ``B·B`` on the native path (a ``(B, B)`` float32 matrix of 64 MiB, B = 4096).
MAX_ELEMS = 1 << 24


def native_lib(x: Tensor) -> ctypes.CDLL | None:
    """The ``pair_rows`` kernel library for a CPU float32 ``(B, D)`` tensor, else ``None``."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        return None
    return load("pair_rows")


def pair_rows_lib(x: Tensor) -> ctypes.CDLL | None:
    """:func:`native_lib` for a batch whose ``(B, B)`` matrix fits the native path (``B² <= MAX_ELEMS``)."""
    return native_lib(x) if x.dim() == 2 and x.shape[0] ** 2 <= MAX_ELEMS else None


def int32_labels(labels: Tensor) -> Tensor:
    """Contiguous int32 class ids with ``ids[i] == ids[j]`` iff ``labels[i] == labels[j]``: int32 labels
    as they are (the kernels only compare labels), others made dense (:func:`dense_label_ids`)."""
    return labels.contiguous() if labels.dtype == torch.int32 else dense_label_ids(labels)[0]


def upper_gram(x: Tensor) -> Tensor:
    """``X Xᵀ`` of a contiguous ``(B, D)`` matrix where the kernels read it, on and above the diagonal:
    two GEMMs (the top half of the rows, the bottom-right quarter) skip the lower-left quarter, which
    is left uninitialised."""
    batch, half = x.shape[0], x.shape[0] // 2
    gram = x.new_empty(batch, batch)
    torch.mm(x[:half], x.T, out=gram[:half])
    torch.mm(x[half:], x[half:].T, out=gram[half:, half:])
    return gram


def ptr(t: Tensor | None) -> int | None:
    """A contiguous tensor's data pointer for the kernels (``None``: a NULL pointer)."""
    return None if t is None else t.data_ptr()


def finalize(
    lib: ctypes.CDLL, m: Tensor, lab: Tensor, fp: Tensor | None, fn: Tensor | None, cpos: Tensor | None,
    upper: bool = False, diag_rows: bool = False,
) -> Tensor:
    """``m ← g + gᵀ`` in place with ``g_ij = m_ij·f_i + [lab_i = lab_j]·cpos_i`` (``f_i`` = ``fp[i]`` on
    same-label columns, ``fn[i]`` on the others; ``None``: 1 and 0), diagonal 0 (``dm_pair_finalize``).
    ``upper``: ``m`` holds one value per unordered pair on its upper triangle (``g_ji`` is taken
    equal to ``g_ij``'s value there). ``diag_rows``: diagonal ``−Σ_{j≠i} m_ij`` instead of 0.
    Returns ``m``."""
    assert m.is_contiguous() and m.shape[0] == m.shape[1]
    lib.dm_pair_finalize(m.data_ptr(), m.shape[0], m.stride(0), lab.data_ptr(), ptr(fp), ptr(fn), ptr(cpos),
                         int(upper), int(diag_rows))
    return m
