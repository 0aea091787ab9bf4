"""Tests of deepmetric.verification: metrics vs scikit-learn and naive references, pair data, plots."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.ref_verification import (
    ref_best_accuracy,
    ref_calibrate,
    ref_eer,
    ref_lfw_protocol,
    ref_rates,
    ref_roc,
)

from deepmetric.errors import ConfigError, DataError, NonFiniteError
from deepmetric.verification import (
    PairSet,
    best_threshold_accuracy,
    calibrate_threshold,
    contiguous_folds,
    eer,
    far_key,
    lfw_protocol,
    load_lfw_pairs,
    load_pair_images,
    load_pairs_csv,
    make_pairs_from_labels,
    min_nonzero_far,
    pair_scores,
    plot_roc,
    plot_score_histograms,
    roc_auc,
    roc_curve,
    scores_report,
    tar_at_far,
    verification_report,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def random_pairs(seed: int, n: int = 200, levels: int | None = 12) -> tuple[np.ndarray, np.ndarray]:
    """Random scores (rounded to ``levels`` values so there are many ties) with both classes present."""
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.4
    same[0], same[1] = True, False
    scores = rng.normal(size=n) + 1.0 * same
    if levels is not None:
        scores = np.round(scores * levels / 6.0) * 6.0 / levels
    return scores, same


# ---------------------------------------------------------------------------------------------- ROC


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 12, 3])
def test_roc_curve_and_auc_match_sklearn(seed: int, levels: int | None) -> None:
    scores, same = random_pairs(seed, levels=levels)
    far, tar, thr = roc_curve(scores, same)
    fpr, tpr, sk_thr = sklearn_metrics.roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(far, fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tar, tpr, rtol=0, atol=1e-12)
    assert thr[0] == np.inf and sk_thr[0] == np.inf
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert roc_auc(scores, same) == pytest.approx(sklearn_metrics.roc_auc_score(same, scores), abs=1e-12)


def test_roc_curve_matches_naive_reference_with_torch_input() -> None:
    scores, same = random_pairs(7, n=60, levels=4)
    far, tar, thr = roc_curve(torch.tensor(scores, dtype=torch.float32), torch.tensor(same))
    r_far, r_tar, r_thr = ref_roc(list(scores.astype(np.float32).astype(float)), list(same))
    np.testing.assert_allclose(far, r_far)
    np.testing.assert_allclose(tar, r_tar)
    np.testing.assert_allclose(thr, r_thr)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=25).filter(
        lambda xs: len({b for _, b in xs}) == 2
    )
)
def test_auc_matches_sklearn_property(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([s for s, _ in pairs], dtype=float)
    same = np.array([b for _, b in pairs])
    assert roc_auc(scores, same) == pytest.approx(sklearn_metrics.roc_auc_score(same, scores), abs=1e-12)


def test_auc_ties_count_half() -> None:
    # every genuine/impostor comparison is a tie -> AUC 0.5
    assert roc_auc([1.0, 1.0, 1.0, 1.0], [True, False, True, False]) == 0.5
    assert roc_auc([2.0, 1.0], [True, False]) == 1.0
    assert roc_auc([1.0, 2.0], [True, False]) == 0.0


# ---------------------------------------------------------------------------------------------- EER


def test_eer_known_answer_exact_crossing() -> None:
    # genuine 0.9 .7 .6 .2 / impostor .8 .4 .3 .1: at t = 0.6, FAR = 1/4 = FRR
    scores = [0.9, 0.7, 0.6, 0.2, 0.8, 0.4, 0.3, 0.1]
    same = [1, 1, 1, 1, 0, 0, 0, 0]
    assert eer(scores, same) == (pytest.approx(0.25), pytest.approx(0.6))


def test_eer_known_answer_interpolated() -> None:
    # ROC: (0,0)@inf, (0,1/3)@3, (1/3,1/3)@2, (2/3,1)@1, (1,1)@0.
    # FAR - FRR: -1, -2/3, -1/3, +2/3 -> crosses between thresholds 2 and 1 with weight 1/3:
    # EER = 1/3 + (1/3)(1/3) = 4/9, threshold = 2 + (1/3)(1 - 2) = 5/3.
    scores = [3.0, 1.0, 1.0, 2.0, 1.0, 0.0]
    same = [1, 1, 1, 0, 0, 0]
    rate, threshold = eer(scores, same)
    assert rate == pytest.approx(4 / 9)
    assert threshold == pytest.approx(5 / 3)


def test_eer_crossing_from_reject_all_point_uses_next_threshold() -> None:
    # all scores tied except one impostor: (0,0)@inf -> (1/2, 1)@1; w = 2/3 -> EER 1/3 at threshold 1
    rate, threshold = eer([1.0, 1.0, 1.0, 0.0], [1, 1, 0, 0])
    assert rate == pytest.approx(1 / 3)
    assert threshold == 1.0


def test_eer_separable_is_zero() -> None:
    rate, threshold = eer([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0])
    assert rate == 0.0
    assert threshold == 0.8


@pytest.mark.parametrize("seed", range(5))
def test_eer_matches_naive_reference(seed: int) -> None:
    scores, same = random_pairs(seed, n=80, levels=8)
    rate, threshold = eer(scores, same)
    assert rate == pytest.approx(ref_eer(list(scores), list(same)), abs=1e-12)
    # the EER threshold lies within the score range, and the rates at it bracket the EER
    assert scores.min() <= threshold <= scores.max()


# ------------------------------------------------------------------------------------------ TAR@FAR


def test_tar_at_far_on_hand_built_roc() -> None:
    # genuine .9 .5 .5 .2 / impostor .8 .5 .3 .1 gives the ROC
    # (0,0) (0,.25) (.25,.25) (.5,.75) (.75,.75) (.75,1) (1,1)
    scores = [0.9, 0.5, 0.5, 0.2, 0.8, 0.5, 0.3, 0.1]
    same = [1, 1, 1, 1, 0, 0, 0, 0]
    far, tar, _ = roc_curve(scores, same)
    np.testing.assert_allclose(far, [0, 0, 0.25, 0.5, 0.75, 0.75, 1])
    np.testing.assert_allclose(tar, [0, 0.25, 0.25, 0.75, 0.75, 1, 1])
    got = tar_at_far(scores, same, fars=(0.1, 0.25, 0.3, 0.375, 0.5, 0.6, 0.75, 0.9, 1.0))
    assert math.isnan(got[0.1])  # below the smallest achievable FAR 1/4
    assert got[0.25] == pytest.approx(0.25)
    assert got[0.3] == pytest.approx(0.25 + (0.05 / 0.25) * 0.5)  # 0.35
    assert got[0.375] == pytest.approx(0.5)
    assert got[0.5] == pytest.approx(0.75)
    assert got[0.6] == pytest.approx(0.75)
    assert got[0.75] == pytest.approx(1.0)  # top of the vertical segment at FAR 0.75
    assert got[0.9] == pytest.approx(1.0)
    assert got[1.0] == pytest.approx(1.0)


def test_tar_at_far_nan_when_too_few_impostors() -> None:
    scores, same = random_pairs(3, n=200, levels=None)
    num_impostor = int((~same).sum())
    got = tar_at_far(scores, same, fars=(0.5 / num_impostor, 1.0 / num_impostor))
    assert math.isnan(got[0.5 / num_impostor])
    assert not math.isnan(got[1.0 / num_impostor])
    assert min_nonzero_far(scores, same) == pytest.approx(1.0 / num_impostor)


@pytest.mark.parametrize("seed", range(4))
def test_tar_at_achievable_far_is_the_best_tar_there(seed: int) -> None:
    scores, same = random_pairs(seed, n=120, levels=10)
    far, tar, _ = roc_curve(scores, same)
    targets = sorted(set(far[far > 0].tolist()))
    got = tar_at_far(scores, same, fars=targets)
    for f in targets:
        assert got[f] == pytest.approx(tar[far == f].max())


def test_tar_at_far_rejects_bad_targets() -> None:
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        tar_at_far([1.0, 0.0], [True, False], fars=(0.0,))
    with pytest.raises(ConfigError):
        tar_at_far([1.0, 0.0], [True, False], fars=(1.5,))


# ------------------------------------------------------------------------------------ best accuracy


@pytest.mark.parametrize("seed", range(8))
def test_best_threshold_accuracy_matches_brute_force(seed: int) -> None:
    scores, same = random_pairs(seed, n=90, levels=[None, 5, 12][seed % 3])
    accuracy, threshold = best_threshold_accuracy(scores, same)
    r_accuracy, r_threshold = ref_best_accuracy(list(scores), list(same))
    assert accuracy == pytest.approx(r_accuracy)
    assert threshold == r_threshold
    assert accuracy == pytest.approx(np.mean((scores >= threshold) == same))


def test_best_threshold_accuracy_single_class_and_reject_all() -> None:
    assert best_threshold_accuracy([0.3, 0.1], [False, False]) == (1.0, math.inf)
    assert best_threshold_accuracy([0.3, 0.1], [True, True]) == (1.0, 0.1)


# --------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("seed", range(5))
def test_calibrate_threshold_matches_brute_force(seed: int) -> None:
    scores, same = random_pairs(seed, n=80, levels=[None, 6][seed % 2])
    for target in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        threshold = calibrate_threshold(scores, same, target)
        assert threshold == ref_calibrate(list(scores), list(same), target)
        far, _ = ref_rates(list(scores), list(same), threshold)
        assert far <= target


def test_calibrate_threshold_can_reject_everything() -> None:
    # the top score is an impostor: no threshold reaches FAR 0 with TAR > 0
    assert calibrate_threshold([0.9, 0.5, 0.1], [False, True, False], 0.0) == math.inf
    with pytest.raises(ConfigError):
        calibrate_threshold([0.9, 0.5], [False, True], -0.1)


# ------------------------------------------------------------------------------------ LFW protocol


@pytest.mark.parametrize("seed", range(4))
def test_lfw_protocol_default_folds_match_reference(seed: int) -> None:
    scores, same = random_pairs(seed, n=120, levels=[None, 8][seed % 2])
    result = lfw_protocol(scores, same)
    folds = [k // 12 for k in range(120)]  # 10 contiguous folds of 12
    r_acc, r_thr = ref_lfw_protocol(list(scores), list(same), folds)
    np.testing.assert_allclose(result["fold_accuracies"], r_acc)
    np.testing.assert_array_equal(result["thresholds"], r_thr)
    assert result["mean_accuracy"] == pytest.approx(np.mean(r_acc))
    assert result["std_accuracy"] == pytest.approx(np.std(r_acc))


def test_lfw_protocol_custom_folds_match_reference() -> None:
    scores, same = random_pairs(11, n=100, levels=6)
    folds = np.random.default_rng(1).integers(3, 8, size=100)  # non-contiguous ids, unequal sizes
    result = lfw_protocol(scores, same, folds)
    r_acc, r_thr = ref_lfw_protocol(list(scores), list(same), list(folds))
    np.testing.assert_allclose(result["fold_accuracies"], r_acc)
    np.testing.assert_array_equal(result["thresholds"], r_thr)


def test_lfw_protocol_errors() -> None:
    with pytest.raises(DataError, match="two folds"):
        lfw_protocol([0.1, 0.9], [False, True], folds=[0, 0])
    with pytest.raises(DataError, match="one entry per pair"):
        lfw_protocol([0.1, 0.9], [False, True], folds=[0])


def test_contiguous_folds() -> None:
    np.testing.assert_array_equal(contiguous_folds(6000, 10), np.repeat(np.arange(10), 600))
    sizes = np.bincount(contiguous_folds(23, 10))
    assert sizes.sum() == 23 and sizes.max() - sizes.min() <= 1


# ------------------------------------------------------------------------------ scores and report


def test_pair_scores_cosine_and_euclidean() -> None:
    e1 = torch.randn(7, 5, dtype=torch.float64)
    e2 = torch.randn(7, 5, dtype=torch.float64)
    cos = pair_scores(e1, e2, "cosine")
    np.testing.assert_allclose(cos, torch.nn.functional.cosine_similarity(e1, e2).numpy(), atol=1e-12)
    euc = pair_scores(e1.numpy(), e2.numpy(), metric="euclidean")
    np.testing.assert_allclose(euc, -torch.linalg.vector_norm(e1 - e2, dim=1).numpy(), atol=1e-12)
    assert isinstance(cos, np.ndarray) and cos.dtype == np.float64
    # larger = more similar under both metrics
    assert pair_scores([[1.0, 0.0]], [[1.0, 0.1]], "euclidean")[0] > pair_scores([[1.0, 0.0]], [[3.0, 0.1]], "euclidean")[0]


def test_pair_scores_errors() -> None:
    with pytest.raises(ConfigError, match="cosine, euclidean"):
        pair_scores(np.ones((2, 3)), np.ones((2, 3)), "manhattan")
    with pytest.raises(DataError, match="same shape"):
        pair_scores(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(NonFiniteError):
        pair_scores(np.full((1, 2), np.nan), np.ones((1, 2)))


def test_metric_input_validation() -> None:
    with pytest.raises(DataError, match="genuine and one impostor"):
        roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(DataError, match="impostor"):
        eer([0.1, 0.2], [0, 0])
    with pytest.raises(NonFiniteError, match="pair 1"):
        roc_auc([0.1, float("nan")], [True, False])
    with pytest.raises(DataError, match="entries"):
        roc_auc([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(DataError, match="0/1"):
        roc_auc([0.1, 0.2], [2, 0])


def test_verification_report_is_consistent_with_the_parts() -> None:
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(30, 8, generator=generator, dtype=torch.float64)
    ids1 = torch.arange(60) % 30
    same = torch.rand(60, generator=generator) < 0.5
    ids2 = torch.where(same, ids1, (ids1 + 1 + torch.arange(60) % 7) % 30)
    e1 = centers[ids1] + 0.6 * torch.randn(60, 8, generator=generator, dtype=torch.float64)
    e2 = centers[ids2] + 0.6 * torch.randn(60, 8, generator=generator, dtype=torch.float64)
    report = verification_report(e1, e2, same, metric="euclidean", fars=(0.1, 1e-3))
    scores = pair_scores(e1, e2, "euclidean")
    assert report["num_genuine"] == int(same.sum()) and report["num_impostor"] == int((~same).sum())
    assert report["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(same.numpy(), scores))
    assert (report["eer"], report["eer_threshold"]) == eer(scores, same)
    assert report[far_key(0.1)] == tar_at_far(scores, same, (0.1,))[0.1]
    assert math.isnan(report["tar@far=0.001"])  # ~30 impostor pairs cannot measure FAR 1e-3
    assert report["unmeasurable_fars"] == [1e-3]
    assert (report["best_accuracy"], report["best_threshold"]) == best_threshold_accuracy(scores, same)
    lfw = lfw_protocol(scores, same)
    assert report["lfw_mean_accuracy"] == lfw["mean_accuracy"]
    assert report["lfw_std_accuracy"] == lfw["std_accuracy"]
    assert 0.5 < report["auc"] <= 1.0  # the embeddings carry identity information
    assert scores_report(scores, same, fars=(0.1, 1e-3)) == report


# ------------------------------------------------------------------------------------- LFW files


COLORS = {"Alice_Smith": (200, 30, 30), "Bob_Jones": (30, 200, 30), "Carol_King": (30, 30, 200), "Dan_Wu": (120, 120, 120)}


def make_mini_lfw(root: Path, counts: dict[str, int] | None = None) -> None:
    from PIL import Image

    counts = counts or {"Alice_Smith": 3, "Bob_Jones": 2, "Carol_King": 2, "Dan_Wu": 1}
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(1, count + 1):
            Image.new("RGB", (10, 8), COLORS[name]).save(root / name / f"{name}_{k:04d}.jpg", quality=95)


MINI_PAIRS = """2\t3
Alice_Smith\t1\t2
Bob_Jones\t1\t2
Carol_King\t1\t2
Alice_Smith\t1\tBob_Jones\t1
Carol_King\t2\tDan_Wu\t1
Bob_Jones\t2\tAlice_Smith\t3
Alice_Smith\t2\t3
Alice_Smith\t1\t3
Bob_Jones\t1\t2
Dan_Wu\t1\tCarol_King\t1
Alice_Smith\t3\tCarol_King\t2
Bob_Jones\t1\tDan_Wu\t1
"""


def test_load_mini_lfw(tmp_path: Path) -> None:
    make_mini_lfw(tmp_path)
    (tmp_path / "pairs.txt").write_text(MINI_PAIRS)
    pairs = load_lfw_pairs(tmp_path)
    assert len(pairs) == 12 and pairs.num_genuine == 6 and pairs.num_impostor == 6
    np.testing.assert_array_equal(pairs.same, [1, 1, 1, 0, 0, 0] * 2)
    np.testing.assert_array_equal(pairs.folds, [0] * 6 + [1] * 6)
    assert pairs.num_folds == 2 and pairs.i is None
    assert pairs.paths1[0] == str(tmp_path / "Alice_Smith" / "Alice_Smith_0001.jpg")
    assert pairs.paths2[0] == str(tmp_path / "Alice_Smith" / "Alice_Smith_0002.jpg")
    assert pairs.paths1[4] == str(tmp_path / "Carol_King" / "Carol_King_0002.jpg")
    assert pairs.paths2[4] == str(tmp_path / "Dan_Wu" / "Dan_Wu_0001.jpg")
    assert pairs.paths2[11] == str(tmp_path / "Dan_Wu" / "Dan_Wu_0001.jpg")

    images = load_pair_images(pairs.paths1, image_size=(4, 5))
    assert images.shape == (12, 3, 4, 5) and images.dtype == torch.uint8
    first = images[0].double().mean(dim=(1, 2))  # Alice: red
    np.testing.assert_allclose(first.numpy(), COLORS["Alice_Smith"], atol=6)
    gray = load_pair_images(pairs.paths2[:2], image_size=6, grayscale=True)
    assert gray.shape == (2, 1, 6, 6)

    # the pair set feeds the protocol: the "same" flags of identical-colour images are recovered
    e1 = load_pair_images(pairs.paths1, 2).flatten(1).double()
    e2 = load_pair_images(pairs.paths2, 2).flatten(1).double()
    report = verification_report(e1, e2, pairs.same, pairs.folds, metric="euclidean")
    assert report["auc"] == 1.0 and report["lfw_mean_accuracy"] == 1.0


def test_load_lfw_single_count_header_and_absolute_pairs_file(tmp_path: Path) -> None:
    make_mini_lfw(tmp_path / "lfw")
    pairs_file = tmp_path / "pairsDevTest.txt"
    pairs_file.write_text("1\nAlice_Smith 1 3\nBob_Jones 1 Dan_Wu 1\n")
    pairs = load_lfw_pairs(tmp_path / "lfw", pairs_file)
    np.testing.assert_array_equal(pairs.same, [True, False])
    np.testing.assert_array_equal(pairs.folds, [0, 0])


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("2\t3\n" + MINI_PAIRS.split("\n", 1)[1].replace("Carol_King\t1\t2\n", "Carol_King\t1\tDan_Wu\t1\n", 1),
         r"pairs\.txt:4: expected a matched pair"),
        ("2\t3\n" + MINI_PAIRS.split("\n", 1)[1].replace("Carol_King\t2\tDan_Wu\t1", "Carol_King\t2\t1", 1),
         r"pairs\.txt:6: expected a mismatched pair"),
        (MINI_PAIRS.replace("Bob_Jones\t1\t2\n", "Bob_Jones\tone\t2\n", 1), r"pairs\.txt:3: image number 'one'"),
        (MINI_PAIRS.replace("Alice_Smith\t2\t3", "Alice_Smith\t2\t9"), r"pairs\.txt:8: image .*Alice_Smith_0009\.jpg does not exist"),
        (MINI_PAIRS.replace("Dan_Wu\t1\tCarol_King\t1", "Dan_Wu\t1\tDan_Wu\t1"), r"pairs\.txt:11: .*same name 'Dan_Wu'"),
        ("3\t3\n" + MINI_PAIRS.split("\n", 1)[1], r"pairs\.txt:1: header says 3 fold\(s\) x 3 .* 18 pair lines, but the file has 12"),
        (MINI_PAIRS.replace("2\t3\n", "2\t3\t4\n", 1), r"pairs\.txt:1: bad header"),
        ("", "empty pairs file"),
    ],
    ids=["matched-expected", "mismatched-expected", "bad-index", "missing-image", "same-name", "count", "header", "empty"],
)
def test_bad_lfw_pairs_files(tmp_path: Path, content: str, pattern: str) -> None:
    make_mini_lfw(tmp_path)
    (tmp_path / "pairs.txt").write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_lfw_pairs(tmp_path)


def test_missing_lfw_pairs_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_lfw_pairs(tmp_path)


def test_load_pair_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jpg does not exist"):
        load_pair_images([tmp_path / "nope.jpg"], 4)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg cannot be read"):
        load_pair_images([tmp_path / "bad.jpg"], 4)


# ------------------------------------------------------------------------------------------- CSV


def test_load_pairs_csv(tmp_path: Path) -> None:
    make_mini_lfw(tmp_path / "img")
    csv_path = tmp_path / "pairs.csv"
    absolute = tmp_path / "img" / "Dan_Wu" / "Dan_Wu_0001.jpg"
    csv_path.write_text(
        "path1,path2,same,fold\n"
        "img/Alice_Smith/Alice_Smith_0001.jpg,img/Alice_Smith/Alice_Smith_0002.jpg,1,0\n"
        f"img/Bob_Jones/Bob_Jones_0001.jpg,{absolute},0,0\n"
        "\n"
        "img/Bob_Jones/Bob_Jones_0001.jpg,img/Bob_Jones/Bob_Jones_0002.jpg,true,1\n"
        "img/Carol_King/Carol_King_0001.jpg,img/Alice_Smith/Alice_Smith_0003.jpg,False,1\n"
    )
    pairs = load_pairs_csv(csv_path)
    np.testing.assert_array_equal(pairs.same, [True, False, True, False])
    np.testing.assert_array_equal(pairs.folds, [0, 0, 1, 1])
    assert pairs.paths1[0] == str(tmp_path / "img" / "Alice_Smith" / "Alice_Smith_0001.jpg")
    assert pairs.paths2[1] == str(absolute)

    no_fold = tmp_path / "nofold.csv"
    no_fold.write_text("same,path1,path2\n" + "".join(
        f"{k % 2},img/Alice_Smith/Alice_Smith_0001.jpg,img/Bob_Jones/Bob_Jones_0001.jpg\n" for k in range(20)
    ))
    pairs = load_pairs_csv(no_fold)
    np.testing.assert_array_equal(pairs.folds, np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(pairs.same, np.arange(20) % 2 == 1)


@pytest.mark.parametrize(
    "body, pattern",
    [
        ("path1,path2\na.jpg,b.jpg\n", r"pairs\.csv:1: .*lacks column\(s\) same"),
        ("path1,path2,same\na.jpg,a.jpg,1\na.jpg,b.jpg,maybe\n", r"pairs\.csv:3: 'same' must be 1/0"),
        ("path1,path2,same\na.jpg,a.jpg,1\na.jpg,b.jpg\n", r"pairs\.csv:3: expected 3 fields"),
        ("path1,path2,same\na.jpg,a.jpg,1\na.jpg,c.jpg,0\n", r"pairs\.csv:3: image .*c\.jpg does not exist"),
        ("path1,path2,same,fold\na.jpg,a.jpg,1,x\n", r"pairs\.csv:2: fold 'x'"),
        ("path1,path2,same\na.jpg,b.jpg,0\nb.jpg,a.jpg,0\n", r"pairs\.csv: all 2 pairs are impostor"),
        ("path1,path2,same\na.jpg,a.jpg,1\n", r"all 1 pairs are genuine"),
        ("path1,path2,same\n", "no pairs"),
    ],
    ids=["column", "same-value", "fields", "missing-image", "fold", "all-impostor", "all-genuine", "empty"],
)
def test_bad_pairs_csv(tmp_path: Path, body: str, pattern: str) -> None:
    from PIL import Image

    for name in ("a.jpg", "b.jpg"):
        Image.new("L", (4, 4), 128).save(tmp_path / name)
    (tmp_path / "pairs.csv").write_text(body)
    with pytest.raises(DataError, match=pattern):
        load_pairs_csv(tmp_path / "pairs.csv")


# ---------------------------------------------------------------------------- pairs from labels


def test_make_pairs_from_labels() -> None:
    labels = np.repeat(np.arange(20), 6)[np.random.default_rng(0).permutation(120)]
    pairs = make_pairs_from_labels(labels, num_pos=300, num_neg=400, num_folds=10, seed=3)
    assert len(pairs) == 700 and pairs.num_genuine == 300 and pairs.paths1 is None
    assert np.all(pairs.i < pairs.j)
    np.testing.assert_array_equal(labels[pairs.i] == labels[pairs.j], pairs.same)
    assert len(set(zip(pairs.i.tolist(), pairs.j.tolist()))) == 700
    for fold in range(10):
        in_fold = pairs.folds == fold
        assert pairs.same[in_fold].sum() == 30 and (~pairs.same[in_fold]).sum() == 40
    # LFW layout: contiguous folds, genuine pairs first in each
    np.testing.assert_array_equal(pairs.folds, contiguous_folds(700, 10))
    np.testing.assert_array_equal(pairs.same[:70], [True] * 30 + [False] * 40)
    again = make_pairs_from_labels(torch.as_tensor(labels), num_pos=300, num_neg=400, num_folds=10, seed=3)
    np.testing.assert_array_equal(again.i, pairs.i)
    np.testing.assert_array_equal(again.j, pairs.j)
    other = make_pairs_from_labels(labels, num_pos=300, num_neg=400, num_folds=10, seed=4)
    assert not np.array_equal(other.i, pairs.i)


def test_make_pairs_exhausts_all_pairs_without_repeats() -> None:
    labels = ["a", "b", "a", "c", "b", "a"]  # genuine pairs: 3 (a) + 1 (b) = 4; impostor: 15 - 4 = 11
    pairs = make_pairs_from_labels(labels, num_pos=4, num_neg=11, num_folds=2, seed=0)
    genuine = {(i, j) for i, j, s in zip(pairs.i, pairs.j, pairs.same) if s}
    impostor = {(i, j) for i, j, s in zip(pairs.i, pairs.j, pairs.same) if not s}
    all_pairs = {(i, j) for i in range(6) for j in range(i + 1, 6)}
    assert genuine == {p for p in all_pairs if labels[p[0]] == labels[p[1]]}
    assert impostor == {p for p in all_pairs if labels[p[0]] != labels[p[1]]}
    counts = [(int(pairs.same[pairs.folds == f].sum()), int((~pairs.same[pairs.folds == f]).sum())) for f in (0, 1)]
    assert counts == [(2, 6), (2, 5)]  # 11 impostor pairs split 6 + 5
    with pytest.raises(DataError, match="only 4 distinct genuine and 11 distinct impostor"):
        make_pairs_from_labels(labels, num_pos=5, num_neg=4, num_folds=2)


def test_make_pairs_uniform_over_genuine_pairs() -> None:
    # class 0 has 3 pairs, class 1 has 45: a uniform draw of 12 of the 48 picks ~0.75 class-0 pairs
    labels = np.array([0] * 3 + [1] * 10)
    hits = 0
    for seed in range(200):
        pairs = make_pairs_from_labels(labels, num_pos=12, num_neg=12, num_folds=2, seed=seed)
        hits += int((labels[pairs.i[pairs.same]] == 0).sum())
    assert 0.55 < hits / 200 < 0.95  # expected 12 * 3 / 48 = 0.75


def test_pair_set_validation() -> None:
    with pytest.raises(DataError, match="exactly one"):
        PairSet(same=np.array([True]), folds=np.array([0]))
    with pytest.raises(DataError, match="2 paths"):
        PairSet(same=np.array([True, False]), folds=np.array([0, 0]), paths1=["a"], paths2=["b", "c"])
    with pytest.raises(ConfigError):
        make_pairs_from_labels([0, 0, 1, 1], num_pos=0)


# ------------------------------------------------------------------------------------------- plots


def test_plots_are_written_atomically(tmp_path: Path) -> None:
    scores, same = random_pairs(0, n=100)
    far, tar, _ = roc_curve(scores, same)
    roc_path = plot_roc(far, tar, tmp_path / "out" / "roc.png", label="model")
    hist_path = plot_score_histograms(scores, same, tmp_path / "out" / "hist.png", threshold=0.5)
    for path in (roc_path, hist_path):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 1000
    assert sorted(os.listdir(tmp_path / "out")) == ["hist.png", "roc.png"]  # no temporary left behind
    with pytest.raises(DataError, match="FAR > 0"):
        plot_roc([0.0, 0.0], [0.0, 1.0], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
