"""The verification workflow: verify / calibrate / train-pairs, threshold files, demo pairs, configs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric.cli import main
from deepmetric.config import apply_overrides, config_from_dict, config_to_dict, load_config, validate_components
from deepmetric.errors import CheckpointError, ConfigError
from deepmetric.train import fit, load_checkpoint, load_model_from_checkpoint, save_checkpoint
from deepmetric.verification import (
    Verifier,
    calibrate,
    checkpoint_sha256,
    fit_pairs,
    load_threshold,
    make_pairs_from_labels,
    pair_scores,
    verify,
)
from deepmetric.verification.metrics import roc_auc

REPO = Path(__file__).resolve().parent.parent
NUM_IMAGES = 120
TINY = [
    'data.name="digits"', "train.epochs=1", "train.max_steps_per_epoch=5", "sampler.batch_size=32", "sampler.m=4",
    'model.name="mlp"', "model.embedding_dim=16", "train.plots=false", "train.baselines=false",
    "train.num_threads=1", "eval.clustering=false", 'loss.name="softmax"', 'miner.name="none"',
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny softmax model trained with fit() on digits (its best.pt)."""
    out = tmp_path_factory.mktemp("run") / "run"
    fit(config_from_dict(apply_overrides({}, TINY)), out, progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PNG files of the first digits images and a pairs CSV over them (relative paths, 10 folds)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("pairs")
    digits = load_digits()
    images = np.rint(digits.images[:NUM_IMAGES] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    (folder / "img").mkdir()
    for k, image in enumerate(images):
        Image.fromarray(image, mode="L").save(folder / "img" / f"{k}.png")
    pairs = make_pairs_from_labels(digits.target[:NUM_IMAGES], num_pos=100, num_neg=100, num_folds=10, seed=0)
    rows = ["path1,path2,same,fold"] + [
        f"img/{i}.png,img/{j}.png,{int(s)},{f}" for i, j, s, f in zip(pairs.i, pairs.j, pairs.same, pairs.folds)
    ]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def _other_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """A copy of ``checkpoint`` with perturbed weights: another model, another hash."""
    ckpt = load_checkpoint(checkpoint)
    ckpt["model"] = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "best.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return folder / "best.pt"


def test_image_files_are_preprocessed_like_the_training_data(run: Path, pairs_csv: Path) -> None:
    # The PNGs hold exactly the digits images: embedding the files with the checkpoint's input
    # preprocessing must give the embeddings of the same images from the dataset pipeline.
    from deepmetric.data import load_digits_dataset

    verifier = Verifier(run / "best.pt")
    ckpt = load_checkpoint(run / "best.pt")
    assert verifier.mean == pytest.approx(ckpt["data"]["mean"]) and verifier.std == pytest.approx(ckpt["data"]["std"])
    paths = [str(pairs_csv.parent / "img" / f"{k}.png") for k in range(10)]
    from_files = verifier.embed_paths(paths)
    raw = load_digits_dataset().subset(list(range(10))).with_normalization(ckpt["data"]["mean"], ckpt["data"]["std"])
    x, _ = raw.get_batch(list(range(10)))
    with torch.no_grad():
        expected = verifier.model(x).numpy()
    np.testing.assert_allclose(from_files, expected, atol=1e-5)


def test_verify_cli_report_plots_and_json(run: Path, pairs_csv: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["verify", str(run / "best.pt"), "--pairs", str(pairs_csv), "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "10-fold accuracy" in text and "AUC" in text and "EER" in text
    # 100 impostor pairs cannot measure FAR 1e-3: NaN, flagged
    assert "TAR@FAR=0.001: NaN (not measurable" in text
    for name in ("roc.png", "scores.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "verification.json").read_text())
    assert report["num_genuine"] == 100 and report["num_impostor"] == 100 and report["num_folds"] == 10
    assert report["tar@far=0.001"] == "nan" and report["unmeasurable_fars"] == [0.001]
    assert len(report["fold_accuracies"]) == 10
    assert report["lfw_mean_accuracy"] == pytest.approx(np.mean(report["fold_accuracies"]))
    assert report["at_threshold"] is None and "does not exist" in report["threshold_note"]
    # the AUC is that of cosine scores of independently embedded pair images
    import csv

    verifier = Verifier(run / "best.pt")
    rows = list(csv.DictReader(pairs_csv.open()))
    e1 = verifier.embed_paths([str(pairs_csv.parent / r["path1"]) for r in rows])
    e2 = verifier.embed_paths([str(pairs_csv.parent / r["path2"]) for r in rows])
    same = np.array([r["same"] == "1" for r in rows])
    assert report["auc"] == pytest.approx(roc_auc(pair_scores(e1, e2), same))
    assert 0.5 < report["auc"] <= 1.0


def test_calibrate_then_verify_applies_the_threshold(run: Path, pairs_csv: Path, tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "model" / "best.pt"
    checkpoint.parent.mkdir()
    shutil.copy(run / "best.pt", checkpoint)
    assert main(["calibrate", str(checkpoint), "--pairs", str(pairs_csv), "--far", "0.05", "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    record = json.loads((checkpoint.parent / "threshold.json").read_text())
    assert record["format"] == "deepmetric-threshold" and record["metric"] == "cosine"
    assert record["target_far"] == 0.05 and record["achieved_far"] <= 0.05
    assert record["checkpoint_sha256"] == checkpoint_sha256(checkpoint)
    assert record["num_impostor"] == 100 and record["far_measurable"] is True
    assert main(["verify", str(checkpoint), "--pairs", str(pairs_csv), "--no-plots", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "at the calibrated threshold" in text
    report = json.loads((checkpoint.parent / "verification" / "verification.json").read_text())
    # verified on the calibration pairs themselves: the rates at the threshold are the calibration's
    assert report["threshold"]["threshold"] == pytest.approx(record["threshold"])
    assert report["at_threshold"]["far"] == pytest.approx(record["achieved_far"])
    assert report["at_threshold"]["tar"] == pytest.approx(record["achieved_tar"])
    # a stricter target gives a threshold at least as high
    strict = calibrate(checkpoint, str(pairs_csv), target_far=0.01, out=tmp_path / "strict.json")
    assert strict["threshold"] >= record["threshold"] and strict["achieved_far"] <= 0.01


def test_threshold_of_another_checkpoint_is_refused(run: Path, pairs_csv: Path, tmp_path: Path, capsys) -> None:
    record = calibrate(run / "best.pt", str(pairs_csv), target_far=0.1, out=tmp_path / "threshold.json")
    other = _other_checkpoint(run / "best.pt", tmp_path / "other")
    with pytest.raises(CheckpointError, match="calibrated for another checkpoint"):
        load_threshold(tmp_path / "threshold.json", other)
    assert load_threshold(tmp_path / "threshold.json", run / "best.pt")["threshold"] == record["threshold"]
    # explicit --threshold: an error (exit 1) naming the mismatch
    code = main(["verify", str(other), "--pairs", str(pairs_csv), "--threshold", str(tmp_path / "threshold.json"),
                 "--no-plots", "--device", "cpu"])
    assert code == 1
    assert "calibrated for another checkpoint" in capsys.readouterr().err
    # the file beside the checkpoint belongs to another one: ignored, and the report says why
    shutil.copy(tmp_path / "threshold.json", other.parent / "threshold.json")
    report = verify(other, str(pairs_csv), plots=False, out_dir=tmp_path / "v")
    assert report["at_threshold"] is None and "calibrated for another checkpoint" in report["threshold_note"]


@pytest.mark.parametrize(
    ("mutate", "line", "message"),
    [
        (lambda rows: rows[:2] + ["img/missing.png,img/1.png,1,0"] + rows[3:], 3, "does not exist"),
        (lambda rows: rows[:1] + ["img/0.png,img/1.png"] + rows[2:], 2, "expected 4 fields"),
        (lambda rows: rows[:4] + ["img/0.png,img/1.png,maybe,0"] + rows[5:], 5, "'same' must be 1/0"),
    ],
)
def test_bad_pairs_file_names_the_line(run: Path, pairs_csv: Path, tmp_path: Path, capsys, mutate, line,
                                       message) -> None:
    rows = pairs_csv.read_text().splitlines()
    bad = pairs_csv.parent / f"bad_{line}.csv"
    bad.write_text("\n".join(mutate(rows)) + "\n")
    assert main(["verify", str(run / "best.pt"), "--pairs", str(bad), "--no-plots", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:{line}:" in err and message in err


def test_one_class_of_pairs_is_an_error(run: Path, pairs_csv: Path, capsys) -> None:
    rows = pairs_csv.read_text().splitlines()
    only_genuine = pairs_csv.parent / "genuine.csv"
    only_genuine.write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.split(",")[2] == "1"]) + "\n")
    assert main(["calibrate", str(run / "best.pt"), "--pairs", str(only_genuine), "--device", "cpu"]) == 1
    assert "all 100 pairs are genuine" in capsys.readouterr().err


def test_usage_errors_exit_2(run: Path, pairs_csv: Path, capsys) -> None:
    assert main(["verify", str(run / "best.pt")]) == 2
    assert "--pairs FILE" in capsys.readouterr().err
    assert main(["calibrate", str(run / "best.pt"), "--pairs", str(pairs_csv), "--far", "0"]) == 2
    assert "target FAR must be in (0, 1]" in capsys.readouterr().err


def test_fit_pairs_from_png_csv_checkpoint_loads(run: Path, pairs_csv: Path, tmp_path: Path, capsys) -> None:
    config = config_from_dict(apply_overrides(
        config_to_dict(load_config(None)),
        ['model.name="mlp"', "model.embedding_dim=8", 'loss.name="contrastive"', "loss.margin=1.0",
         'miner.name="none"', "train.num_threads=1", "extra_losses=[]"]))
    result = fit_pairs(pairs_csv, tmp_path / "prun", config=config, epochs=3, lr=3e-3, batch_size=32,
                       val_pairs=pairs_csv, log=lambda s: None)
    out = tmp_path / "prun"
    for name in ("config.toml", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (out / name).is_file(), name
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # same checkpoint layout as fit()
    pairs_ckpt, fit_ckpt = load_checkpoint(out / "best.pt"), load_checkpoint(run / "best.pt")
    assert set(pairs_ckpt) == set(fit_ckpt)
    assert set(pairs_ckpt["data"]) >= {"input_shape", "kind", "mean", "std", "info"}
    assert pairs_ckpt["data"]["input_shape"] == [1, 8, 8] and pairs_ckpt["config"]["data"]["name"].startswith("pairs:")
    model, config_back, _ = load_model_from_checkpoint(out / "best.pt")
    assert config_back.model.embedding_dim == 8
    # validation AUC recorded during training = verify on the same pairs (same preprocessing)
    report = verify(out / "best.pt", str(pairs_csv), plots=False)
    assert report["auc"] == pytest.approx(result.val["auc"], abs=1e-9)
    # loads in the other commands: embed a dataset with the matching input
    assert main(["embed", str(out / "best.pt"), "--data", "digits", "--out", str(tmp_path / "e.npz"),
                 "--no-progress", "--device", "cpu"]) == 0
    assert np.load(tmp_path / "e.npz")["embeddings"].shape[1] == 8


def test_train_pairs_cli(pairs_csv: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli_run"
    args = ["train-pairs", str(pairs_csv), "--out", str(out), "--epochs", "1", "--no-progress",
            "--set", 'model.name="mlp"', "--set", "model.embedding_dim=4", "--device", "cpu"]
    assert main(args) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert main(args) == 2  # the run exists
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train-pairs", str(pairs_csv), "--out", str(tmp_path / "x"), "--set", 'loss.name="softmax"',
                 "--set", 'model.name="mlp"']) == 2
    assert "forward_pairs" in capsys.readouterr().err


def _fashion_available() -> bool:
    from deepmetric.data import fashion_mnist_search_paths

    return any((p / "t10k-images-idx3-ubyte.gz").is_file() for p in fashion_mnist_search_paths())


@pytest.mark.skipif(not _fashion_available(), reason="Fashion-MNIST not found locally")
def test_demo_pairs_and_demo_cli(tmp_path: Path, capsys) -> None:
    from deepmetric.train.loop import build_components
    from deepmetric.verification import demo_pairs

    test = demo_pairs("test")
    val = demo_pairs("val")
    assert len(test.pairs) == 6000 and test.pairs.num_genuine == 3000 and test.pairs.num_folds == 10
    assert len(test.dataset) == 5000 and set(test.dataset.labels.unique().tolist()) == {5, 6, 7, 8, 9}
    assert len(val.dataset) == 30000 and set(val.dataset.labels.unique().tolist()) == {5, 6, 7, 8, 9}
    again = demo_pairs("test")
    assert np.array_equal(again.pairs.i, test.pairs.i) and np.array_equal(again.pairs.j, test.pairs.j)
    # an (untrained) Fashion-MNIST model, stored as fit() stores it
    config = config_from_dict(apply_overrides({}, ['model.name="mlp"', "model.embedding_dim=8",
                                                   'data.protocol="disjoint"']))
    validate_components(config)
    model, _, _ = build_components(config, 5, (1, 28, 28), "image")
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, {"config": config_to_dict(config), "model": model.state_dict(),
                                 "data": {"input_shape": [1, 28, 28], "kind": "image", "mean": [0.286],
                                          "std": [0.353], "info": {"train_classes": [0, 1, 2, 3, 4]}}})
    assert main(["calibrate", str(checkpoint), "--demo", "--far", "0.01", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "threshold.json").read_text())
    assert "training split, classes 5-9" in record["pairs"] and record["num_impostor"] == 3000
    capsys.readouterr()
    assert main(["verify", str(checkpoint), "--demo", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "test split, classes 5-9" in text and "at the calibrated threshold" in text
    report = json.loads((tmp_path / "verification" / "verification.json").read_text())
    assert report["num_genuine"] == 3000 and report["num_folds"] == 10
    assert all(report[k] != "nan" for k in ("tar@far=0.1", "tar@far=0.01", "tar@far=0.001"))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("verification_*.toml")), ids=lambda p: p.stem)
def test_verification_configs_are_valid(path: Path) -> None:
    config = load_config(path)
    validate_components(config)
    assert config.data.protocol == "disjoint" and config.eval.metric == "cosine"


def test_center_config_has_the_paper_values() -> None:
    config = load_config(REPO / "configs" / "verification_softmax_center.toml")
    assert config.loss.name == "softmax"
    (center,) = config.extra_losses
    assert center.name == "center" and center.args["with_softmax"] is False
    assert center.args["lambda_c"] == 0.003 and center.args["alpha"] == 0.5


def test_bad_metric_is_a_config_error(run: Path, pairs_csv: Path) -> None:
    with pytest.raises(ConfigError, match="unknown metric"):
        calibrate(run / "best.pt", str(pairs_csv), metric="manhattan")
