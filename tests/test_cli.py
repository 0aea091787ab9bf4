"""End-to-end command line: train → evaluate → embed on digits, ``list``, and the error exit codes.

Most calls go through :func:`deepmetric.cli.main` in-process; one runs ``python -m deepmetric.cli``
in a subprocess to check the module entry point and that its exit code reaches the shell.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepmetric.cli import main
from deepmetric.data import load_splits

TRAIN_SET = [
    'data.name="digits"', 'data.protocol="disjoint"', 'model.name="mlp"', "model.embedding_dim=16",
    'loss.name="contrastive"', 'miner.name="none"', "sampler.m=8", "sampler.batch_size=32",
    "train.epochs=1", "train.max_steps_per_epoch=3", "train.plots=true", "train.num_threads=1",
    "eval.clustering=false",
]


def _sets(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def _train(out: Path, *extra: str) -> int:
    return main(["train", *_sets(TRAIN_SET), *extra, "--out", str(out), "--no-progress"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert _train(out) == 0
    return out


def test_train_writes_a_complete_run(run_dir: Path) -> None:
    for name in ("config.toml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "projection.png",
                 "summary.md", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "projection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["steps"]) for r in rows] == [(1, 3)]
    config = (run_dir / "config.toml").read_text()
    assert 'name = "contrastive"' in config and 'protocol = "disjoint"' in config
    assert "max_steps_per_epoch = 3" in config


def test_evaluate_json(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(run_dir / "best.pt"), "--json", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("recall@1", "recall@8", "precision@1", "r_precision", "map@r"):
        assert 0.0 <= metrics[key] <= 1.0, key
    splits = load_splits("digits", "disjoint", seed=0)
    assert metrics["num_queries"] == len(splits.test)
    # the trained run's summary evaluated the same checkpoint on the same split
    summary = json.loads((run_dir / "summary.json").read_text())["rows"]
    trained = [row for name, row in summary.items() if name.startswith("trained")][0]
    assert metrics["map@r"] == pytest.approx(trained["map@r"], abs=1e-6)


def test_embed_writes_npz_with_the_right_shapes(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.npz"
    assert main(["embed", str(run_dir / "best.pt"), "--out", str(out), "--no-progress"]) == 0
    data = np.load(out)
    splits = load_splits("digits", "disjoint", seed=0)
    n = len(splits.test)
    assert data["embeddings"].shape == (n, 16)
    assert data["labels"].shape == (n,)
    assert set(np.unique(data["labels"]).tolist()) == {5, 6, 7, 8, 9}
    assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-5)
    train = tmp_path / "train.npz"
    assert main(["embed", str(run_dir / "best.pt"), "--split", "train", "--out", str(train), "--no-progress"]) == 0
    assert np.load(train)["embeddings"].shape == (len(splits.train), 16)


@pytest.mark.parametrize("what", ["losses", "miners", "samplers", "models", "datasets", "distances"])
def test_list_prints_every_component_with_a_description(what: str, capsys: pytest.CaptureFixture[str]) -> None:
    import deepmetric.data  # noqa: F401
    import deepmetric.losses  # noqa: F401
    import deepmetric.miners  # noqa: F401
    import deepmetric.models  # noqa: F401
    import deepmetric.samplers  # noqa: F401
    from deepmetric import registry

    reg = {"losses": registry.LOSSES, "miners": registry.MINERS, "samplers": registry.SAMPLERS,
           "models": registry.MODELS, "datasets": registry.DATASETS, "distances": registry.DISTANCES}[what]
    capsys.readouterr()
    assert main(["list", what]) == 0
    lines = capsys.readouterr().out.splitlines()
    printed = {line.split()[0]: line.split(None, 1)[1] if len(line.split()) > 1 else "" for line in lines}
    public = [n for n in reg.names() if not n.startswith("_")]
    assert public, what
    for name in public:
        assert name in printed, f"{what}: {name} not listed"
        assert printed[name].strip(), f"{what}: {name} has no one-line description"
        assert printed[name].strip() == reg.describe(name).strip()


def test_list_losses_covers_the_loss_registry(capsys: pytest.CaptureFixture[str]) -> None:
    import deepmetric.losses as losses

    capsys.readouterr()
    assert main(["list", "losses"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert {n for n in losses.names() if not n.startswith("_")} <= listed
    assert {"contrastive", "triplet_margin", "multi_similarity", "proxy_anchor", "arc_face"} <= listed


def test_unknown_config_key_exits_2_and_names_valid_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _train(tmp_path / "r", "--set", "train.epoch=2") == 2
    err = capsys.readouterr().err
    assert "'epoch'" in err and "epochs" in err and "max_steps_per_epoch" in err
    assert not (tmp_path / "r").exists()
    assert _train(tmp_path / "r", "--set", "trian.epochs=2") == 2
    err = capsys.readouterr().err
    assert "'trian'" in err and "train" in err and "optim" in err


def test_unknown_loss_or_loss_argument_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _train(tmp_path / "r", "--set", 'loss.name="tripletmargin"') == 2
    err = capsys.readouterr().err
    assert "'tripletmargin'" in err and "triplet_margin" in err
    assert _train(tmp_path / "r", "--set", "loss.margn=0.5") == 2
    err = capsys.readouterr().err
    assert "'margn'" in err and "margin" in err
    assert not (tmp_path / "r").exists()


def test_resume_without_a_run_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _train(tmp_path / "empty", "--resume") == 2
    assert "cannot resume" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no runs/ here: --resume without --out has nothing to continue
    assert main(["train", "--resume", "--no-progress"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_existing_run_without_resume_exits_2(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (run_dir / "last.pt").read_bytes()
    capsys.readouterr()
    assert _train(run_dir) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err
    assert (run_dir / "last.pt").read_bytes() == before


def _corrupt(kind: str, good: bytes) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "empty":
        return b""
    if kind == "random":
        return np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return b"this is not a checkpoint"


@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "text"])
def test_corrupt_checkpoint_exits_1_with_a_clear_message(kind: str, run_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_corrupt(kind, (run_dir / "best.pt").read_bytes()))
    capsys.readouterr()
    assert main(["evaluate", str(bad), "--json", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "deepmetric: error:" in err and str(bad) in err and "not a readable checkpoint" in err


def test_missing_or_foreign_checkpoint_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    capsys.readouterr()
    assert main(["embed", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e.npz")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert main(["evaluate", str(foreign), "--no-progress"]) == 1
    assert "not a deepmetric checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "e.npz").exists()


def test_module_entry_point_in_a_subprocess(run_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "deepmetric.cli", "evaluate", str(run_dir / "best.pt"), "--json",
                           "--no-progress", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    capsys.readouterr()
    assert main(["evaluate", str(run_dir / "best.pt"), "--json", "--no-progress", "--device", "cpu"]) == 0
    assert json.loads(proc.stdout) == pytest.approx(json.loads(capsys.readouterr().out), abs=1e-6)
    proc = subprocess.run([sys.executable, "-m", "deepmetric.cli", "train", "--set", "train.epoch=1"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "epochs" in proc.stderr and not (tmp_path / "runs").exists()
