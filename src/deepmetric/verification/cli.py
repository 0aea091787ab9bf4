"""``deepmetric verify``, ``deepmetric calibrate`` and ``deepmetric train-pairs``: thin calls into the API.

Wire them into the ``deepmetric`` command by appending :func:`register_commands` to
``deepmetric.cli._EXTENSIONS``. Usage errors raise :class:`~deepmetric.errors.ConfigError` (exit 2);
bad pairs files, images and checkpoints raise ``DataError`` / ``CheckpointError`` (exit 1).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepmetric.errors import ConfigError

__all__ = ["register_commands", "cmd_verify", "cmd_calibrate", "cmd_train_pairs"]


def _pairs_arg(args: argparse.Namespace, command: str) -> str:
    if getattr(args, "demo", False):
        if args.pairs not in (None, "demo"):
            raise ConfigError(f"{command}: give --demo or --pairs FILE, not both")
        return "demo"
    if not args.pairs:
        raise ConfigError(f"{command}: give --pairs FILE (a path1,path2,same CSV, or LFW pairs.txt with "
                          "--lfw-root DIR) or --demo")
    return str(args.pairs)


def _fars(values: list[float] | None) -> tuple[float, ...]:
    fars = tuple(values) if values else (1e-1, 1e-2, 1e-3)
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise ConfigError(f"--far must be in (0, 1]; got {far}")
    return fars


def cmd_verify(args: argparse.Namespace) -> int:
    """``deepmetric verify CHECKPOINT --pairs PAIRS.csv | --demo``."""
    from deepmetric.train import resolve_device
    from deepmetric.verification.workflow import format_report, verify

    fars = _fars(args.far)
    report = verify(
        args.checkpoint, _pairs_arg(args, "verify"), metric=args.metric, threshold_file=args.threshold,
        out_dir=args.out, fars=fars, device=resolve_device(args.device), lfw_root=args.lfw_root,
        data_root=args.data_root, plots=not args.no_plots,
    )
    if args.json:
        print(Path(report["files"]["report"]).read_text(), end="")
    else:
        print(f"{args.checkpoint}")
        print(format_report(report, fars))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``deepmetric calibrate CHECKPOINT --pairs VAL.csv | --demo --far 1e-3``."""
    from deepmetric.train import resolve_device
    from deepmetric.verification.workflow import calibrate, threshold_path

    record = calibrate(
        args.checkpoint, _pairs_arg(args, "calibrate"), target_far=args.far,
        metric=args.metric, out=args.out, device=resolve_device(args.device), lfw_root=args.lfw_root,
        data_root=args.data_root,
    )
    target = Path(args.out) if args.out else threshold_path(args.checkpoint)
    if args.json:
        print(target.read_text(), end="")
        return 0
    print(f"threshold {record['threshold']:.6g} ({record['metric']}; accept a pair when score >= threshold)")
    print(f"  validation pairs: {record['pairs']}")
    print(f"  target FAR {record['target_far']:g}: FAR {record['achieved_far']:.4g}, TAR {record['achieved_tar']:.4f}, "
          f"accuracy {record['accuracy']:.4f} on the validation pairs")
    if not record["far_measurable"]:
        print(f"  note: the target FAR is below the smallest FAR {record['min_measurable_far']:.2g} these "
              f"{record['num_impostor']} impostor pairs can measure; the threshold rejects every one of them, "
              "and the FAR on new pairs is not established. Use more impostor pairs.")
    print(f"  wrote {target}")
    return 0


