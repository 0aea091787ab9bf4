"""Plain shuffled batches, for proxy and classification losses that need no P×K structure."""
from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from deepmetric.errors import DataError
from deepmetric.registry import SAMPLERS
from deepmetric.samplers._common import as_label_array, check_positive_int, check_seed, epoch_generator

__all__ = ["RandomBatchSampler"]


@SAMPLERS.register("random")
class RandomBatchSampler(Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` indices, a new permutation for every ``(seed, epoch)``.

    A *batch* sampler (``DataLoader(dataset, batch_sampler=sampler)``) with the same conventions as
    :class:`~deepmetric.samplers.m_per_class.MPerClassSampler`: the batches are a function of
    ``(seed, epoch)`` only, :meth:`set_epoch` selects the epoch, iterating twice at the same epoch
    yields the same batches, and ``len()`` is the number of batches yielded.

    One epoch: a random permutation of ``range(num_samples)`` cut into consecutive batches; with
    ``drop_last=True`` the incomplete last batch (``num_samples % batch_size`` samples) is dropped,
    otherwise it is yielded shorter. Each index appears at most once per epoch.

    Args:
        labels_or_num_samples: the dataset's labels (only their number is used) or the number of samples.
        batch_size: samples per batch.
        seed: non-negative seed.
        drop_last: drop the incomplete last batch.

    Raises:
        DataError: no samples, or ``drop_last=True`` with fewer samples than ``batch_size``
            (no batch at all).
        ConfigError: ``batch_size`` or ``num_samples`` not a positive integer, or a negative seed.

    Requirements:
        none on labels; batches need not contain positive pairs.

    Example:
        >>> sampler = RandomBatchSampler(10, batch_size=4, seed=0)
        >>> len(sampler), [len(batch) for batch in sampler]
        (2, [4, 4])
        >>> len(RandomBatchSampler(10, batch_size=4, drop_last=False))
        3
    """

    def __init__(
        self,
        labels_or_num_samples: int | Sequence[Any] | np.ndarray | Any,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(labels_or_num_samples, numbers.Integral) and not isinstance(labels_or_num_samples, bool):
            if labels_or_num_samples < 1:
                raise DataError(f"num_samples must be at least 1; got {labels_or_num_samples}")
            self.num_samples = int(labels_or_num_samples)
        else:
            self.num_samples = int(as_label_array(labels_or_num_samples).size)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.seed = check_seed(seed)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.num_samples < self.batch_size:
            raise DataError(
                f"{self.num_samples} samples make no full batch of {self.batch_size} with drop_last=True; "
                "lower batch_size or pass drop_last=False"
            )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = check_seed(epoch, "epoch")

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_generator(self.seed, self.epoch).permutation(self.num_samples)
        for batch in range(len(self)):
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"seed={self.seed}, drop_last={self.drop_last})"
        )
