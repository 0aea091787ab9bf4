"""The ``deepmetric`` command: thin calls into the public API.

Exit codes: 0 success, 1 a runtime error (bad data, corrupt checkpoint, NaN), 2 a usage or
configuration error (unknown key, unknown component name), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser"]


def _die(code: int, message: str) -> int:
    print(f"deepmetric: error: {message}", file=sys.stderr)
    return code


def _default_run_dir(args: argparse.Namespace, config: Any) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = config.data.name.split(":")[0]
    return Path("runs") / f"{stamp}_{name}_{config.data.protocol}_{config.loss.name}"


def _latest_run(root: Path = Path("runs")) -> Path | None:
    runs = sorted((p for p in root.glob("*") if (p / "last.pt").is_file()), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def cmd_train(args: argparse.Namespace) -> int:
    from deepmetric.config import load_config
    from deepmetric.train import fit

    overrides = list(args.set or [])
    if args.protocol:
        overrides.append(f'data.protocol="{args.protocol}"')
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    config = load_config(args.config, overrides)
    if args.resume:
        out = Path(args.out) if args.out else _latest_run()
        if out is None:
            return _die(2, "--resume needs --out DIR (no run with a last.pt found under runs/)")
    else:
        out = Path(args.out) if args.out else _default_run_dir(args, config)
        if (out / "last.pt").exists():
            return _die(2, f"{out} already holds a run; use --resume to continue it or choose another --out")
    fit(config, out, resume=args.resume, progress=not args.no_progress)
    return 0


def _load_split(config: Any, data: str | None, split: str) -> Any:
    from deepmetric.data import load_splits

    d = config.data
    splits = load_splits(
        data or d.name, d.protocol, root=d.root or None, val_fraction=d.val_fraction, seed=config.seed,
        train_classes=list(d.train_classes) or None, image_size=d.image_size or None, download=d.download,
    )
    dataset = getattr(splits, split, None)
    if dataset is None:
        from deepmetric.errors import ConfigError

        raise ConfigError(f"split {split!r} is empty for this dataset/protocol")
    return dataset


def cmd_evaluate(args: argparse.Namespace) -> int:
    from deepmetric.metrics import evaluate
    from deepmetric.train import embed_dataset, load_model_from_checkpoint, resolve_device

    device = resolve_device(args.device)
    model, config, _ = load_model_from_checkpoint(args.checkpoint, device)
    dataset = _load_split(config, args.data, args.split)
    emb, labels = embed_dataset(model, dataset, batch_size=config.train.embed_batch_size, device=device,
                                progress=not args.no_progress)
    metrics = evaluate(emb, labels, ks=tuple(config.eval.ks), metric=config.eval.metric, seed=config.seed)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.checkpoint}: {args.split} split, {len(labels)} items (leave-one-out)")
        for key, value in metrics.items():
            print(f"  {key:>14}: {value:.4f}" if isinstance(value, float) else f"  {key:>14}: {value}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from deepmetric.io import atomic_savez
    from deepmetric.train import embed_dataset, load_model_from_checkpoint, resolve_device

    device = resolve_device(args.device)
    model, config, _ = load_model_from_checkpoint(args.checkpoint, device)
    dataset = _load_split(config, args.data, args.split)
    emb, labels = embed_dataset(model, dataset, batch_size=config.train.embed_batch_size, device=device,
                                progress=not args.no_progress)
    atomic_savez(args.out, embeddings=emb, labels=labels)
    print(f"wrote {len(emb)} embeddings of dimension {emb.shape[1]} to {args.out}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import deepmetric.data  # noqa: F401  (registers datasets)
    import deepmetric.losses  # noqa: F401
    import deepmetric.miners  # noqa: F401
    import deepmetric.models  # noqa: F401
    import deepmetric.samplers  # noqa: F401
    from deepmetric import registry

    reg = {
        "losses": registry.LOSSES, "miners": registry.MINERS, "samplers": registry.SAMPLERS,
        "models": registry.MODELS, "datasets": registry.DATASETS, "distances": registry.DISTANCES,
    }[args.what]
    width = max((len(n) for n in reg.names()), default=0)
    for name in reg.names():
        print(f"{name:<{width}}  {reg.describe(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepmetric", description="Deep metric learning: train, evaluate, embed.")
    from deepmetric import __version__

    parser.add_argument("--version", action="version", version=f"deepmetric {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an embedding model (no arguments: the default Fashion-MNIST job)")
    p.add_argument("config", nargs="?", help="TOML configuration file (default: built-in defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set loss.name=\"contrastive\"")
    p.add_argument("--out", help="run directory (default: runs/<time>_<data>_<protocol>_<loss>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (default: the latest run)")
    p.add_argument("--protocol", choices=["closed", "disjoint"], help="closed-set or class-disjoint evaluation")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="retrieval metrics of a checkpoint on its dataset's test split")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--data", help="dataset name (default: the checkpoint's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("embed", help="write embeddings of a dataset split to an .npz file")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="dataset: fashion_mnist | digits | image_folder:DIR | csv:FILE | npz:FILE")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--out", required=True, help="output .npz (embeddings, labels)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("list", help="list registered components")
    p.add_argument("what", choices=["losses", "miners", "samplers", "models", "datasets", "distances"])
    p.set_defaults(func=cmd_list)

    import importlib

    for module in _EXTENSION_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # an optional part whose dependencies are not installed
            if exc.name == module or (exc.name and exc.name.split(".")[0] in ("fastapi", "uvicorn", "multipart")):
                continue
            raise
        mod.register_commands(sub)
    for register in _EXTENSIONS:
        register(sub)
    return parser


# Modules whose ``register_commands(subparsers)`` adds sub-commands (index, search, serve, verify, ...).
_EXTENSION_MODULES = ("deepmetric.index.cli", "deepmetric.serve.cli", "deepmetric.verification.cli")
# Further register functions (tests and plug-ins may append).
_EXTENSIONS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    from deepmetric.errors import CheckpointError, ConfigError, DataError, DeepMetricError, NonFiniteError

    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        return _die(2, str(exc))
    except (DataError, CheckpointError, NonFiniteError, DeepMetricError) as exc:
        return _die(1, str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
