"""Tests of deepmetric.metrics: brute-force reference, PML AccuracyCalculator cross-check, edge cases."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.native import requires_cc
from reference.ref_metrics import ref_expected_mutual_information, ref_knn, ref_retrieval
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from deepmetric.errors import ConfigError, DataError, NonFiniteError
from deepmetric.metrics import evaluate, expected_mutual_information, knn, nmi_ami, retrieval_metrics
from deepmetric.metrics.clustering import kmeans_assign

KNN_KEYS = ("precision@1", "r_precision", "map@r")


def clustered(n: int, classes: int, dim: int = 8, spread: float = 1.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim))
    labels = rng.integers(0, classes, n)
    x = centers[labels] + spread * rng.standard_normal((n, dim))
    return x.astype(np.float32), labels


# ----------------------------------------------------------------------------------------- k-NN
BACKENDS = [pytest.param("native", marks=requires_cc), "faiss"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("loo", [True, False])
def test_knn_matches_brute_force(metric: str, loo: bool, backend: str) -> None:
    x, _ = clustered(120, 6, seed=1)
    g, _ = clustered(90, 6, seed=2)
    gallery = None if loo else g
    d, i = knn(x, gallery, k=7, metric=metric, backend=backend)
    rd, ri = ref_knn(x, gallery, 7, metric)
    assert d.shape == i.shape == (120, 7) and d.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(d, rd, rtol=1e-4, atol=1e-4)
    if loo:
        assert not (i == np.arange(120)[:, None]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_small_blocks_equal_one_block(backend: str) -> None:
    x, _ = clustered(150, 5, seed=3)
    d1, i1 = knn(x, k=9, block_size=7, backend=backend)
    d2, i2 = knn(x, k=9, backend=backend)
    np.testing.assert_array_equal(i1, i2)
    # the BLAS may round a 7-row product differently from a 150-row one (it does on some CPUs):
    # the same neighbours, distances equal to float32 rounding
    np.testing.assert_allclose(d1, d2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_ties_broken_by_index_and_duplicates_kept(backend: str) -> None:
    # integer coordinates: distances are exact, so many exact ties
    rng = np.random.default_rng(4)
    x = rng.integers(0, 3, size=(60, 2)).astype(np.float32)
    for loo in (True, False):
        gallery = None if loo else x[::-1].copy()
        _, i = knn(x, gallery, k=15, backend=backend)
        _, ri = ref_knn(x, gallery, 15, "euclidean")
        np.testing.assert_array_equal(i, ri)
    # a query with 5 exact copies of itself gets those copies first (self excluded by index)
    y = np.zeros((6, 3), np.float32)
    y = np.vstack([y, np.ones((4, 3), np.float32)])
    d, i = knn(y, k=5, backend=backend)
    assert i[0].tolist() == [1, 2, 3, 4, 5] and d[0].tolist() == [0.0] * 5
    assert i[3].tolist() == [0, 1, 2, 4, 5]


@requires_cc
@pytest.mark.parametrize("loo", [True, False])
def test_native_knn_across_tiles_threads_and_buffer_cuts(loo: bool) -> None:
    """Several 128-row tiles on 2 workers, 3 gallery chunks of 2048 columns and k large enough that
    every row's key buffer (2k + 32) is cut back many times; integer coordinates make thousands of
    exact ties, which must still go to the lowest gallery index, exactly as the brute force."""
    rng = np.random.default_rng(7)
    q = rng.integers(-2, 3, size=(4500 if loo else 300, 3)).astype(np.float32)
    g = None if loo else rng.integers(-2, 3, size=(4500, 3)).astype(np.float32)
    k = 200
    before = torch.get_num_threads()
    d, i = knn(q, g, k=k, backend="native", num_threads=2)
    assert torch.get_num_threads() == before
    # vectorised brute force (ref_knn's rule: by (distance, index), self excluded by index)
    gal = (q if loo else g).astype(np.float64)
    q64 = q.astype(np.float64)  # integer coordinates: the float64 expansion is exact
    full = (q64**2).sum(1)[:, None] + (gal**2).sum(1)[None, :] - 2 * q64 @ gal.T
    if loo:
        np.fill_diagonal(full, np.inf)
    cols = np.broadcast_to(np.arange(full.shape[1]), full.shape)
    ri = np.lexsort((cols, full), axis=1)[:, :k]
    rd = np.sqrt(np.take_along_axis(full, ri, axis=1))
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(d, rd, rtol=1e-5, atol=1e-5)
    _, i_f = knn(q, g, k=k, backend="faiss", num_threads=2)
    np.testing.assert_array_equal(i_f, ri)


@requires_cc
def test_native_knn_random_data_agrees_with_float64_brute_force() -> None:
    """Continuous data, several chunks: every returned neighbour is among the true k nearest up to
    float32 rounding of the score (|difference| of the k-th distance below 1e-4 relative)."""
    x, _ = clustered(2500, 20, dim=32, seed=5)
    k = 40
    d, i = knn(x, k=k, backend="native", num_threads=2)
    x64 = x.astype(np.float64)
    sq = (x64**2).sum(1)
    full = np.maximum(sq[:, None] + sq[None, :] - 2 * x64 @ x64.T, 0.0)  # float64: ~1e-12 relative
    np.fill_diagonal(full, np.inf)
    true_d = np.sqrt(np.sort(full, axis=1)[:, :k])
    np.testing.assert_allclose(d, true_d, rtol=1e-4, atol=1e-4)
    got = np.sqrt(np.take_along_axis(full, i, axis=1))
    np.testing.assert_allclose(got, true_d, rtol=1e-4, atol=1e-4)  # the ids carry those distances
    assert (np.diff(d, axis=1) >= 0).all() and not (i == np.arange(len(x))[:, None]).any()


@requires_cc
def test_native_knn_from_concurrent_threads() -> None:
    """Searches started from several threads at once (each with its own worker pool, tiles and key
    buffers) give the answer of a lone search, and torch's thread count is 2 again afterwards (each
    search sets it to 1 while its workers run, under a lock, and restores it)."""
    from concurrent.futures import ThreadPoolExecutor

    x, _ = clustered(700, 7, dim=16, seed=9)
    outer = torch.get_num_threads()  # the suite runs with 1 thread: use 2, so a lost restore shows
    torch.set_num_threads(2)
    try:
        expected = knn(x, k=12, backend="native", num_threads=2)[1]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: knn(x, k=12, backend="native", num_threads=2)[1], range(8)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)
    for got in results:
        np.testing.assert_array_equal(got, expected)


@requires_cc
def test_knn_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepmetric.metrics.knn import resolve_backend

    x, y = clustered(30, 3)
    with pytest.raises(ConfigError, match="backend"):
        knn(x, k=3, backend="gpu")
    with pytest.raises(ConfigError, match="backend"):
        evaluate(x, y, backend="gpu")
    native, faiss_ = evaluate(x, y, backend="native"), evaluate(x, y, backend="faiss")
    assert native == faiss_
    assert resolve_backend("auto", 30) == "native"  # this machine has a C compiler
    monkeypatch.setenv("DEEPMETRIC_NATIVE", "0")
    assert resolve_backend("auto", 30) == "faiss"
    with pytest.raises(ConfigError, match="native k-NN kernel is unavailable"):
        knn(x, k=3, backend="native")
    np.testing.assert_array_equal(knn(x, k=3)[1], ref_knn(x, None, 3, "euclidean")[1])


@requires_cc
def test_native_loader_without_compiler_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import deepmetric._native as native

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_warned", set())
    monkeypatch.setenv("DEEPMETRIC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert native.load("knn_select") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load("knn_select") is None  # remembered, not warned again
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.delenv("CC")
    lib = native.load("knn_select")  # builds into the fresh cache directory, atomically
    assert lib is not None and hasattr(lib, "dm_scan")
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].name.startswith("knn_select-") and built[0].suffix == ".so"


def test_knn_k_validation() -> None:
    x, _ = clustered(10, 2)
    assert knn(x, k=9)[1].shape == (10, 9)
    with pytest.raises(DataError, match="leave-one-out"):
        knn(x, k=10)
    assert knn(x, x[:4], k=4)[1].shape == (10, 4)
    with pytest.raises(DataError):
        knn(x, x[:4], k=5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError):
            knn(x, k=bad)


def test_faiss_threads_restored() -> None:
    import faiss

    before = faiss.omp_get_max_threads()
    x, y = clustered(200, 4)
    evaluate(x, y, num_threads=2)
    assert faiss.omp_get_max_threads() == before


# ---------------------------------------------------------------------------- retrieval metrics
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("loo", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_matches_brute_force(metric: str, loo: bool, seed: int) -> None:
    x, y = clustered(150, 7, spread=1.0 + seed, seed=seed)
    g, gy = clustered(110, 9, spread=1.5, seed=seed + 10)  # labels 7, 8 absent from queries
    gy = gy.copy()
    gy[gy == 3] = 8  # label 3 absent from the gallery: those queries are lone
    ks = (1, 3, 10)
    if loo:
        out = evaluate(x, y, ks=ks, metric=metric, clustering=False)
        ref = ref_retrieval(x, y, None, None, ks, metric)
    else:
        out = evaluate(x, y, g, gy, ks=ks, metric=metric, clustering=False)
        ref = ref_retrieval(x, y, g, gy, ks, metric)
        assert out["num_lone_queries"] == float((y == 3).sum()) > 0
    for name, value in ref.items():
        assert out[name] == pytest.approx(value, abs=1e-12), name
    assert out["num_queries"] + out["num_lone_queries"] == len(x)


def test_duplicates_count_as_neighbours_and_ties_use_index() -> None:
    x = np.array([[0.0], [0.0], [5.0], [5.0]], np.float32)
    out = evaluate(x, [0, 0, 1, 1], ks=(1,), clustering=False)
    assert out["precision@1"] == 1.0 and out["map@r"] == 1.0 and out["k_used"] == 1.0
    # three identical points, labels [0, 1, 0]: query 0 sees index 1 (other label) first,
    # query 2 sees index 0 (same label) first; query 1 is lone
    z = np.zeros((3, 2), np.float32)
    out = evaluate(z, [0, 1, 0], ks=(1, 2), clustering=False)
    assert out["num_queries"] == 2.0 and out["num_lone_queries"] == 1.0
    assert out["precision@1"] == 0.5 and out["recall@2"] == 1.0
    assert out["map@r"] == 0.5 and out["r_precision"] == 0.5


def test_lone_queries_excluded() -> None:
    x, y = clustered(80, 4, seed=5)
    y = y.copy()
    y[:3] = [100, 101, 102]  # singletons: lone in leave-one-out
    out = evaluate(x, y, ks=(1, 2), clustering=False)
    ref = ref_retrieval(x, y, None, None, (1, 2), "euclidean")
    assert out["num_lone_queries"] == 3.0 and out["num_queries"] == 77.0
    assert out["map@r"] == pytest.approx(ref["map@r"], abs=1e-12)
    with pytest.warns(RuntimeWarning, match="no query"):
        out = evaluate(x[:5], [0, 1, 2, 3, 4], clustering=False)
    assert math.isnan(out["precision@1"]) and out["num_queries"] == 0.0 and out["num_lone_queries"] == 5.0


def test_k_used_and_large_cutoffs() -> None:
    x, y = clustered(60, 3, seed=6)
    counts = np.bincount(y)
    out = evaluate(x, y, ks=(1, 4), clustering=False)
    assert out["k_used"] == counts.max() - 1  # R_max in leave-one-out
    out = evaluate(x, y, ks=(1, 200), clustering=False)  # cut-off beyond the gallery size
    assert out["k_used"] == 59.0 and out["recall@200"] == 1.0
    g, gy = clustered(30, 3, seed=7)
    out = evaluate(x, y, g, gy, ks=(2,), clustering=False)
    assert out["k_used"] == max(2, np.bincount(gy).max())


def test_torch_and_numpy_inputs_agree() -> None:
    x, y = clustered(100, 5, seed=8)
    a = evaluate(x, y, seed=3)
    b = evaluate(torch.from_numpy(x).double().requires_grad_(), torch.from_numpy(y), seed=3)
    assert a == b


def test_invariances() -> None:
    x, y = clustered(120, 5, seed=9)
    g, gy = clustered(100, 5, seed=10)
    base = evaluate(x, y, g, gy, clustering=False)
    perm_q, perm_g = np.random.permutation(120), np.random.permutation(100)
    permuted = evaluate(x[perm_q], y[perm_q], g[perm_g], gy[perm_g], clustering=False)
    relabeled = evaluate(x, y * 7 + 3, g, gy * 7 + 3, clustering=False)
    string_labels = evaluate(x, np.array([f"c{v}" for v in y]), g, np.array([f"c{v}" for v in gy]), clustering=False)
    for name in base:
        assert permuted[name] == pytest.approx(base[name], abs=1e-12)
        assert relabeled[name] == base[name] == string_labels[name]


def test_perfect_and_worst_retrieval() -> None:
    x = np.repeat(np.arange(4, dtype=np.float32)[:, None] * 100, 5, axis=0)
    x += np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    y = np.repeat(np.arange(4), 5)
    out = evaluate(x, y, ks=(1, 4))
    for name in ("recall@1", "recall@4", "precision@1", "r_precision", "map@r", "nmi", "ami"):
        assert out[name] == pytest.approx(1.0), name
    # each point's only same-label item is the farthest away
    far = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]], np.float32)
    out = evaluate(far, [0, 1, 2, 2, 1, 0], ks=(1,), clustering=False)
    # query 0 (label 0) ranks 1, 2, 3, 4, 5: its match (index 5) is last, R=1
    assert out["precision@1"] == 0.0 and out["r_precision"] == 0.0


def test_retrieval_metrics_hand_computed() -> None:
    # ranking rel = [0, 1, 1, 0], R = 3: P@1 0, R-prec 2/3, MAP@R (1/2 + 2/3) / 3
    knn_labels = np.array([[5, 1, 1, 7]])
    out = retrieval_metrics(knn_labels, np.array([1]), np.array([3]), ks=(1, 2))
    assert out["recall@1"] == 0.0 and out["recall@2"] == 1.0
    assert out["r_precision"] == pytest.approx(2 / 3)
    assert out["map@r"] == pytest.approx((1 / 2 + 2 / 3) / 3)


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = clustered(50, 3)
    out = evaluate(x, y, progress=True, clustering=False)
    assert out["num_queries"] == 50.0
    assert "k-NN" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- clustering
def test_expected_mutual_information_matches_triple_loop() -> None:
    rng = np.random.default_rng(11)
    for n, ca, cb in [(40, 3, 5), (60, 7, 2), (25, 25, 4)]:
        a, b = rng.integers(0, ca, n), rng.integers(0, cb, n)
        emi = expected_mutual_information(np.unique(a, return_counts=True)[1], np.unique(b, return_counts=True)[1], n)
        assert emi == pytest.approx(ref_expected_mutual_information(a, b), rel=1e-10, abs=1e-13)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 120),
    ca=st.integers(1, 12),
    cb=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_nmi_ami_match_sklearn(n: int, ca: int, cb: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, ca, n), rng.integers(0, cb, n)
    nmi, ami = nmi_ami(a, b)
    if len(set(a.tolist())) == len(set(b.tolist())) == n:
        return  # AMI is 0/0 there (E[MI] equals the maximum); sklearn's value is rounding noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nmi == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-10)
        assert ami == pytest.approx(adjusted_mutual_info_score(a, b), abs=1e-9)


def test_kmeans_seeded_and_separates_clusters() -> None:
    x, y = clustered(300, 5, dim=16, spread=0.05, seed=12)
    c1 = kmeans_assign(x, 5, seed=1)
    assert np.array_equal(c1, kmeans_assign(x, 5, seed=1))
    nmi, ami = nmi_ami(y, c1)
    # k-means may merge two true clusters (local optimum), so not ~1; chance level is ~0.02
    assert nmi > 0.8 and ami > 0.8
    assert nmi_ami(y, np.random.default_rng(0).integers(0, 5, 300))[0] < 0.1
    assert kmeans_assign(x, 1).tolist() == [0] * 300
    out = evaluate(x, y, ks=(1,))
    assert out["nmi"] > 0.8
    assert "nmi" not in evaluate(x, y, clustering=False)


# ------------------------------------------------------------------------------ PML cross-check
@pytest.mark.parametrize("loo", [True, False])
def test_against_pml_accuracy_calculator(loo: bool) -> None:
    """PML 2.9.0 AccuracyCalculator(k="max_bin_count"): same kNN metrics; same NMI/AMI given the
    same cluster assignment. PML's ``get_accuracy(query, query_labels, reference, reference_labels,
    ref_includes_query=False)``; ``reference=None`` means leave-one-out on the query set."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = clustered(300, 12, dim=16, seed=13)
    g, gy = clustered(200, 14, dim=16, seed=14)  # query labels 12, 13 never occur: fine, gallery-only
    gy = gy.copy()
    gy[gy == 5] = 13  # queries of label 5 are lone
    calc = AccuracyCalculator(k="max_bin_count", device=torch.device("cpu"))
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    if loo:
        pml = calc.get_accuracy(tx, ty)
        ours = evaluate(x, y)
    else:
        pml = calc.get_accuracy(tx, ty, torch.from_numpy(g), torch.from_numpy(gy), ref_includes_query=False)
        ours = evaluate(x, y, g, gy)
    assert ours["precision@1"] == pytest.approx(pml["precision_at_1"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-12)
    # different k-means settings: close, not equal
    assert ours["nmi"] == pytest.approx(pml["NMI"], abs=0.05)
    assert ours["ami"] == pytest.approx(pml["AMI"], abs=0.05)
    clusters = kmeans_assign(x, 12, seed=0)
    nmi, ami = nmi_ami(y, clusters)
    assert nmi == pytest.approx(calc.calculate_NMI(query_labels=ty, cluster_labels=torch.from_numpy(clusters)), abs=1e-12)
    assert ami == pytest.approx(calc.calculate_AMI(query_labels=ty, cluster_labels=torch.from_numpy(clusters)), abs=1e-10)


# -------------------------------------------------------------------------------------- errors
def test_input_errors() -> None:
    x, y = clustered(20, 2)
    with pytest.raises(DataError, match="2-D"):
        evaluate(x[0], y[:1])
    with pytest.raises(DataError, match="19 entries"):
        evaluate(x, y[:19])
    with pytest.raises(DataError, match="empty"):
        evaluate(x[:0], y[:0])
    with pytest.raises(DataError, match="empty"):
        evaluate(x, y, x[:0], y[:0])
    with pytest.raises(DataError, match="dimension"):
        evaluate(x, y, x[:, :3], y)
    with pytest.raises(DataError, match="gallery_labels"):
        evaluate(x, y, x)
    with pytest.raises(DataError, match="without gallery"):
        evaluate(x, y, None, y)
    with pytest.raises(DataError, match="1-D"):
        evaluate(x, y[:, None])
    with pytest.raises(DataError, match="integer"):
        evaluate(x, y + 0.5)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match="row 3"):
        evaluate(bad, y)
    bad[3, 1] = np.inf
    with pytest.raises(NonFiniteError):
        evaluate(x, y, bad, y)
    zero = x.copy()
    zero[2] = 0
    with pytest.raises(DataError, match="all-zero"):
        evaluate(zero, y, metric="cosine")
    with pytest.raises(ConfigError, match="valid metrics"):
        evaluate(x, y, metric="manhattan")
    for ks in ((), (0,), (1, -2), ("a",)):
        with pytest.raises(ConfigError):
            evaluate(x, y, ks=ks)
    with pytest.raises(ConfigError):
        evaluate(x, y, num_threads=0)


def test_sort_rows_equals_a_full_lexsort() -> None:
    """The row sort only re-sorts rows with ties (or out of order): same result as lexsorting all."""
    from deepmetric.metrics.knn import _sort_rows

    rng = np.random.default_rng(0)
    dist = np.sort(rng.integers(0, 6, size=(200, 9)).astype(np.float32), axis=1)  # many ties
    dist[:50] = np.sort(rng.random((50, 9)).astype(np.float32), axis=1)  # rows without ties
    dist[50:55] = rng.random((5, 9)).astype(np.float32)  # rows out of order
    dist[55, 3] = np.nan
    idx = rng.permutation(200 * 9).reshape(200, 9).astype(np.int64)
    order = np.lexsort((idx, dist), axis=-1)
    want_d, want_i = np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)
    got_d, got_i = _sort_rows(dist.copy(), idx.copy())
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)
