"""Benchmark: the time budget of the "5× faster than PML" target at B = 512, against the unavoidable work.

``bench_losses.py`` finds six configurations at B = 512 where deepmetric is less than 5× faster than
pytorch-metric-learning (PML). This script asks whether 5× is reachable there at all on this machine.
For each of them it times, **in one process, in alternating rounds** (the order rotates every round):

* deepmetric and PML, forward + backward, exactly as ``bench_losses.py`` builds them (same inputs,
  same mapping);
* the matmul every implementation must run: the Gram block ``‖x‖² − 2 x xᵀ`` (``addmm``, forward
  only, no autograd; for ``n_pair`` the N × N block of its N anchor/positive pairs), and that plus
  one ``(B, B) @ (B, D)`` matmul, the least a loss with a dense gradient needs in its backward;
* the cost of the rest in units: one elementwise pass over a ``(B, B)`` matrix (``lt`` into a
  preallocated mask), ``nonzero`` of a 1 %-dense ``(B, B)`` mask, and one dispatched operator on a
  tiny tensor (Python + dispatcher overhead, paid by every operator whatever its size);
* ``lean contrastive``: a minimal eager formulation of the contrastive loss (about 25 operators: the
  Gram block, one mask of candidate pairs, their square roots and hinges, a sparse backward),
  checked against PML's value and gradient — what hand-fusing in eager PyTorch can reach;
* ``native-scan contrastive`` (when a C compiler ``cc`` is found): the same, with every elementwise
  pass over the ``(B, B)`` matrix (threshold, label comparison, upper triangle, ``nonzero``) replaced
  by one loop of C (compiled into a temporary directory, called through ``ctypes``) that lists the
  candidate pairs — an upper bound on what fused native kernels would gain for the forward pass.

The table reports the target (PML / 5), how much of it the unavoidable matmul already takes, and
what remains for everything else, in elementwise passes over the ``(B, B)`` matrix.

Run by hand (about 2 minutes)::

    python benchmarks/bench_small_batch.py

Writes benchmarks/results/bench_small_batch.{json,md}.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

THREADS = 2
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_losses as BL  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

B = 512
CONFIGS = ["contrastive", "triplet_margin+hard", "n_pair", "ranked_list", "sup_con", "multi_similarity"]
DENSE_GRAD = {"ranked_list", "sup_con", "multi_similarity", "n_pair"}  # gradient w.r.t. the matrix not sparse
REPS, TARGET_S = 9, 0.03
_EPS = 1e-12


class LeanContrastive(torch.autograd.Function):
    """Contrastive loss over all pairs (euclidean, unsquared hinges, PML's reduction: positive and
    negative non-zero means added), batch against itself, the candidate pairs (positives, and negatives
    with ``d² < m²``) found on the squared distances of the upper triangle; sparse backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, labels: torch.Tensor, margin: float, scan=None) -> torch.Tensor:  # type: ignore[override]
        n = x.shape[0]
        sq = torch.linalg.vector_norm(x, dim=1).square_()
        d2 = torch.addmm(sq.unsqueeze(1), x, x.T, alpha=-2.0).add_(sq)
        bound = margin * margin * (1 + 1e-5)
        if scan is None:
            same = labels.unsqueeze(1) == labels
            cand = torch.lt(d2, bound).logical_or_(same).triu_(1)
            idx = cand.view(-1).nonzero().squeeze(1)
            pos = same.view(-1).index_select(0, idx)
        else:
            idx = scan(d2, labels, bound)
            r = torch.div(idx, n, rounding_mode="floor")
            pos = labels.index_select(0, r) == labels.index_select(0, idx - r * n)
        v = d2.view(-1).index_select(0, idx)
        d = v.clamp_min(_EPS).sqrt_()
        h = torch.where(pos, d, margin - d).relu_()
        active = h > 0
        n_pos = int((active & pos).sum())
        n_neg = int(active.sum()) - n_pos
        s_pos = float(h[pos].sum())
        s_neg = float(h.sum()) - s_pos
        w_pos, w_neg = 1.0 / max(n_pos, 1), 1.0 / max(n_neg, 1)
        value = s_pos * w_pos + (s_neg * w_neg if n_neg else 0.0)
        g = torch.where(pos, w_pos, -w_neg) * active / d  # ∂L/∂d / d (each unordered pair once: both orders)
        g.masked_fill_(v < _EPS, 0.0)
        ctx.save_for_backward(x, idx, g)
        return x.new_tensor(value)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, idx, g = ctx.saved_tensors
        r = torch.div(idx, x.shape[0], rounding_mode="floor")
        c = idx - r * x.shape[0]
        diff = (x.index_select(0, r) - x.index_select(0, c)).mul_(g.unsqueeze(1))
        gx = torch.zeros_like(x)
        gx.index_add_(0, r, diff).index_add_(0, c, diff, alpha=-1.0)
        return gx.mul_(grad_out), None, None, None


