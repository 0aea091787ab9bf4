"""Tests of the batch samplers (P×K and plain random)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from deepmetric import samplers
from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import SAMPLERS
from deepmetric.samplers.m_per_class import MPerClassSampler
from deepmetric.samplers.random import RandomBatchSampler

FAST = settings(max_examples=60, deadline=None)


@st.composite
def pk_cases(draw: st.DrawFn, min_count: int | None = None) -> tuple[list[int], int, int]:
    """Arbitrary label multisets (shuffled, non-contiguous ids) with valid m and batch_size."""
    m = draw(st.integers(1, 4))
    num_classes = draw(st.integers(2, 9))
    low = m if min_count is None else min_count
    counts = draw(st.lists(st.integers(low, 13), min_size=num_classes, max_size=num_classes))
    ids = draw(st.lists(st.integers(-50, 1000), min_size=num_classes, max_size=num_classes, unique=True))
    labels = [label for label, count in zip(ids, counts) for _ in range(count)]
    labels = draw(st.permutations(labels))
    classes_per_batch = draw(st.integers(2, num_classes))  # a single-class batch is refused
    return list(labels), m, classes_per_batch * m


def _check_pk(batches: list[list[int]], labels: list[int], m: int, batch_size: int) -> None:
    for batch in batches:
        assert len(batch) == batch_size
        per_class = Counter(labels[i] for i in batch)
        assert len(per_class) == batch_size // m
        assert set(per_class.values()) == {m}
        positions = {}
        for position, i in enumerate(batch):
            positions.setdefault(labels[i], []).append(position)
        for pos in positions.values():  # the m samples of a class are consecutive
            assert pos == list(range(pos[0], pos[0] + m))


@FAST
@given(pk_cases())
def test_m_per_class_structure_coverage_and_len(case: tuple[list[int], int, int]) -> None:
    labels, m, batch_size = case
    sampler = MPerClassSampler(labels, m=m, batch_size=batch_size, seed=3)
    batches = list(sampler)
    assert len(sampler) == len(batches) > 0
    _check_pk(batches, labels, m, batch_size)
    visited = [i for batch in batches for i in batch]
    assert set(visited) == set(range(len(labels)))  # every sample at least once
    assert all(len(set(batch)) == len(batch) for batch in batches)  # no repeated index in a batch
    assert all(isinstance(i, int) for i in visited)
    # the epoch is as short as possible: fewest batches holding ceil(n_c / m) chunks per class
    # with no class twice in a batch
    chunks = [-(-c // m) for c in Counter(labels).values()]
    assert len(batches) == max(max(chunks), -(-sum(chunks) // (batch_size // m)))


@FAST
@given(pk_cases(min_count=1))
def test_m_per_class_allow_repeats(case: tuple[list[int], int, int]) -> None:
    labels, m, batch_size = case
    sampler = MPerClassSampler(labels, m=m, batch_size=batch_size, seed=1, allow_repeats=True)
    batches = list(sampler)
    assert len(sampler) == len(batches)
    _check_pk(batches, labels, m, batch_size)
    assert set(i for batch in batches for i in batch) == set(range(len(labels)))


@FAST
@given(pk_cases(), st.integers(0, 2**32), st.integers(0, 1000))
def test_m_per_class_deterministic_per_seed_and_epoch(
    case: tuple[list[int], int, int], seed: int, epoch: int
) -> None:
    labels, m, batch_size = case
    a = MPerClassSampler(labels, m=m, batch_size=batch_size, seed=seed)
    b = MPerClassSampler(np.array(labels), m=m, batch_size=batch_size, seed=seed)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    first = list(a)
    assert first == list(a)  # same epoch twice: same batches
    assert first == list(b)  # another instance (and label container): same batches


def test_m_per_class_epochs_and_seeds_differ() -> None:
    labels = np.repeat(np.arange(20), 10)
    sampler = MPerClassSampler(labels, m=4, batch_size=32, seed=0)
    epochs = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert all(len(e) == len(sampler) for e in epochs)
    assert len({str(e) for e in epochs}) == 4
    other_seed = list(MPerClassSampler(labels, m=4, batch_size=32, seed=1))
    assert other_seed != epochs[0]


def test_m_per_class_mixes_class_combinations() -> None:
    """Which classes meet in a batch varies: not a fixed partition of classes into groups."""
    labels = np.repeat(np.arange(10), 20)  # 5 chunks per class, 2 classes per batch, 25 batches
    sampler = MPerClassSampler(labels, m=4, batch_size=8, seed=0)
    pairs = {tuple(sorted({int(labels[i]) for i in batch})) for batch in sampler}
    assert len(pairs) >= 15  # a fixed pairing would give 5


def test_m_per_class_dominant_class_pads_instead_of_dropping() -> None:
    labels = [0] * 40 + [1] * 4 + [2] * 5  # class 0 holds 10 of 14 chunks
    sampler = MPerClassSampler(labels, m=4, batch_size=8, seed=0)
    batches = list(sampler)
    assert len(batches) == 10  # one batch per chunk of the dominant class
    _check_pk(batches, labels, 4, 8)
    counts = Counter(i for batch in batches for i in batch)
    assert all(counts[i] == 1 for i in range(40))  # class 0 exactly once
    assert set(counts) == set(range(len(labels)))


def test_m_per_class_balanced_data_visits_each_sample_once() -> None:
    labels = np.repeat(np.arange(8), 12)  # 3 chunks per class, 24 chunks, P = 4: exactly 6 batches
    sampler = MPerClassSampler(labels, m=4, batch_size=16, seed=5)
    visited = sorted(i for batch in sampler for i in batch)
    assert visited == list(range(96))


def test_m_per_class_accepts_tensor_and_string_labels() -> None:
    tensor_labels = torch.tensor([3, 3, 7, 7, 9, 9])
    batches = list(MPerClassSampler(tensor_labels, m=2, batch_size=4))
    _check_pk(batches, tensor_labels.tolist(), 2, 4)
    names = ["cat", "cat", "dog", "dog", "eel", "eel"]
    _check_pk(list(MPerClassSampler(names, m=2, batch_size=6)), names, 2, 6)


def test_m_per_class_with_dataloader() -> None:
    labels = torch.arange(6).repeat_interleave(5)
    dataset = TensorDataset(torch.arange(30, dtype=torch.float32)[:, None], labels)
    sampler = MPerClassSampler(labels, m=5, batch_size=10, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == len(sampler) == 3
    seen = []
    for x, y in loader:
        assert x.shape == (10, 1)
        assert sorted(Counter(y.tolist()).values()) == [5, 5]
        seen.extend(x[:, 0].long().tolist())
    assert sorted(seen) == list(range(30))


def test_m_per_class_errors() -> None:
    with pytest.raises(DataError, match="empty"):
        MPerClassSampler([], m=2, batch_size=4)
    with pytest.raises(ConfigError, match="multiple of m"):
        MPerClassSampler([0, 0, 1, 1], m=2, batch_size=5)
    with pytest.raises(DataError, match="only 2"):
        MPerClassSampler([0, 0, 1, 1], m=2, batch_size=6)
    with pytest.raises(DataError) as info:
        MPerClassSampler([0, 0, 0, 1, 2, 2, 2, 5, 5], m=3, batch_size=6)
    message = str(info.value)
    assert "1 (1)" in message and "5 (2)" in message and "allow_repeats" in message
    assert "0 (" not in message and "2 (3)" not in message
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ConfigError, match="m must be"):
            MPerClassSampler([0, 0, 1, 1], m=bad, batch_size=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed"):
        MPerClassSampler([0, 0, 1, 1], m=2, batch_size=4, seed=-1)
    with pytest.raises(DataError, match="one-dimensional"):
        MPerClassSampler(np.zeros((4, 2)), m=2, batch_size=4)
    with pytest.raises(ConfigError, match="epoch"):
        MPerClassSampler([0, 0, 1, 1], m=2, batch_size=4).set_epoch(-1)


def test_m_per_class_error_lists_at_most_ten_classes() -> None:
    labels = list(range(15)) + [99] * 4
    with pytest.raises(DataError, match="15 class.*and 5 more"):
        MPerClassSampler(labels, m=2, batch_size=4)


@FAST
@given(st.integers(1, 60), st.integers(1, 16), st.booleans(), st.integers(0, 50))
def test_random_batch_sampler(num_samples: int, batch_size: int, drop_last: bool, epoch: int) -> None:
    if drop_last and num_samples < batch_size:
        with pytest.raises(DataError, match="drop_last"):
            RandomBatchSampler(num_samples, batch_size, drop_last=drop_last)
        return
    sampler = RandomBatchSampler(num_samples, batch_size, seed=7, drop_last=drop_last)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert batches == list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert all(len(b) == batch_size for b in batches)
        assert len(flat) == num_samples - num_samples % batch_size
    else:
        assert sorted(flat) == list(range(num_samples))
        assert all(len(b) == batch_size for b in batches[:-1])


def test_random_batch_sampler_epochs_differ_and_labels_accepted() -> None:
    sampler = RandomBatchSampler(np.zeros(50), batch_size=10)
    assert sampler.num_samples == 50
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    loader = DataLoader(TensorDataset(torch.arange(50)), batch_sampler=sampler)
    assert sorted(torch.cat([b[0] for b in loader]).tolist()) == list(range(50))


def test_random_batch_sampler_errors() -> None:
    with pytest.raises(DataError):
        RandomBatchSampler(0, 4)
    with pytest.raises(DataError, match="empty"):
        RandomBatchSampler([], 4)
    with pytest.raises(ConfigError, match="batch_size"):
        RandomBatchSampler(10, 0)


def test_registry_builds_both_and_rejects_unknown_kwargs() -> None:
    assert {"m_per_class", "random"} <= set(samplers.names())
    assert samplers.describe("m_per_class").startswith("P×K batches")
    built = samplers.build("m_per_class", [0, 0, 1, 1], m=2, batch_size=4, seed=2)
    assert isinstance(built, MPerClassSampler) and built.seed == 2
    assert isinstance(SAMPLERS.build("random", 8, batch_size=4), RandomBatchSampler)
    with pytest.raises(ConfigError, match="valid arguments.*allow_repeats"):
        samplers.build("m_per_class", [0, 0, 1, 1], m=2, batch_size=4, shuffle=True)


def test_single_class_batches_are_refused() -> None:
    with pytest.raises(ConfigError, match="single class"):
        MPerClassSampler([0, 0, 1, 1], m=2, batch_size=2)
