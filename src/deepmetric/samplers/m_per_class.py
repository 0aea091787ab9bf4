"""P×K batch sampler: ``m`` samples of each of ``P = batch_size // m`` distinct classes per batch."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import SAMPLERS
from deepmetric.samplers._common import as_label_array, check_positive_int, check_seed, epoch_generator

__all__ = ["MPerClassSampler"]

_MAX_NAMED = 10


@SAMPLERS.register("m_per_class")
class MPerClassSampler(Sampler[list[int]]):
    """P×K batches: every batch holds ``m`` samples of each of ``batch_size // m`` distinct classes.

    A *batch* sampler: pass it as ``DataLoader(dataset, batch_sampler=sampler)``; iterating yields
    lists of ``batch_size`` integer dataset indices. This is the sampler pair- and triplet-based losses
    need (every anchor has ``m - 1`` positives in its batch).

    Algorithm of one epoch (all randomness from a generator seeded by ``(seed, epoch)``):

    1. **Chunks.** Each class's indices are shuffled and cut into chunks of ``m``; an incomplete last
       chunk is completed with other samples of the same class drawn without replacement, so a class
       with ``n_c`` samples gives ``k_c = ceil(n_c / m)`` chunks and every sample is in one of them.
       A class with fewer than ``m`` samples (only with ``allow_repeats=True``) gives one chunk, filled
       up by drawing from the class *with* replacement.
    2. **Number of batches.** ``B = max(max_c k_c, ceil(sum_c k_c / P))``: the fewest batches that
       hold every chunk while no class appears twice in a batch. ``B`` depends only on the class sizes,
       so ``len(sampler) == B`` at every epoch.
    3. **Padding, no dropping.** No chunk is ever dropped. The ``B·P − Σ k_c`` free slots (fewer than
       ``P`` unless one class holds more than ``1/P`` of the chunks) are filled with extra chunks of
       ``m`` samples redrawn from classes that have fewer than ``B`` chunks; how many each class gets is
       drawn uniformly over the free capacity ``B − k_c`` of the classes (multivariate
       hypergeometric). A dominant class therefore makes the epoch longer and re-visits the other
       classes' samples, rather than leaving part of the data unseen.
    4. **Packing.** Batches are filled one at a time. With ``R`` batches left and ``r_c`` chunks left
       per class, every class with ``r_c = R`` must be in this batch; the remaining places go to other
       classes with chunks left, drawn without replacement with probability proportional to ``r_c``.
       This keeps ``r_c ≤ R`` and ``Σ r_c = P·R``, so packing always succeeds, while which classes
       meet in a batch changes from batch to batch and epoch to epoch. Each chosen class contributes
       its next chunk (the chunk order within a class is shuffled); the ``P`` chunks appear in random
       class order, the ``m`` samples of a class consecutively.

    Consequences: each batch has exactly ``P`` classes × ``m`` samples; when every class has at least
    ``m`` samples, the indices within a batch are distinct and every sample is visited at least once
    per epoch. Packing costs ``O(B · num_classes)`` per epoch.

    Call :meth:`set_epoch` before each epoch: iteration does not advance the epoch by itself, so
    iterating twice at the same epoch yields the same batches (as ``DistributedSampler`` does).

    Args:
        labels: class label of every dataset sample (list, array or 1-D tensor; any hashable,
            sortable values).
        m: samples per class in a batch (the K of P×K).
        batch_size: batch size; must be a multiple of ``m``.
        seed: non-negative seed; the batches are a function of ``(seed, epoch)`` only.
        allow_repeats: allow classes with fewer than ``m`` samples, completing their chunk by drawing
            with replacement (a batch may then hold the same index twice).

    Raises:
        DataError: empty labels, fewer than ``P`` classes, or (without ``allow_repeats``) classes with
            fewer than ``m`` samples (named, with their counts).
        ConfigError: ``m``/``batch_size`` not positive integers, or ``batch_size`` not a multiple of ``m``.

    Requirements:
        at least ``batch_size // m`` classes; at least ``m`` samples per class unless
        ``allow_repeats=True``.

    Example:
        >>> labels = [0, 0, 1, 1, 2, 2, 2, 2]
        >>> sampler = MPerClassSampler(labels, m=2, batch_size=4, seed=0)
        >>> len(sampler)  # 4 chunks of 2 samples, 2 classes per batch
        2
        >>> batches = list(sampler)
        >>> sorted(i for batch in batches for i in batch)  # every sample exactly once here
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> sorted(sorted({labels[i] for i in batch}) for batch in batches)  # class 2 in both
        [[0, 2], [1, 2]]
    """

    def __init__(
        self,
        labels: Sequence[Any] | np.ndarray | Any,
        m: int,
        batch_size: int,
        seed: int = 0,
        allow_repeats: bool = False,
    ) -> None:
        super().__init__()
        self.m = check_positive_int(m, "m")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.seed = check_seed(seed)
        self.allow_repeats = bool(allow_repeats)
        if self.batch_size % self.m:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of m ({self.m}); "
                f"e.g. {self.batch_size - self.batch_size % self.m or self.m} or "
                f"{self.batch_size + self.m - self.batch_size % self.m}"
            )
        self.classes_per_batch = self.batch_size // self.m
        if self.classes_per_batch < 2:
            raise ConfigError(
                f"batch_size {self.batch_size} with m={self.m} gives batches of a single class: there would be "
                f"no negative pairs. Use batch_size >= {2 * self.m} or a smaller m"
            )
        array = as_label_array(labels)
        self.classes, inverse = np.unique(array, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(self.classes))
        self._class_indices: list[np.ndarray] = np.split(order, np.cumsum(counts)[:-1])
        self.class_counts = counts
        self.num_samples = int(array.size)

        if len(self.classes) < self.classes_per_batch:
            raise DataError(
                f"a batch needs {self.classes_per_batch} distinct classes (batch_size {self.batch_size} // "
                f"m {self.m}) but the labels have only {len(self.classes)}; lower batch_size or raise m"
            )
        small = np.flatnonzero(counts < self.m)
        if small.size and not self.allow_repeats:
            named = ", ".join(f"{self.classes[c].item()!r} ({counts[c]})" for c in small[:_MAX_NAMED])
            more = f" and {small.size - _MAX_NAMED} more" if small.size > _MAX_NAMED else ""
            raise DataError(
                f"{small.size} class(es) have fewer than m={self.m} samples — class (count): {named}{more}. "
                "Remove them, lower m, or pass allow_repeats=True to sample them with replacement"
            )

        self._chunks_per_class = np.maximum(1, -(-counts // self.m))
        total = int(self._chunks_per_class.sum())
        self._num_batches = max(
            int(self._chunks_per_class.max()), -(-total // self.classes_per_batch)
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = check_seed(epoch, "epoch")

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._epoch_batches(self.epoch))

    def _class_chunks(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Step 1 and 3: a ``(chunks, m)`` index array per class, rows in random order."""
        m = self.m
        capacity = self._num_batches - self._chunks_per_class
        extra_total = self._num_batches * self.classes_per_batch - int(self._chunks_per_class.sum())
        extra = (
            rng.multivariate_hypergeometric(capacity, extra_total)
            if extra_total
            else np.zeros_like(capacity)
        )
        chunks: list[np.ndarray] = []
        for indices, n_extra in zip(self._class_indices, extra):
            n = indices.size
            perm = rng.permutation(indices)
            rest = n % m
            if n < m:
                fill = rng.choice(indices, m - n, replace=True)
                rows = np.concatenate([perm, fill])[None, :]
            elif rest:
                fill = rng.choice(perm[: n - rest], m - rest, replace=False)
                rows = np.concatenate([perm, fill]).reshape(-1, m)
            else:
                rows = perm.reshape(-1, m)
            if n_extra:
                if n < m:
                    padding = rng.choice(indices, (int(n_extra), m), replace=True)
                else:
                    padding = np.stack([rng.choice(indices, m, replace=False) for _ in range(int(n_extra))])
                rows = rng.permutation(np.concatenate([rows, padding]))
            chunks.append(rows)
        return chunks

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = epoch_generator(self.seed, epoch)
        chunks = self._class_chunks(rng)
        remaining = np.array([c.shape[0] for c in chunks], dtype=np.int64)
        taken = np.zeros_like(remaining)
        per_batch = self.classes_per_batch
        batches: list[list[int]] = []
        for left in range(self._num_batches, 0, -1):
            forced = np.flatnonzero(remaining == left)
            free = per_batch - forced.size
            if free:
                candidates = np.flatnonzero((remaining > 0) & (remaining < left))
                weights = remaining[candidates].astype(np.float64)
                chosen = rng.choice(candidates, free, replace=False, p=weights / weights.sum())
                classes = np.concatenate([forced, chosen])
            else:
                classes = forced
            classes = rng.permutation(classes)
            batch = np.concatenate([chunks[c][taken[c]] for c in classes])
            taken[classes] += 1
            remaining[classes] -= 1
            batches.append(batch.tolist())
        return batches

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, num_classes={len(self.classes)}, "
            f"m={self.m}, batch_size={self.batch_size}, seed={self.seed}, allow_repeats={self.allow_repeats})"
        )
