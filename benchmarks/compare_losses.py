"""Every registered loss under one protocol: Fashion-MNIST, class-disjoint, SmallCNN.

Protocol: Fashion-MNIST ``disjoint`` — train on classes 0–4 (T-shirt, trouser, pullover, dress,
coat; 30,000 training images; ``--val-fraction`` of them held out for validation to pick the best
epoch — default 0, i.e. no validation, since the default budget is a single epoch and there is
nothing to pick; fit's default is 10 %), test
on the 5,000 *test-split* images of classes 5–9 (sandal, shirt, sneaker, bag, ankle boot), never
seen in training. Leave-one-out retrieval on the test set; NMI of k-means with k = 5.

Everything is ``fit()``'s default job except the loss: SmallCNN (width 32) → 64-d L2-normalised
embedding, P×K sampler (fit's default: m = 32 images of each of 4 classes, batch 128), AdamW lr
2e-3, weight decay 1e-4, warm-up (half an epoch) + cosine schedule, Fashion-MNIST augmentation (crop with padding 2 + flip), every loss at its constructor
defaults (its paper's values). Miners: none, plus a second row with the paper's miner where the
paper has one (multi-similarity + its miner, triplet + semi-hard, margin + distance-weighted).
Budget: ``--epochs`` × ``--steps`` steps per run (default 1 × 60 = 60 steps × 128 images =
7,680 images, about a quarter of a pass over the training images) so that the whole table runs in
about 40 minutes on 2 heavily shared CPU cores (measured: 14.6 min per seed at load average 5-12,
27.4 min for seeds 0 and 1 with ``--seeds 0 1 --append``); the numbers
are therefore *short-training* numbers, not converged ones.

Exceptions, each what the loss's paper does:

* ``log_ratio`` is left out: it needs continuous labels (class ids are not distances).
* ``cross_batch_memory`` wraps ``contrastive`` with a memory of 2,048 embeddings (16 batches).
* ``n_pair`` trains un-normalised embeddings (``model.normalize = false``), as its paper does.

Baselines on the same test split: L2-normalised raw pixels and the untrained SmallCNN (the same
initial weights every run starts from). Timing: ``train img/s`` is fit's own training throughput
(forward, loss, backward, step; evaluation excluded), which depends on the machine's load.

Run by hand::

    .venv/bin/python benchmarks/compare_losses.py                  # the full table
    .venv/bin/python benchmarks/compare_losses.py --only contrastive triplet_margin --seeds 0 1

Writes benchmarks/results/compare_losses.{json,md} after every run (a partial table survives).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import deepmetric.losses as losses
from deepmetric.config import apply_overrides, config_from_dict
from deepmetric.io import atomic_write_text
from deepmetric.train import fit

RESULTS = Path(__file__).resolve().parent / "results"

SKIP = {"log_ratio": "continuous labels only (class ids are not label distances)"}
LOSS_ARGS: dict[str, list[str]] = {
    "cross_batch_memory": ['loss.loss="contrastive"', "loss.memory_size=2048"],
    "n_pair": ["model.normalize=false"],
}
# (loss, miner): the miner each paper trains its loss with.
PAPER_MINERS = [("multi_similarity", "multi_similarity"), ("triplet_margin", "semi_hard"),
                ("margin", "distance_weighted")]
METRICS = ("recall@1", "map@r", "nmi")


def recipes(only: list[str] | None) -> list[tuple[str, str]]:
    names = [n for n in losses.names() if not n.startswith("_") and n not in SKIP]
    rows = [(n, "none") for n in names] + PAPER_MINERS
    if only:
        rows = [r for r in rows if r[0] in only]
    return rows


def make_config(loss: str, miner: str, seed: int, args: argparse.Namespace, baselines: bool):
    overrides = [
        'data.name="fashion_mnist"', 'data.protocol="disjoint"', f"seed={seed}",
        f'loss.name="{loss}"', f'miner.name="{miner}"', *LOSS_ARGS.get(loss, []),
        f"train.epochs={args.epochs}", f"train.max_steps_per_epoch={args.steps}",
        f"train.num_threads={args.threads}", "train.plots=false", f"train.baselines={str(baselines).lower()}",
        "eval.clustering=true", f"data.val_fraction={args.val_fraction}",
    ]
    return config_from_dict(apply_overrides({}, overrides))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "—"
    mean, std = _mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def write_tables(report: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "compare_losses.json", json.dumps(report, indent=2) + "\n")
    a = report["settings"]
    lines = [
        "# Loss comparison: Fashion-MNIST, class-disjoint (train 0–4 → test 5–9), SmallCNN",
        "",
        f"Test: {report.get('test_size', '?')} test-split images of classes 5–9, leave-one-out retrieval; "
        "NMI of k-means (k = 5). "
        f"Every run: fit's default job except the loss — SmallCNN → 64-d, P×K sampler {a['sampler']}, AdamW 2e-3, "
        f"warm-up + cosine, {a['epochs']} epochs × {a['steps']} steps ({a['epochs'] * a['steps'] * a['batch_size']:,} "
        f"training images, short training; a full epoch is {30000 * (1 - a['val_fraction']):,.0f} images), seeds {a['seeds']}, {a['threads']} thread(s). "
        "Values in % (mean ± std over seeds when more than one). `img/s` = training throughput on a "
        "shared, loaded 2-core machine (indicative only).",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; started {report['started']}, total "
        f"{report.get('total_minutes', 0) + report.get('minutes_before', 0):.1f} min.",
        "",
        "| loss | miner | Recall@1 | MAP@R | NMI | train img/s | best epoch | run s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report.get("baselines", {}).items():
        lines.append(f"| *{name}* | — | {_cell(row['recall@1'])} | {_cell(row['map@r'])} | "
                     f"{_cell(row['nmi'])} | — | — | — |")
    for row in report["runs"]:
        runs = row["seeds"]
        get = lambda k: [r[k] for r in runs.values() if k in r]  # noqa: E731
        ips = get("images_per_s")
        lines.append(
            f"| {row['loss']} | {row['miner']} | {_cell(get('recall@1'))} | {_cell(get('map@r'))} | "
            f"{_cell(get('nmi'))} | {statistics.fmean(ips):.0f} | "
            f"{', '.join(str(r['best_epoch']) for r in runs.values())} | "
            f"{statistics.fmean(get('seconds')):.0f} |" if runs else f"| {row['loss']} | {row['miner']} | failed |"
        )
    for row in report["runs"]:
        for seed, err in row.get("errors", {}).items():
            lines.append(f"\n**{row['loss']} + {row['miner']}, seed {seed} failed:** `{err}`")
    if report.get("skipped"):
        lines.append("")
        lines.extend(f"- `{k}` not run: {v}" for k, v in report["skipped"].items())
    lines.append("")
    lines.append("Exceptions: `cross_batch_memory` wraps `contrastive` (memory 2,048); `n_pair` trains "
                 "un-normalised embeddings (its paper's setting). Everything else at its constructor defaults.")
    atomic_write_text(RESULTS / "compare_losses.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60, help="max steps per epoch (0 = full epochs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--only", nargs="+", help="only these losses")
    parser.add_argument("--keep-runs", help="keep the run directories under this folder")
    parser.add_argument("--append", action="store_true",
                        help="reuse the (loss, miner, seed) results already in compare_losses.json (same settings)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    sampler = make_config("contrastive", "none", 0, args, baselines=False).sampler
    report: dict[str, Any] = {
        "settings": {"epochs": args.epochs, "steps": args.steps, "val_fraction": args.val_fraction, "seeds": args.seeds, "threads": args.threads,
                     "sampler": f"{sampler.name} {dict(sampler.args)}", "batch_size": sampler.args["batch_size"], "dataset": "fashion_mnist", "protocol": "disjoint", "model": "small_cnn"},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"load average {os.getloadavg()[0]:.1f} at start",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "skipped": SKIP, "baselines": {}, "runs": [],
    }
    previous: dict[tuple[str, str], dict[str, Any]] = {}
    if args.append and (RESULTS / "compare_losses.json").is_file():
        old = json.loads((RESULTS / "compare_losses.json").read_text())
        same = {k: v for k, v in old["settings"].items() if k != "seeds"} == \
            {k: v for k, v in report["settings"].items() if k != "seeds"}
        if not same:
            parser.error("--append: compare_losses.json was made with other settings")
        previous = {(r["loss"], r["miner"]): r for r in old["runs"]}
        report["baselines"], report["baseline_seeds"] = old["baselines"], old.get("baseline_seeds", old["settings"]["seeds"])
        report["command"] = old["command"] + " ; then " + report["command"]
        report["started"] = old["started"] + " (appended " + report["started"] + ")"
        report["minutes_before"] = old.get("total_minutes", 0.0) + old.get("minutes_before", 0.0)
    t_start = time.perf_counter()
    root = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix="compare_losses_"))
    for loss, miner in recipes(args.only):
        row: dict[str, Any] = {"loss": loss, "miner": miner, "seeds": {}, "errors": {}}
        report["runs"].append(row)
        for seed in args.seeds:
            done = previous.get((loss, miner), {}).get("seeds", {}).get(str(seed))
            if done is not None:
                row["seeds"][str(seed)] = done
                continue
            need_baselines = seed not in report.setdefault("baseline_seeds", [])
            config = make_config(loss, miner, seed, args, baselines=need_baselines)
            t0 = time.perf_counter()
            try:
                result = fit(config, root / f"{loss}_{miner}_s{seed}", progress=False, log=lambda s: None)
            except Exception as exc:  # noqa: BLE001 - a failing loss is a result of the benchmark
                row["errors"][str(seed)] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"{loss:20s} {miner:18s} seed {seed}: FAILED {type(exc).__name__}: {exc}", flush=True)
                write_tables(report)
                continue
            seconds = time.perf_counter() - t0
            if need_baselines:
                report["baseline_seeds"].append(seed)
                for name, metrics in result.summary.items():
                    if name.startswith("trained"):
                        continue
                    base = report["baselines"].setdefault(name, {k: [] for k in METRICS})
                    for k in METRICS:
                        base[k].append(metrics[k])
            report["test_size"] = int(result.test.get("num_queries", 0))
            history = result.history
            row["seeds"][str(seed)] = {
                **{k: result.test[k] for k in METRICS},
                "images_per_s": sum(h["images_per_s"] for h in history) / len(history),
                "best_epoch": result.best_epoch, "seconds": seconds,
                "steps": sum(h["steps"] for h in history),
                "final_train_loss": history[-1]["train_loss"],
            }
            r = row["seeds"][str(seed)]
            print(f"{loss:20s} {miner:18s} seed {seed}: R@1 {r['recall@1']:.4f}  MAP@R {r['map@r']:.4f}  "
                  f"NMI {r['nmi']:.4f}  {r['images_per_s']:.0f} img/s  {seconds:.0f} s", flush=True)
            report["total_minutes"] = (time.perf_counter() - t_start) / 60
            write_tables(report)
    report["total_minutes"] = (time.perf_counter() - t_start) / 60
    write_tables(report)
    print((RESULTS / "compare_losses.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
