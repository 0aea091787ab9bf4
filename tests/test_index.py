"""deepmetric.index: exact/approximate search, persistence (checksums, fingerprints, atomic saves), CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric.errors import ConfigError
from deepmetric.index import Index, SearchIndexError, recall_against_exact
from deepmetric.index import store as index_store

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- helpers (also used by test_serve)
def make_checkpoint(path: Path, seed: int = 0, embedding_dim: int = 16) -> Path:
    """A deepmetric checkpoint of an untrained small CNN for the digits dataset, in fit()'s format."""
    from deepmetric.config import Config, DataConfig, ModelConfig, TrainConfig, config_to_dict
    from deepmetric.data import load_splits
    from deepmetric.models import build_model
    from deepmetric.train import save_checkpoint
    from deepmetric.train.loop import _plain

    config = Config(
        seed=seed,
        data=DataConfig(name="digits"),
        model=ModelConfig(name="small_cnn", embedding_dim=embedding_dim, args={"width": 8}),
        train=TrainConfig(embed_batch_size=256, baselines=False, plots=False),
    )
    splits = load_splits("digits", "closed", val_fraction=0.1, seed=seed)
    torch.manual_seed(seed)
    model = build_model("small_cnn", embedding_dim, normalize=True, in_channels=1, width=8)
    meta = {"input_shape": list(splits.train.input_shape), "kind": "image",
            "num_train_classes": splits.num_train_classes, "info": _plain(splits.info)}
    save_checkpoint(path, {"config": config_to_dict(config), "data": meta, "model": model.state_dict(),
                           "epoch": 0, "step": 0})
    return path


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32) * 3
    labels = rng.integers(0, clusters, n)
    return (centers[labels] + spread * rng.standard_normal((n, dim))).astype(np.float32), labels


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    g, q = gallery.astype(np.float64), queries.astype(np.float64)
    if metric == "euclidean":
        d = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    elif metric == "cosine":
        d = 1 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    else:
        d = -(q @ g.T)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    import deepmetric.cli as cli

    return cli.main(argv)


