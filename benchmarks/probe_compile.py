"""Probe: does ``torch.compile`` (inductor, CPU) pay off for the elementwise part of pair losses here?

Naive B×B formulations (forward only, no autograd) of batch-hard mining and of the contrastive hinge
sums at B = 512, D = 128, P×K with K = 4, eager vs compiled, same process, 2 threads; also the one-off
compile time. Not a deepmetric code path: a measurement that decides whether one is worth building.
Run by hand::

    python benchmarks/probe_compile.py

Writes benchmarks/results/probe_compile.{json,md}.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

THREADS = 2
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
B, D = 512, 128


def batch_hard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(1e-12).sqrt()
    same = y[:, None] == y[None, :]
    eye = torch.eye(x.shape[0], dtype=torch.bool)
    p = torch.where(same & ~eye, d, -1.0).argmax(1)
    n = torch.where(same, torch.inf, d).argmin(1)
    return p, n


def contrastive_sums(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(1e-12).sqrt()
    same = y[:, None] == y[None, :]
    h = torch.where(same, d, (1.0 - d).clamp_min(0))
    return h.sum(), (h > 0).sum()


def median_ms(fn, n: int = 100) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[n // 2]


def main() -> None:
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.arange(B // 4).repeat_interleave(4)[torch.randperm(B, generator=g)]
    rows = []
    for fn in (batch_hard, contrastive_sums):
        t = time.perf_counter()
        compiled = torch.compile(fn)
        out_c = compiled(x, y)
        compile_s = time.perf_counter() - t
        out_e = fn(x, y)
        same = all(torch.equal(a, b) for a, b in zip(out_e, out_c)) if fn is batch_hard else all(
            torch.allclose(a.double(), b.double(), rtol=1e-4) for a, b in zip(out_e, out_c))
        eager = median_ms(lambda: fn(x, y))
        comp = median_ms(lambda: compiled(x, y))
        rows.append({"fn": fn.__name__, "compile_s": compile_s, "eager_ms": eager, "compiled_ms": comp,
                     "speedup": eager / comp, "outputs_agree": bool(same)})
        print(json.dumps(rows[-1]), flush=True)
    from deepmetric.losses import ContrastiveLoss
    from deepmetric.miners import HardMiner

    miner, loss = HardMiner(), ContrastiveLoss(squared=False)
    refs = {"batch_hard": median_ms(lambda: miner(x, y)), "contrastive_sums": median_ms(lambda: loss(x, y))}
    for r in rows:
        r["deepmetric_eager_ms"] = refs[r["fn"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": THREADS, "B": B, "D": D, "date": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / "probe_compile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# probe_compile: torch.compile (inductor, CPU) vs eager", "",
             f"{meta['date']}, torch {meta['torch']}, {THREADS} threads, B = {B}, D = {D}, P×K with K = 4; "
             "naive B×B forward formulations, not deepmetric's kernels.", "",
             "| function | compile (s) | eager ms | compiled ms | eager/compiled | outputs agree | deepmetric ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fn']} | {r['compile_s']:.1f} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
                     f"{r['speedup']:.1f} | {r['outputs_agree']} | {r['deepmetric_eager_ms']:.2f} |")
    lines += ["", "deepmetric ms: `HardMiner()(x, y)` and `ContrastiveLoss(squared=False)(x, y)` (forward, no grad "
              "needed by the input) in the same process, for scale."]
    (RESULTS / "probe_compile.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