_SCAN_C = r'''
#include <stdint.h>
/* flat indices i*n + j (j > i) of the cells with d2 < bound or equal labels; returns their count */
int64_t scan_pairs(const float* d2, const int64_t* lab, int64_t n, float bound, int64_t* out, int64_t cap) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float* row = d2 + i * n;
        const int64_t li = lab[i];
        for (int64_t j = i + 1; j < n; ++j) {
            if (row[j] < bound || lab[j] == li) {
                if (k < cap) out[k] = i * n + j;
                ++k;
            }
        }
    }
    return k;
}
'''


def native_scan() -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None:
    """The C candidate-pair scan compiled with ``cc -O3 -march=native`` into a temporary directory;
    ``None`` without a compiler."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tmp = Path(tempfile.mkdtemp(prefix="dm_scan_"))
    (tmp / "scan.c").write_text(_SCAN_C)
    subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", "-o", str(tmp / "scan.so"), str(tmp / "scan.c")],
                   check=True)
    lib = ctypes.CDLL(str(tmp / "scan.so"))
    shutil.rmtree(tmp)  # the library stays mapped after its file is gone
    lib.scan_pairs.restype = ctypes.c_int64
    lib.scan_pairs.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                               ctypes.c_int64]

    def scan(d2: torch.Tensor, labels: torch.Tensor, bound: float) -> torch.Tensor:
        n = d2.shape[0]
        lab = labels.contiguous()
        cap = n * (n - 1) // 2
        out = torch.empty(cap, dtype=torch.int64)
        k = lib.scan_pairs(d2.data_ptr(), lab.data_ptr(), n, bound, out.data_ptr(), cap)
        return out[:k]

    return scan


def timed_rounds(items: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Median ms per call of every item, in ``REPS`` alternating rounds (rotated order)."""
    names = list(items)
    number = {}
    for k in names:
        items[k]()
        t0 = time.perf_counter()
        items[k]()
        number[k] = max(1, int(TARGET_S / max(time.perf_counter() - t0, 1e-7)))
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(REPS):
        for k in names[r % len(names):] + names[: r % len(names)]:
            f, m = items[k], number[k]
            t0 = time.perf_counter()
            for _ in range(m):
                f()
            times[k].append((time.perf_counter() - t0) / m * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def gram_items(x: torch.Tensor, tag: str) -> dict[str, Callable[[], Any]]:
    n = x.shape[0]
    sq = torch.linalg.vector_norm(x, dim=1).square_().unsqueeze(1)
    out = torch.empty(n, n)
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(2))
    grad = torch.empty_like(x)

    def gram() -> None:
        torch.addmm(sq, x, x.T, alpha=-2.0, out=out)

    def gram_grad() -> None:
        torch.addmm(sq, x, x.T, alpha=-2.0, out=out)
        torch.mm(w, x, out=grad)

    return {f"gram{tag}": gram, f"gram+grad{tag}": gram_grad}


