"""Anchor-block distance kernels shared by the miners and the triplet-family losses.

Everything here walks the ``(B, R)`` distance matrix in blocks of anchor rows (about
:data:`BLOCK_ELEMENTS` cells per block, so one block stays in the CPU cache) and never holds the
whole matrix, let alone anything of size ``B·R·R``:

* :class:`Operands` computes one block of distances with exactly the formulas of
  :mod:`deepmetric.distances` (``|x|² + |y|² − 2x·y`` clamped, its square root, or ``1 − cos``).
* :func:`block_loss` evaluates a loss ``S = Σ_blocks kernel(D_block)`` whose kernel returns the
  block's value and ``∂S/∂D_block``; the gradient w.r.t. the embeddings is formed block by block
  with two matmuls (``∂S/∂x = rowsum(V)·x − V·y`` and the transposed term) during the forward
  pass, so the backward pass is one multiplication. Memory: O(block·R + (B + R)·D).
* :class:`LabelGroups` reads each anchor's same-label references from the sorted labels (no
  ``(B, R)`` label comparison); :class:`Outputs` writes mined indices block by block; :class:`Scratch`
  keeps work buffers; :class:`MinedTuples` / :class:`MiningNote` let a loss recompute mined indices.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric._native.labels import dense_label_ids

__all__ = [
    "BLOCK_ELEMENTS",
    "FAST_DISTANCES",
    "Operands",
    "block_rows",
    "block_loss",
    "supported",
    "Scratch",
    "dense_labels",
    "LabelGroups",
    "Outputs",
    "cat_indices",
    "MinedTuples",
    "MiningNote",
    "tensor_key",
    "big",
]

#: Cells of one ``(rows, R)`` block on the CPU (1 MiB in float32: stays in the L2/L3 cache).
BLOCK_ELEMENTS = 1 << 18
#: On accelerators one large block is cheaper than many small kernels.
_DEVICE_BLOCK_ELEMENTS = 1 << 26
FAST_DISTANCES = ("euclidean", "squared_euclidean", "cosine")
_EPS = 1e-12  # same clamp as deepmetric.distances

# kernel(d_block, start, end, want_grad) -> (value (0-d float64), count (0-d long), dS/dD block or None,
#                                            dS/d(aux rows) or None)
Kernel = Callable[[Tensor, int, int, bool], "tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]"]


def big(dtype: torch.dtype) -> float:
    """A finite value larger than any distance: added to the cells a selection must ignore."""
    return torch.finfo(dtype).max


def supported(x: Tensor, y: Tensor | None, distance: str) -> bool:
    """Whether the block kernels handle these operands (float32/float64 matrices, a built-in distance)."""
    if distance not in FAST_DISTANCES or x.dim() != 2 or x.dtype not in (torch.float32, torch.float64):
        return False
    return y is None or (y.dim() == 2 and y.dtype == x.dtype and y.device == x.device)


def block_rows(rows: int, cols: int, device: torch.device, budget: int | None = None) -> int:
    """Rows per block so that a ``(rows, cols)`` block holds about ``budget`` cells."""
    if budget is None:
        budget = BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(1, min(rows, budget // max(1, cols)))


class Operands:
    """``x (B, D)`` and ``y (R, D)`` prepared for distance blocks under ``distance``.

    ``normalized=True`` means ``x``/``y`` are already L2-normalised (cosine; done by the caller under
    autograd); otherwise cosine normalises here. ``y=None``: the reference set is ``x`` itself.
    """

    def __init__(self, x: Tensor, y: Tensor | None, distance: str, normalized: bool = False) -> None:
        self.distance = distance
        self.same = y is None or y is x
        if distance == "cosine" and not normalized:
            x = F.normalize(x, dim=1)
            y = None if self.same else F.normalize(y, dim=1)  # type: ignore[arg-type]
        self.x = x
        self.y = x if self.same else y  # type: ignore[assignment]
        self.yt = self.y.T
        if distance != "cosine":
            # squared norms without a (B, D) temporary (a fresh one costs page faults at every call)
            self.x2 = torch.linalg.vector_norm(x, dim=1, keepdim=True).square_()
            self.y2 = self.x2.T if self.same else torch.linalg.vector_norm(self.y, dim=1).square_().unsqueeze(0)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def cols(self) -> int:
        return self.y.shape[0]

    def block(
        self, start: int, end: int, out: Tensor | None = None, want_mask: bool = False, mask_out: Tensor | None = None
    ) -> tuple[Tensor, "Tensor | tuple[Tensor, Tensor] | None"]:
        """Distances of rows ``start:end`` to every reference.

        With ``want_mask`` also where the clamp blocks gradients: ``None`` when it blocks none (the
        usual case), ``(rows, cols)`` of the clamped cells when they all lie on the diagonal of a
        same-set block (a sample and itself), else a float ``0/1`` block, 1 where gradients pass.
        """
        xb = self.x[start:end]
        passes = None
        if self.distance == "cosine":
            d = torch.mm(xb, self.yt, out=out) if out is not None else torch.mm(xb, self.yt)
            d.neg_().add_(1.0)
            return d, None
        if out is not None:
            d = torch.addmm(self.x2[start:end], xb, self.yt, beta=1.0, alpha=-2.0, out=out)
        else:
            d = torch.addmm(self.x2[start:end], xb, self.yt, beta=1.0, alpha=-2.0)
        d.add_(self.y2)
        floor = 0.0 if self.distance == "squared_euclidean" else _EPS
        if want_mask and float(d.min()) < floor:
            passes = self._clamped(d, start, end, floor, mask_out)
        d.clamp_min_(floor)
        if self.distance == "euclidean":
            d.sqrt_()
        return d, passes

    def scores(self, start: int, end: int, out: Tensor | None = None) -> Tensor:
        """Rows ``start:end`` against every reference: per row an increasing function of the distance,
        for an arg-min / arg-max along rows at the cost of one matmul (no clamp, no square root):
        ``‖y‖² − 2·x·y = d² − ‖x‖²`` for the euclidean distances, ``−x̂·ŷ = d − 1`` for cosine."""
        xb = self.x[start:end]
        if self.distance == "cosine":
            return torch.mm(xb, self.yt, out=out).neg_()
        return torch.addmm(self.y2, xb, self.yt, beta=1.0, alpha=-2.0, out=out)

    def _clamped(self, d: Tensor, start: int, end: int, floor: float, mask_out: Tensor | None):
        if self.same and start < self.cols:
            i = torch.arange(start, min(end, self.cols), device=d.device)
            diag = d[i - start, i].clone()
            d[i - start, i] = float("inf")
            off_diagonal_ok = float(d.min()) >= floor
            d[i - start, i] = diag
            if off_diagonal_ok:
                hit = diag < floor
                return (i[hit] - start, i[hit])
        return torch.ge(d, floor, out=torch.empty_like(d) if mask_out is None else mask_out)

    def blocks(
        self, width: int = 1, similarity: bool = False, scores: bool = False
    ) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, end, distances)`` over row blocks sized for ``width`` cells per distance (a caller
        that expands every row ``width`` times asks for proportionally fewer rows); the block tensor
        is reused between iterations. ``similarity`` (cosine only): the cosine similarity instead;
        ``scores``: :meth:`scores` instead (same order along each row as the distances)."""
        width = max(1, width)
        budget = (BLOCK_ELEMENTS if self.x.device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS) * min(width, 4)
        rows = block_rows(self.rows, self.cols * width, self.x.device, budget)  # (rows, width, R) boolean cells
        scratch = Scratch("Operands.blocks")
        buf = scratch.get("d", (min(rows, self.rows), self.cols), self.x.dtype, self.x.device)
        try:
            for start in range(0, self.rows, rows):
                end = min(self.rows, start + rows)
                if similarity:
                    assert self.distance == "cosine"
                    d = torch.mm(self.x[start:end], self.yt, out=buf[: end - start])
                elif scores:
                    d = self.scores(start, end, out=buf[: end - start])
                else:
                    d, _ = self.block(start, end, out=buf[: end - start])
                yield start, end, d
        finally:
            scratch.release()

    def to_v(self, grad: Tensor, d: Tensor, passes) -> Tensor:
        """In place: ``∂S/∂D`` of a block → ``V`` with ``∂S/∂x = rowsum(V)·x − V·y`` (cosine: ``−∂S/∂D``);
        ``passes`` as returned by :meth:`block`."""
        if self.distance == "cosine":
            return grad.neg_()
        if self.distance == "squared_euclidean":
            grad.mul_(2.0)
        else:
            grad.div_(d)  # 2 · d sqrt(max(d2, eps)) / d d2 = 1 / d
        if passes is None:
            return grad
        if isinstance(passes, tuple):
            grad[passes] = 0.0
            return grad
        return grad.mul_(passes)


