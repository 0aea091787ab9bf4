"""Verification with a trained checkpoint: embed pairs, report, calibrate a deployment threshold.

The deployment workflow on top of :mod:`deepmetric.verification.metrics`:

1. :func:`calibrate` chooses, on a **validation** pair set, the threshold whose FAR is at most a target
   (:func:`~deepmetric.verification.metrics.calibrate_threshold`) and saves it **with the model**, as
   ``threshold.json`` beside the checkpoint (see :func:`threshold_path`). The file records the metric,
   the target FAR, the FAR/TAR reached on the validation pairs and the checkpoint's SHA-256, so that a
   threshold is never applied to another model (:func:`load_threshold` refuses it).
2. :func:`verify` embeds both images of every pair of a (test) pair set and reports the LFW 10-fold
   accuracy, AUC, EER and TAR@FAR (see :func:`~deepmetric.verification.protocol.scores_report`), the
   accuracy / FAR / TAR at the calibrated threshold when one exists for this checkpoint, and writes a
   ROC plot, a genuine/impostor score-histogram plot and a JSON report.

Images of path-based pairs are loaded with PIL and preprocessed as the model's training data was:
resized to the checkpoint's ``input_shape`` (grayscale when it has one channel), scaled to ``[0, 1]``
and normalised with the ``mean``/``std`` stored in the checkpoint's ``data`` entry (falling back to
``data.info`` and then to the checkpoint's dataset defaults).

**The demo pairs** (:func:`demo_pairs`, ``deepmetric verify CHECKPOINT --demo``) need no pairs file:

* ``"test"``: the Fashion-MNIST **test split of classes 5-9** (5,000 images; the test set of the
  class-disjoint protocol, unseen by a model trained with ``protocol = "disjoint"``), 3,000 genuine
  + 3,000 impostor pairs from :func:`~deepmetric.verification.data.make_pairs_from_labels` with seed
  :data:`DEMO_TEST_SEED`, 10 folds;
* ``"val"`` (for calibration): the Fashion-MNIST **training split of classes 5-9** (30,000 images,
  also unseen under the disjoint protocol, and other images than the test split's, so no pair and
  no image is shared with the test pairs), 3,000 + 3,000 pairs with seed :data:`DEMO_VAL_SEED`.

A checkpoint trained on classes 5-9 (the closed protocol) has seen the ``"val"`` images; a warning
says so.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from deepmetric.errors import CheckpointError, ConfigError, DataError
from deepmetric.io import atomic_write_text
from deepmetric.verification.data import PairSet, load_lfw_pairs, load_pair_images, load_pairs_csv
from deepmetric.verification.metrics import calibrate_threshold, pair_scores, roc_curve
from deepmetric.verification.plots import plot_roc, plot_score_histograms
from deepmetric.verification.protocol import far_key, scores_report

__all__ = [
    "DEMO_CLASSES",
    "DEMO_TEST_SEED",
    "DEMO_VAL_SEED",
    "THRESHOLD_FORMAT",
    "Verifier",
    "calibrate",
    "checkpoint_sha256",
    "demo_pairs",
    "embed_pairs",
    "load_pairs",
    "load_threshold",
    "threshold_path",
    "verify",
    "format_report",
    "LoadedPairs",
]

DEMO_CLASSES = (5, 6, 7, 8, 9)
DEMO_TEST_SEED = 0
DEMO_VAL_SEED = 1
DEMO_NUM_PAIRS = 3000
THRESHOLD_FORMAT = "deepmetric-threshold"
THRESHOLD_VERSION = 1
DEFAULT_FARS = (1e-1, 1e-2, 1e-3)


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a checkpoint file (hex), the identity a threshold file is tied to."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    digest = hashlib.sha256()
    with p.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def threshold_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where :func:`calibrate` saves the threshold of ``checkpoint``: ``threshold.json`` beside it."""
    return Path(checkpoint).parent / "threshold.json"


def _float_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


