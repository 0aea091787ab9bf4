"""1-process vs 2-process (gloo, 127.0.0.1) training-step time, and the gradient difference.

* Gradient difference: for contrastive, triplet + semi-hard mining, multi-similarity, proxy-anchor and
  N-pair, the model (and loss-parameter) gradients of one step with 2 ranks × B/2 against one
  process with batch B, float64 — the max absolute and max relative difference.
* Step time: SmallCNN on Fashion-MNIST-sized inputs (1×28×28), global batch 128 (P×K = 32×4), the
  multi-similarity loss + miner on the global batch; one process with 2 threads vs two processes
  with 1 thread each (this machine has 2 cores). Median of the timed steps after warm-up.

Run by hand::

    .venv/bin/python benchmarks/bench_distributed.py

Writes benchmarks/results/bench_distributed.{json,md}.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import dist_workers as W  # noqa: E402

from deepmetric.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GLOBAL_BATCH, STEPS, WARMUP = 128, 30, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_problem():
    import deepmetric.losses  # noqa: F401
    import deepmetric.miners  # noqa: F401
    from deepmetric.distributed import GlobalBatchLoss
    from deepmetric.losses import MultiSimilarityLoss
    from deepmetric.miners import MultiSimilarityMiner
    from deepmetric.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", 64, in_channels=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g)
    y = torch.arange(GLOBAL_BATCH // 4).repeat_interleave(4)
    return model, GlobalBatchLoss(MultiSimilarityLoss(), MultiSimilarityMiner()), x, y


def _time_steps(model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(WARMUP + STEPS):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        value = loss(model(x), y)
        opt.zero_grad()
        value.backward()
        opt.step()
        if dist.is_initialized():
            dist.barrier()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return times


def _timing_worker(rank: int, world: int, port: int, out: str) -> None:
    from deepmetric.distributed import shard_bounds

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        model, loss, x, y = _step_problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        s, e = shard_bounds(len(x), rank, world)
        times = _time_steps(ddp, loss, x[s:e], y[s:e])
        if rank == 0:
            torch.save(torch.tensor(times), Path(out) / "times.pt")
    finally:
        dist.destroy_process_group()


def gradient_differences() -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for case in sorted(W.LOSS_CASES):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(W.grad_worker, args=(2, _free_port(), case, [(0, 10), (10, 20)], list(range(20)), tmp),
                     nprocs=2, join=True)
            expected = W.single_process_grads(case)
            abs_diff, rel_diff = 0.0, 0.0
            for rank in (0, 1):
                got = torch.load(Path(tmp) / f"rank{rank}.pt", weights_only=True)
                for key, ref in expected.items():
                    d = (got[key] - ref).abs().max().item()
                    abs_diff = max(abs_diff, d)
                    rel_diff = max(rel_diff, d / max(ref.abs().max().item(), 1e-300))
            out[case] = {"max_abs_diff": abs_diff, "max_rel_diff": rel_diff}
            print(f"{case:20s} max |Δgrad| {abs_diff:.2e}  relative {rel_diff:.2e}", flush=True)
    return out


def step_times() -> dict[str, float]:
    torch.set_num_threads(2)
    model, loss, x, y = _step_problem()
    single = statistics.median(_time_steps(model, loss, x, y))
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_timing_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
        two = statistics.median(torch.load(Path(tmp) / "times.pt", weights_only=True).tolist())
    print(f"step time: 1 process × 2 threads {single * 1e3:.1f} ms; 2 processes × 1 thread {two * 1e3:.1f} ms",
          flush=True)
    return {"one_process_ms": single * 1e3, "two_processes_ms": two * 1e3}


def main() -> int:
    grads = gradient_differences()
    times = step_times()
    results = {"gradients": grads, "step_time": times, "global_batch": GLOBAL_BATCH, "steps": STEPS}
    lines = ["Gradient difference, 2 ranks × 10 vs 1 process × 20 (float64, model + loss parameters):", "",
             "| loss | max abs diff | max rel diff |", "|---|---|---|"]
    lines += [f"| {k} | {v['max_abs_diff']:.2e} | {v['max_rel_diff']:.2e} |" for k, v in grads.items()]
    lines += ["", f"Training step (SmallCNN 1×28×28, global batch {GLOBAL_BATCH}, multi-similarity + miner, "
              f"median of {STEPS} steps):", "",
              "| setting | ms / step |", "|---|---|",
              f"| 1 process, 2 threads | {times['one_process_ms']:.1f} |",
              f"| 2 processes (gloo, 127.0.0.1), 1 thread each | {times['two_processes_ms']:.1f} |"]
    md = "\n".join(lines) + "\n\nCommand: `.venv/bin/python benchmarks/bench_distributed.py`\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "bench_distributed.json", json.dumps(results, indent=2))
    atomic_write_text(RESULTS / "bench_distributed.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