# ----------------------------------------------------------------------------- exact search
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "inner_product"])
def test_flat_search_equals_brute_force(metric: str) -> None:
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((300, 12)).astype(np.float32)
    queries = rng.standard_normal((25, 12)).astype(np.float32)
    ids = rng.permutation(10_000)[:300].astype(np.int64)
    index = Index(12, metric=metric)
    index.add(gallery, ids, labels=np.arange(300) % 7, metadata=[{"row": i} for i in range(300)])
    result = index.search(queries, k=9)
    want_d, want_rows = brute_force(gallery, queries, 9, metric)
    np.testing.assert_array_equal(result.ids, ids[want_rows])
    np.testing.assert_allclose(result.distances, want_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(result.labels, want_rows % 7)
    assert [[m["row"] for m in row] for row in result.metadata] == want_rows.tolist()
    # one query as a 1-D vector
    single = index.search(queries[3], k=9)
    np.testing.assert_array_equal(single.ids[0], result.ids[3])


def test_padding_when_fewer_items_than_k() -> None:
    index = Index(3)
    index.add(np.eye(3), ids=[5, 6, 7], labels=[1, 2, 3])
    result = index.search(np.array([[1.0, 0.0, 0.0]]), k=5)
    assert result.ids.tolist() == [[5, 6, 7, -1, -1]]
    assert np.isinf(result.distances[0, 3:]).all() and np.isfinite(result.distances[0, :3]).all()
    assert result.labels[0, 3:].tolist() == [-1, -1]
    assert result.metadata[0][3:] == [None, None]
    assert [r["id"] for r in result.rows(0)] == [5, 6, 7]
    empty = Index(3).search(np.ones((2, 3)), k=2)
    assert empty.ids.tolist() == [[-1, -1], [-1, -1]]


def test_bad_inputs_are_refused() -> None:
    index = Index(4, metric="cosine")
    index.add(np.ones((2, 4)), ids=[1, 2])
    with pytest.raises(SearchIndexError, match="duplicate"):
        index.add(np.ones((2, 4)), ids=[3, 3])
    with pytest.raises(SearchIndexError, match="already in the index"):
        index.add(np.ones((1, 4)), ids=[2])
    with pytest.raises(SearchIndexError, match="shape"):
        index.add(np.ones((1, 5)), ids=[9])
    with pytest.raises(SearchIndexError, match="NaN"):
        index.add(np.full((1, 4), np.nan), ids=[9])
    with pytest.raises(SearchIndexError, match="zero vector"):
        index.search(np.zeros(4), k=1)
    with pytest.raises(SearchIndexError, match="integers"):
        index.add(np.ones((1, 4)), ids=[1.5])
    with pytest.raises(SearchIndexError, match=">= 0"):
        index.add(np.ones((1, 4)), ids=[-1])
    with pytest.raises(ConfigError):
        index.search(np.ones(4), k=0)
    with pytest.raises(ConfigError, match="valid metrics"):
        Index(4, metric="manhattan")
    with pytest.raises(ConfigError, match="nprobe"):
        Index(4, backend="hnsw", nprobe=3)
    with pytest.raises(ConfigError, match="Valid index backend names"):
        Index(4, backend="annoy")
    assert len(index) == 2  # nothing was added by the failed calls


# ----------------------------------------------------------------------------- approximate search
@pytest.mark.parametrize("backend,params,floor", [("ivf", {}, 0.9), ("hnsw", {}, 0.95)])
def test_approximate_recall_on_clustered_data(backend: str, params: dict, floor: float) -> None:
    vectors, labels = clustered(3000, 16, 30, seed=2)
    index = Index(16, backend=backend, **params)
    index.add(vectors, np.arange(3000), labels=labels)
    queries = vectors[::10] + 0.01
    recall = recall_against_exact(index, queries, k=10)
    print(f"{backend} recall@10 = {recall:.4f}")
    assert recall >= floor
    if backend == "ivf":
        assert index.backend_params["nlist"] == round(4 * np.sqrt(3000))  # trained on the first add
    flat = Index(16)
    flat.add(vectors, np.arange(3000))
    assert recall_against_exact(flat, queries, k=10) == 1.0


def test_recall_measure_detects_a_poor_index() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)  # no structure: IVF with 1 probe misses
    index = Index(32, backend="ivf", nlist=64, nprobe=1)
    index.add(vectors, np.arange(2000))
    low = recall_against_exact(index, vectors[:200], k=10)
    index.set_search_params(nprobe=64)  # visiting every list is exhaustive
    high = recall_against_exact(index, vectors[:200], k=10)
    assert low < 0.9 and high == pytest.approx(1.0)


# ----------------------------------------------------------------------------- remove / add
@pytest.mark.parametrize("backend", ["flat", "ivf", "hnsw"])
def test_remove_and_add_keep_ids_consistent(backend: str, tmp_path: Path) -> None:
    vectors, labels = clustered(600, 8, 6, seed=4)
    index = Index(8, backend=backend)
    index.add(vectors, np.arange(1000, 1600), labels=labels, metadata=[{"i": i} for i in range(600)])
    rng = np.random.default_rng(5)
    gone = rng.choice(np.arange(1000, 1600), size=60, replace=False)  # 10 %: HNSW keeps tombstones
    index.remove(gone)
    assert len(index) == 540 and not any(int(g) in index for g in gone)
    result = index.search(vectors, k=10)
    assert not np.isin(result.ids, gone).any()
    for row_ids, row_labels, row_meta in zip(result.ids, result.labels, result.metadata):
        for item_id, label, meta in zip(row_ids, row_labels, row_meta):
            if item_id >= 0:
                assert label == labels[item_id - 1000] and meta == {"i": int(item_id - 1000)}
    # the stored vector of a kept item finds itself first
    keep = np.setdiff1d(np.arange(1000, 1600), gone)[:20]
    assert (index.search(vectors[keep - 1000], k=1).ids[:, 0] == keep).mean() >= 0.95
    with pytest.raises(SearchIndexError, match="not in the index"):
        index.remove([int(gone[0]), int(keep[0])])
    assert int(keep[0]) in index  # a failed remove removes nothing
    with pytest.raises(SearchIndexError):
        index.get(int(gone[0]))
    # re-adding removed ids with new vectors: they are found under those ids
    fresh = np.full((3, 8), 50.0, dtype=np.float32) + np.arange(3)[:, None]
    index.add(fresh, gone[:3], labels=[99, 99, 99])
    found = index.search(fresh, k=1)
    assert found.ids[:, 0].tolist() == gone[:3].tolist() and found.labels[:, 0].tolist() == [99, 99, 99]
    assert index.get(int(gone[0])).label == 99
    # and the state survives a save/load round trip (HNSW tombstones included)
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    again = loaded.search(vectors, k=10)
    np.testing.assert_array_equal(again.ids, index.search(vectors, k=10).ids)
    assert not np.isin(again.ids, gone[3:]).any()


