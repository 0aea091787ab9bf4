"""The default recipe against the same CNN trained with PML losses, same data, epochs and optimizer.

Every recipe runs through ``deepmetric.train.fit`` (same SmallCNN, same P×K sampler, AdamW with
warm-up + cosine, same augmentation, same epochs); only the loss/miner differs. PML's losses are
plugged in through a thin adapter registered in this process only. For each protocol the table has
the raw-pixel and untrained-network baselines and, per recipe, mean ± std over the seeds of test
Recall@1 and MAP@R, and the training throughput.

Run by hand (about 25 minutes on 2 cores with the defaults)::

    .venv/bin/python benchmarks/train_fashion_mnist.py --seeds 0 1 2 --epochs 4

Writes benchmarks/results/train_fashion_mnist.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepmetric.config import apply_overrides, config_from_dict
from deepmetric.io import atomic_write_text
from deepmetric.registry import LOSSES
from deepmetric.train import fit

RESULTS = Path(__file__).resolve().parent / "results"


class _PMLAdapter(nn.Module):
    """Calls a PML loss (and optional PML miner) on ``(embeddings, labels)``."""

    tuple_kind = None
    label_kind = "class"

    def __init__(self, loss: nn.Module, miner: nn.Module | None) -> None:
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Any = None) -> torch.Tensor:
        tuples = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, tuples)


def _register_pml() -> None:
    from pytorch_metric_learning import losses, miners

    @LOSSES.register("pml_triplet_semihard")
    class PMLTripletSemihard(_PMLAdapter):
        """PML TripletMarginLoss(margin=0.2) + TripletMarginMiner(margin=0.2, semihard) (env.md §3d)."""

        def __init__(self) -> None:
            super().__init__(losses.TripletMarginLoss(margin=0.2),
                             miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"))

    @LOSSES.register("pml_multi_similarity")
    class PMLMultiSimilarity(_PMLAdapter):
        """PML MultiSimilarityLoss(2, 50, 0.5) + MultiSimilarityMiner(0.1) (env.md §3d variant)."""

        def __init__(self) -> None:
            super().__init__(losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
                             miners.MultiSimilarityMiner(epsilon=0.1))


def _recipes(default_overrides: list[str]) -> dict[str, list[str]]:
    return {
        "deepmetric default": default_overrides,
        "PML triplet + semi-hard": ['loss.name="pml_triplet_semihard"', 'miner.name="none"'],
        "PML multi-similarity + miner": ['loss.name="pml_multi_similarity"', 'miner.name="none"'],
    }


def run(seeds: list[int], epochs: int, protocols: list[str], default_overrides: list[str],
        recipes: list[str] | None = None, threads: int = 2) -> dict[str, Any]:
    torch.set_num_threads(threads)
    _register_pml()
    results: dict[str, Any] = {"seeds": seeds, "epochs": epochs, "runs": []}
    chosen = {k: v for k, v in _recipes(default_overrides).items() if recipes is None or k in recipes}
    with tempfile.TemporaryDirectory() as tmp:
        for protocol in protocols:
            for name, overrides in chosen.items():
                for seed in seeds:
                    raw = apply_overrides({}, overrides + [f'data.protocol="{protocol}"', f"seed={seed}",
                                                           f"train.epochs={epochs}", "train.plots=false",
                                                           f"train.num_threads={threads}"])
                    config = config_from_dict(raw)
                    t0 = time.perf_counter()
                    res = fit(config, Path(tmp) / f"{protocol}-{len(results['runs'])}", progress=False,
                              log=lambda s: None)
                    wall = time.perf_counter() - t0
                    rows = list(res.summary.items())
                    run_row = {
                        "protocol": protocol, "recipe": name, "seed": seed, "wall_s": wall,
                        "images_per_s": statistics.mean(h["images_per_s"] for h in res.history),
                        "test": res.test, "raw": rows[0][1], "untrained": rows[1][1],
                    }
                    results["runs"].append(run_row)
                    print(f"{protocol:9s} {name:30s} seed {seed}: R@1 {res.test['recall@1']:.4f} "
                          f"MAP@R {res.test['map@r']:.4f}  {run_row['images_per_s']:.0f} img/s  {wall:.0f}s",
                          flush=True)
    return results


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: dict[str, Any]) -> str:
    lines = [f"Fashion-MNIST, SmallCNN (64-d), {results['epochs']} epochs, seeds {results['seeds']}, "
             "test split, leave-one-out retrieval", ""]
    lines += ["| protocol | model | Recall@1 | MAP@R | train img/s |", "|---|---|---|---|---|"]
    for protocol in dict.fromkeys(r["protocol"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["protocol"] == protocol]
        first = runs[0]
        lines.append(f"| {protocol} | raw pixels | {first['raw']['recall@1']:.4f} | {first['raw']['map@r']:.4f} | — |")
        untrained = [r["untrained"] for r in runs if r["recipe"] == runs[0]["recipe"]]
        lines.append(f"| {protocol} | untrained network | {_fmt([u['recall@1'] for u in untrained])} | "
                     f"{_fmt([u['map@r'] for u in untrained])} | — |")
        for recipe in dict.fromkeys(r["recipe"] for r in runs):
            rr = [r for r in runs if r["recipe"] == recipe]
            lines.append(f"| {protocol} | {recipe} | {_fmt([r['test']['recall@1'] for r in rr])} | "
                         f"{_fmt([r['test']['map@r'] for r in rr])} | "
                         f"{statistics.mean(r['images_per_s'] for r in rr):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--protocols", nargs="+", default=["closed", "disjoint"])
    parser.add_argument("--default", nargs="*", default=[], help="extra --set overrides for the default recipe")
    parser.add_argument("--recipes", nargs="*", help="run only these recipes (names as in the table)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--append", nargs="*", default=[], help="merge the runs of these earlier JSON results")
    parser.add_argument("--out", default="train_fashion_mnist", help="results file stem in benchmarks/results")
    args = parser.parse_args(argv)
    results = run(args.seeds, args.epochs, args.protocols, args.default, args.recipes, args.threads)
    commands = ["python " + " ".join(sys.argv)]
    for earlier in args.append:
        old = json.loads(Path(earlier).read_text())
        results["runs"] = old["runs"] + results["runs"]
        commands = old.get("commands", [old.get("command", "")]) + commands
    results["runs"].sort(key=lambda r: (r["protocol"] != "closed", r["recipe"] != "deepmetric default", r["recipe"]))
    md = table(results)
    results["commands"] = commands
    results["command"] = " ; ".join(commands)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{args.out}.json", json.dumps(results, indent=2))
    atomic_write_text(RESULTS / f"{args.out}.md", md + f"\nCommands: `{results['command']}`\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
