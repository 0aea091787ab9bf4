"""Siamese training straight from verification pairs (same / different), for data labelled by pairs.

When the only labels are pairs ("these two signatures are by the same person", "these two are not"),
class-based losses do not apply. :func:`fit_pairs` trains a :class:`~deepmetric.networks.SiameseNetwork`
(one shared embedder) with the contrastive loss on the explicit pairs
(:meth:`~deepmetric.losses.contrastive.ContrastiveLoss.forward_pairs`, Hadsell, Chopra & LeCun, CVPR
2006) and writes a run directory whose checkpoints have **the same format as** :func:`deepmetric.train.fit`'s,
so ``deepmetric verify``, ``calibrate``, ``embed --data ...`` and ``index build --data ...`` load them.

Run directory: ``config.toml`` (the resolved configuration), ``metrics.jsonl`` (one line per epoch:
training loss, learning rate, and with validation pairs their AUC, EER and 10-fold accuracy),
``last.pt``, ``best.pt`` (best validation AUC; without validation pairs the last epoch) and
``summary.json``.

Checkpoint entries (as ``fit`` writes them): ``config`` (``config_to_dict``; ``data.name`` is
``"pairs:<csv>"``, which is not a loadable dataset: give ``--data`` to ``evaluate``/``embed``/``index``),
``data`` (``input_shape``, ``kind``, ``mean``, ``std``, ``num_train_classes = 0``, ``info``,
``world_size = 1``), ``model``, ``loss`` (the contrastive loss's state, empty), ``optimizer``,
``scheduler``, ``epoch``, ``step`` (0), ``best_value`` (best validation AUC, or minus the training
loss), ``best_epoch`` and ``running``. ``deepmetric train --resume`` does not apply to these runs.

Images: every distinct image of the pairs is loaded once with PIL, resized to ``image_size`` (default:
the size of the first image) and converted to grayscale when the first image is grayscale (or as
``grayscale`` says). The normalisation ``mean``/``std`` are the per-channel statistics of the training
images (in ``[0, 1]``), stored in the checkpoint and used by ``deepmetric verify``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from deepmetric.config import Config, apply_overrides, config_from_dict, config_to_dict, dumps_toml
from deepmetric.errors import ConfigError, DataError, NonFiniteError
from deepmetric.io import atomic_write_text
from deepmetric.verification.data import PairSet, load_pair_images, load_pairs_csv

__all__ = ["fit_pairs", "PairsFitResult", "default_pairs_config", "images_for_pairs"]

#: Defaults of a pairs run (``--set`` overrides apply on top): SmallCNN, 64-d L2-normalised
#: embeddings, contrastive loss (margin 1 on unit vectors), AdamW lr 1e-3, 10 epochs.
PAIRS_DEFAULTS: dict[str, Any] = {
    "model": {"name": "small_cnn", "embedding_dim": 64, "normalize": True},
    "loss": {"name": "contrastive", "margin": 1.0},
    "miner": {"name": "none"},
    "optim": {"lr": 1e-3, "warmup_epochs": 0.5},
    "train": {"epochs": 10, "baselines": False},
    "eval": {"metric": "cosine"},
}


def default_pairs_config(overrides: list[str] | None = None, *, data_name: str = "pairs") -> Config:
    """The configuration of a pairs run: :data:`PAIRS_DEFAULTS` with ``section.key=value`` overrides."""
    raw = json.loads(json.dumps(PAIRS_DEFAULTS))
    raw["data"] = {"name": data_name, "protocol": "closed", "augment": False}
    return config_from_dict(apply_overrides(raw, list(overrides or [])))


@dataclass
class PairsFitResult:
    """What :func:`fit_pairs` returns."""

    out_dir: Path
    history: list[dict[str, Any]]
    best_epoch: int
    val: dict[str, Any] = field(default_factory=dict)


def _first_image_properties(path: str) -> tuple[tuple[int, int], bool]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return (image.height, image.width), image.mode in ("1", "L", "LA", "I", "I;16", "F")
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"image {path} cannot be read: {exc}") from exc


def images_for_pairs(pairs: PairSet, image_size: int | tuple[int, int], grayscale: bool,
                     mean: Any = None, std: Any = None) -> tuple[Any, PairSet]:
    """Load the distinct images of path-based ``pairs`` into an ArrayDataset; return it and index pairs.

    ``mean``/``std`` ``None``: computed per channel from these images.
    """
    from deepmetric.data import ArrayDataset

    if pairs.paths1 is None or pairs.paths2 is None:
        raise ConfigError("images_for_pairs needs path-based pairs")
    unique, inverse = np.unique(np.asarray(pairs.paths1 + pairs.paths2, dtype=str), return_inverse=True)
    data = load_pair_images(list(unique), image_size, grayscale=grayscale)
    if mean is None or std is None:
        x = data.float().div_(255.0)
        mean = x.mean(dim=(0, 2, 3)).tolist()
        std = [v if v > 1e-6 else 1.0 for v in x.std(dim=(0, 2, 3), unbiased=False).tolist()]
    dataset = ArrayDataset(data, torch.zeros(len(unique), dtype=torch.long), mean=mean, std=std, kind="image")
    n = len(pairs)
    index_pairs = PairSet(same=pairs.same, folds=pairs.folds, i=inverse[:n].astype(np.int64),
                          j=inverse[n:].astype(np.int64))
    return dataset, index_pairs


def _as_index_pairs(pairs: Any, images: Any, what: str, size: tuple[int, int] | None, grayscale: bool | None,
                    mean: Any = None, std: Any = None) -> tuple[Any, PairSet, str, tuple[int, int], bool]:
    """(dataset, index pairs, description, image size, grayscale) of a pairs argument."""
    source = ""
    if isinstance(pairs, (str, os.PathLike)):
        source = str(pairs)
        pairs = load_pairs_csv(pairs)
    if not isinstance(pairs, PairSet):
        raise ConfigError(f"{what} must be a pairs CSV path or a PairSet; got {type(pairs).__name__}")
    if pairs.paths1 is not None:
        assert pairs.paths2 is not None
        if images is not None:
            raise ConfigError(f"{what}: path-based pairs load their own images; do not pass images=")
        first_size, first_gray = _first_image_properties(pairs.paths1[0])
        size = size or first_size
        grayscale = first_gray if grayscale is None else grayscale
        dataset, index_pairs = images_for_pairs(pairs, size, grayscale, mean, std)
        return dataset, index_pairs, source or f"{len(pairs)} path pairs", size, grayscale
    if images is None:
        raise ConfigError(f"{what}: index-based pairs need images= (the dataset they index)")
    if int(max(pairs.i.max(), pairs.j.max())) >= len(images):  # type: ignore[union-attr]
        raise DataError(f"{what}: pair indices out of range for a dataset of {len(images)} items")
    shape = tuple(images.input_shape)
    return images, pairs, source or f"{len(pairs)} index pairs", (shape[-2], shape[-1]), shape[0] == 1


def _val_metrics(model: torch.nn.Module, dataset: Any, pairs: PairSet, metric: str, batch: int) -> dict[str, Any]:
    from deepmetric.verification.metrics import pair_scores
    from deepmetric.verification.protocol import scores_report

    was = model.training
    model.eval()
    unique, inverse = np.unique(np.concatenate([pairs.i, pairs.j]), return_inverse=True)  # type: ignore[list-item]
    chunks = []
    with torch.no_grad():
        for s in range(0, len(unique), batch):
            x, _ = dataset.get_batch(torch.as_tensor(unique[s : s + batch]))
            chunks.append(model(x).float().cpu().numpy())
    model.train(was)
    emb = np.concatenate(chunks)
    n = len(pairs)
    scores = pair_scores(emb[inverse[:n]], emb[inverse[n:]], metric)
    folds = pairs.folds if pairs.num_folds >= 2 else None
    report = scores_report(scores, pairs.same, folds)
    return {k: report[k] for k in ("auc", "eer", "best_accuracy", "lfw_mean_accuracy", "lfw_std_accuracy")}


def fit_pairs(
    pairs: str | os.PathLike[str] | PairSet,
    out_dir: str | os.PathLike[str],
    *,
    images: Any = None,
    config: Config | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 64,
    val_pairs: str | os.PathLike[str] | PairSet | None = None,
    val_images: Any = None,
    image_size: int | tuple[int, int] | None = None,
    grayscale: bool | None = None,
    device: str = "auto",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> PairsFitResult:
    """Train a siamese network with the contrastive loss on explicit same/different pairs.

    Args:
        pairs: a pairs CSV (``path1,path2,same``, see
            :func:`~deepmetric.verification.data.load_pairs_csv`), a path-based :class:`PairSet`, or an
            index-based one together with ``images``.
        out_dir: the run directory (created).
        images: for index-based pairs, the deepmetric dataset (``get_batch``, ``input_shape``) they
            index, normalised as the model should see it.
        config: model, loss (``contrastive`` and its arguments), optimiser, seed, train settings;
            default :func:`default_pairs_config`. ``data.name`` is set to ``"pairs:<csv>"``.
        epochs: overrides ``config.train.epochs``.
        lr: overrides ``config.optim.lr``.
        batch_size: pairs per step.
        val_pairs: validation pairs (same forms; index-based ones with ``val_images``), scored every
            epoch with ``config.eval.metric``; the best checkpoint has the highest validation AUC.
        val_images: the dataset of index-based ``val_pairs``.
        image_size: ``S`` or ``(H, W)`` for path-based pairs (default: the first image's size).
        grayscale: load path-based images as one channel (default: as the first image is).
        device: ``auto``, ``cpu``, ``cuda``...
        progress: show a progress bar.
        log: receives one line per epoch.

    Raises:
        ConfigError: a loss without ``forward_pairs``, extra losses, bad sizes.
        DataError: bad pairs file or images (the message names the line / file).
        NonFiniteError: NaN/inf loss.
    """
    from deepmetric.config import validate_components
    from deepmetric.registry import LOSSES
    from deepmetric.train.checkpoint import save_checkpoint
    from deepmetric.train.loop import build_components, resolve_device, step_seed
    from deepmetric.train.schedule import warmup_cosine
    from deepmetric.networks import SiameseNetwork

    config = config if config is not None else default_pairs_config()
    if epochs is not None:
        if isinstance(epochs, bool) or int(epochs) < 1:
            raise ConfigError(f"epochs must be a positive integer; got {epochs!r}")
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=int(epochs)))
    if lr is not None:
        if not float(lr) > 0:
            raise ConfigError(f"lr must be > 0; got {lr!r}")
        config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=float(lr)))
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
    if config.extra_losses:
        raise ConfigError("pairs training uses one loss ([loss], e.g. contrastive); remove [[extra_losses]]")
    if config.miner is not None:
        raise ConfigError("pairs training trains on the given pairs: set [miner] name = \"none\"")
    validate_components(config)
    import deepmetric.losses  # noqa: F401

    if not hasattr(LOSSES.get(config.loss.name), "forward_pairs"):
        raise ConfigError(f"loss {config.loss.name!r} cannot train on explicit pairs (no forward_pairs); "
                          "use loss.name=\"contrastive\"")
    size = (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size) if image_size else None)
    dataset, train_pairs, source, size, gray = _as_index_pairs(pairs, images, "pairs", size, grayscale)  # type: ignore[arg-type]
    if len(train_pairs) < 1:
        raise DataError("no training pairs")
    mean = dataset.mean.tolist() if getattr(dataset, "mean", None) is not None else None
    std = dataset.std.tolist() if getattr(dataset, "std", None) is not None else None
    val_set = None
    if val_pairs is not None:
        val_set = _as_index_pairs(val_pairs, val_images, "val_pairs", size, gray, mean, std)
        if tuple(val_set[0].input_shape) != tuple(dataset.input_shape):
            raise DataError(f"validation images have shape {tuple(val_set[0].input_shape)}, training images "
                            f"{tuple(dataset.input_shape)}")
    data_name = f"pairs:{Path(source).resolve()}" if Path(source).is_file() else "pairs"
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, name=data_name))

    device_ = resolve_device(config.train.device)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    input_shape = tuple(int(s) for s in dataset.input_shape)
    kind = getattr(dataset, "kind", "image")
    model, loss_set, _ = build_components(config, 0, input_shape, kind)
    loss_fn = loss_set.losses[0]
    model.to(device_)
    net = SiameseNetwork(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    n = len(train_pairs)
    steps = math.ceil(n / batch_size)
    total = config.train.epochs * steps
    scheduler = warmup_cosine(optimizer, total, int(round(config.optim.warmup_epochs * steps)),
                              config.optim.min_lr_ratio)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.toml", dumps_toml(config_to_dict(config)))
    info = {"name": data_name, "protocol": "pairs", "source": source, "num_pairs": n,
            "num_genuine": train_pairs.num_genuine, "num_impostor": train_pairs.num_impostor,
            "num_images": len(dataset), "input_shape": list(input_shape), "kind": kind,
            "image_size": list(size), "grayscale": bool(gray), "mean": mean, "std": std,
            "val_pairs": len(val_set[1]) if val_set is not None else 0, "seed": config.seed}
    meta = {"input_shape": list(input_shape), "kind": kind, "num_train_classes": 0, "mean": mean, "std": std,
            "info": info, "world_size": 1}
    i_all = torch.as_tensor(train_pairs.i)
    j_all = torch.as_tensor(train_pairs.j)
    same_all = torch.as_tensor(train_pairs.same)
    history: list[dict[str, Any]] = []
    best_value, best_epoch = -math.inf, -1
    running: dict[str, float] = {}

    def save(path: Path, epoch: int) -> None:
        save_checkpoint(path, {
            "config": config_to_dict(config), "data": meta, "model": model.state_dict(),
            "loss": loss_set.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "step": 0, "best_value": best_value,
            "best_epoch": best_epoch, "running": dict(running),
        })

    net.train()
    for epoch in range(config.train.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(config.seed, epoch, 0)))
        running = {"loss_sum": 0.0, "count": 0, "images": 0, "seconds": 0.0}
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.train.epochs}", unit="batch",
                   disable=not progress, dynamic_ncols=True)
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            torch.manual_seed(step_seed(config.seed, epoch, step))
            x1, _ = dataset.get_batch(i_all[idx])
            x2, _ = dataset.get_batch(j_all[idx])
            e1, e2 = net(x1.to(device_), x2.to(device_))
            loss = loss_fn.forward_pairs(e1, e2, same_all[idx].to(device_))
            if not bool(torch.isfinite(loss)):
                raise NonFiniteError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}; "
                                     "lower optim.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            running["loss_sum"] += float(loss.detach())
            running["count"] += 1
            running["images"] += 2 * len(idx)
            bar.update(1)
        bar.close()
        running["seconds"] = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "steps": steps,
                               "train_loss": running["loss_sum"] / max(1, running["count"]),
                               "lr": optimizer.param_groups[0]["lr"],
                               "images_per_s": running["images"] / max(running["seconds"], 1e-9),
                               "epoch_seconds": running["seconds"], "val": {}}
        if val_set is not None:
            row["val"] = _val_metrics(model, val_set[0], val_set[1], config.eval.metric,
                                      config.train.embed_batch_size)
        history.append(row)
        value = row["val"]["auc"] if row["val"] else -row["train_loss"]
        improved = value > best_value
        if improved:
            best_value, best_epoch = value, epoch + 1
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))
        save(out / "last.pt", epoch + 1)
        if improved:
            save(out / "best.pt", epoch + 1)
        vtxt = "  ".join(f"val {k} {row['val'][k]:.4f}" for k in ("auc", "lfw_mean_accuracy") if k in row["val"])
        log(f"epoch {epoch + 1}: contrastive loss {row['train_loss']:.4f}  {vtxt}{'  (best)' if improved else ''}")
    best_val = history[best_epoch - 1]["val"] if best_epoch > 0 else {}
    atomic_write_text(out / "summary.json", json.dumps({
        "trained_on": "pairs", "source": source, "num_pairs": n, "best_epoch": best_epoch,
        "val": best_val, "epochs": config.train.epochs,
    }, indent=2) + "\n")
    log(f"run directory: {out}  (config.toml, metrics.jsonl, best.pt, last.pt, summary.json)")
    return PairsFitResult(out_dir=out, history=history, best_epoch=best_epoch, val=best_val)
