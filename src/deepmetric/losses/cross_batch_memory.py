"""Cross-batch memory (XBM) wrapper (Wang et al., CVPR 2020)."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import LOSSES, MINERS
from deepmetric.tuples import (
    Indices,
    check_inputs,
    is_pairs,
    is_triplets,
    label_masks,
    masks_to_pairs,
    triplets_to_pairs,
)

__all__ = ["CrossBatchMemory"]


def _drop_self_pairs(indices: Indices, self_slot: Tensor) -> Indices:
    """Remove tuples pairing a batch element with its own memory slot (``self_slot[a]``)."""
    if is_triplets(indices):
        a, p, n = indices
        keep = (p != self_slot[a]) & (n != self_slot[a])
        return a[keep], p[keep], n[keep]
    if is_pairs(indices):
        a1, p, a2, n = indices
        keep_pos = p != self_slot[a1]
        keep_neg = n != self_slot[a2]
        return a1[keep_pos], p[keep_pos], a2[keep_neg], n[keep_neg]
    raise DataError("indices must be triplets (a, p, n) or pairs (a1, p, a2, n)")


def _concat(first: Indices, second: Indices) -> Indices:
    """Union (concatenation) of two index tuples; mixed kinds are both reduced to pairs."""
    if len(first) != len(second):
        first = triplets_to_pairs(first) if is_triplets(first) else first  # type: ignore[arg-type]
        second = triplets_to_pairs(second) if is_triplets(second) else second  # type: ignore[arg-type]
    return tuple(torch.cat([x.long(), y.long()]) for x, y in zip(first, second))  # type: ignore[return-value]


@LOSSES.register("cross_batch_memory")
class CrossBatchMemory(nn.Module):
    r"""Cross-batch memory (XBM): compare each batch with a queue of recent embeddings.

    A FIFO queue keeps the last ``memory_size`` embeddings (detached) and labels. At each call the
    batch is first enqueued (oldest entries are overwritten), then the wrapped pair/tuple loss is
    evaluated with the batch as anchors and the whole queue as reference set:

    $$ L = \ell\big(f_{batch},\, y_{batch};\ \text{tuples},\ \text{ref} = M \big),\qquad
       M = \text{last } \min(\text{seen}, |M|) \text{ embeddings (the batch included)} $$

    where the tuples are ``miner(embeddings, labels, M_emb, M_labels)`` when a miner is given and
    all (batch, memory) pairs otherwise.

    Reference: X. Wang, H. Zhang, W. Huang, M. R. Scott, "Cross-Batch Memory for Embedding
    Learning", CVPR 2020. As in the authors' code, the current batch is enqueued before the loss,
    so the memory contains a detached copy of the batch: the batch-vs-batch pairs are part of the
    loss (gradients flow only through the anchors' side, the memory being constant).

    Self-comparisons: batch element ``i`` sits in memory slot ``s_i``; every tuple pairing ``i``
    with ``s_i`` is removed (from the all-pairs set or from the miner's output) before the loss is
    called. The wrapped loss always receives explicit ``indices`` (pairs or the miner's triplets),
    so it never has to guess which reference entries are the anchors themselves. Mined
    within-batch ``indices`` passed to ``forward`` are mapped to the batch's memory slots and added
    to these tuples (as PML does).

    State: the queue (``embedding_memory``, ``label_memory``), the write position
    (``queue_pointer``) and the number of filled slots (``fill_count``) are buffers, so
    ``state_dict()`` / ``load_state_dict()`` save and resume the memory exactly.

    PML mapping: ``pml.CrossBatchMemory(loss, embedding_size=embedding_dim,
    memory_size=memory_size, miner=miner)`` with an equivalent wrapped loss gives the same values.

    Args:
        loss: a loss module with ``tuple_kind`` not None and class labels, or its registry name.
        memory_size: number of embeddings kept (≥ the batch size).
        embedding_dim: embedding dimension D.
        miner: optional miner module (or registry name) called as
            ``miner(embeddings, labels, memory_embeddings, memory_labels)``.

    Shape:
        embeddings ``(B, D)`` with ``B <= memory_size``, labels ``(B,)``; output scalar.

    Requirements:
        Integer class labels; the wrapped loss must accept ``indices`` and ``ref_embeddings``.

    Example:
        >>> import torch
        >>> from deepmetric.losses.sup_con import SupConLoss
        >>> xbm = CrossBatchMemory(SupConLoss(), memory_size=32, embedding_dim=4)
        >>> for step in range(3):
        ...     embeddings = torch.randn(8, 4, requires_grad=True)
        ...     labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        ...     loss = xbm(embeddings, labels)
        ...     loss.backward()
        >>> int(xbm.fill_count), int(xbm.queue_pointer)
        (24, 24)
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    embedding_memory: Tensor
    label_memory: Tensor
    queue_pointer: Tensor
    fill_count: Tensor

    def __init__(
        self,
        loss: nn.Module | str,
        memory_size: int,
        embedding_dim: int,
        miner: nn.Module | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(loss, str):
            loss = LOSSES.build(loss)
        if isinstance(miner, str):
            miner = MINERS.build(miner)
        if not isinstance(loss, nn.Module):
            raise ConfigError(f"loss must be an nn.Module or a loss name; got {type(loss).__name__}")
        if getattr(loss, "tuple_kind", None) is None:
            raise ConfigError(
                f"CrossBatchMemory needs a pair/tuple loss (tuple_kind not None); "
                f"{type(loss).__name__} does not accept indices/ref_embeddings"
            )
        if getattr(loss, "label_kind", "class") != "class":
            raise ConfigError(f"CrossBatchMemory needs class labels; {type(loss).__name__} uses continuous ones")
        if isinstance(loss, CrossBatchMemory):
            raise ConfigError("CrossBatchMemory cannot wrap another CrossBatchMemory")
        if int(memory_size) < 1 or int(embedding_dim) < 1:
            raise ConfigError(f"memory_size and embedding_dim must be >= 1; got {memory_size}, {embedding_dim}")
        self.loss = loss
        self.miner = miner
        self.memory_size = int(memory_size)
        self.embedding_dim = int(embedding_dim)
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_dim))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("fill_count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def reset_memory(self) -> None:
        """Empty the queue."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_pointer.zero_()
        self.fill_count.zero_()

    @torch.no_grad()
    def _enqueue(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Write the batch at the queue pointer; returns the memory slot of each batch element."""
        if self.embedding_memory.dtype != embeddings.dtype or self.embedding_memory.device != embeddings.device:
            self.embedding_memory = self.embedding_memory.to(device=embeddings.device, dtype=embeddings.dtype)
            self.label_memory = self.label_memory.to(embeddings.device)
            self.queue_pointer = self.queue_pointer.to(embeddings.device)
            self.fill_count = self.fill_count.to(embeddings.device)
        batch_size = embeddings.shape[0]
        slots = (self.queue_pointer + torch.arange(batch_size, device=embeddings.device)) % self.memory_size
        self.embedding_memory[slots] = embeddings.detach()
        self.label_memory[slots] = labels.to(self.label_memory.dtype)
        self.queue_pointer.copy_((self.queue_pointer + batch_size) % self.memory_size)
        self.fill_count.copy_((self.fill_count + batch_size).clamp_max(self.memory_size))
        return slots

    def memory(self) -> tuple[Tensor, Tensor]:
        """The filled part of the queue: ``(embeddings (M, D), labels (M,))``."""
        filled = int(self.fill_count)
        return self.embedding_memory[:filled], self.label_memory[:filled]

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        if ref_embeddings is not None or ref_labels is not None:
            raise DataError("CrossBatchMemory uses its memory as reference set; do not pass ref_embeddings")
        check_inputs(embeddings, labels)
        if embeddings.shape[1] != self.embedding_dim:
            raise DataError(
                f"embeddings have dimension {embeddings.shape[1]}, CrossBatchMemory(embedding_dim="
                f"{self.embedding_dim})"
            )
        if embeddings.shape[0] > self.memory_size:
            raise DataError(
                f"batch of {embeddings.shape[0]} does not fit a memory of {self.memory_size}; "
                "raise memory_size"
            )
        if labels.is_floating_point():
            raise DataError("CrossBatchMemory needs integer class labels")
        slots = self._enqueue(embeddings, labels)
        memory_embeddings, memory_labels = self.memory()
        if self.miner is not None:
            tuples = self.miner(embeddings, labels, memory_embeddings, memory_labels)
        else:
            pos, neg = label_masks(labels, memory_labels, exclude_self=False)
            tuples = masks_to_pairs(pos, neg)
        tuples = _drop_self_pairs(tuples, slots)
        if indices is not None:
            if is_triplets(indices):
                a, p, n = indices
                mapped: Indices = (a, slots[p], slots[n])
            elif is_pairs(indices):
                a1, p, a2, n = indices
                mapped = (a1, slots[p], a2, slots[n])
            else:
                raise DataError("indices must be triplets (a, p, n) or pairs (a1, p, a2, n)")
            tuples = _concat(tuples, mapped)
        return self.loss(embeddings, labels, tuples, memory_embeddings, memory_labels)

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, embedding_dim={self.embedding_dim}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Accept a saved memory in another dtype (e.g. float64 runs) by adopting the saved dtype.
        key = prefix + "embedding_memory"
        if key in state_dict and state_dict[key].dtype != self.embedding_memory.dtype:
            self.embedding_memory = self.embedding_memory.to(state_dict[key].dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
