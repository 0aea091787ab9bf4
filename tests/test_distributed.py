"""Multi-process training on torch.distributed (gloo, 127.0.0.1, 2 processes)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers as W
from deepmetric.distributed import init_from_env, shard_bounds
from deepmetric.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, world: int = 2) -> None:
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


def test_shard_bounds_cover_in_order() -> None:
    for n in range(0, 23):
        for world in (1, 2, 3, 5):
            parts = [shard_bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(e - s for s, e in parts) - min(e - s for s, e in parts) <= 1


@pytest.mark.parametrize("case", sorted(W.LOSS_CASES))
def test_two_ranks_give_single_process_gradients(case: str, tmp_path: Path) -> None:
    order = list(range(20))
    _spawn(W.grad_worker, case, [(0, 10), (10, 20)], order, str(tmp_path))
    expected = W.single_process_grads(case)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got) == set(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12, msg=f"{case} {key}")


def test_uneven_shards_and_a_rank_without_some_classes(tmp_path: Path) -> None:
    """Rank 0 gets 13 samples of classes 0-3, rank 1 gets 7 samples and never sees class 0-2."""
    order = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    _spawn(W.grad_worker, "multi_similarity", [(0, 13), (13, 20)], order.tolist(), str(tmp_path))
    expected = W.single_process_grads("multi_similarity", order)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12)


DIST_TINY = [
    'data.name="digits"', "train.epochs=2", "train.max_steps_per_epoch=4", "sampler.batch_size=32", "sampler.m=4",
    'model.name="mlp"', "model.embedding_dim=16", "model.batch_norm=false", "train.plots=false",
    "train.baselines=false", "eval.clustering=false", 'miner.name="_dist_stop_after"',
]


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_seconds")} for r in rows]


def test_two_process_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    _spawn(W.fit_worker, DIST_TINY, str(tmp_path / "straight"), False, -1)
    _spawn(W.fit_worker, DIST_TINY, str(tmp_path / "resumed"), False, 6)  # stop in epoch 2
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1) and ckpt["data"]["world_size"] == 2
    _spawn(W.fit_worker, DIST_TINY, str(tmp_path / "resumed"), True, -1)
    assert _rows(tmp_path / "resumed") == _rows(tmp_path / "straight")
    assert len(_rows(tmp_path / "straight")) == 2


def test_misconfigured_world_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK/LOCAL_RANK are missing"):
        init_from_env()
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match="RANK=5 is not in"):
        init_from_env()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT not set"):
        init_from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is None
