"""Does center loss help verification? Softmax + center loss against softmax alone, Fashion-MNIST demo pairs.

Both recipes train the same SmallCNN (64-d, features not L2-normalised, as in Wen et al., ECCV 2016)
with ``deepmetric.train.fit`` on the class-disjoint protocol (training classes 0-4), the same P×K
sampler, AdamW schedule, augmentation and number of epochs; they differ only in the loss:

* ``softmax``: ``configs/verification_softmax.toml``;
* ``softmax+center``: ``configs/verification_softmax_center.toml`` (λ = 0.003, α = 0.5, the paper's
  face-recognition values), and, with ``--lambdas``, the same with other λ.

Each trained model (best checkpoint) is evaluated with :func:`deepmetric.verification.verify` on the
demo pairs (Fashion-MNIST **test** split of the unseen classes 5-9, 3,000 + 3,000 pairs, 10 folds,
cosine scores): 10-fold accuracy, AUC, EER, TAR@FAR; a threshold calibrated at FAR 1e-2 on the demo
*validation* pairs (training-split images of classes 5-9) is applied to the test pairs.

Run by hand (about 3-4 minutes per run on 2 heavily shared cores with these settings)::

    .venv/bin/python benchmarks/verification_center_loss.py --seeds 0 1 2 --epochs 2 --max-steps 25

Writes benchmarks/results/verification_center_loss.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from deepmetric.config import load_config
from deepmetric.io import atomic_write_text
from deepmetric.train import fit
from deepmetric.verification import calibrate, verify

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("lfw_mean_accuracy", "auc", "eer", "tar@far=0.1", "tar@far=0.01", "tar@far=0.001")


def run_one(name: str, config_file: Path, extra: list[str], seed: int, epochs: int, max_steps: int,
            threads: int, work: Path) -> dict[str, Any]:
    overrides = [f"seed={seed}", f"train.epochs={epochs}", f"train.max_steps_per_epoch={max_steps}",
                 "train.plots=false", "train.baselines=false", "eval.clustering=false",
                 f"train.num_threads={threads}", 'train.device="cpu"', "data.val_fraction=0.02", *extra]
    config = load_config(config_file, overrides)
    out = work / f"{name.replace('+', '_').replace('=', '')}_{seed}"
    t0 = time.perf_counter()
    result = fit(config, out, progress=False, log=lambda s: None)
    train_s = time.perf_counter() - t0
    checkpoint = out / "best.pt"
    calibration = calibrate(checkpoint, "demo", target_far=1e-2, metric="cosine")
    report = verify(checkpoint, "demo", metric="cosine", plots=False, out_dir=out / "verification")
    row = {k: report[k] for k in KEYS}
    row.update(lfw_std_accuracy=report["lfw_std_accuracy"], train_seconds=train_s,
               best_epoch=result.best_epoch, retrieval_map_at_r=result.test.get("map@r"),
               calibrated_threshold=calibration["threshold"], val_far_at_threshold=calibration["achieved_far"],
               test_far_at_threshold=report["at_threshold"]["far"],
               test_tar_at_threshold=report["at_threshold"]["tar"],
               test_accuracy_at_threshold=report["at_threshold"]["accuracy"])
    return row


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0 = full epochs)")
    parser.add_argument("--lambdas", type=float, nargs="*", default=[],
                        help="extra softmax+center arms with these lambda_c (the paper's 0.003 always runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "verification_center_loss"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms: list[tuple[str, Path, list[str]]] = [
        ("softmax", ROOT / "configs" / "verification_softmax.toml", []),
        ("softmax+center λ=0.003", ROOT / "configs" / "verification_softmax_center.toml", []),
    ]
    for lam in args.lambdas:
        arms.append((f"softmax+center λ={lam:g}", ROOT / "configs" / "verification_softmax_center.toml",
                     [f"extra_losses=[{{name=\"center\", with_softmax=false, lambda_c={lam!r}, alpha=0.5}}]"]))
    runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name, _, _ in arms}
    with tempfile.TemporaryDirectory(prefix="dm_vcl_") as tmp:
        for seed in args.seeds:
            for name, config_file, extra in arms:
                row = run_one(name, config_file, extra, seed, args.epochs, args.max_steps, args.threads, Path(tmp))
                runs[name][seed] = row
                print(f"{name:<24} seed {seed}: 10-fold acc {row['lfw_mean_accuracy']:.4f}  AUC {row['auc']:.4f}  "
                      f"EER {row['eer']:.4f}  TAR@1e-2 {row['tar@far=0.01']:.4f}  ({row['train_seconds']:.0f} s)",
                      flush=True)
                _write(args, argv, runs)  # after every run, so that a partial benchmark keeps its numbers
    print(_write(args, argv, runs))
    return 0


def _write(args: argparse.Namespace, argv: list[str] | None, runs: dict[str, dict[int, dict[str, Any]]]) -> str:
    runs = {name: rows for name, rows in runs.items() if rows}
    summary = {name: {k: _mean_std([r[k] for r in rows.values()]) for k in
                      (*KEYS, "test_far_at_threshold", "test_tar_at_threshold", "train_seconds")}
               for name, rows in runs.items()}
    payload = {
        "command": "python benchmarks/verification_center_loss.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": args.seeds, "complete": all(len(r) == len(args.seeds) for r in runs.values()),
        "epochs": args.epochs, "max_steps_per_epoch": args.max_steps,
        "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
        "pairs": "demo: Fashion-MNIST test split, classes 5-9, 3000 + 3000 pairs, 10 folds, seed 0; cosine",
        "calibration": "FAR 1e-2 on the demo validation pairs (training split, classes 5-9, seed 1)",
        "runs": {name: {str(s): r for s, r in rows.items()} for name, rows in runs.items()},
        "summary": {name: {k: {"mean": m, "std": s} for k, (m, s) in row.items()} for name, row in summary.items()},
    }
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    header = ("| recipe | 10-fold accuracy | AUC | EER | TAR@FAR=1e-1 | TAR@FAR=1e-2 | TAR@FAR=1e-3 | "
              "test FAR / TAR at the calibrated threshold (val FAR 1e-2) | train s |")
    lines = [f"### Softmax vs softmax + center loss — Fashion-MNIST demo verification pairs",
             "", f"Class-disjoint protocol (train classes 0-4), SmallCNN 64-d, {args.epochs} epoch(s)"
             + (f" × {args.max_steps} steps" if args.max_steps else "") + f", seeds {args.seeds}; "
             "mean ± std (sample std over seeds). Pairs: test split of classes 5-9, 3,000 + 3,000, 10 folds, "
             "cosine. TAR@FAR=1e-3 rests on 3 impostor pairs of 3,000.", "", header, "|---" * 9 + "|"]
    for name, row in summary.items():
        n = len(runs[name])
        name = f"{name} (n={n})"
        cells = [f"{row[k][0]:.4f} ± {row[k][1]:.4f}" for k in KEYS]
        at = (f"{row['test_far_at_threshold'][0]:.4f} / {row['test_tar_at_threshold'][0]:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {at} | {row['train_seconds'][0]:.0f} |")
    lines += ["", f"Command: `{payload['command']}`", ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
