"""``deepmetric index build|stats`` and ``deepmetric search``: thin calls into :mod:`deepmetric.index`.

Wire them into the ``deepmetric`` command by appending :func:`register_commands` to
``deepmetric.cli._EXTENSIONS``. Errors are deepmetric exceptions (exit code 1; ConfigError: 2).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.errors import ConfigError

__all__ = ["register_commands", "cmd_index_build", "cmd_index_stats", "cmd_search", "format_results"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _backend_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.backend == "ivf":
        if args.nlist is not None:
            params["nlist"] = args.nlist
        if args.nprobe is not None:
            params["nprobe"] = args.nprobe
    elif args.backend == "hnsw":
        if args.ef_search is not None:
            params["efSearch"] = args.ef_search
        if args.m is not None:
            params["M"] = args.m
    for name, value in (("--nlist", args.nlist), ("--nprobe", args.nprobe)):
        if value is not None and args.backend != "ivf":
            raise ConfigError(f"{name} applies to --backend ivf only")
    for name, value in (("--ef-search", args.ef_search), ("--m", args.m)):
        if value is not None and args.backend != "hnsw":
            raise ConfigError(f"{name} applies to --backend hnsw only")
    return params


def cmd_index_build(args: argparse.Namespace) -> int:
    """``deepmetric index build CHECKPOINT --data ... --out IDX``."""
    from deepmetric.index.build import build_index
    from deepmetric.train import resolve_device

    index = build_index(
        args.checkpoint, args.data, split=args.split, backend=args.backend, metric=args.metric,
        backend_params=_backend_params(args), device=resolve_device(args.device), batch_size=args.batch_size,
        thumbnails=not args.no_thumbnails, progress=not args.no_progress,
    )
    index.save(args.out)
    print(f"wrote an index of {len(index)} items (dim {index.dim}, {index.metric}, {index.backend_name}"
          f"{' ' + json.dumps(index.backend_params) if index.backend_params else ''}) to {args.out}")
    return 0


def _sample_queries(vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    take = rng.choice(len(vectors), size=min(n, len(vectors)), replace=False)
    return vectors[np.sort(take)]


def cmd_index_stats(args: argparse.Namespace) -> int:
    """``deepmetric index stats IDX``: counts, dimensions, back-end, checksums and approximate recall."""
    from deepmetric.index import Index, read_manifest, recall_against_exact

    if args.k < 1 or args.sample < 1:
        raise ConfigError(f"-k and --sample must be positive; got {args.k} and {args.sample}")
    manifest = read_manifest(args.index)
    index = Index.load(args.index)  # verifies every checksum
    stats: dict[str, Any] = {
        "index": str(args.index),
        "format": f"{manifest['format']} v{manifest['version']}",
        "created": manifest.get("created"),
        "items": len(index),
        "counts": manifest.get("counts", {}),
        "dim": index.dim,
        "metric": index.metric,
        "backend": index.backend_name,
        "backend_params": index.backend_params,
        "model_fingerprint": manifest.get("model_fingerprint"),
        "checkpoint": manifest.get("checkpoint"),
        "checkpoint_exists": bool(manifest.get("checkpoint")) and Path(str(manifest.get("checkpoint"))).is_file(),
        "files": {name: entry.get("bytes") for name, entry in manifest["files"].items()},
        "checksums": "ok",
    }
    if index.approximate and len(index):
        queries = _sample_queries(index.vectors, args.sample)
        stats[f"recall@{args.k}"] = recall_against_exact(index, queries, args.k)
        stats["recall_queries"] = len(queries)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        if key == "files":
            value = ", ".join(f"{n} ({b} bytes)" for n, b in value.items())
        elif isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, float):
            value = f"{value:.4f}"
        print(f"{key:>{width}}: {value}")
    if index.approximate and len(index):
        print(f"(recall@{args.k} of the {index.backend_name} search against an exact flat search, "
              f"{stats['recall_queries']} stored vectors as queries)")
    return 0


def format_results(result: Any, query: int, class_names: list[str] | None = None) -> str:
    """One query's neighbours as a text table: rank, id, distance, label, metadata."""
    rows = result.rows(query)
    lines = [f"{'rank':>4}  {'id':>8}  {'distance':>10}  {'label':<16}  metadata"]
    for row in rows:
        label = row["label"]
        if label >= 0 and class_names and label < len(class_names):
            label_text = f"{label} ({class_names[label]})"
        else:
            label_text = str(label) if label >= 0 else "-"
        meta = json.dumps(row["metadata"], sort_keys=True) if row["metadata"] is not None else "-"
        lines.append(f"{row['rank']:>4}  {row['id']:>8}  {row['distance']:>10.4f}  {label_text:<16}  {meta}")
    if not rows:
        lines.append("(no neighbours: the index is empty)")
    return "\n".join(lines)