class Verifier:
    """A checkpoint's embedding model with its input preprocessing.

    Args:
        checkpoint: a deepmetric checkpoint (``best.pt`` / ``last.pt`` of ``fit`` or ``fit_pairs``).
        device: torch device.
        batch_size: images per forward pass.

    Attributes:
        model, config, input_shape, kind, mean, std, path.

    Raises:
        CheckpointError: unreadable or foreign checkpoint.
    """

    def __init__(self, checkpoint: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 batch_size: int = 512) -> None:
        from deepmetric.train import load_model_from_checkpoint

        self.path = Path(checkpoint)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.model: nn.Module
        self.model, self.config, ckpt = load_model_from_checkpoint(self.path, self.device)
        meta = ckpt.get("data", {}) or {}
        info = meta.get("info", {}) or {}
        self.meta = meta
        self.kind = str(meta.get("kind", "image"))
        self.input_shape = tuple(int(s) for s in meta.get("input_shape", (1, 28, 28)))
        mean = meta.get("mean", info.get("mean"))
        std = meta.get("std", info.get("std"))
        if mean is None and std is None:
            mean, std = self._dataset_defaults()
        self.mean = _float_list(mean)
        self.std = _float_list(std)
        self.train_classes = info.get("train_classes")

    def _dataset_defaults(self) -> tuple[Any, Any]:
        """Normalisation of the checkpoint's dataset when the checkpoint does not record it."""
        name = self.config.data.name
        if name == "fashion_mnist":
            from deepmetric.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

            return FASHION_MNIST_MEAN, FASHION_MNIST_STD
        try:
            from deepmetric.data import load_splits

            d = self.config.data
            splits = load_splits(name, d.protocol, root=d.root or None, val_fraction=d.val_fraction,
                                 seed=self.config.seed, train_classes=list(d.train_classes) or None,
                                 image_size=d.image_size or None, download=False)
        except Exception as exc:  # noqa: BLE001 - any failure means "unknown": say so and go on
            warnings.warn(f"{self.path}: the checkpoint records no input normalisation and its dataset "
                          f"{name!r} cannot be loaded ({exc}); images are only scaled to [0, 1]", stacklevel=3)
            return None, None
        train = splits.train
        return (train.mean.tolist() if train.mean is not None else None,
                train.std.tolist() if train.std is not None else None)

    def _check_images(self) -> tuple[int, int, int]:
        if self.kind != "image" or len(self.input_shape) != 3:
            raise DataError(f"{self.path}: the model takes {self.kind} inputs of shape {self.input_shape}, "
                            "not images; verification pairs of image files need an image model")
        c, h, w = self.input_shape
        if c not in (1, 3):
            raise DataError(f"{self.path}: the model takes {c}-channel images; image files give 1 or 3")
        return c, h, w

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images ``(B, C, H, W)`` → the model's float input (scaled to [0, 1], then mean/std)."""
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return x

    @torch.no_grad()
    def embed_tensor(self, x: torch.Tensor) -> np.ndarray:
        """Embeddings ``(N, D)`` of a batch of model inputs (already preprocessed), in chunks."""
        self.model.eval()
        out = [self.model(x[s : s + self.batch_size].to(self.device)).float().cpu().numpy()
               for s in range(0, x.shape[0], self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_paths(self, paths: Sequence[str]) -> np.ndarray:
        """Embeddings ``(N, D)`` of image files (loaded, resized and normalised chunk by chunk)."""
        c, h, w = self._check_images()
        out = []
        for s in range(0, len(paths), self.batch_size):
            images = load_pair_images(paths[s : s + self.batch_size], (h, w), grayscale=(c == 1))
            out.append(self.embed_tensor(self.normalize(images)))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_dataset_items(self, dataset: Any, indices: np.ndarray) -> np.ndarray:
        """Embeddings of items ``indices`` of a deepmetric dataset (its own ``get_batch`` preprocessing)."""
        shape = tuple(int(s) for s in getattr(dataset, "input_shape", self.input_shape))
        if shape != self.input_shape:
            raise DataError(f"the pairs' images have shape {shape}; the model in {self.path} takes "
                            f"{self.input_shape}")
        out = []
        for s in range(0, len(indices), self.batch_size):
            x, _ = dataset.get_batch(torch.as_tensor(indices[s : s + self.batch_size], dtype=torch.long))
            out.append(self.embed_tensor(x))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_pairs(verifier: Verifier, pairs: PairSet, dataset: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``(e1, e2)`` of both sides of every pair; each distinct image is embedded once.

    Args:
        verifier: the model and its preprocessing.
        pairs: path-based pairs, or index-based pairs into ``dataset``.
        dataset: for index-based pairs, a deepmetric dataset (``get_batch``) already normalised as
            the model expects.
    """
    if pairs.paths1 is not None:
        assert pairs.paths2 is not None
        unique, inverse = np.unique(np.asarray(pairs.paths1 + pairs.paths2, dtype=object).astype(str),
                                    return_inverse=True)
        emb = verifier.embed_paths(list(unique))
    else:
        if dataset is None:
            raise ConfigError("index-based pairs need the dataset they index (dataset=...)")
        assert pairs.i is not None and pairs.j is not None
        unique, inverse = np.unique(np.concatenate([pairs.i, pairs.j]), return_inverse=True)
        if unique.size and (unique[0] < 0 or unique[-1] >= len(dataset)):
            raise DataError(f"pair indices out of range for a dataset of {len(dataset)} items")
        emb = verifier.embed_dataset_items(dataset, unique)
    n = len(pairs)
    return emb[inverse[:n]], emb[inverse[n:]]


@dataclass(frozen=True)
class LoadedPairs:
    """A pair set ready to embed: the pairs, the dataset index-based pairs point into, a description."""

    pairs: PairSet
    dataset: Any
    source: str


def demo_pairs(split: str = "test", *, input_shape: Sequence[int] = (1, 28, 28),
               mean: Any = None, std: Any = None, root: str | None = None,
               num_pairs: int = DEMO_NUM_PAIRS, download: bool = True) -> LoadedPairs:
    """The built-in Fashion-MNIST verification pairs (see the module docstring).

    Args:
        split: ``"test"`` (Fashion-MNIST test split of classes 5-9, seed :data:`DEMO_TEST_SEED`) or
            ``"val"`` (training split of classes 5-9, seed :data:`DEMO_VAL_SEED`), for calibration.
        input_shape: the model's input; images are resized to its height and width.
        mean, std: the model's normalisation (default: Fashion-MNIST's).
        root: a folder to look for Fashion-MNIST in first.
        num_pairs: genuine pairs = impostor pairs = ``num_pairs`` (10 folds).
        download: allow downloading Fashion-MNIST when it is not found locally.
    """
    from deepmetric.data import load_fashion_mnist
    from deepmetric.verification.data import make_pairs_from_labels

    if split not in ("test", "val"):
        raise ConfigError(f"demo split must be 'test' or 'val'; got {split!r}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[0] != 1:
        raise DataError(f"the demo pairs are 1-channel Fashion-MNIST images; this model takes inputs of shape "
                        f"{shape}")
    train, test = load_fashion_mnist(root, download=download)
    source = test if split == "test" else train
    keep = torch.isin(source.labels, torch.tensor(DEMO_CLASSES))
    dataset = source.subset(keep.nonzero().flatten())
    if tuple(dataset.input_shape[1:]) != shape[1:]:
        dataset = dataset.resized(shape[1:])
    if mean is not None or std is not None:
        dataset = dataset.with_normalization(mean, std)
    seed = DEMO_TEST_SEED if split == "test" else DEMO_VAL_SEED
    pairs = make_pairs_from_labels(dataset.labels.numpy(), num_pos=num_pairs, num_neg=num_pairs,
                                   num_folds=10, seed=seed)
    which = "test" if split == "test" else "training"
    return LoadedPairs(pairs, dataset, f"demo: Fashion-MNIST {which} split, classes 5-9 ({len(dataset)} images), "
                                       f"{num_pairs} + {num_pairs} pairs, seed {seed}")


def load_pairs(spec: str | os.PathLike[str] | PairSet | LoadedPairs, verifier: Verifier | None = None, *,
               lfw_root: str | None = None, demo_split: str = "test", data_root: str | None = None,
               check_images: bool = True) -> LoadedPairs:
    """Resolve a pairs argument: a :class:`PairSet`, ``"demo"``, a CSV, or LFW ``pairs.txt`` (with ``lfw_root``).

    ``"demo"`` gives :func:`demo_pairs` (``demo_split``) preprocessed for ``verifier``'s model.
    """
    if isinstance(spec, LoadedPairs):
        return spec
    if isinstance(spec, PairSet):
        if spec.paths1 is None:
            raise ConfigError("an index-based PairSet needs its dataset: pass LoadedPairs(pairs, dataset, name)")
        return LoadedPairs(spec, None, f"{len(spec)} pairs")
    text = str(spec)
    if text == "demo":
        shape = verifier.input_shape if verifier is not None else (1, 28, 28)
        mean = verifier.mean if verifier is not None else None
        std = verifier.std if verifier is not None else None
        if verifier is not None and demo_split == "val" and verifier.train_classes is not None \
                and set(int(c) for c in verifier.train_classes) & set(DEMO_CLASSES) \
                and verifier.config.data.name == "fashion_mnist":
            warnings.warn(f"{verifier.path} was trained on Fashion-MNIST classes {verifier.train_classes}, which "
                          "include the demo classes 5-9: the demo validation pairs are images it was trained "
                          "on, so the calibrated FAR is optimistic", stacklevel=2)
        return demo_pairs(demo_split, input_shape=shape, mean=mean, std=std, root=data_root)
    if lfw_root is not None:
        pairs = load_lfw_pairs(lfw_root, text, check_images=check_images)
    else:
        pairs = load_pairs_csv(text, check_images=check_images)
    return LoadedPairs(pairs, None, f"{text} ({len(pairs)} pairs)")


def load_threshold(path: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None,
                   sha256: str | None = None) -> dict[str, Any]:
    """Read a ``threshold.json``; with ``checkpoint`` (or its ``sha256``) require that it belongs to it.

    Raises:
        DataError: missing or malformed file.
        CheckpointError: the file was calibrated for another checkpoint (SHA-256 mismatch).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"threshold file {p} does not exist (create it with: deepmetric calibrate CHECKPOINT "
                        "--pairs VAL_PAIRS)")
    try:
        record = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: not a JSON threshold file: {exc}") from exc
    required = ("format", "threshold", "metric", "checkpoint_sha256", "target_far")
    if not isinstance(record, dict) or record.get("format") != THRESHOLD_FORMAT or \
            any(k not in record for k in required):
        raise DataError(f"{p}: not a deepmetric threshold file (needs format={THRESHOLD_FORMAT!r} and keys "
                        f"{', '.join(required)})")
    if int(record.get("version", 0)) > THRESHOLD_VERSION:
        raise DataError(f"{p} was written by a newer deepmetric (version {record.get('version')})")
    try:
        record["threshold"] = float(record["threshold"])  # "inf" (reject all) accepted
    except (TypeError, ValueError):
        raise DataError(f"{p}: threshold {record['threshold']!r} is not a number") from None
    if checkpoint is not None or sha256 is not None:
        actual = sha256 or checkpoint_sha256(checkpoint)  # type: ignore[arg-type]
        if record["checkpoint_sha256"] != actual:
            raise CheckpointError(
                f"threshold file {p} was calibrated for another checkpoint ({record.get('checkpoint', '?')}, "
                f"sha256 {record['checkpoint_sha256'][:12]}…), not {checkpoint or 'this one'} (sha256 "
                f"{actual[:12]}…); recalibrate with: deepmetric calibrate {checkpoint or 'CHECKPOINT'} --pairs "
                "VAL_PAIRS"
            )
    return record


def _json_float(value: float) -> float | str:
    """``value``, or ``"inf"`` / ``"-inf"`` / ``"nan"`` (strict JSON has no infinities)."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def _rates_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> dict[str, float]:
    accept = scores >= threshold
    genuine, impostor = same, ~same
    return {
        "accuracy": float(np.mean(accept == same)),
        "far": float(accept[impostor].mean()) if impostor.any() else math.nan,
        "tar": float(accept[genuine].mean()) if genuine.any() else math.nan,
    }


def calibrate(
    checkpoint: str | os.PathLike[str],
    pairs: str | os.PathLike[str] | PairSet | LoadedPairs = "demo",
    target_far: float = 1e-3,
    metric: str = "cosine",
    *,
    out: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    lfw_root: str | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Choose the threshold meeting ``target_far`` on validation pairs and save it beside the checkpoint.

    The threshold maximises the TAR among thresholds whose FAR on these pairs is ``<= target_far``
    (:func:`~deepmetric.verification.metrics.calibrate_threshold`); a pair is accepted when its score
    is ``>= threshold``. When ``target_far`` is below ``1 / #impostor pairs`` it cannot be measured:
    the threshold then accepts no impostor pair of the set, and ``far_measurable`` is false.

    ``threshold.json`` (atomic write) holds: ``format``, ``version``, ``threshold`` (a number, or
    ``"inf"`` = reject all), ``metric``, ``target_far``, ``achieved_far``, ``achieved_tar``,
    ``accuracy`` (all three on the validation pairs), ``min_measurable_far``, ``far_measurable``,
    ``num_genuine``, ``num_impostor``, ``pairs`` (a description of the validation set), ``checkpoint``
    (absolute path), ``checkpoint_sha256`` and ``created``.

    Args:
        checkpoint: the model.
        pairs: validation pairs: ``"demo"`` (the demo's *validation* pairs, see :func:`demo_pairs`), a
            CSV, LFW pairs.txt (with ``lfw_root``), or a :class:`PairSet` / :class:`LoadedPairs`.
            Never the pairs you report results on.
        target_far: the largest acceptable false accept rate, in ``(0, 1]``.
        metric: ``"cosine"`` or ``"euclidean"`` (score = negative distance).
        out: where to write (default :func:`threshold_path`).
        device: torch device.
        lfw_root: read ``pairs`` as LFW pairs.txt with images under this folder.
        data_root: a folder to look for Fashion-MNIST in first (demo pairs).

    Returns:
        The record written.
    """
    target = float(target_far)
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target FAR must be in (0, 1]; got {target_far!r}")
    if metric not in ("cosine", "euclidean"):
        raise ConfigError(f"unknown metric {metric!r}; valid metrics: cosine, euclidean")
    sha = checkpoint_sha256(checkpoint)
    verifier = Verifier(checkpoint, device=device)
    loaded = load_pairs(pairs, verifier, lfw_root=lfw_root, demo_split="val", data_root=data_root)
    e1, e2 = embed_pairs(verifier, loaded.pairs, loaded.dataset)
    scores = pair_scores(e1, e2, metric)
    same = loaded.pairs.same
    threshold = calibrate_threshold(scores, same, target)
    rates = _rates_at(scores, same, threshold)
    far, _, _ = roc_curve(scores, same)
    min_far = float(far[far > 0.0][0])
    record = {
        "format": THRESHOLD_FORMAT,
        "version": THRESHOLD_VERSION,
        "threshold": _json_float(threshold),
        "metric": metric,
        "target_far": target,
        "achieved_far": rates["far"],
        "achieved_tar": rates["tar"],
        "accuracy": rates["accuracy"],
        "min_measurable_far": min_far,
        "far_measurable": bool(target >= min_far),
        "num_genuine": loaded.pairs.num_genuine,
        "num_impostor": loaded.pairs.num_impostor,
        "pairs": loaded.source,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": sha,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(Path(out) if out is not None else threshold_path(checkpoint),
                      json.dumps(record, indent=2) + "\n")
    record["threshold"] = threshold
    return record


def verify(
    checkpoint: str | os.PathLike[str],
    pairs: str | os.PathLike[str] | PairSet | LoadedPairs = "demo",
    *,
    metric: str | None = None,
    threshold_file: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    fars: Sequence[float] = DEFAULT_FARS,
    device: str | torch.device = "cpu",
    lfw_root: str | None = None,
    data_root: str | None = None,
    plots: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Verification report of a checkpoint on a pair set; plots and a JSON report in ``out_dir``.

    The threshold: ``threshold_file`` when given (it must belong to this checkpoint, else
    :class:`CheckpointError`); otherwise ``threshold.json`` beside the checkpoint when it exists and
    its SHA-256 matches (a mismatching one is ignored and the report's ``threshold_note`` says why).

    Args:
        checkpoint: the model.
        pairs: ``"demo"`` (the demo *test* pairs), a CSV, LFW pairs.txt (with ``lfw_root``), or a
            :class:`PairSet` / :class:`LoadedPairs`.
        metric: ``"cosine"`` / ``"euclidean"``; default: the threshold's metric, else cosine.
        threshold_file: an explicit threshold file.
        out_dir: where to write ``roc.png``, ``scores.png`` and ``verification.json`` (default
            ``<checkpoint folder>/verification``).
        fars: FARs of the TAR@FAR entries.
        device: torch device.
        lfw_root: read ``pairs`` as LFW pairs.txt with images under this folder.
        data_root: a folder to look for Fashion-MNIST in first (demo pairs).
        plots: write the two PNGs.
        log: receives progress lines.

    Returns:
        :func:`~deepmetric.verification.protocol.scores_report`'s keys plus ``metric``, ``pairs``,
        ``checkpoint``, ``checkpoint_sha256``, ``fold_accuracies``, ``threshold`` (the record used,
        or None), ``threshold_note`` and ``at_threshold`` (``accuracy``, ``far``, ``tar``, or None),
        and ``files``.
    """
    sha = checkpoint_sha256(checkpoint)
    record: dict[str, Any] | None = None
    note = ""
    if threshold_file is not None:
        record = load_threshold(threshold_file, checkpoint, sha256=sha)
        record.setdefault("path", str(threshold_file))
    else:
        default = threshold_path(checkpoint)
        if default.is_file():
            try:
                record = load_threshold(default, checkpoint, sha256=sha)
                record["path"] = str(default)
            except (CheckpointError, DataError) as exc:
                note = f"{default} ignored: {exc}"
        else:
            note = f"no calibrated threshold ({default} does not exist)"
    if metric is None:
        metric = str(record["metric"]) if record is not None else "cosine"
    if metric not in ("cosine", "euclidean"):
        raise ConfigError(f"unknown metric {metric!r}; valid metrics: cosine, euclidean")
    if record is not None and record["metric"] != metric:
        note = f"the calibrated threshold is for metric {record['metric']!r}, not {metric!r}: not applied"
        record = None

    verifier = Verifier(checkpoint, device=device)
    loaded = load_pairs(pairs, verifier, lfw_root=lfw_root, demo_split="test", data_root=data_root)
    log(f"embedding {len(loaded.pairs)} pairs: {loaded.source}")
    e1, e2 = embed_pairs(verifier, loaded.pairs, loaded.dataset)
    scores = pair_scores(e1, e2, metric)
    same = loaded.pairs.same
    report = scores_report(scores, same, loaded.pairs.folds, fars)
    from deepmetric.verification.protocol import lfw_protocol

    lfw = lfw_protocol(scores, same, loaded.pairs.folds)
    report.update(
        metric=metric,
        pairs=loaded.source,
        num_folds=loaded.pairs.num_folds,
        fold_accuracies=[float(a) for a in lfw["fold_accuracies"]],
        checkpoint=str(Path(checkpoint).resolve()),
        checkpoint_sha256=sha,
        threshold=None,
        threshold_note=note,
        at_threshold=None,
    )
    if record is not None:
        report["threshold"] = {k: record[k] for k in ("threshold", "metric", "target_far", "achieved_far",
                                                       "achieved_tar", "path") if k in record}
        report["at_threshold"] = _rates_at(scores, same, float(record["threshold"]))
    out = Path(out_dir) if out_dir is not None else Path(checkpoint).parent / "verification"
    files: dict[str, str] = {}
    if plots:
        far, tar, _ = roc_curve(scores, same)
        files["roc"] = str(plot_roc(far, tar, out / "roc.png", label=f"AUC {report['auc']:.4f}"))
        threshold_value = float(record["threshold"]) if record is not None else None
        files["scores"] = str(plot_score_histograms(scores, same, out / "scores.png", threshold=threshold_value))
    files["report"] = str(out / "verification.json")
    report["files"] = files
    atomic_write_text(out / "verification.json", json.dumps(_jsonable(report), indent=2) + "\n")
    return report


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else _json_float(value)
    return obj


def format_report(report: dict[str, Any], fars: Sequence[float] = DEFAULT_FARS) -> str:
    """The human-readable summary ``deepmetric verify`` prints."""
    lines = [
        f"pairs: {report['pairs']}  ({report['num_genuine']} genuine, {report['num_impostor']} impostor, "
        f"metric {report['metric']})",
        f"  {report['num_folds']}-fold accuracy: {report['lfw_mean_accuracy']:.4f} ± "
        f"{report['lfw_std_accuracy']:.4f}",
        f"  AUC: {report['auc']:.4f}   EER: {report['eer']:.4f} (threshold {report['eer_threshold']:.4f})",
    ]
    for far in fars:
        tar = report[far_key(far)]
        if math.isnan(tar):
            lines.append(f"  TAR@FAR={far:g}: NaN (not measurable: the smallest FAR these impostor pairs "
                         f"measure is {report['min_far']:.2g})")
        else:
            lines.append(f"  TAR@FAR={far:g}: {tar:.4f}")
    if report.get("at_threshold"):
        t = report["threshold"]
        at = report["at_threshold"]
        lines.append(f"  at the calibrated threshold {float(t['threshold']):.4f} (target FAR {t['target_far']:g}, "
                     f"validation FAR {t['achieved_far']:.4g}): accuracy {at['accuracy']:.4f}, "
                     f"FAR {at['far']:.4g}, TAR {at['tar']:.4f}")
    elif report.get("threshold_note"):
        lines.append(f"  threshold: {report['threshold_note']}")
    files = report.get("files", {})
    if files:
        lines.append("  wrote " + ", ".join(files.values()))
    return "\n".join(lines)