def cmd_train_pairs(args: argparse.Namespace) -> int:
    """``deepmetric train-pairs PAIRS.csv --out DIR``."""
    from deepmetric.config import apply_overrides, config_from_dict
    from deepmetric.verification.pairs_training import PAIRS_DEFAULTS, default_pairs_config, fit_pairs

    overrides = list(args.set or [])
    if args.config:
        import tomllib

        p = Path(args.config)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
        base = json.loads(json.dumps(PAIRS_DEFAULTS))
        for key, value in raw.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                if key == "loss" and value.get("name", base[key]["name"]) != base[key]["name"]:
                    base[key] = {}
                base[key].update(value)
            else:
                base[key] = value
        config = config_from_dict(apply_overrides(base, overrides))
    else:
        config = default_pairs_config(overrides)
    out = Path(args.out)
    if (out / "last.pt").exists():
        raise ConfigError(f"{out} already holds a run; choose another --out")
    if args.image_size is not None and args.image_size < 1:
        raise ConfigError(f"--image-size must be positive; got {args.image_size}")
    fit_pairs(
        args.pairs, out, config=config, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        val_pairs=args.val_pairs, image_size=args.image_size, grayscale=args.grayscale,
        device=args.device or config.train.device, progress=not args.no_progress,
    )
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a deepmetric checkpoint (best.pt / last.pt)")
    p.add_argument("--pairs", help="pairs: a CSV 'path1,path2,same[,fold]', LFW pairs.txt (with --lfw-root), "
                                   "or 'demo'")
    p.add_argument("--demo", action="store_true", help="the built-in Fashion-MNIST pairs (no file needed)")
    p.add_argument("--lfw-root", help="read --pairs as LFW pairs.txt with images under this folder")
    p.add_argument("--data-root", help="a folder to look for Fashion-MNIST in first (--demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the JSON report")


def register_commands(subparsers: Any) -> None:
    """Add ``verify``, ``calibrate`` and ``train-pairs`` to the ``deepmetric`` sub-command parsers."""
    p = subparsers.add_parser(
        "verify", help="verification report of a checkpoint on pairs: 10-fold accuracy, AUC, EER, TAR@FAR",
        description="Embed both images of each pair and report the 10-fold accuracy (mean ± std), AUC, EER, "
                    "TAR@FAR and, when the checkpoint has a calibrated threshold.json, the accuracy/FAR/TAR "
                    "at that threshold. Writes roc.png, scores.png and verification.json to --out.",
    )
    _common(p)
    p.add_argument("--metric", choices=["cosine", "euclidean"],
                   help="pair score (default: the calibrated threshold's metric, else cosine)")
    p.add_argument("--threshold", help="a threshold file (default: threshold.json beside the checkpoint)")
    p.add_argument("--far", type=float, action="append", help="FAR of a TAR@FAR entry (repeatable; default "
                                                              "0.1, 0.01, 0.001)")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/verification)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser(
        "calibrate", help="choose the threshold meeting a target FAR on validation pairs; save threshold.json",
        description="Choose the decision threshold with the highest TAR among those whose FAR on the "
                    "validation pairs is at most --far, and save it with the model (threshold.json beside "
                    "the checkpoint, tied to it by SHA-256). --demo uses the demo's validation pairs.",
    )
    _common(p)
    p.add_argument("--far", type=float, default=1e-3, help="target false accept rate (default 1e-3)")
    p.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine")
    p.add_argument("--out", help="threshold file to write (default: threshold.json beside the checkpoint)")
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser(
        "train-pairs", help="train a siamese network (contrastive loss) from a same/different pairs CSV",
        description="Siamese training on explicit pairs (CSV 'path1,path2,same'). Writes a run directory "
                    "whose checkpoints load in verify, calibrate, embed and index build.",
    )
    p.add_argument("pairs", help="pairs CSV: path1,path2,same[,fold] (paths relative to the CSV)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="TOML with [model], [loss] (contrastive), [optim], [train] sections")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override, e.g. --set model.embedding_dim=32 --set loss.margin=0.5")
    p.add_argument("--epochs", type=int, help="epochs (default 10)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per step (default 64)")
    p.add_argument("--val-pairs", help="validation pairs CSV: AUC every epoch, best.pt = best AUC")
    p.add_argument("--image-size", type=int, help="resize images to S×S (default: the first image's size)")
    colour = p.add_mutually_exclusive_group()
    colour.add_argument("--grayscale", dest="grayscale", action="store_true", default=None,
                        help="load images as one channel (default: as the first image is)")
    colour.add_argument("--rgb", dest="grayscale", action="store_false", help="load images as RGB")
    p.add_argument("--device", help="auto | cpu | cuda (default: train.device)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_pairs)