def cmd_search(args: argparse.Namespace) -> int:
    """``deepmetric search IDX --query IMAGE|NPZ -k 10``."""
    from deepmetric.index import Index
    from deepmetric.index.query import QueryEncoder, load_query_vectors
    from deepmetric.train import resolve_device

    if not 1 <= args.k <= 10_000:
        raise ConfigError(f"-k must be between 1 and 10000; got {args.k}")
    index = Index.load(args.index)
    if args.nprobe is not None or args.ef_search is not None:
        params = {}
        if args.nprobe is not None:
            params["nprobe"] = args.nprobe
        if args.ef_search is not None:
            params["efSearch"] = args.ef_search
        index.set_search_params(**params)
    query = Path(args.query)
    if query.suffix.lower() in (".npz", ".npy"):
        queries = load_query_vectors(query)
        if args.checkpoint:
            raise ConfigError("--checkpoint is only used for image queries; a .npz/.npy holds embeddings already")
        names = [f"{query.name}[{i}]" for i in range(len(queries))]
    elif query.suffix.lower() in _IMAGE_SUFFIXES:
        encoder = QueryEncoder.for_index(index, args.checkpoint, device=resolve_device(args.device))
        queries = encoder.encode_file(query)
        names = [query.name]
    else:
        raise ConfigError(f"--query must be an image ({', '.join(_IMAGE_SUFFIXES)}) or a .npz/.npy of "
                          f"embeddings; got {str(query)!r}")
    result = index.search(queries, args.k)
    class_names = index.provenance.get("class_names")
    if args.json:
        out = [{"query": name, "neighbours": result.rows(i)} for i, name in enumerate(names)]
        print(json.dumps(out, indent=2))
        return 0
    for i, name in enumerate(names):
        print(f"query {name}: {args.k} nearest of {len(index)} items ({index.metric}, {index.backend_name})")
        print(format_results(result, i, class_names))
        if i + 1 < len(names):
            print()
    return 0


def register_commands(subparsers: Any) -> None:
    """Add ``index build``, ``index stats`` and ``search`` to the ``deepmetric`` sub-command parser."""
    p = subparsers.add_parser("index", help="build and inspect embedding indexes")
    sub = p.add_subparsers(dest="index_command", required=True)

    b = sub.add_parser("build", help="embed a dataset split with a checkpoint and save a searchable index")
    b.add_argument("checkpoint")
    b.add_argument("--data", help="fashion_mnist | digits | image_folder:DIR | csv:FILE | npz:FILE "
                                  "(default: the checkpoint's dataset)")
    b.add_argument("--split", default="test", choices=["test", "val", "train"])
    b.add_argument("--out", required=True, help="index directory (replaced atomically if it holds an index)")
    b.add_argument("--backend", default="flat", choices=["flat", "ivf", "hnsw"])
    b.add_argument("--metric", choices=["euclidean", "cosine", "inner_product"],
                   help="default: the checkpoint's eval.metric")
    b.add_argument("--nlist", type=int, help="ivf: inverted lists (default round(4*sqrt(N)))")
    b.add_argument("--nprobe", type=int, help="ivf: lists visited per query (default 8)")
    b.add_argument("--m", type=int, help="hnsw: links per node (default 32)")
    b.add_argument("--ef-search", type=int, help="hnsw: search candidate list size (default 64)")
    b.add_argument("--batch-size", type=int, help="embedding batch size (default: the checkpoint's)")
    b.add_argument("--device", default="auto")
    b.add_argument("--no-thumbnails", action="store_true", help="do not store image thumbnails")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_index_build)

    s = sub.add_parser("stats", help="counts, dimension, back-end, checksums and approximate recall@k")
    s.add_argument("index")
    s.add_argument("-k", type=int, default=10, help="k of the recall measured for approximate back-ends")
    s.add_argument("--sample", type=int, default=1000, help="stored vectors used as recall queries")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_index_stats)

    q = subparsers.add_parser("search", help="nearest neighbours of a query image or of embeddings in an index")
    q.add_argument("index")
    q.add_argument("--query", required=True, help="an image file, or a .npz/.npy of embeddings (Q, dim)")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--checkpoint", help="model for image queries (default: the one recorded in the index)")
    q.add_argument("--nprobe", type=int, help="ivf: lists visited per query")
    q.add_argument("--ef-search", type=int, help="hnsw: search candidate list size")
    q.add_argument("--device", default="cpu")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_search)