def test_hnsw_compacts_after_many_removals() -> None:
    vectors, _ = clustered(500, 8, 5, seed=6)
    index = Index(8, backend="hnsw")
    index.add(vectors, np.arange(500))
    index.remove(np.arange(0, 300))
    assert index._backend_state()[2] == 200  # the graph was rebuilt from the 200 live vectors
    assert not np.isin(index.search(vectors, k=5).ids, np.arange(300)).any()


# ----------------------------------------------------------------------------- persistence
def _small_index(backend: str = "flat", fingerprint: str | None = "f" * 64) -> Index:
    vectors, labels = clustered(200, 6, 4, seed=7)
    index = Index(6, metric="cosine", backend=backend)
    thumbs = (np.arange(200 * 4 * 4) % 255).astype(np.uint8).reshape(200, 1, 4, 4)
    index.add(vectors, np.arange(200) * 3, labels=labels, metadata=[{"path": f"img{i}.png"} for i in range(200)],
              thumbnails=thumbs)
    if fingerprint:
        index.provenance = {"model_fingerprint": fingerprint, "checkpoint": "/nowhere/model.pt"}
    return index


@pytest.mark.parametrize("backend", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(backend: str, tmp_path: Path) -> None:
    index = _small_index(backend)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["format"] == "deepmetric-index" and manifest["backend"] == backend
    assert manifest["dim"] == 6 and manifest["metric"] == "cosine" and manifest["counts"]["items"] == 200
    assert manifest["model_fingerprint"] == "f" * 64
    assert set(manifest["files"]) == {"index.faiss", "items.npz", "metadata.json", "thumbnails.npz"}
    loaded = Index.load(tmp_path / "idx", expected_fingerprint="f" * 64)
    queries = index.vectors[:30]
    a, b = index.search(queries, 7), loaded.search(queries, 7)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.distances, b.distances)
    assert a.metadata == b.metadata and len(loaded) == 200
    assert loaded.backend_params == index.backend_params and loaded.provenance == index.provenance
    np.testing.assert_array_equal(loaded.get(9).thumbnail, index.get(9).thumbnail)
    assert loaded.get(9).metadata == {"path": "img3.png"}


@pytest.mark.parametrize("name", ["index.faiss", "items.npz", "metadata.json", "thumbnails.npz"])
def test_tampered_file_is_refused(name: str, tmp_path: Path) -> None:
    _small_index().save(tmp_path / "idx")
    path = tmp_path / "idx" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SearchIndexError, match=f"checksum mismatch for .*{name}"):
        Index.load(tmp_path / "idx")


def test_missing_file_and_foreign_directory_are_refused(tmp_path: Path) -> None:
    _small_index().save(tmp_path / "idx")
    (tmp_path / "idx" / "items.npz").unlink()
    with pytest.raises(SearchIndexError, match="items.npz.*missing"):
        Index.load(tmp_path / "idx")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SearchIndexError, match="no manifest.json"):
        Index.load(tmp_path / "other")
    with pytest.raises(SearchIndexError, match="not a deepmetric index"):
        _small_index().save(tmp_path / "other")  # never replaces unrelated data
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(SearchIndexError, match="no index directory"):
        Index.load(tmp_path / "absent")


def test_foreign_model_fingerprint_is_refused(tmp_path: Path) -> None:
    _small_index(fingerprint="a" * 64).save(tmp_path / "idx")
    with pytest.raises(SearchIndexError) as info:
        Index.load(tmp_path / "idx", expected_fingerprint="b" * 64)
    assert "a" * 64 in str(info.value) and "b" * 64 in str(info.value)
    assert len(Index.load(tmp_path / "idx", expected_fingerprint="a" * 64)) == 200


