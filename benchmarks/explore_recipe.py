"""One training run of a candidate recipe; appends its test and seen-class validation MAP@R to a JSONL log.

Used to choose the default recipe (benchmarks/results/recipe_exploration.jsonl). Usage::

    python benchmarks/explore_recipe.py LABEL PROTOCOL SEED EPOCHS [cfg=FILE.toml] [section.key=value ...]

PML adapters (``pml_triplet_semihard``, ``pml_multi_similarity``) are registered as in
train_fashion_mnist.py. One thread per process; run two at a time on 2 cores.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_fashion_mnist as bench  # noqa: E402

from deepmetric.config import apply_overrides, config_from_dict  # noqa: E402
from deepmetric.io import atomic_write_text  # noqa: E402
from deepmetric.train import fit  # noqa: E402

LOG = Path(__file__).resolve().parent / "results" / "recipe_exploration.jsonl"


def main(argv: list[str]) -> None:
    label, protocol, seed, epochs = argv[0], argv[1], int(argv[2]), int(argv[3])
    overrides = argv[4:]
    files = [o[4:] for o in overrides if o.startswith("cfg=")]
    overrides = [o for o in overrides if not o.startswith("cfg=")]
    base = tomllib.loads(Path(files[0]).read_text()) if files else {}
    torch.set_num_threads(1)
    bench._register_pml()
    raw = apply_overrides(base, overrides + [f'data.protocol="{protocol}"', f"seed={seed}", f"train.epochs={epochs}",
                                             "train.plots=false", "train.num_threads=1"])
    config = config_from_dict(raw)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = fit(config, Path(tmp) / "run", progress=False, log=lambda s: None)
    val = res.history[-1].get("val") or {}
    row = {"label": label, "protocol": protocol, "seed": seed, "epochs": epochs,
           "test_map": round(res.test["map@r"], 4), "test_r1": round(res.test["recall@1"], 4),
           "val_map": round(val.get("map@r", float("nan")), 4), "wall": round(time.perf_counter() - t0),
           "config": {"loss": config.loss.name, "loss_args": dict(config.loss.args),
                      "miner": config.miner.name if config.miner else None,
                      "extra_losses": [{"name": e.name, **dict(e.args)} for e in config.extra_losses]}}
    print(json.dumps(row), flush=True)
    old = LOG.read_text() if LOG.exists() else ""
    atomic_write_text(LOG, old + json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
