"""Tests of deepmetric.data: IDX files, Fashion-MNIST lookup, datasets, protocols, augmentation."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import deepmetric.data.fashion_mnist as fm
from deepmetric.data import (
    ArrayDataset,
    BatchDataset,
    Compose,
    CsvManifestDataset,
    ImageFolderDataset,
    RandomCropWithPadding,
    RandomHorizontalFlip,
    default_augment,
    load_digits_dataset,
    load_fashion_mnist,
    load_npz,
    load_splits,
    read_idx,
    stratified_split,
    write_idx,
)
from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import DATASETS

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([9, 0, 3], dtype=np.uint8),
        np.array([[-5, 70000], [1, 2]], dtype=np.int32),
        np.array([1.5, -2.25], dtype=np.float32),
    ],
)
def test_idx_round_trip(tmp_path: Path, array: np.ndarray, suffix: str) -> None:
    path = tmp_path / f"a-idx{suffix}"
    write_idx(path, array)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_idx_header_is_the_mnist_layout(tmp_path: Path) -> None:
    write_idx(tmp_path / "x.gz", np.zeros((5, 28, 28), dtype=np.uint8))
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    assert raw[:4] == bytes.fromhex("00000803")
    assert int.from_bytes(raw[4:8], "big") == 5 and int.from_bytes(raw[8:12], "big") == 28
    assert len(raw) == 16 + 5 * 28 * 28


def _gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc", "magic"),
        (b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"abc", "truncated"),
        (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abcd", "trailing"),
        (b"\x00\x00\x08\x03" + (1).to_bytes(4, "big"), "truncated header"),
        (b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"a", "magic"),
    ],
)
def test_idx_corrupt_files_name_the_file(tmp_path: Path, payload: bytes, message: str) -> None:
    path = _gz(tmp_path / "bad-idx1-ubyte.gz", payload)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_broken_gzip_and_wrong_ndim(tmp_path: Path) -> None:
    good = gzip.compress(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + b"abcd")
    broken = tmp_path / "broken.gz"
    broken.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(broken)
    assert str(broken) in str(info.value)
    ok = tmp_path / "ok.gz"
    ok.write_bytes(good)
    assert read_idx(ok, expected_ndim=1).tolist() == list(b"abcd")
    with pytest.raises(DataError, match="expected 3"):
        read_idx(ok, expected_ndim=3)


# --------------------------------------------------------------------------- Fashion-MNIST lookup


def _write_fake_fmnist(folder: Path, n_train: int = 20, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    write_idx(folder / "train-images-idx3-ubyte.gz", train_x)
    write_idx(folder / "train-labels-idx1-ubyte.gz", (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", (np.arange(n_test) % 10).astype(np.uint8))
    return train_x, test_x


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point every Fashion-MNIST search location into tmp_path (all empty)."""
    paths = {"env": tmp_path / "env", "cache": tmp_path / "xdg", "system": tmp_path / "system"}
    monkeypatch.setenv("DEEPMETRIC_DATA", str(paths["env"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(paths["cache"]))
    monkeypatch.setattr(fm, "SYSTEM_DIR", paths["system"])
    return paths


def test_fashion_mnist_from_generated_files(tmp_path: Path, isolated_env: dict[str, Path]) -> None:
    train_x, test_x = _write_fake_fmnist(tmp_path / "root")
    train, test = load_fashion_mnist(tmp_path / "root", download=False)
    assert isinstance(train, BatchDataset)
    assert train.input_shape == (1, 28, 28) and train.kind == "image" and len(train) == 20 and len(test) == 10
    assert train.data.dtype == torch.uint8
    assert torch.equal(train.data[:, 0], torch.from_numpy(train_x))
    assert train.labels.tolist() == [i % 10 for i in range(20)]
    x, y = train.get_batch([3])
    expected = (torch.from_numpy(train_x[3]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[0, 0], expected)
    assert y.tolist() == [3] and y.dtype == torch.long
    assert train.class_names is not None and train.class_names[9] == "Ankle boot"


def test_fashion_mnist_search_order(tmp_path: Path, isolated_env: dict[str, Path]) -> None:
    _write_fake_fmnist(isolated_env["env"] / "fashion-mnist", n_train=30)
    train, _ = load_fashion_mnist(download=False)
    assert len(train) == 30  # $DEEPMETRIC_DATA/fashion-mnist is searched
    _write_fake_fmnist(tmp_path / "root", n_train=40)
    train, _ = load_fashion_mnist(tmp_path / "root", download=False)
    assert len(train) == 40  # root comes first
    paths = fm.fashion_mnist_search_paths(tmp_path / "root")
    assert paths == [tmp_path / "root", isolated_env["env"], isolated_env["env"] / "fashion-mnist",
                     isolated_env["cache"] / "deepmetric" / "fashion-mnist", isolated_env["system"]]


def test_fashion_mnist_corrupt_file_is_named(tmp_path: Path, isolated_env: dict[str, Path]) -> None:
    root = tmp_path / "root"
    _write_fake_fmnist(root)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))  # 7 labels, 10 images
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(root, download=False)
    _gz(root / "train-images-idx3-ubyte.gz", b"\x00\x00\x08\x03" + b"\x00" * 3)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist(root, download=False)


def _assert_lists_all(message: str, paths: list[Path]) -> None:
    for p in paths:
        assert str(p) in message, f"{p} missing from: {message}"
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "DEEPMETRIC_DATA" in message


def test_fashion_mnist_not_found_lists_every_path(tmp_path: Path, isolated_env: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("download=False must not download")

    monkeypatch.setattr(fm, "_download_file", no_download)
    expected = [tmp_path / "root", isolated_env["env"], isolated_env["env"] / "fashion-mnist",
                isolated_env["cache"] / "deepmetric" / "fashion-mnist", isolated_env["system"]]
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path / "root", download=False)
    _assert_lists_all(str(info.value), expected)
    monkeypatch.delenv("DEEPMETRIC_DATA")
    with pytest.raises(DataError, match="not set") as info:
        load_fashion_mnist(download=False)
    _assert_lists_all(str(info.value), expected[3:])


def test_fashion_mnist_offline_download_fails_cleanly(tmp_path: Path, isolated_env: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def offline(url: str, dest: Path, md5: str, timeout: float = 0) -> None:
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(fm, "_download_file", offline)
    with pytest.raises(DataError, match="network is unreachable") as info:
        load_fashion_mnist(download=True)
    assert calls and calls[0].startswith(fm.FASHION_MNIST_URL)
    _assert_lists_all(str(info.value), fm.fashion_mnist_search_paths())


def test_fashion_mnist_download_goes_to_cache(tmp_path: Path, isolated_env: dict[str, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "server"
    _write_fake_fmnist(source, n_train=10, n_test=10)
    fetched: list[tuple[str, str]] = []

    def fake(url: str, dest: Path, md5: str, timeout: float = 0) -> None:
        name = url.rsplit("/", 1)[1]
        fetched.append((name, md5))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((source / name).read_bytes())

    monkeypatch.setattr(fm, "_download_file", fake)
    train, test = load_fashion_mnist(download=True)
    assert len(train) == 10 and len(test) == 10
    assert dict(fetched) == fm.FASHION_MNIST_FILES
    assert all((isolated_env["cache"] / "deepmetric" / "fashion-mnist" / n).is_file() for n in fm.FASHION_MNIST_FILES)


class _FakeResponse(io.BytesIO):
    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_download_file_verifies_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"fashion" * 1000
    monkeypatch.setattr(fm.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(payload))
    dest = tmp_path / "cache" / "f.gz"
    with pytest.raises(DataError, match="checksum mismatch"):
        fm._download_file("http://example.invalid/f.gz", dest, "0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # nothing half-written left
    import hashlib

    fm._download_file("http://example.invalid/f.gz", dest, hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload and list(dest.parent.iterdir()) == [dest]


@pytest.fixture(scope="module")
def real_fmnist() -> tuple[ArrayDataset, ArrayDataset]:
    if not all((SYSTEM_FMNIST / n).is_file() for n in fm.FASHION_MNIST_FILES):
        pytest.skip("Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist(SYSTEM_FMNIST, download=False)


def test_real_fashion_mnist(real_fmnist: tuple[ArrayDataset, ArrayDataset]) -> None:
    train, test = real_fmnist
    assert train.data.shape == (60000, 1, 28, 28) and test.data.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert abs(train.data.float().mean().item() / 255 - 0.2860) < 1e-3
    assert abs(train.data.float().std().item() / 255 - 0.3530) < 1e-3


def test_real_fashion_mnist_disjoint_protocol(real_fmnist: tuple[ArrayDataset, ArrayDataset]) -> None:
    s = load_splits("fashion_mnist", "disjoint", root=SYSTEM_FMNIST, download=False, val_fraction=0.1)
    assert s.info["train_classes"] == [0, 1, 2, 3, 4] and s.info["test_classes"] == [5, 6, 7, 8, 9]
    assert (len(s.train), len(s.val), len(s.test)) == (27000, 3000, 5000)
    assert torch.bincount(s.test.labels, minlength=10)[5:].tolist() == [1000] * 5  # the TEST split
    # the test images are those of the official test split
    test = real_fmnist[1]
    assert torch.equal(s.test.data, test.data[test.labels >= 5])
    assert s.num_train_classes == 5 and set(s.train.labels.tolist()) == {0, 1, 2, 3, 4}
    torch.testing.assert_close(s.train.mean, torch.tensor([0.2860]))
    assert s.train.transform is not None and s.test.transform is None and s.val.transform is None


# --------------------------------------------------------------------------- digits, protocols


def test_digits_dataset() -> None:
    images = load_digits_dataset()
    assert images.data.shape == (1797, 1, 8, 8) and images.data.dtype == torch.uint8
    assert int(images.data.max()) == 255 and int(images.data.min()) == 0
    vectors = load_digits_dataset(as_vectors=True)
    assert vectors.kind == "vector" and vectors.input_shape == (64,) and len(vectors) == 1797
    assert torch.equal(vectors.labels, images.labels)
    torch.testing.assert_close(vectors.data.view(-1, 1, 8, 8) * 255 / 16, images.data.float(), atol=0.5, rtol=0)


def _ids_of(ds: ArrayDataset) -> list[int]:
    """Recover the item ids stored in feature 0 of the npz fixture below."""
    x, _ = ds.with_normalization(None, None).get_batch(torch.arange(len(ds)))
    return [int(v) for v in x[:, 0].round().tolist()]


@pytest.fixture
def id_npz(tmp_path: Path) -> Path:
    """A vector dataset whose feature 0 is the item id: 6 classes, 10 + class items each."""
    labels = np.concatenate([np.full(10 + c, c * 3) for c in range(6)])  # ids 0, 3, ..., 15: non-contiguous
    rng = np.random.default_rng(1)
    features = np.column_stack([np.arange(labels.size), rng.normal(size=(labels.size, 3))]).astype(np.float32)
    path = tmp_path / "ids.npz"
    np.savez(path, features=features, labels=labels)
    return path


def test_closed_protocol(id_npz: Path) -> None:
    s = load_splits(f"npz:{id_npz}", "closed", val_fraction=0.2, seed=3)
    train_ids, val_ids, test_ids = set(_ids_of(s.train)), set(_ids_of(s.val)), set(_ids_of(s.test))
    assert not train_ids & val_ids and not train_ids & test_ids and not val_ids & test_ids
    assert train_ids | val_ids | test_ids == set(range(75))
    assert s.info["train_classes"] == [0, 3, 6, 9, 12, 15] == s.info["test_classes"]
    assert sorted(set(s.train.labels.tolist())) == list(range(6)) == sorted(set(s.val.labels.tolist()))
    assert sorted(set(s.test.labels.tolist())) == [0, 3, 6, 9, 12, 15]  # test keeps original ids
    # stratified: 20 % of each class in test (rounded), then 20 % of the rest in val
    assert torch.bincount(s.test.labels)[[0, 3, 6, 9, 12, 15]].tolist() == [2, 2, 2, 3, 3, 3]
    # the test split does not depend on the seed, the validation split does
    other = load_splits(f"npz:{id_npz}", "closed", val_fraction=0.2, seed=4)
    assert set(_ids_of(other.test)) == test_ids and set(_ids_of(other.val)) != val_ids
    again = load_splits(f"npz:{id_npz}", "closed", val_fraction=0.2, seed=3)
    assert set(_ids_of(again.val)) == val_ids
    # normalisation from the training part
    x, _ = s.train.get_batch(torch.arange(len(s.train)))
    torch.testing.assert_close(x.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    assert s.train.transform is None  # vectors are not augmented
    assert s.info["kind"] == "vector" and s.info["input_shape"] == (4,)


def test_disjoint_protocol_and_label_map(id_npz: Path) -> None:
    s = load_splits(f"npz:{id_npz}", "disjoint", val_fraction=0.1)
    assert s.info["train_classes"] == [0, 3, 6] and s.info["test_classes"] == [9, 12, 15]
    assert s.info["label_map"] == {0: 0, 3: 1, 6: 2} and s.num_train_classes == 3
    assert set(s.test.labels.tolist()) == {9, 12, 15} and len(s.test) == 13 + 14 + 15  # all their images
    assert set(_ids_of(s.train)).isdisjoint(_ids_of(s.val))
    assert len(s.train) + len(s.val) == 10 + 11 + 12
    # labels remapped consistently: the item with id 0 has class 0, ids 10.. are class 3 -> 1
    ids, y = _ids_of(s.train), s.train.labels.tolist()
    assert all((label == 0) == (i < 10) for i, label in zip(ids, y))
    custom = load_splits(f"npz:{id_npz}", "disjoint", train_classes=[15, 3], val_fraction=0)
    assert custom.val is None and custom.info["train_classes"] == [3, 15]
    assert custom.info["test_classes"] == [0, 6, 9, 12] and custom.num_train_classes == 2
    assert sorted(set(custom.train.labels.tolist())) == [0, 1]


def test_digits_protocols() -> None:
    s = load_splits("digits", "disjoint", val_fraction=0.1)
    assert set(s.info["train_classes"]).isdisjoint(s.info["test_classes"])
    assert s.info["test_classes"] == [5, 6, 7, 8, 9] and len(s.test) == int((load_digits_dataset().labels >= 5).sum())
    assert repr(s.train.transform) == repr(RandomCropWithPadding(1))  # no flip for digits
    x, y = s.train.get_batch(torch.arange(8), torch.Generator().manual_seed(0), augment=True)
    assert x.shape == (8, 1, 8, 8) and y.max() < 5
    c = load_splits("digits", "closed", val_fraction=0.1)
    assert c.info["train_classes"] == c.info["test_classes"] == list(range(10))
    assert c.info["sizes"]["train"] + c.info["sizes"]["val"] + c.info["sizes"]["test"] == 1797
    by_name = load_splits("digits", "disjoint", train_classes=["1", "2"], val_fraction=0)
    assert by_name.info["train_classes"] == [1, 2]


def test_errors_name_the_valid_choices(id_npz: Path) -> None:
    with pytest.raises(ConfigError, match="fashion_mnist.*image_folder:<path>"):
        load_splits("cifar10")
    with pytest.raises(ConfigError, match="closed, disjoint"):
        load_splits("digits", "open")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_splits("digits", val_fraction=1.0)
    with pytest.raises(ConfigError, match="not in the dataset"):
        load_splits(f"npz:{id_npz}", "disjoint", train_classes=[1])
    with pytest.raises(ConfigError, match="test classes"):
        load_splits(f"npz:{id_npz}", "disjoint", train_classes=[0, 3, 6, 9, 12, 15])
    with pytest.raises(ConfigError, match="needs a path"):
        load_splits("csv")
    assert set(DATASETS.names()) >= {"fashion_mnist", "digits", "image_folder", "csv", "npz"}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.floats(0.0, 0.9), st.integers(0, 100))
def test_stratified_split_properties(labels: list[int], fraction: float, seed: int) -> None:
    y = torch.tensor(labels)
    kept, taken = stratified_split(y, fraction, seed)
    assert sorted(kept.tolist() + taken.tolist()) == list(range(len(labels)))
    for c in set(labels):
        n = labels.count(c)
        k = int((y[taken] == c).sum())
        assert k == min(int(np.floor(fraction * n + 0.5)), n - 1)
        assert int((y[kept] == c).sum()) >= 1
    again = stratified_split(y, fraction, seed)
    assert torch.equal(again[1], taken)


# --------------------------------------------------------------------------- npz


def test_load_npz_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "e.npz", embeddings=np.ones((3, 2)), labels=np.array(["b", "a", "b"]))
    ds = load_npz(tmp_path / "e.npz")
    assert ds.kind == "vector" and ds.input_shape == (2,) and ds.data.dtype == torch.float32
    assert ds.labels.tolist() == [1, 0, 1] and ds.class_names == ["a", "b"]
    np.savez(tmp_path / "bad.npz", x=np.ones((3, 2)), y=np.zeros(3))
    with pytest.raises(DataError, match="keys present: x, y"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", features=np.ones((3, 2)), labels=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="3 entries"):
        load_npz(tmp_path / "short.npz")


def test_npz_two_files_share_string_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "tr.npz", features=np.arange(8.0).reshape(4, 2), labels=np.array(["cat", "cat", "dog", "dog"]))
    np.savez(tmp_path / "te.npz", features=np.arange(6.0).reshape(3, 2), labels=np.array(["ant", "cat", "ant"]))
    s = load_splits(f"npz:{tmp_path / 'tr.npz'},{tmp_path / 'te.npz'}", "disjoint", train_classes=["cat", "dog"],
                    val_fraction=0)
    assert s.info["train_class_names"] == ["cat", "dog"] and s.info["test_class_names"] == ["ant"]
    assert len(s.test) == 2 and s.test.labels.tolist() == [0, 0]  # "ant" keeps its id in the union
    with pytest.warns(UserWarning, match="have no training images"):
        closed = load_splits(f"npz:{tmp_path / 'tr.npz'},{tmp_path / 'te.npz'}", "closed", val_fraction=0)
    assert len(closed.test) == 1 and closed.info["dropped_test_classes"] == [0]


# --------------------------------------------------------------------------- image folders and CSV


COLOURS = {"cat": (255, 0, 0), "ant": (0, 255, 0), "dog": (0, 0, 255)}


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (6, 4), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image.putpixel((0, 0), (255, 255, 255))  # a marker in the top-left corner
    image.convert(mode).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for name, colour in COLOURS.items():
        for i in range(4):
            _png(root / name / f"{i}.png", colour)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder(folder: Path) -> None:
    ds = ImageFolderDataset(folder)
    assert isinstance(ds, BatchDataset)
    assert ds.class_names == ["ant", "cat", "dog"] and ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.input_shape == (3, 4, 6) and ds.kind == "image" and len(ds) == 12
    x, y = ds.get_batch([4, 8])
    assert x.shape == (2, 3, 4, 6) and y.tolist() == [1, 2]
    torch.testing.assert_close(x[0, :, 1, 1], torch.tensor([1.0, 0.0, 0.0]))  # cat is red
    torch.testing.assert_close(x[1, :, 0, 0], torch.ones(3))  # the white marker
    item, label = ds[8]
    torch.testing.assert_close(item, x[1])
    assert label == 2
    small = ImageFolderDataset(folder, image_size=(2, 3), grayscale=True, mean=0.5, std=0.25)
    xs, _ = small.get_batch([0])
    assert small.input_shape == (1, 2, 3) and xs.shape == (1, 1, 2, 3)
    sub = small.subset([11, 0])
    assert isinstance(sub, ImageFolderDataset) and sub.labels.tolist() == [2, 0] and sub.std is not None
    arr = ds.to_array()
    torch.testing.assert_close(arr.get_batch([4, 8])[0], x)


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty_root")
    (tmp_path / "r" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no image"):
        ImageFolderDataset(tmp_path / "r")
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")


def test_image_folder_grayscale_auto_and_corrupt_file(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "g" / "a" / f"{i}.png", (10, 10, 10), mode="L")
    ds = ImageFolderDataset(tmp_path / "g")
    assert ds.grayscale and ds.input_shape == (1, 4, 6)
    (tmp_path / "g" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="1.png"):
        ds.get_batch([1])


def test_image_folder_splits_protocol(tmp_path: Path) -> None:
    root = tmp_path / "split"
    for split, n in (("train", 5), ("test", 2)):
        for name, colour in COLOURS.items():
            for i in range(n):
                _png(root / split / name / f"{i}.png", colour, size=(16, 16))
    s = load_splits(f"image_folder:{root}", "disjoint", val_fraction=0.2)
    assert s.info["train_classes"] == [0, 1] and s.info["test_classes"] == [2]
    assert (len(s.train), len(s.val), len(s.test)) == (8, 2, 2)  # test from the test/ folder
    assert s.info["train_class_names"] == ["ant", "cat"] and s.info["test_class_names"] == ["dog"]
    assert repr(s.train.transform) == repr(Compose([RandomCropWithPadding(2), RandomHorizontalFlip()]))
    x, _ = s.train.get_batch(torch.arange(len(s.train)))
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)  # train statistics
    resized = load_splits("image_folder:split", "closed", root=tmp_path, image_size=8, val_fraction=0)
    assert resized.train.input_shape == (3, 8, 8) and resized.test.input_shape == (3, 8, 8)
    assert len(resized.test) == 6 and resized.val is None


def test_csv_manifest(tmp_path: Path) -> None:
    for i, name in enumerate(["cat", "ant", "dog", "cat", "dog", "ant"]):
        _png(tmp_path / "img" / f"{i}.png", COLOURS[name])
    rows = ["path,label,split,comment"] + [
        f"img/{i}.png,{name},{'test' if i >= 4 else 'train'},x"
        for i, name in enumerate(["cat", "ant", "dog", "cat", "dog", "ant"])
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = CsvManifestDataset(tmp_path / "m.csv")
    assert ds.class_names == ["ant", "cat", "dog"] and ds.labels.tolist() == [1, 0, 2, 1, 2, 0]
    assert ds.splits == ["train"] * 4 + ["test"] * 2
    x, _ = ds.get_batch([2])
    torch.testing.assert_close(x[0, :, 2, 2], torch.tensor([0.0, 0.0, 1.0]))  # dog is blue
    test_only = CsvManifestDataset(tmp_path / "m.csv", split="test")
    assert test_only.labels.tolist() == [2, 0] and test_only.class_names == ds.class_names
    s = load_splits(f"csv:{tmp_path / 'm.csv'}", "closed", val_fraction=0)
    assert len(s.train) == 4 and len(s.test) == 2 and s.info["predefined_split"]


def test_csv_manifest_errors_name_the_row(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", COLOURS["cat"])
    (tmp_path / "m.csv").write_text("path,label\na.png,3\nmissing.png,10\n")
    with pytest.raises(DataError, match=r"line 3: 'missing.png'"):
        CsvManifestDataset(tmp_path / "m.csv")
    (tmp_path / "h.csv").write_text("file,class\na.png,3\n")
    with pytest.raises(DataError, match=r"'path' and 'label'.*\['file', 'class'\]"):
        CsvManifestDataset(tmp_path / "h.csv")
    (tmp_path / "s.csv").write_text("path,label,split\na.png,3,train\na.png,3,holdout\n")
    with pytest.raises(DataError, match="line 3: split must be"):
        CsvManifestDataset(tmp_path / "s.csv")
    (tmp_path / "n.csv").write_text("path,label\na.png,10\na.png,9\na.png,10\n")
    numeric = CsvManifestDataset(tmp_path / "n.csv")
    assert numeric.class_names == ["9", "10"] and numeric.labels.tolist() == [1, 0, 1]  # numeric order


# --------------------------------------------------------------------------- ArrayDataset


def test_array_dataset_basics() -> None:
    data = torch.arange(6 * 2 * 3 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(6, 2, 3, 3)
    ds = ArrayDataset(data, torch.tensor([0, 1, 0, 1, 2, 2]), mean=[0.1, 0.2], std=[0.5, 0.25])
    x, y = ds.get_batch(torch.tensor([5, 1]))
    expected = (data[[5, 1]].float() / 255 - torch.tensor([0.1, 0.2]).view(1, 2, 1, 1)) / torch.tensor(
        [0.5, 0.25]).view(1, 2, 1, 1)
    torch.testing.assert_close(x, expected)
    assert y.tolist() == [2, 1] and x.dtype == torch.float32
    xi, yi = ds[-1]
    torch.testing.assert_close(xi, expected[0])
    assert yi == 2 and isinstance(yi, int)
    sub = ds.subset([4, 5])
    assert len(sub) == 2 and sub.labels.tolist() == [2, 2] and sub.mean is not None and len(ds) == 6
    with pytest.raises(DataError, match="1 or 2 values"):
        ArrayDataset(data, torch.zeros(6, dtype=torch.long), mean=[0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="6 items but labels has 5"):
        ArrayDataset(data, torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match="out of range"):
        ds.get_batch([6])
    with pytest.raises(DataError, match="std must be > 0"):
        ds.with_normalization(0.0, 0.0)
    vec = ArrayDataset(torch.ones(3, 4, dtype=torch.float64), torch.tensor([0, 1, 1]), kind="vector")
    assert vec.input_shape == (4,) and vec.get_batch([0])[0].dtype == torch.float32


def test_get_batch_augmentation_is_driven_by_the_generator() -> None:
    torch.manual_seed(123)
    data = torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8)
    ds = ArrayDataset(data, torch.arange(64) % 4, transform=default_augment("fashion_mnist"))
    idx = torch.arange(64)
    a, _ = ds.get_batch(idx, torch.Generator().manual_seed(7), augment=True)
    torch.manual_seed(999)  # the global generator must not matter
    b, _ = ds.get_batch(idx, torch.Generator().manual_seed(7), augment=True)
    c, _ = ds.get_batch(idx, torch.Generator().manual_seed(8), augment=True)
    plain, _ = ds.get_batch(idx, torch.Generator().manual_seed(7), augment=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(plain, data.float() / 255)
    assert not torch.equal(a, plain)
    assert torch.equal(ds.with_transform(None).get_batch(idx, torch.Generator(), augment=True)[0], plain)


# --------------------------------------------------------------------------- augmentations


def test_flip_really_flips() -> None:
    x = torch.rand(5, 3, 4, 7)
    torch.testing.assert_close(RandomHorizontalFlip(p=1.0)(x, torch.Generator()), x.flip(-1))
    torch.testing.assert_close(RandomHorizontalFlip(p=0.0)(x, torch.Generator()), x)
    out = RandomHorizontalFlip(p=0.5)(torch.rand(200, 1, 2, 5).add(0.1), torch.Generator().manual_seed(0))
    assert out.shape == (200, 1, 2, 5)
    x = torch.arange(10.0).view(1, 1, 1, 10).expand(200, 1, 2, 10).contiguous()
    out = RandomHorizontalFlip(p=0.5)(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all()) and 60 < int(flipped.sum()) < 140


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x translated so that out[i, j] = x[i + dy, j + dx] (0 outside)."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    yt, xt = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    out[..., ys, xs] = x[..., yt, xt]
    return out


def test_crop_shifts_by_at_most_padding() -> None:
    p = 2
    x = torch.rand(64, 2, 7, 9) + 0.1  # strictly positive, so the zero border is visible
    out = RandomCropWithPadding(p)(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    shifts = []
    for i in range(x.shape[0]):
        matches = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                   if torch.equal(out[i], _shift(x[i], dy, dx))]
        assert len(matches) == 1, f"sample {i} is not a translation by at most {p} pixels"
        shifts.append(matches[0])
    assert len(set(shifts)) > 10  # offsets really vary across the batch
    same = RandomCropWithPadding(p)(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, same)
    assert torch.equal(RandomCropWithPadding(0)(x, torch.Generator()), x)


def test_compose_and_defaults() -> None:
    x = torch.rand(16, 1, 10, 10)
    t = Compose([RandomCropWithPadding(1), RandomHorizontalFlip(1.0)])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(t(x, g1), RandomCropWithPadding(1)(x, g2).flip(-1))
    assert default_augment("npz:x.npz", "vector") is None
    assert repr(default_augment("image_folder:/a", "image", (3, 64, 64))) == repr(
        Compose([RandomCropWithPadding(8), RandomHorizontalFlip(0.5)]))
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        RandomHorizontalFlip()(torch.rand(3, 4), None)
    with pytest.raises(ConfigError):
        RandomCropWithPadding(-1)


def test_negative_and_large_label_ids_are_remapped(tmp_path: Path) -> None:
    labels = np.repeat([-1, 7, 10**9, 3], 5)
    np.savez(tmp_path / "n.npz", features=np.arange(40.0).reshape(20, 2), labels=labels)
    s = load_splits(f"npz:{tmp_path / 'n.npz'}", "disjoint", val_fraction=0)
    assert s.info["train_classes"] == [-1, 3] and s.info["test_classes"] == [7, 10**9]
    assert sorted(set(s.train.labels.tolist())) == [0, 1] and len(s.train) == 10
    x, y = s.train.with_normalization(None, None).get_batch(torch.arange(10))
    assert all((label == 0) == (row < 5) for row, label in zip((x[:, 0] / 2).tolist(), y.tolist()))


def test_train_classes_by_csv_label_name(tmp_path: Path) -> None:
    for i in range(6):
        _png(tmp_path / f"{i}.png", COLOURS["cat"])
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{i}.png,{[2, 10, 30][i % 3]}\n" for i in range(6)))
    s = load_splits(f"csv:{tmp_path / 'm.csv'}", "disjoint", train_classes=["10"], val_fraction=0)
    assert s.info["train_class_names"] == ["10"] and s.info["train_classes"] == [1]
    assert s.info["test_class_names"] == ["2", "30"] and len(s.test) == 4


def test_array_dataset_string_labels() -> None:
    ds = ArrayDataset(torch.zeros(3, 2), ["b", "a", "b"], kind="vector")
    assert ds.labels.tolist() == [1, 0, 1] and ds.class_names == ["a", "b"]