def test_interrupted_save_leaves_previous_index_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "idx"
    old = _small_index()
    old.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    new = Index(6, metric="cosine")
    new.add(np.ones((3, 6)), [1, 2, 3])
    real = index_store.atomic_write_bytes
    calls = {"n": 0}

    def failing_write(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # index.faiss written, then the crash while writing items.npz
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(index_store, "atomic_write_bytes", failing_write)
    with pytest.raises(OSError, match="simulated"):
        new.save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no staging directory left behind
    assert len(Index.load(target)) == 200

    # a failure while renaming the new directory into place puts the old one back
    monkeypatch.setattr(index_store, "atomic_write_bytes", real)
    real_rename = os.rename
    renames = {"n": 0}

    def failing_rename(src: object, dst: object) -> None:
        renames["n"] += 1
        if renames["n"] == 2:
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(index_store.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        new.save(target)
    monkeypatch.setattr(index_store.os, "rename", real_rename)
    assert len(Index.load(target)) == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    new.save(target)  # and a good save replaces it
    assert len(Index.load(target)) == 3


# ----------------------------------------------------------------------------- built from a checkpoint, CLI
def test_cli_build_stats_search(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from deepmetric.models import model_fingerprint
    from deepmetric.train import load_model_from_checkpoint

    out = tmp_path / "idx"
    assert _cli(["index", "build", str(checkpoint), "--out", str(out), "--backend", "hnsw", "--no-progress",
                 "--device", "cpu"], monkeypatch) == 0
    index = Index.load(out)
    model, _, _ = load_model_from_checkpoint(checkpoint)
    fingerprint = model_fingerprint(model, include_weights=True)
    assert index.provenance["model_fingerprint"] == fingerprint
    assert index.provenance["checkpoint"] == str(checkpoint.resolve())
    assert index.provenance["input_shape"] == [1, 8, 8] and len(index.provenance["mean"]) == 1
    assert len(index) == 359 and index.has_thumbnails and index.get(0).metadata == {"dataset_index": 0,
                                                                                       "split": "test"}
    capsys.readouterr()

    assert _cli(["index", "stats", str(out)], monkeypatch) == 0
    text = capsys.readouterr().out
    assert "checksums: ok" in text and "recall@10:" in text and "backend: hnsw" in text
    assert _cli(["index", "stats", str(out), "--json"], monkeypatch) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["items"] == 359 and 0.5 <= stats["recall@10"] <= 1.0

    # an image query: the stored thumbnail of item 17 (the full 8×8 image) finds item 17 at distance ~0,
    # which checks that query preprocessing (grayscale, size, normalisation) matches the indexed items
    Image.fromarray(index.thumbnail(17)[0]).save(tmp_path / "q.png")
    assert _cli(["search", str(out), "--query", str(tmp_path / "q.png"), "-k", "3", "--json"], monkeypatch) == 0
    hits = json.loads(capsys.readouterr().out)[0]["neighbours"]
    assert hits[0]["id"] == 17 and hits[0]["distance"] < 1e-3 and len(hits) == 3
    assert _cli(["search", str(out), "--query", str(tmp_path / "q.png"), "-k", "3"], monkeypatch) == 0
    table = capsys.readouterr().out
    assert "rank" in table and "distance" in table and '{"dataset_index": 17, "split": "test"}' in table

    np.savez(tmp_path / "q.npz", embeddings=index.vectors[[4, 9]])
    assert _cli(["search", str(out), "--query", str(tmp_path / "q.npz"), "-k", "2", "--json"], monkeypatch) == 0
    found = json.loads(capsys.readouterr().out)
    assert [q["neighbours"][0]["id"] for q in found] == [4, 9]

    # another model (other weights) is refused for image queries, naming both fingerprints
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    assert _cli(["search", str(out), "--query", str(tmp_path / "q.png"), "--checkpoint", str(other)],
                monkeypatch) == 1
    err = capsys.readouterr().err
    assert fingerprint in err and "another model" in err
    # usage errors exit 2, data errors 1
    assert _cli(["search", str(out), "--query", str(tmp_path / "q.txt")], monkeypatch) == 2
    (out / "metadata.json").write_text("{}")
    assert _cli(["index", "stats", str(out)], monkeypatch) == 1
    assert "checksum mismatch" in capsys.readouterr().err