def main() -> None:
    from deepmetric.io import atomic_write_text

    torch.set_num_threads(THREADS)
    BL.set_allocator(*BL.USER_ALLOCATOR)  # as bench_losses' timing phase
    x = F.normalize(torch.randn(B, BL.DIM, generator=torch.Generator().manual_seed(0)), dim=1)
    rows = []
    units: dict[str, Any] = {}
    scan = native_scan()
    for layout in BL.LAYOUTS:
        labels = BL._labels(B, layout)
        classes = int(labels.max()) + 1
        items: dict[str, Callable[[], Any]] = {}
        specs = {name: BL.build(name, x, labels) for name in CONFIGS}
        for name, spec in specs.items():
            for side in ("ours", "pml"):
                def call(fn=spec[side]) -> None:
                    e = x.detach().clone().requires_grad_(True)
                    fn(e).backward()
                items[f"{name}/{side}"] = call
        items.update(gram_items(x, ""))
        items.update(gram_items(x[:classes].contiguous(), "_n"))  # n_pair: one (anchor, positive) pair per class
        mask = torch.empty(B, B, dtype=torch.bool)
        dense = torch.rand(B, B, generator=torch.Generator().manual_seed(3))
        sparse = dense < 0.01
        tiny = torch.zeros(1)
        items["pass"] = lambda: torch.lt(dense, 0.5, out=mask)
        items["nonzero"] = lambda: sparse.view(-1).nonzero()
        items["op"] = lambda: torch.add(tiny, 1.0, out=tiny)
        pml = specs["contrastive"]["pml"]
        variants = {"lean contrastive": None} | ({} if scan is None else {"native-scan contrastive": scan})
        for key, fn in variants.items():
            e1 = x.clone().requires_grad_(True)
            e2 = x.clone().requires_grad_(True)
            v1, v2 = LeanContrastive.apply(e1, labels, 1.0, fn), pml(e2)
            v1.backward(), v2.backward()
            units[f"{key} equal to PML ({layout})"] = abs(float(v1) - float(v2)) <= 2e-4 * abs(float(v2)) and bool(
                (e1.grad - e2.grad).norm() <= 2e-3 * e2.grad.norm())

            def lean(fn=fn) -> None:
                e = x.detach().clone().requires_grad_(True)
                LeanContrastive.apply(e, labels, 1.0, fn).backward()

            items[key] = lean
        ms = timed_rounds(items)
        for k in ("pass", "nonzero", "op", "gram", "gram+grad", *variants):
            units[f"{k} ({layout})"] = ms[k]
        for name in CONFIGS:
            tag = "_n" if name == "n_pair" else ""
            need = ms[f"gram+grad{tag}"] if name in DENSE_GRAD else ms[f"gram{tag}"]
            target = ms[f"{name}/pml"] / 5
            rows.append({
                "loss": name, "layout": layout, "ours_ms": ms[f"{name}/ours"], "pml_ms": ms[f"{name}/pml"],
                "target_ms": target, "matmul_ms": need, "matmul_kind": "gram+grad" if name in DENSE_GRAD else "gram",
                "left_ms": target - need, "left_passes": (target - need) / ms["pass"],
                **({f"{k}_ms": ms[k] for k in variants} if name == "contrastive" else {}),
            })
            print(json.dumps(rows[-1]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": THREADS, "B": B,
            "D": BL.DIM, "reps": REPS, "load": os.getloadavg()[0], "command": "python benchmarks/bench_small_batch.py"}
    out = BL.RESULTS
    atomic_write_text(out / "bench_small_batch.json", json.dumps({"meta": meta, "rows": rows, "units": units}, indent=1))
    atomic_write_text(out / "bench_small_batch.md", render(meta, rows, units))
    print(render(meta, rows, units))


def render(meta: dict[str, Any], rows: list[dict[str, Any]], units: dict[str, Any]) -> str:
    lines = [
        "# bench_small_batch: the 5× target at B = 512 against the unavoidable work", "",
        f"{meta['date']}, torch {meta['torch']}, {meta['threads']} threads, B = {meta['B']}, D = {meta['D']}, "
        f"median of {meta['reps']} alternating rounds, load average {meta['load']:.1f}. Command: `{meta['command']}`.", "",
        "target = PML / 5. matmul = the Gram block (`gram`), plus one (B, B) @ (B, D) gradient matmul for the "
        "losses whose gradient w.r.t. the matrix is dense (`gram+grad`); n_pair: the N × N block of its N "
        "(anchor, positive) pairs. left = target − matmul: the time a 5× implementation would have for "
        "everything else (label bookkeeping, masks, exponentials, the backward's chain rule, Python), also "
        "in elementwise passes over a (B, B) matrix.", "",
        "| loss | layout | ours ms | PML ms | PML/ours | target ms | matmul | matmul ms | left ms | left in (B, B) passes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['layout']} | {r['ours_ms']:.2f} | {r['pml_ms']:.2f} | {r['pml_ms'] / r['ours_ms']:.1f} | "
            f"{r['target_ms']:.2f} | {r['matmul_kind']} | {r['matmul_ms']:.2f} | {r['left_ms']:.2f} | {r['left_passes']:.1f} |"
        )
    lines += ["", "Units measured in the same rounds:", "", "| item | ms |", "|---|---|"]
    for k, v in units.items():
        lines.append(f"| {k} | {v if isinstance(v, bool) else f'{v:.3f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
