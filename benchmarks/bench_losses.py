"""Benchmark: deepmetric losses (and loss + miner pairs) vs pytorch-metric-learning (PML), forward + backward.

For every loss / loss+miner pair that PML also implements, both libraries run **in one process**
on the same inputs (L2-normalised ``randn(B, 128)``, float32, a fixed random permutation of the
labels), with the same hyper-parameters under the mapping documented in :data:`CONFIGS`. Each
configuration (loss, label layout, B) runs in its own subprocess:

1. warm-up + peak memory, one side at a time: the peak RSS is reset (``/proc/self/clear_refs``
   ``5``; the high-water mark that ``getrusage().ru_maxrss`` reports), one forward + backward runs,
   and "peak MB" = ``VmHWM`` − the RSS just before the call. During this phase glibc is told
   (``mallopt``) to ``mmap`` every allocation ≥ 128 KiB and to trim the heap above 128 KiB, so freed
   tensors go back to the OS and the second side starts from the same baseline;
2. value check: the two values (and the gradients w.r.t. the embeddings, where the mapping is the
   identity) must agree (float32: |Δ| ≤ 2e-4·|v| + 1e-6, gradient relative L2 error ≤ 2e-3); a
   configuration whose values disagree is **not timed** (status ``values disagree``);
3. timing: ``reps`` rounds alternating deepmetric, PML and the floor (the order rotates every round);
   fast calls are repeated inside one measurement; the median per call is reported. Before it the
   allocator is set to what a long-running process reaches by itself with glibc's defaults (the
   dynamic thresholds at their ceiling: allocations up to 32 MiB reuse heap memory) — with the
   peak phase's settings every fresh tensor ≥ 128 KiB costs page faults, which inflated every
   small-batch time about 3× (both sides) compared with a user's process.

``--env user`` (default) runs the children with the OpenMP library's default wait policy, as a user's
process; ``--env quiet`` reproduces the setting of the earlier tables (``OMP_WAIT_POLICY=PASSIVE``
and the peak phase's allocator settings for the timing too; each OpenMP region then pays a thread
wake-up), for a machine so loaded that spinning threads distort the timings.

Floor = the bare distance matmul: ``x @ x.T`` on ``x (B, 128)`` with ``requires_grad`` and the
backward of its sum, timed in the same rounds. Both sides run with ``torch.set_num_threads(2)``
(the machine has 2 cores, shared: timings are noisy, hence the in-process alternation and ratios).

A side that raises an out-of-memory error under ``RLIMIT_AS`` (default 20 GiB, ``--mem-cap-gb``)
is reported as ``fails (OOM)``; one whose warm-up call exceeds ``--cap`` seconds (default 30; the
repetitions stop once a side has used its cap)
as ``timeout`` (SIGALRM interrupts PML's Python-level loops; the parent kills a child that does not
return at all). Label layouts: ``pk4`` = P×K with K = 4 (B/4 classes), ``c32`` = 32 classes
(K = B/32); at B = 128 they coincide and only ``pk4`` is run. Proxy losses use
``num_classes`` = the number of classes of the layout.

Run by hand (not a test; about 35 minutes for the whole grid on 2 cores)::

    python benchmarks/bench_losses.py                           # every config, B in 128 512 2048 4096
    python benchmarks/bench_losses.py --losses triplet_margin,circle --sizes 512 2048
    python benchmarks/bench_losses.py --one triplet_margin 2048 pk4   # one config, JSON on stdout

Writes benchmarks/results/bench_losses.json and bench_losses.md (unless ``--no-write``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

THREADS = 2
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 128
SIZES = (128, 512, 2048, 4096)
LAYOUTS = ("pk4", "c32")
VALUE_RTOL, VALUE_ATOL, GRAD_RTOL = 2e-4, 1e-6, 2e-3


# ----------------------------------------------------------------------------------- memory helpers
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    # VmHWM is the value ru_maxrss reports (KiB), resettable per side through clear_refs.
    return max(_status_kb("VmHWM"), 0) / 1024


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def set_allocator(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc's mmap and trim thresholds for the rest of the process (``False`` without glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes))


PEAK_ALLOCATOR = (128 << 10, 128 << 10)  # every allocation >= 128 KiB mmap-ed, the heap trimmed above 128 KiB
USER_ALLOCATOR = (32 << 20, 64 << 20)  # glibc's dynamic thresholds at their ceiling (64-bit)


# ------------------------------------------------------------------------------------------ configs
class Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise Timeout()


def _labels(batch: int, layout: str):
    import torch

    per_class = 4 if layout == "pk4" else batch // 32
    labels = torch.arange(batch // per_class).repeat_interleave(per_class)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(1))
    return labels[perm]


def _pair_indices(labels):
    from deepmetric.tuples import label_masks

    pos, neg = label_masks(labels)
    a1, p = pos.nonzero(as_tuple=True)
    a2, n = neg.nonzero(as_tuple=True)
    return a1, p, a2, n


def build(name: str, x, labels) -> dict[str, Any]:
    """``ours(x)`` / ``pml(x)`` return the loss (x: a leaf with requires_grad); ``check(x)`` returns
    ``(ours_value, pml_value, grads_compared)`` under the documented mapping, or the two losses."""
    import torch
    from pytorch_metric_learning import distances as PD
    from pytorch_metric_learning import losses as PL
    from pytorch_metric_learning import miners as PM
    from pytorch_metric_learning import reducers as PR

    from deepmetric import losses as L
    from deepmetric import miners as M

    y = labels
    lp = PD.LpDistance(normalize_embeddings=False)  # our "euclidean" (PML's default would also normalise)
    num_classes = int(labels.max()) + 1
    spec: dict[str, Any] = {"mapping": "", "compare": "value+grad", "params": []}

    def pair(ours_loss, pml_loss, ours_miner=None, pml_miner=None, fused=False):
        if ours_miner is None:
            spec["ours"] = lambda e: ours_loss(e, y)
            spec["pml"] = lambda e: pml_loss(e, y)
        elif fused:  # the loss mines itself: loss(x, y, miner=m), what deepmetric's trainer calls
            spec["ours"] = lambda e: ours_loss(e, y, miner=ours_miner)
            spec["pml"] = lambda e: pml_loss(e, y, pml_miner(e, y))
        else:
            spec["ours"] = lambda e: ours_loss(e, y, ours_miner(e, y))
            spec["pml"] = lambda e: pml_loss(e, y, pml_miner(e, y))

    if name == "contrastive":
        ours = L.ContrastiveLoss(margin=1.0, pos_margin=0.0, squared=False, reduction="mean_nonzero")
        pml = PL.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=lp)
        pair(ours, pml)
        spec["mapping"] = (
            "ours ContrastiveLoss(margin=1, pos_margin=0, squared=False, reduction='mean_nonzero'); "
            "PML ContrastiveLoss(pos_margin=0, neg_margin=1, LpDistance(normalize_embeddings=False)) averages the positive and the negative "
            "part over their non-zero terms separately and adds them: checked as "
            "S+/n+ + (S - S+)/(n - n+) from ours' sums (reduction 'sum' / 'mean_nonzero', all pairs "
            "and positive pairs only); timed: ours' single call (same pair terms)"
        )
        sum_all = L.ContrastiveLoss(margin=1.0, squared=False, reduction="sum")
        a1, p, _, _ = _pair_indices(y)
        empty = a1[:0]
        pos_idx = (a1, p, empty, empty)

        def check(e):
            s_all = sum_all(e, y)
            s_pos = sum_all(e, y, pos_idx)
            n_all = torch.round(s_all.detach() / ours(e, y).detach())
            n_pos = torch.round(s_pos.detach() / ours(e, y, pos_idx).detach())
            n_neg = n_all - n_pos
            neg_part = (s_all - s_pos) / n_neg if float(n_neg) > 0 else 0.0 * s_all  # AvgNonZero of nothing = 0
            return s_pos / n_pos + neg_part, pml(e, y)

        spec["check"] = check
    elif name.startswith("triplet_margin"):
        ours_loss = L.TripletMarginLoss(margin=0.2, distance="euclidean")
        pml_loss = PL.TripletMarginLoss(margin=0.2, distance=lp)
        miner = name.split("+")[1] if "+" in name else None
        text = "TripletMarginLoss(margin=0.2, distance='euclidean') == PML TripletMarginLoss(margin=0.2, distance=LpDistance(normalize_embeddings=False))"
        if miner is None:
            pair(ours_loss, pml_loss)
            spec["mapping"] = text + "; all triplets of the batch"
        elif miner == "semi_hard":
            pair(ours_loss, pml_loss, M.SemiHardMiner(margin=0.2, distance="euclidean", negatives="all"),
                 PM.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", distance=lp), fused=True)
            spec["mapping"] = text + (
                "; SemiHardMiner(0.2, 'euclidean', negatives='all') == PML TripletMarginMiner(0.2, 'semihard', same LpDistance); "
                "ours timed as loss(x, y, miner=m) (fused: the bands are evaluated in the loss's blocks, the triplets never listed)"
            )
        elif miner == "hard":
            pair(ours_loss, pml_loss, M.HardMiner(distance="euclidean"), PM.BatchHardMiner(distance=lp), fused=True)
            spec["mapping"] = text + (
                "; HardMiner('euclidean') == PML BatchHardMiner(same LpDistance); ours timed as loss(x, y, miner=m) "
                "(the miner's blocks, then the per-anchor terms without index checks)"
            )
        elif miner == "multi_similarity":
            pair(ours_loss, pml_loss, M.MultiSimilarityMiner(epsilon=0.1), PM.MultiSimilarityMiner(epsilon=0.1), fused=True)
            spec["mapping"] = text + (
                "; MultiSimilarityMiner(0.1) == PML MultiSimilarityMiner(0.1) (pairs -> every (a,p,n) of a mined positive "
                "and a mined negative pair); ours timed as loss(x, y, miner=m) (fused: the ε-rule applied in the loss's "
                "blocks, no pair lists)"
            )
        else:
            raise KeyError(name)
    elif name.startswith("multi_similarity"):
        ours = L.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
        pml = PL.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
        if "+" in name:
            pair(ours, pml, M.MultiSimilarityMiner(epsilon=0.1), PM.MultiSimilarityMiner(epsilon=0.1), fused=True)
        else:
            pair(ours, pml)
        spec["mapping"] = "MultiSimilarityLoss(2, 50, base=0.5) == PML MultiSimilarityLoss(2, 50, 0.5)" + (
            "; MultiSimilarityMiner(0.1) both; ours timed as loss(x, y, miner=m) (fused: the ε-rule applied in "
            "the loss's similarity blocks, no pair lists)" if "+" in name else ""
        )
    elif name == "lifted_structure":
        pair(L.LiftedStructureLoss(margin=1.0), PL.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0, distance=lp))
        spec["mapping"] = (
            "LiftedStructureLoss(margin=1) == PML LiftedStructureLoss(neg_margin=1, pos_margin=0, "
            "LpDistance(normalize_embeddings=False)) "
            "(the paper's smooth loss; PML's GeneralizedLiftedStructureLoss is another loss)"
        )
    elif name == "n_pair":
        pair(
            L.NPairLoss(l2_reg=0.0, pairs="one_per_class"),
            PL.NPairsLoss(distance=PD.DotProductSimilarity(normalize_embeddings=False)),
        )
        spec["mapping"] = (
            "NPairLoss(l2_reg=0, pairs='one_per_class') == PML NPairsLoss(DotProductSimilarity("
            "normalize_embeddings=False)): one (anchor, positive) pair per class (its first two samples), "
            "the other classes' positives as negatives (the paper's N-pair batch)"
        )
    elif name == "histogram":
        pair(L.HistogramLoss(num_nodes=101), PL.HistogramLoss(n_bins=100))
        spec["mapping"] = "HistogramLoss(num_nodes=101) == PML HistogramLoss(n_bins=100)"
    elif name == "ranked_list":
        ours = L.RankedListLoss(alpha=1.2, margin=0.4, temperature=10.0)
        pml = PL.RankedListLoss(margin=0.4, Tn=10.0, imbalance=0.5, alpha=1.2, Tp=0)
        pair(ours, pml)
        spec["check"] = lambda e: (0.5 * ours(e, y), pml(e, y))
        spec["compare"] = "value"
        # PML pads both per-row weight sums with 1e-5 per matrix entry (sum(w + 1e-5)): each row term is
        # scaled by den / (den + R·1e-5) with den >= 1 (Tp = 0: w_p = 1; w_n = e^{Tn(α-d)} >= 1), so the
        # values agree to R·1e-5 relative, not to float32 precision.
        spec["value_rtol"] = max(VALUE_RTOL, 1e-5 * x.shape[0])
        spec["mapping"] = (
            "0.5 * RankedListLoss(alpha=1.2, margin=0.4, temperature=10) == PML RankedListLoss(margin=0.4, "
            "Tn=10, imbalance=0.5, alpha=1.2, Tp=0) (PML weighs L_P and L_N by 1/2) up to PML's padding of "
            "both weight sums by 1e-5 per entry (relative difference <= B·1e-5, the tolerance used); values "
            "only: the gradients differ because the paper's negative weights are constants (ours) and PML "
            "back-propagates through them"
        )
    elif name == "margin+distance_weighted":
        ours = L.MarginLoss(margin=0.2, beta=1.2, nu=0.0, learn_beta=False)
        pml = PL.MarginLoss(margin=0.2, nu=0, beta=1.2, learn_beta=False)
        pair(ours, pml, M.DistanceWeightedMiner(seed=0), PM.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4))
        dw = M.DistanceWeightedMiner(seed=0)

        def check(e):
            a, p, n = dw(e, y)
            # one triplet per (a, n) pair so that both count each pair once (PML counts per triplet)
            key = a * e.shape[0] + n
            _, first = torch.unique(key, return_inverse=True)
            keep = torch.zeros_like(key, dtype=torch.bool)
            seen = torch.full((int(first.max()) + 1,), -1, dtype=torch.long)
            seen.scatter_reduce_(0, first, torch.arange(len(key)), reduce="amin", include_self=False)
            keep[seen] = True
            t = (a[keep], p[keep], n[keep])
            return ours(e, y, t), pml(e, y, t)

        spec["check"] = check
        spec["mapping"] = (
            "MarginLoss(0.2, beta=1.2, nu=0, learn_beta=False) == PML MarginLoss(0.2, nu=0, beta=1.2); "
            "DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4) both sides (random: values "
            "checked on one set of triplets fed to both losses, (a, n) pairs deduplicated)"
        )
    elif name == "circle":
        pair(L.CircleLoss(m=0.4, gamma=80.0), PL.CircleLoss(m=0.4, gamma=80))
        spec["mapping"] = "CircleLoss(m=0.4, gamma=80) == PML CircleLoss(m=0.4, gamma=80)"
    elif name == "sup_con":
        pair(L.SupConLoss(temperature=0.1), PL.SupConLoss(temperature=0.1))
        spec["mapping"] = "SupConLoss(0.1) == PML SupConLoss(temperature=0.1)"
    elif name in ("proxy_nca", "proxy_anchor", "norm_softmax", "soft_triple", "cos_face", "arc_face"):
        c, d = num_classes, x.shape[1]
        if name == "proxy_nca":
            ours = L.ProxyNCALoss(num_classes=c, embedding_dim=d, softmax_scale=1.0)
            pml = PL.ProxyNCALoss(c, d, softmax_scale=1.0)
            pml.proxies.data = ours.proxies.detach().clone()
            pml_each = PL.ProxyNCALoss(c, d, softmax_scale=1.0, reducer=PR.DoNothingReducer())
            pml_each.proxies = pml.proxies

            def check(e):
                per = pml_each(e, y)["loss"]["losses"]
                return ours(e, y), (per + torch.log1p(-torch.exp(-per))).mean()

            spec["check"] = check
            spec["mapping"] = (
                "ProxyNCALoss(softmax_scale=1) vs PML ProxyNCALoss(softmax_scale=1): PML keeps the positive "
                "proxy in the denominator; checked per sample as L = L_pml + log(1 - exp(-L_pml))"
            )
            spec["compare"] = "value (mapped)"
            params = [(ours.proxies, pml.proxies, False)]
        elif name == "proxy_anchor":
            ours = L.ProxyAnchorLoss(num_classes=c, embedding_dim=d, alpha=32.0, delta=0.1)
            pml = PL.ProxyAnchorLoss(c, d, margin=0.1, alpha=32)
            pml.proxies.data = ours.proxies.detach().clone()
            spec["mapping"] = "ProxyAnchorLoss(alpha=32, delta=0.1) == PML ProxyAnchorLoss(margin=0.1, alpha=32)"
            params = [(ours.proxies, pml.proxies, False)]
        elif name == "norm_softmax":
            ours = L.NormSoftmaxLoss(num_classes=c, embedding_dim=d, temperature=0.05)
            pml = PL.NormalizedSoftmaxLoss(c, d, temperature=0.05)
            pml.W.data = ours.proxies.detach().T.clone()
            spec["mapping"] = "NormSoftmaxLoss(temperature=0.05) == PML NormalizedSoftmaxLoss(temperature=0.05)"
            params = [(ours.proxies, pml.W, True)]
        elif name == "cos_face":
            ours = L.CosFaceLoss(num_classes=c, embedding_dim=d, scale=64.0, margin=0.35)
            pml = PL.CosFaceLoss(c, d, margin=0.35, scale=64)
            pml.W.data = ours.weight.detach().T.clone()
            spec["mapping"] = "CosFaceLoss(scale=64, margin=0.35) == PML CosFaceLoss(margin=0.35, scale=64)"
            params = [(ours.weight, pml.W, True)]
        elif name == "arc_face":
            ours = L.ArcFaceLoss(num_classes=c, embedding_dim=d, scale=64.0, margin=0.5)
            pml = PL.ArcFaceLoss(c, d, margin=math.degrees(0.5), scale=64)
            pml.W.data = ours.weight.detach().T.clone()
            spec["mapping"] = "ArcFaceLoss(scale=64, margin=0.5 rad) == PML ArcFaceLoss(margin=28.65 deg, scale=64)"
            params = [(ours.weight, pml.W, True)]
        else:
            ours = L.SoftTripleLoss(num_classes=c, embedding_dim=d, centers_per_class=10, la=20.0, gamma=0.1, tau=0.0, delta=0.01)
            pml = PL.SoftTripleLoss(c, d, centers_per_class=10, la=20, gamma=0.1, margin=0.01)
            pml.fc.data = ours.centers.detach().reshape(c * 10, d).T.clone()
            spec["mapping"] = (
                "SoftTripleLoss(K=10, la=20, gamma=0.1, delta=0.01, tau=0) == PML SoftTripleLoss(10, la=20, "
                "gamma=0.1, margin=0.01) (PML has no center regulariser, hence tau=0)"
            )
            params = [(ours.centers, pml.fc, True)]
        pair(ours, pml)
        spec["params"] = params
        spec["modules"] = (ours, pml)
    else:
        raise KeyError(name)
    return spec


PAIR_LOSSES = [
    "contrastive",
    "triplet_margin",
    "triplet_margin+semi_hard",
    "triplet_margin+hard",
    "triplet_margin+multi_similarity",
    "multi_similarity",
    "multi_similarity+multi_similarity",
    "lifted_structure",
    "n_pair",
    "histogram",
    "ranked_list",
    "margin+distance_weighted",
    "circle",
    "sup_con",
]
PROXY_LOSSES = ["proxy_nca", "proxy_anchor", "norm_softmax", "soft_triple", "cos_face", "arc_face"]
CONFIGS = PAIR_LOSSES + PROXY_LOSSES
PML_NAMES = {
    "contrastive": "ContrastiveLoss",
    "triplet_margin": "TripletMarginLoss (all triplets)",
    "triplet_margin+semi_hard": "TripletMarginLoss + TripletMarginMiner(semihard)",
    "triplet_margin+hard": "TripletMarginLoss + BatchHardMiner",
    "triplet_margin+multi_similarity": "TripletMarginLoss + MultiSimilarityMiner",
    "multi_similarity": "MultiSimilarityLoss",
    "multi_similarity+multi_similarity": "MultiSimilarityLoss + MultiSimilarityMiner",
    "lifted_structure": "LiftedStructureLoss",
    "n_pair": "NPairsLoss",
    "histogram": "HistogramLoss",
    "ranked_list": "RankedListLoss",
    "margin+distance_weighted": "MarginLoss + DistanceWeightedMiner",
    "circle": "CircleLoss",
    "sup_con": "SupConLoss",
    "proxy_nca": "ProxyNCALoss",
    "proxy_anchor": "ProxyAnchorLoss",
    "norm_softmax": "NormalizedSoftmaxLoss",
    "soft_triple": "SoftTripleLoss",
    "cos_face": "CosFaceLoss",
    "arc_face": "ArcFaceLoss",
}


# ------------------------------------------------------------------------------------------- child
def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or "can't allocate" in text or "out of memory" in text or "alloc" in text


def run_one(name: str, batch: int, layout: str, cap: float, mem_cap_gb: float, env_mode: str = "user") -> dict[str, Any]:
    if env_mode == "user":
        set_allocator(*PEAK_ALLOCATOR)
    limit = int(mem_cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import warnings

    import torch
    import torch.nn.functional as F

    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    import pytorch_metric_learning  # noqa: F401

    import deepmetric  # noqa: F401

    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(batch, DIM, generator=gen), dim=1)
    labels = _labels(batch, layout)
    spec = build(name, x, labels)
    out: dict[str, Any] = {
        "loss": name, "pml": PML_NAMES[name], "layout": layout, "B": batch, "D": DIM,
        "classes": int(labels.max()) + 1, "mapping": spec["mapping"], "compare": spec["compare"],
        "threads": torch.get_num_threads(),
    }
    params = spec["params"]

    def call(side: str):
        if side == "floor":
            e = x.detach().clone().requires_grad_(True)
            (e @ e.T).sum().backward()
            return None, e
        for po, pp, _ in params:
            (po if side == "ours" else pp).grad = None
        e = x.detach().clone().requires_grad_(True)
        loss = spec[side](e)
        loss.backward()
        return loss.detach(), e

    signal.signal(signal.SIGALRM, _alarm)
    status: dict[str, str] = {"ours": "ok", "pml": "ok", "floor": "ok"}
    first: dict[str, float] = {}
    spent: dict[str, float] = {"ours": 0.0, "pml": 0.0, "floor": 0.0}
    results: dict[str, Any] = {}
    for side in ("floor", "ours", "pml"):
        reset_peak()
        base = rss_mb()
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, cap)
        try:
            try:
                results[side] = call(side)
                status[side] = "ok"
            except Timeout:
                raise
            except BaseException as exc:  # noqa: BLE001 - OOM surfaces as RuntimeError or MemoryError
                signal.setitimer(signal.ITIMER_REAL, 0)  # no alarm while the error is being classified
                if not _is_oom(exc):
                    raise
                status[side] = "fails (OOM)"
                out[f"{side}_error"] = str(exc).splitlines()[0][:200]
        except Timeout as exc:
            # the alarm may also fire while an out-of-memory error is being handled: report the OOM
            cause = exc.__context__
            if cause is not None and not isinstance(cause, Timeout) and _is_oom(cause):
                status[side] = "fails (OOM)"
                out[f"{side}_error"] = str(cause).splitlines()[0][:200]
            else:
                status[side] = "timeout"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            torch.set_grad_enabled(True)  # an alarm inside a no_grad() exit leaves grad mode off
        first[side] = time.perf_counter() - t0
        spent[side] = first[side]
        out[f"{side}_first_s"] = first[side]
        out[f"{side}_peak_mb"] = peak_mb() - base if status[side] == "ok" else None
        out[f"status_{side}"] = status[side]
        print("PARTIAL " + json.dumps(out), flush=True)  # kept by the parent if this child has to be killed
        results.setdefault(side, (None, None))
        import gc

        gc.collect()
    out["status_ours"], out["status_pml"] = status["ours"], status["pml"]

    # value check (before any timing)
    check = "n/a"
    if status["ours"] == "ok" and status["pml"] == "ok":
        signal.setitimer(signal.ITIMER_REAL, cap)
        try:
            if "check" in spec:  # a mapping: both values from one leaf, gradients by autograd.grad
                e = x.detach().clone().requires_grad_(True)
                v_ours, v_pml = spec["check"](e)
                g1 = g2 = None
                if spec["compare"] == "value+grad":
                    g1 = torch.autograd.grad(v_ours, e, retain_graph=True)[0]
                    g2 = torch.autograd.grad(v_pml, e)[0]
            else:  # identity mapping: the warm-up calls' values and gradients
                (v_ours, e1), (v_pml, e2) = results["ours"], results["pml"]
                g1, g2 = e1.grad, e2.grad
            a, b = float(v_ours), float(v_pml)
            out["value_ours"], out["value_pml"] = a, b
            ok = abs(a - b) <= spec.get("value_rtol", VALUE_RTOL) * abs(b) + VALUE_ATOL
            if g1 is not None:
                rel = float((g1 - g2).norm() / g2.norm().clamp_min(1e-30))
                out["grad_rel_err"] = rel
                ok = ok and rel <= GRAD_RTOL
            check = "equal" if ok else "values disagree"
        except Timeout:
            check = "check timeout"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            torch.set_grad_enabled(True)  # an alarm inside a no_grad() exit leaves grad mode off
    elif status["ours"] == "ok":
        out["value_ours"] = float(results["ours"][0])
        check = "PML fails: not compared"
    out["check"] = check
    del results

    # timing: alternate floor / ours / pml, rotating the order every round
    if env_mode == "user":
        out["allocator"] = "user" if set_allocator(*USER_ALLOCATOR) else "default (no glibc)"
    sides = ["floor"] + [s for s in ("ours", "pml") if status[s] == "ok"]
    if check == "values disagree":
        sides = ["floor"]
    if check == "check timeout":
        sides = [s for s in sides if s != "pml"]
    # calibrate: calls per measurement so one measurement lasts >= ~30 ms
    per_call = {}
    for side in sides:
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, max(1.0, cap - spent[side]))
        try:
            call(side)
        except Timeout:
            status[side] = "timeout"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            torch.set_grad_enabled(True)  # an alarm inside a no_grad() exit leaves grad mode off
        per_call[side] = time.perf_counter() - t0
        spent[side] += per_call[side]
    sides = [s for s in sides if status[s] == "ok"]
    number = {s: max(1, int(0.03 / max(per_call[s], 1e-6))) for s in sides}
    reps = 5
    times: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(reps):
        order = sides[r % len(sides):] + sides[: r % len(sides)]
        for side in order:
            remaining = cap - spent[side]
            if side != "floor" and times[side] and remaining < per_call[side] * number[side]:
                continue  # this side's time cap is used up: keep the repetitions so far
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, max(1.0, remaining))
            try:
                for _ in range(number[side]):
                    call(side)
            except Timeout:
                if not times[side]:
                    status[side] = "timeout"
                break
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                torch.set_grad_enabled(True)  # an alarm inside a no_grad() exit leaves grad mode off
            dt = time.perf_counter() - t0
            spent[side] += dt
            times[side].append(dt / number[side])
    for side in ("floor", "ours", "pml"):
        ts = sorted(times.get(side, []))
        out[f"{side}_ms"] = 1000 * ts[len(ts) // 2] if ts and status[side] == "ok" else None
        out[f"{side}_reps"] = len(ts)
        out[f"{side}_calls_per_rep"] = number.get(side)
    out["status_ours"], out["status_pml"] = status["ours"], status["pml"]
    return out


# ------------------------------------------------------------------------------------------ parent
def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _side_ms(rec: dict[str, Any], side: str) -> tuple[float | None, str]:
    """Median ms, or the warm-up call's time when the warm-up finished but no timed repetition fit in the
    cap (marked ``1st call``: it includes first-touch page faults, so it overstates the steady state)."""
    if rec.get(f"status_{side}") == "ok" and rec.get(f"{side}_ms") is not None:
        return rec[f"{side}_ms"], ""
    if rec.get(f"{side}_peak_mb") is not None and rec.get(f"{side}_first_s") is not None:
        return 1000 * rec[f"{side}_first_s"], " (1st call)"
    return None, ""


def _side_cell(rec: dict[str, Any], side: str, key: str) -> str:
    if key == "ms":
        ms, note = _side_ms(rec, side)
        if ms is not None:
            return _fmt(ms) + note
        return rec.get(f"status_{side}", "—")
    if key == "peak_mb" and rec.get(f"{side}_peak_mb") is not None:
        return _fmt(rec[f"{side}_peak_mb"], 1)
    st = rec.get(f"status_{side}", "ok")
    return st if st != "ok" else _fmt(rec.get(f"{side}_{key}"))


def _check_cell(rec: dict[str, Any]) -> str:
    check = rec.get("check", "—")
    if check == "killed" and rec.get("status_ours") == "ok":
        return f"PML {rec.get('status_pml')} (child killed): not compared"
    if check == "PML fails: not compared" and rec.get("status_pml") != "ok":
        return f"PML {rec['status_pml']}: not compared"
    return check


def _env_text(meta: dict[str, Any]) -> str:
    load = meta.get("load")
    load_text = f" Load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f}." if load else ""
    if meta.get("env", "quiet") == "user":
        return (
            "Environment `user` (both sides): the OpenMP library's default wait policy; peaks measured with "
            "glibc mmap-ing every allocation >= 128 KiB, timings with glibc's thresholds at their steady-state "
            "ceiling (32 MiB), as in a long-running process." + load_text
        )
    return "Environment `quiet` (both sides): OMP_WAIT_POLICY=PASSIVE and MALLOC_MMAP_THRESHOLD_=131072." + load_text


def render(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# bench_losses: deepmetric vs pytorch-metric-learning, forward + backward",
        "",
        f"{meta['date']}, torch {meta['torch']}, PML {meta['pml']}, {meta['threads']} threads each side, "
        f"shared {meta['cpus']}-core machine (timings noisy; ratios are from the same process and rounds).",
        f"Inputs: L2-normalised randn(B, {DIM}) float32; layouts pk4 = P×K with K=4, c32 = 32 classes (K=B/32). "
        f"RLIMIT_AS {meta['mem_cap_gb']} GiB, time cap {meta['cap']} s per side and config. "
        "floor = `x @ x.T` forward + backward of its sum, timed in the same rounds. "
        "peak MB = peak RSS during the first forward+backward minus the RSS before it. "
        "check: `equal` = value (and gradient, where the mapping is the identity) agree within float32 "
        "tolerance; a configuration whose values disagree is not timed.",
        "",
        f"Command: `{meta['command']}` (wall {meta['wall_s']:.0f} s{meta.get('note', '')}). " + _env_text(meta) + " "
        "`X (1st call)`: the side finished its warm-up call within the cap but no timed repetition fitted; "
        "the warm-up time (with first-touch page faults) is shown instead of a median.",
        "",
    ]
    if meta.get("reruns"):
        lines += [f"Re-run alone after a benchmark-harness fix and spliced in: {', '.join(meta['reruns'])}.", ""]
    lines += [
        "| loss | PML | layout | B | ours ms | PML ms | PML/ours | ours/floor | floor ms | peak MB ours | peak MB PML | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ours_ms, _ = _side_ms(r, "ours")
        pml_ms_v, _ = _side_ms(r, "pml")
        ratio = pml_ms_v / ours_ms if ours_ms and pml_ms_v else None
        vs_floor = ours_ms / r["floor_ms"] if ours_ms and r.get("floor_ms") else None
        pml_ms = _side_cell(r, "pml", "ms")
        pml_mem = _side_cell(r, "pml", "peak_mb")
        lines.append(
            f"| {r['loss']} | {r['pml']} | {r['layout']} | {r['B']} | {_side_cell(r, 'ours', 'ms')} | {pml_ms} | "
            f"{_fmt(ratio, 1) if ratio else '—'} | {_fmt(vs_floor, 1) if vs_floor else '—'} | {_fmt(r.get('floor_ms'))} | "
            f"{_side_cell(r, 'ours', 'peak_mb')} | {pml_mem} | {_check_cell(r)} |"
        )
    lines += ["", "## Mappings (deepmetric == PML)", ""]
    seen = set()
    for r in records:
        if r["loss"] in seen or "mapping" not in r:
            continue
        seen.add(r["loss"])
        lines.append(f"- **{r['loss']}** ({r['compare']}): {r['mapping']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("LOSS", "B", "LAYOUT"))
    parser.add_argument("--losses", default=",".join(CONFIGS))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--cap", type=float, default=30.0, help="seconds per side and configuration")
    parser.add_argument("--mem-cap-gb", type=float, default=20.0)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", action="store_true", help="re-write the .md from the .json")
    parser.add_argument("--env", choices=("user", "quiet"), default="user",
                        help="user: OpenMP and allocator defaults of a user's process (timing); quiet: the earlier "
                        "tables' OMP_WAIT_POLICY=PASSIVE and mmap-every-128-KiB allocator throughout")
    parser.add_argument("--update", action="store_true",
                        help="replace only the measured (loss, layout, B) records in the existing .json (and re-render)")
    args = parser.parse_args()
    if args.render:
        data = json.loads((RESULTS / "bench_losses.json").read_text())
        (RESULTS / "bench_losses.md").write_text(render(data["records"], data["meta"]))
        return
    if args.one:
        rec = run_one(args.one[0], int(args.one[1]), args.one[2], args.cap, args.mem_cap_gb, args.env)
        print("RESULT " + json.dumps(rec))
        return
    names = [n for n in args.losses.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown loss {n!r}; valid: {', '.join(CONFIGS)}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    if args.env == "quiet":
        # PASSIVE: OpenMP threads sleep instead of spinning at barriers; on the shared, oversubscribed 2-core
        # machine spinning once made a 2-thread matmul 10x slower (both sides run under the same setting).
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072", OMP_WAIT_POLICY="PASSIVE")
    load_start = os.getloadavg()[0]
    records = []
    t_start = time.time()
    for batch in args.sizes:
        for layout in args.layouts:
            if layout == "c32" and batch // 32 == 4 and "pk4" in args.layouts:
                continue  # identical to pk4
            for name in names:
                cmd = [sys.executable, __file__, "--one", name, str(batch), layout,
                       "--cap", str(args.cap), "--mem-cap-gb", str(args.mem_cap_gb), "--env", args.env]
                t0 = time.time()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3 * args.cap + 120)
                    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if line:
                        rec = json.loads(line[-1][7:])
                    else:
                        rec = {"loss": name, "pml": PML_NAMES[name], "layout": layout, "B": batch,
                               "status_ours": "error", "status_pml": "error", "check": "crashed",
                               "stderr": proc.stderr[-2000:]}
                except subprocess.TimeoutExpired as exc:
                    rec = _killed(exc, name, layout, batch)
                rec["wall_s"] = time.time() - t0
                records.append(rec)
                print(
                    f"{name:34s} {layout} B={batch:5d} ours={rec.get('ours_ms') or rec.get('status_ours')} "
                    f"pml={rec.get('pml_ms') or rec.get('status_pml')} floor={rec.get('floor_ms')} "
                    f"mem={rec.get('ours_peak_mb')}/{rec.get('pml_peak_mb')} check={rec.get('check')} "
                    f"({rec['wall_s']:.1f}s)",
                    flush=True,
                )
        if not args.no_write and not args.update:
            _write(records, args, t_start, load_start)  # after every configuration: a partial run keeps its results
    meta = _write(records, args, t_start, load_start, final=not args.no_write)
    print(render(records, meta))


def _killed(exc: subprocess.TimeoutExpired, name: str, layout: str, batch: int) -> dict[str, Any]:
    """The record of a child killed at the parent's time limit (a side stuck where the alarm cannot
    interrupt it): what the child reported before that (sides whose warm-up call finished keep their
    peak and first-call time), the side that was running marked ``timeout``."""
    rec = {"loss": name, "pml": PML_NAMES[name], "layout": layout, "B": batch,
           "status_ours": "timeout", "status_pml": "timeout", "check": "killed"}
    text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    partial = [ln for ln in text.splitlines() if ln.startswith("PARTIAL ")]
    if partial:
        rec.update(json.loads(partial[-1][8:]))
        for side in ("ours", "pml"):
            if f"{side}_first_s" not in rec:
                rec[f"status_{side}"] = "timeout"
        rec["check"] = "killed"
    return rec


def _merged(records: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``records`` replacing the same (loss, layout, B) records of the saved run (``--update``); the
    saved commands are kept, this one appended."""
    saved = json.loads((RESULTS / "bench_losses.json").read_text())
    if saved["meta"].get("env", "quiet") != meta["env"]:
        raise SystemExit(
            f"--update: the saved table was measured with --env {saved['meta'].get('env', 'quiet')}, this run with "
            f"--env {meta['env']}; rows from the two cannot share a table (re-run the whole grid)"
        )
    key = lambda r: (r["loss"], r["layout"], r["B"])  # noqa: E731
    new = {key(r): r for r in records}
    merged = [new.pop(key(r), r) for r in saved["records"]] + list(new.values())
    old = saved["meta"]
    meta = dict(meta, command=old["command"] + " ; " + meta["command"], updated=meta["date"], date=old["date"],
                wall_s=old.get("wall_s", 0.0) + meta["wall_s"])
    return merged, meta


def _write(
    records: list[dict[str, Any]], args: argparse.Namespace, t_start: float, load_start: float, final: bool = True
) -> dict[str, Any]:
    import torch
    import pytorch_metric_learning

    from deepmetric.io import atomic_write_text

    meta = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "pml": pytorch_metric_learning.__version__,
        "threads": THREADS,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cap": args.cap,
        "mem_cap_gb": args.mem_cap_gb,
        "command": "python benchmarks/bench_losses.py " + " ".join(sys.argv[1:]),
        "env": args.env,
        "load": [load_start, os.getloadavg()[0]],
        "wall_s": time.time() - t_start,
    }
    if final:
        RESULTS.mkdir(parents=True, exist_ok=True)
        if getattr(args, "update", False):
            records, meta = _merged(records, meta)
        atomic_write_text(RESULTS / "bench_losses.json", json.dumps({"meta": meta, "records": records}, indent=1))
        atomic_write_text(RESULTS / "bench_losses.md", render(records, meta))
    return meta


if __name__ == "__main__":
    main()
