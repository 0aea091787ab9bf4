"""Siamese / triplet networks, explicit pair and triplet datasets, offline tuple generation."""
from __future__ import annotations

import doctest
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import deepmetric.networks as networks_module
import deepmetric.offline as offline_module
from deepmetric.errors import ConfigError, DataError
from deepmetric.networks import PairDataset, SiameseNetwork, TripletDataset, TripletNetwork
from deepmetric.offline import generate_pairs, generate_triplets
from reference import ref_miners as ref


class TensorLabelled(torch.utils.data.Dataset):
    """Minimal labelled dataset: ``labels`` tensor and ``(x, y)`` items."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], int(self.labels[i])


def test_doctests() -> None:
    for module in (networks_module, offline_module):
        result = doctest.testmod(module, extraglobs={"torch": torch})
        assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------- networks
def test_siamese_and_triplet_share_one_embedder() -> None:
    embedder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x1, x2, x3 = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    siamese = SiameseNetwork(embedder)
    assert sum(p.numel() for p in siamese.parameters()) == sum(p.numel() for p in embedder.parameters())
    e1, e2 = siamese(x1, x2)
    torch.testing.assert_close(e1, embedder(x1))
    torch.testing.assert_close(e2, embedder(x2))
    unbatched = SiameseNetwork(embedder, batched=False)(x1, x2)
    torch.testing.assert_close(unbatched[1], e2)
    ea, ep, en = TripletNetwork(embedder)(x1, x2, x3)
    torch.testing.assert_close(en, embedder(x3))
    # gradients from both branches reach the same parameters
    (e1.sum() + e2.sum()).backward()
    grad = embedder[0].weight.grad.clone()
    embedder.zero_grad()
    (embedder(x1).sum() + embedder(x2).sum()).backward()
    torch.testing.assert_close(grad, embedder[0].weight.grad)


def test_networks_accept_different_input_shapes() -> None:
    net = TripletNetwork(nn.Linear(3, 2))
    ea, ep, en = net(torch.randn(2, 3), torch.randn(5, 3), torch.randn(1, 3))
    assert (ea.shape[0], ep.shape[0], en.shape[0]) == (2, 5, 1)


def test_pair_and_triplet_datasets() -> None:
    base = TensorLabelled(torch.arange(6.0).unsqueeze(1), torch.tensor([0, 0, 1, 1, 2, 2]))
    pairs = PairDataset(base, torch.tensor([[0, 1], [1, 2], [5, 4]]))
    assert len(pairs) == 3
    x1, x2, same = pairs[1]
    assert float(x1) == 1.0 and float(x2) == 2.0 and same.dtype == torch.bool and not bool(same)
    batch = next(iter(DataLoader(pairs, batch_size=3)))
    assert batch[2].tolist() == [True, False, True]
    triplets = TripletDataset(base, torch.tensor([[0, 1, 2], [5, 4, 0]]))
    a, p, n = triplets[1]
    assert (float(a), float(p), float(n)) == (5.0, 4.0, 0.0)
    with pytest.raises(DataError):
        TripletDataset(base, torch.tensor([[0, 2, 1]]))  # positive of another class
    with pytest.raises(DataError):
        PairDataset(base, torch.tensor([[0, 6]]))  # out of range
    with pytest.raises(DataError):
        PairDataset(base, torch.tensor([0, 1]))  # not (N, 2)
    with pytest.raises(DataError):
        PairDataset(object(), torch.tensor([[0, 1]]))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- offline pairs
def test_generate_pairs() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    pairs = generate_pairs(labels, 1000, positive_fraction=0.3, seed=1)
    assert pairs.shape == (1000, 2) and pairs.dtype == torch.long
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    assert int(same.sum()) == 300
    assert bool((pairs[:, 0] != pairs[:, 1]).all())
    assert 5 not in pairs[same].flatten().tolist()  # sample 5 is alone in class 2: no positive pair
    assert torch.equal(pairs, generate_pairs(labels, 1000, positive_fraction=0.3, seed=1))
    assert not torch.equal(pairs, generate_pairs(labels, 1000, positive_fraction=0.3, seed=2))
    # partners are uniform: anchor 0's positive partners are 1 and 2 about equally often
    many = generate_pairs(labels, 20000, positive_fraction=1.0, seed=0)
    partners = Counter(many[many[:, 0] == 0, 1].tolist())
    assert set(partners) == {1, 2} and abs(partners[1] - partners[2]) < 0.2 * sum(partners.values())
    negs = generate_pairs(labels, 20000, positive_fraction=0.0, seed=0)
    assert bool((labels[negs[:, 0]] != labels[negs[:, 1]]).all())
    partners = Counter(negs[negs[:, 0] == 0, 1].tolist())
    assert set(partners) == {3, 4, 5, 6, 7, 8, 9}
    with pytest.raises(DataError):
        generate_pairs(torch.tensor([0, 1, 2]), 4, positive_fraction=0.5)
    with pytest.raises(DataError):
        generate_pairs(torch.tensor([1, 1, 1]), 4, positive_fraction=0.5)
    with pytest.raises(ConfigError):
        generate_pairs(labels, 4, positive_fraction=1.5)


# --------------------------------------------------------------------------------- offline triplets
def _check_structure(t: torch.Tensor, labels: torch.Tensor) -> None:
    a, p, n = t.unbind(1)
    assert bool((labels[a] == labels[p]).all()) and bool((a != p).all()) and bool((labels[a] != labels[n]).all())


def test_generate_triplets_random() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    t = generate_triplets(labels, 23, seed=0)
    assert t.shape == (23, 3)
    _check_structure(t, labels)
    counts = Counter(t[:, 0].tolist())
    assert 5 not in counts and max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 7
    assert torch.equal(t, generate_triplets(labels, 23, seed=0))
    with pytest.raises(ConfigError):
        generate_triplets(labels, 5, strategy="semihard")
    with pytest.raises(DataError):
        generate_triplets(labels, 5, strategy="hard")  # no embeddings
    with pytest.raises(DataError):
        generate_triplets(torch.tensor([0, 1, 2]), 5)


@pytest.mark.parametrize("metric", ["squared_euclidean", "euclidean"])
def test_generate_triplets_mining_matches_reference(metric: str) -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (40,), generator=g)
    emb = torch.randn(40, 3, generator=g, dtype=torch.float64)
    d = ref.ref_distance_matrix(emb, emb, metric)
    positives, negatives = ref.ref_candidates(labels.tolist(), labels.tolist(), True)
    margin = 1.0
    hard = generate_triplets(labels, 60, "hard", emb, seed=0, chunk_size=7, distance=metric)
    assert torch.equal(hard, generate_triplets(labels, 60, "hard", emb, seed=0, chunk_size=1000, distance=metric))
    semi = generate_triplets(labels, 60, "semi_hard", emb, margin=margin, seed=0, chunk_size=7, distance=metric)
    easy = generate_triplets(labels, 60, "easy", emb, margin=margin, seed=0, chunk_size=7, distance=metric)
    for t in (hard, semi, easy):
        _check_structure(t, labels)
    for a, p, n in hard.tolist():
        assert p == max(positives[a], key=lambda j: d[a][j]) and n == min(negatives[a], key=lambda j: d[a][j])
    used_band = used_fallback = 0
    for a, p, n in semi.tolist():
        band = [j for j in negatives[a] if d[a][p] < d[a][j] < d[a][p] + margin]
        if band:
            assert n in band
            used_band += 1
        else:
            beyond = [j for j in negatives[a] if d[a][j] > d[a][p]]
            pick = min(beyond, key=lambda j: d[a][j]) if beyond else max(negatives[a], key=lambda j: d[a][j])
            assert n == pick
            used_fallback += 1
    assert used_band > 0
    for a, p, n in easy.tolist():
        assert p == min(positives[a], key=lambda j: d[a][j])
        easy_negs = [j for j in negatives[a] if d[a][j] > d[a][p] + margin]
        assert n in easy_negs if easy_negs else n == max(negatives[a], key=lambda j: d[a][j])
    # the random semi-hard choice covers the band (not always its first member)
    many = generate_triplets(labels, 2000, "semi_hard", emb, margin=margin, seed=1, distance=metric)
    per_pair: dict[tuple[int, int], set[int]] = {}
    for a, p, n in many.tolist():
        per_pair.setdefault((a, p), set()).add(n)
    assert max(len(v) for v in per_pair.values()) >= 3


# --------------------------------------------------------------------------------- training
def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return TensorLabelled(x[:1200], y[:1200]), TensorLabelled(x[1200:], y[1200:])


def _embedder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def _verification_accuracy(embedder: nn.Module, train: TensorLabelled, test: TensorLabelled) -> float:
    """Pair verification: threshold chosen on training pairs, accuracy on held-out pairs."""
    with torch.no_grad():
        def dists(ds: TensorLabelled, seed: int):
            pairs = generate_pairs(ds.labels, 1000, seed=seed)
            e = embedder(ds.x)
            same = ds.labels[pairs[:, 0]] == ds.labels[pairs[:, 1]]
            return (e[pairs[:, 0]] - e[pairs[:, 1]]).norm(dim=1), same

        d_train, s_train = dists(train, 10)
        candidates = d_train.sort().values
        accs = torch.stack([((d_train <= t) == s_train).float().mean() for t in candidates])
        threshold = candidates[int(accs.argmax())]
        d_test, s_test = dists(test, 11)
        return float(((d_test <= threshold) == s_test).float().mean())


def _first_last(losses: list[float], k: int = 8) -> tuple[float, float]:
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def test_train_siamese_network_on_digits() -> None:
    from deepmetric.losses.contrastive import ContrastiveLoss

    train, test = _digits()
    untrained = _verification_accuracy(_embedder(), train, test)  # ~0.71: digits are easy even untrained
    net = SiameseNetwork(_embedder())
    loss_fn = ContrastiveLoss(margin=1.0)
    loader = DataLoader(PairDataset(train, generate_pairs(train.labels, 128 * 40, seed=0)), batch_size=128)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for x1, x2, same in loader:
        e1, e2 = net(x1, x2)
        loss = loss_fn.forward_pairs(e1, e2, same)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = _first_last(losses)
    assert last < 0.7 * first, (first, last)
    accuracy = _verification_accuracy(net.embedder, train, test)  # ~0.92
    assert accuracy > 0.85 and accuracy > untrained + 0.1


def test_train_triplet_network_on_digits() -> None:
    from deepmetric.losses.triplet_margin import TripletMarginLoss

    train, test = _digits()
    embedder = _embedder()
    untrained = _verification_accuracy(embedder, train, test)
    net = TripletNetwork(embedder)
    loss_fn = TripletMarginLoss(margin=0.2, distance="euclidean", reduction="mean")
    triplets = generate_triplets(train.labels, 128 * 40, "random", seed=0)
    loader = DataLoader(TripletDataset(train, triplets), batch_size=128)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for a, p, n in loader:
        ea, ep, en = net(a, p, n)
        loss = loss_fn.forward_triplets(ea, ep, en)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = _first_last(losses)
    assert last < 0.7 * first, (first, last)
    accuracy = _verification_accuracy(net.embedder, train, test)  # ~0.90
    assert accuracy > 0.85 and accuracy > untrained + 0.1
    # a round of offline semi-hard mining with the trained model yields valid triplets
    with torch.no_grad():
        emb = net.embedder(train.x)
    mined = generate_triplets(train.labels, 500, "semi_hard", emb, margin=0.2, seed=0, distance="euclidean")
    _check_structure(mined, train.labels)
