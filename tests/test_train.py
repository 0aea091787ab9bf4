"""fit(): run directory, resume equivalence (in-process and after SIGTERM), clear errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepmetric.config import apply_overrides, config_from_dict
from deepmetric.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from deepmetric.registry import LOSSES, MINERS
from deepmetric.train import fit, load_checkpoint

TINY = [
    'data.name="digits"', "train.epochs=2", "train.max_steps_per_epoch=6", "sampler.batch_size=32", "sampler.m=4",
    'model.name="mlp"', "model.embedding_dim=16", "train.plots=false", "train.baselines=false",
    "train.num_threads=1", "eval.clustering=false",
]


def tiny(*extra: str):
    return config_from_dict(apply_overrides({}, TINY + list(extra)))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_seconds")} for r in rows]


def test_run_directory_contents(tmp_path: Path) -> None:
    config = tiny("train.plots=true", "train.baselines=true", "eval.clustering=true")
    result = fit(config, tmp_path / "run", progress=False, log=lambda s: None)
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "projection.png",
                 "summary.md", "summary.json"):
        assert (run / name).is_file(), name
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0.0 <= r["val"]["recall@1"] <= 1.0 for r in rows)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())["rows"]
    assert set(summary) >= {"raw inputs (L2-normalised)", "untrained network"}
    assert result.test["recall@1"] == pytest.approx(list(summary.values())[-1]["recall@1"])
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0
    # the resolved config written beside the run reproduces the run's config
    from deepmetric.config import load_config

    assert load_config(run / "config.toml") == config


def test_training_improves_on_untrained(tmp_path: Path) -> None:
    config = tiny("train.epochs=3", "train.max_steps_per_epoch=0", "train.baselines=true",
                  'loss.name="contrastive"', 'miner.name="none"')
    result = fit(config, tmp_path / "run", progress=False, log=lambda s: None)
    untrained = result.summary["untrained network"]
    assert result.test["map@r"] > untrained["map@r"] + 0.05


class _StopAfter(nn.Module):
    """A miner that interrupts the run (like Ctrl-C) on its n-th call, then behaves normally."""

    calls = 0
    stop_at = -1

    def __init__(self) -> None:
        super().__init__()
        from deepmetric.miners import MultiSimilarityMiner

        self.inner = MultiSimilarityMiner()

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        type(self).calls += 1
        if type(self).calls == type(self).stop_at:
            raise KeyboardInterrupt("test interrupt")
        return self.inner(embeddings, labels)


if "_test_stop_after" not in MINERS:
    MINERS.register("_test_stop_after")(_StopAfter)


def test_resume_mid_epoch_equals_uninterrupted(tmp_path: Path) -> None:
    config = tiny('miner.name="_test_stop_after"', "train.epochs=3")
    _StopAfter.calls, _StopAfter.stop_at = 0, -1
    fit(config, tmp_path / "straight", progress=False, log=lambda s: None)
    _StopAfter.calls, _StopAfter.stop_at = 0, 9  # epoch 2, step 3
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "stopped", progress=False, log=lambda s: None)
    ckpt = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    fit(config, tmp_path / "stopped", resume=True, progress=False, log=lambda s: None)
    assert _strip_timing(_rows(tmp_path / "stopped")) == _strip_timing(_rows(tmp_path / "straight"))


def test_resume_after_sigterm_in_a_subprocess(tmp_path: Path) -> None:
    """`deepmetric train` killed with SIGTERM mid-epoch saves its position; --resume finishes the run
    with the same metrics as an uninterrupted run."""
    args = [a for item in TINY for a in ("--set", item)] + [
        "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=0", "--set", "train.checkpoint_every=1",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deepmetric.cli", "train", *args]
    straight = subprocess.run(cmd + ["--out", str(tmp_path / "a")], env=env, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "b")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "position saved" in out + err
    resumed = subprocess.run(cmd[:4] + ["--resume", "--out", str(tmp_path / "b"), "--no-progress"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _strip_timing(_rows(tmp_path / "b")) == _strip_timing(_rows(tmp_path / "a"))


class _NaNAtStep(nn.Module):
    """Contrastive loss that turns NaN on its 4th call."""

    tuple_kind = None
    label_kind = "class"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, embeddings, labels, indices=None):
        self.calls += 1
        value = (embeddings ** 2).sum()
        return value * float("nan") if self.calls == 4 else value


if "_test_nan" not in LOSSES:
    LOSSES.register("_test_nan")(_NaNAtStep)


def test_non_finite_loss_names_step_and_keeps_checkpoint(tmp_path: Path) -> None:
    config = tiny('loss.name="_test_nan"', 'miner.name="none"', "train.max_steps_per_epoch=3")
    with pytest.raises(NonFiniteError, match=r"non-finite loss.*epoch 2, step 1 of 3.*last.pt"):
        fit(config, tmp_path / "run", progress=False, log=lambda s: None)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot resume"):
        fit(tiny(), tmp_path / "nothing", resume=True, progress=False)
    empty = tmp_path / "empty.npz"
    np.savez(empty, features=np.zeros((0, 4), np.float32), labels=np.zeros((0,), np.int64))
    with pytest.raises(DataError):
        fit(tiny(f'data.name="npz:{empty}"'), tmp_path / "e", progress=False)
    with pytest.raises(ConfigError, match="does not take mined tuples"):
        fit(tiny('loss.name="proxy_anchor"', 'miner.name="multi_similarity"'), tmp_path / "p", progress=False)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="needs continuous labels"):
        fit(tiny('loss.name="log_ratio"', 'miner.name="none"'), tmp_path / "l", progress=False)
    with pytest.raises(ConfigError, match="eval.select 'map@10' is not a computed metric"):
        fit(tiny("eval.select=\"map@10\""), tmp_path / "s", progress=False)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a deepmetric checkpoint"):
        load_checkpoint(foreign)


def test_multi_task_losses_and_learnable_parameters(tmp_path: Path) -> None:
    config = config_from_dict(apply_overrides(
        {"extra_losses": [{"name": "center", "weight": 0.5, "with_softmax": False}]},
        TINY + ['loss.name="norm_softmax"', 'loss.lr=0.01', 'miner.name="none"'],
    ))
    result = fit(config, tmp_path / "run", progress=False, log=lambda s: None)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert any(k.startswith("losses.0.") for k in ckpt["loss"]) and any(k.startswith("losses.1.") for k in ckpt["loss"])
    lrs = [g["lr"] for g in ckpt["optimizer"]["param_groups"]]
    assert len(lrs) == 2  # model + norm_softmax proxies (center loss updates its centers by its own rule)
    assert np.isfinite(result.test["map@r"])