def dense_labels(labels: Tensor, ref_labels: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """Labels (and reference labels) as dense int32 class ids (equal labels ↔ equal ids, in
    ``[0, classes)``) and the number of classes (:func:`~deepmetric._native.labels.dense_label_ids`)."""
    inverse, classes = dense_label_ids(labels if ref_labels is None else torch.cat([labels, ref_labels]))
    batch = labels.shape[0]
    return inverse[:batch], (inverse if ref_labels is None else inverse[batch:]), classes


class LabelGroups:
    """Each anchor's same-label reference columns, read from the sorted labels in O(B·K) (K: the largest
    class of the reference set); no ``(B, R)`` label comparison is ever made.

    Attributes:
        same_idx, same_valid: ``(B, K)`` same-label reference indices (increasing; padded) and validity;
            with ``same_set`` the anchor itself is among them.
        same_count: ``(B,)`` number of same-label references (so ``R − same_count`` negatives).
        pidx, pvalid: ``(B, W)`` the positives (same label, not the anchor itself), increasing, left-aligned.
    """

    def __init__(self, labels: Tensor, ref_labels: Tensor, same_set: bool) -> None:
        lab, ref_lab, _ = dense_labels(labels, None if same_set else ref_labels)
        batch, ref_size = lab.shape[0], ref_lab.shape[0]
        self.ref_size = ref_size
        device = lab.device
        order = torch.argsort(ref_lab, stable=True)
        sorted_lab = ref_lab[order]
        start = torch.searchsorted(sorted_lab, lab)
        same = torch.searchsorted(sorted_lab, lab, right=True) - start
        width = int(same.max()) if batch else 0
        slots = torch.arange(width, device=device)
        valid = slots[None, :] < same[:, None]
        cols = order[(start[:, None] + slots[None, :]).clamp_max_(max(ref_size - 1, 0))]
        cols = torch.where(valid, cols, torch.zeros_like(cols))
        self.same_idx, self.same_valid, self.same_count = cols, valid, same
        if same_set and width:
            pvalid = valid & (cols != torch.arange(batch, device=device)[:, None])
            perm = torch.argsort((~pvalid).to(torch.int8), dim=1, stable=True)  # valid slots first, in order
            pcols, pvalid = cols.gather(1, perm), pvalid.gather(1, perm)
            width = int(pvalid.sum(1).max())
            pcols, pvalid = pcols[:, :width].contiguous(), pvalid[:, :width].contiguous()
            self.pidx = torch.where(pvalid, pcols, torch.zeros_like(pcols))
            self.pvalid = pvalid
        else:
            self.pidx, self.pvalid = cols, valid
        self._penalty: dict[torch.dtype, Tensor] = {}

    def has_negatives(self) -> Tensor:
        return self.same_count < self.ref_size

    def push(self, block: Tensor, start: int, end: int, value: float | None = None) -> Tensor:
        """In place: add ``value`` (default: a huge finite number) to the same-label cells of rows
        ``start:end`` of ``block``."""
        unit = self._penalty.get(block.dtype)
        if unit is None:
            unit = self.same_valid.to(block.dtype)  # padding slots add 0
            self._penalty[block.dtype] = unit
        return block.scatter_add_(1, self.same_idx[start:end], unit[start:end] * (big(block.dtype) if value is None else value))


class Outputs:
    """``k`` long index outputs filled block after block, without a final concatenation.

    Capacity comes from an extrapolation of the rows seen so far (+20 %) and grows by copying when it
    falls short; :meth:`finish` returns the filled prefixes (views: capacity never written costs no
    resident memory), compacted by a copy only if the estimate was far off.
    """

    def __init__(self, k: int, total_rows: int, device: torch.device) -> None:
        self.k, self.total_rows, self.device = k, total_rows, device
        self.bufs: list[Tensor] = []
        self.size = 0

    def take(self, count: int, rows_done: int) -> slice:
        """Room for ``count`` more entries (``rows_done``: anchor rows covered once they are written)."""
        needed = self.size + count
        capacity = self.bufs[0].numel() if self.bufs else 0
        if needed > capacity:
            # extrapolated from the rows seen, +20 %: capacity that is never written costs no resident
            # memory, while growing copies everything written so far
            expected = needed * self.total_rows // max(rows_done, 1)
            new_capacity = max(needed, expected + expected // 5 + 1024, capacity + capacity // 4)
            new = [torch.empty(new_capacity, dtype=torch.long, device=self.device) for _ in range(self.k)]
            for old, buf in zip(self.bufs, new):
                buf[: self.size].copy_(old[: self.size])
            self.bufs = new
        sl = slice(self.size, needed)
        self.size = needed
        return sl

    def finish(self) -> list[Tensor]:
        if not self.bufs:
            return [torch.empty(0, dtype=torch.long, device=self.device) for _ in range(self.k)]
        out = [buf[: self.size] for buf in self.bufs]
        if self.bufs[0].numel() > 2 * self.size + 4096:  # far off: do not keep a mostly empty storage
            out = [o.clone() for o in out]
        self.bufs = []
        return out


def cat_indices(parts: list[Tensor], device: torch.device) -> Tensor:
    """One long index tensor from per-block pieces (empty if none); ``parts`` is emptied, so the pieces
    are freed before the next output is assembled."""
    if not parts:
        return torch.empty(0, dtype=torch.long, device=device)
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    parts.clear()
    return out


def tensor_key(t: Tensor) -> tuple:
    """Identity of a tensor's current contents: storage, geometry and version counter (``detach()``
    shares all of them; any in-place change bumps the version)."""
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)


class MinedTuples(tuple):
    """Mined indices, an ordinary tuple of index tensors (triplets ``(a, p, n)`` or pairs
    ``(a1, p, a2, n)``), plus ``note`` (a :class:`MiningNote`): how they were mined. A loss given them
    together with the very embeddings (unchanged) and labels they were mined from may recompute the set
    from the same distance blocks instead of reading the indices. Pickling and copying give a plain
    tuple."""

    def __new__(cls, indices: tuple, note: "MiningNote") -> "MinedTuples":
        obj = super().__new__(cls, indices)
        obj.note = note
        note.index_keys = tuple(tensor_key(t) for t in indices)
        return obj

    def __reduce__(self):
        return (tuple, (tuple(self),))


class MiningNote:
    """What a miner records about one call: the label groups, the blocks it used (``step`` anchor rows,
    ``counts`` per block start) and keys identifying the embeddings, the labels and its outputs (their
    storages are held, so a key cannot match other tensors that reuse the memory)."""

    kind = ""

    def __init__(self, groups: LabelGroups, embeddings: Tensor, labels: Tensor, distance: str) -> None:
        self.groups, self.distance = groups, distance
        # holding the storage (not the graph) keeps its address from being reused by other embeddings
        self.embeddings = embeddings.detach()
        self.embeddings_key = tensor_key(embeddings)
        self.labels = labels.clone()
        self.step = 0
        self.counts: dict[int, int] = {}
        self.index_keys: tuple = ()

    def record(self, start: int, end: int, count: int) -> None:
        self.step = max(self.step, end - start)
        self.counts[start] = count

    def matches(self, embeddings: Tensor, labels: Tensor, indices: tuple) -> bool:
        """Whether ``indices`` are still exactly what was mined, for these (unchanged) embeddings and labels."""
        return (
            tensor_key(embeddings) == self.embeddings_key
            and tuple(tensor_key(t) for t in indices) == self.index_keys
            and labels.shape == self.labels.shape
            and bool(torch.equal(labels.to(self.labels.device), self.labels))
        )


_LOCAL = threading.local()
#: Work buffers up to this many elements are kept (per thread and owner) for the next call.
_KEEP_ELEMENTS = 1 << 22


class Scratch:
    """Named work buffers of one computation, reused across its blocks.

    With an ``owner`` name the CPU buffers (up to :data:`_KEEP_ELEMENTS` elements each) are also kept
    for the next computation of that owner in the same thread: a fresh large allocation costs a page
    fault per 4 KiB on first touch, more than the arithmetic on it (accelerators have caching
    allocators). Only one live ``Scratch`` per owner and
    thread uses the kept buffers (a second one gets private ones); they are handed back by
    :meth:`release` or when the ``Scratch`` is garbage collected. Nothing returned to a caller may
    alias a work buffer.
    """

    def __init__(self, owner: str | None = None) -> None:
        self._store: dict[str, Tensor] = {}
        self._kept: dict[str, Tensor] | None = None
        self._owner = owner
        if owner is not None:
            busy = getattr(_LOCAL, "busy", None)
            if busy is None:
                busy = _LOCAL.busy = set()
                _LOCAL.kept = {}
            if owner not in busy:
                busy.add(owner)
                self._kept = _LOCAL.kept.setdefault(owner, {})

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        buf = self._store.get(name)
        if buf is None and self._kept is not None:
            buf = self._kept.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            grow = buf is not None and buf.dtype == dtype and buf.device == device
            buf = torch.empty(numel + (numel // 4 if grow else 0), dtype=dtype, device=device)
            if self._kept is not None and buf.numel() <= _KEEP_ELEMENTS and device.type == "cpu":
                self._kept[name] = buf
            else:
                self._store[name] = buf
        return buf[:numel].view(shape)

    def release(self) -> None:
        if self._kept is not None:
            self._kept = None
            _LOCAL.busy.discard(self._owner)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


class _BlockLoss(torch.autograd.Function):
    """``S = Σ_blocks kernel(D[rows])``; the gradient is accumulated block by block in the forward pass."""

    @staticmethod
    def forward(ctx, kernel, distance, want_grad, step, x, y, aux):  # type: ignore[override]
        ops = Operands(x, y, distance, normalized=True)
        rows_total, cols = ops.rows, ops.cols
        step = step or block_rows(rows_total, cols, x.device)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        count = torch.zeros((), dtype=torch.long, device=x.device)
        scratch = Scratch("_BlockLoss")
        buf = scratch.get("d", (min(step, rows_total), cols), x.dtype, x.device)
        mask_buf = scratch.get("mask", buf.shape, x.dtype, x.device) if want_grad and not distance == "cosine" else None
        gx = gy = colsum = g_aux = None
        if want_grad:
            gx = torch.zeros_like(x)
            gy = torch.zeros_like(ops.y)
            colsum = torch.zeros(cols, dtype=x.dtype, device=x.device)
            g_aux = torch.zeros_like(aux) if aux is not None else None
        cosine = distance == "cosine"
        for start in range(0, rows_total, step):
            end = min(rows_total, start + step)
            d, passes = ops.block(
                start, end, out=buf[: end - start], want_mask=mask_buf is not None,
                mask_out=None if mask_buf is None else mask_buf[: end - start],
            )
            value, n, grad, grad_aux = kernel(d, start, end, want_grad)
            total += value
            count += n
            if not want_grad:
                continue
            if grad_aux is not None:
                g_aux[start:end] = grad_aux  # type: ignore[index]
            if grad is None:
                continue
            v = ops.to_v(grad, d, passes)
            xb = x[start:end]
            if cosine:
                gx[start:end] = torch.mm(v, ops.y)  # type: ignore[index]
            else:
                torch.addmm(xb * v.sum(1, keepdim=True), v, ops.y, alpha=-1.0, out=gx[start:end])  # type: ignore[index]
                colsum.add_(v.sum(0))  # type: ignore[union-attr]
            gy.addmm_(v.T, xb, alpha=1.0 if cosine else -1.0)  # type: ignore[union-attr]
        if want_grad:
            if not cosine:
                gy.addcmul_(ops.y, colsum.unsqueeze(1))  # type: ignore[union-attr]
            if ops.same:
                gx.add_(gy)  # type: ignore[union-attr]
                gy = None
            ctx.save_for_backward(gx, gy, g_aux)
        ctx.want_grad = want_grad
        ctx.mark_non_differentiable(count)
        return total.to(x.dtype), count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_count):  # type: ignore[override]
        if not ctx.want_grad:
            raise RuntimeError("block loss evaluated without gradients cannot be differentiated")
        gx, gy, g_aux = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_total  # noqa: E731
        return None, None, None, None, scale(gx), scale(gy), scale(g_aux)


def block_loss(
    kernel: Kernel, x: Tensor, y: Tensor | None, distance: str, aux: Tensor | None = None, step: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(S, count)``: ``S = Σ`` of ``kernel`` over row blocks of ``D = distance(x, y)``, differentiable
    w.r.t. ``x``, ``y`` and ``aux`` (a per-row tensor whose gradient the kernel returns).

    For ``cosine`` pass L2-normalised ``x``/``y`` (normalise under autograd before calling). ``step``:
    rows per block (default :func:`block_rows`).
    """
    tensors = [t for t in (x, y, aux) if t is not None]
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _BlockLoss.apply(kernel, distance, want_grad, step, x, y, aux)
