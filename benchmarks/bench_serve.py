"""Load test of the search service: N concurrent clients for a bounded time against a local server.

What it does (everything on 127.0.0.1, nothing downloaded):

1. a checkpoint of the default job: ``--checkpoint`` or, when omitted, a short run of the default
   configuration (Fashion-MNIST, small CNN, 64-d, multi-similarity) trained for ``--train-steps`` steps
   into ``--work`` (reused on later runs);
2. an index of the Fashion-MNIST test split (10,000 items) built from it (``--backend``);
3. ``python -m deepmetric.serve`` started in a subprocess on a free port, waited for on ``/health``;
4. ``--clients`` threads, each with its own keep-alive ``httpx.Client``, sending requests back to back
   for ``--duration`` seconds: alternately an image upload (a Fashion-MNIST test image as PNG,
   multipart) and a JSON vector query (a stored embedding plus noise), ``k = --k``;
5. the server is stopped (always), and latency percentiles, throughput and errors are written to
   ``benchmarks/results/bench_serve.json`` and ``.md``.

Usage::

    .venv/bin/python benchmarks/bench_serve.py --clients 8 --duration 10
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_job_checkpoint(work: Path, steps: int) -> Path:
    """A checkpoint of the default job's configuration, trained briefly (reused when present)."""
    import dataclasses

    from deepmetric.config import Config
    from deepmetric.train import fit

    run = work / "default-job"
    best = run / "best.pt"
    if best.is_file():
        return best
    from deepmetric.config import Component

    config = Config()
    sampler = config.sampler
    if int(sampler.args.get("batch_size", 128)) // int(sampler.args.get("m", 4)) > 10:
        # Fashion-MNIST has 10 classes: keep the batch size, draw more images per class
        sampler = Component(sampler.name, {**dict(sampler.args), "m": int(sampler.args.get("batch_size", 128)) // 8})
    config = dataclasses.replace(config, sampler=sampler, train=dataclasses.replace(
        config.train, epochs=1, max_steps_per_epoch=steps, baselines=False, plots=False, num_threads=1,
        device="cpu"), data=dataclasses.replace(config.data, download=False))
    fit(config, run, progress=False, log=lambda s: None)
    return best


def start_server(index_dir: Path, log: Path, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepmetric.serve", str(index_dir), "--host", "127.0.0.1", "--port", str(port),
             "--threads", str(threads), "--log-level", "warning", "--no-access-log"],
            stdout=handle, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def run_clients(url: str, clients: int, duration: float, k: int, pngs: list[bytes],
                vectors: np.ndarray) -> dict[str, Any]:
    """``clients`` threads sending requests for ``duration`` seconds; per-request (kind, latency, status)."""
    import httpx

    records: list[list[tuple[str, float, int]]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_barrier = threading.Barrier(clients + 1)
    stop_at: list[float] = [0.0]

    def worker(i: int) -> None:
        rng = np.random.default_rng(i)
        out = records[i]
        with httpx.Client(base_url=url, timeout=30) as http:
            start_barrier.wait()
            n = 0
            while time.perf_counter() < stop_at[0]:
                kind = "image" if (n + i) % 2 == 0 else "vector"
                t0 = time.perf_counter()
                try:
                    if kind == "image":
                        r = http.post("/search", files={"file": ("q.png", pngs[rng.integers(len(pngs))], "image/png")},
                                      data={"k": str(k)})
                    else:
                        v = vectors[rng.integers(len(vectors))] + rng.normal(0, 0.01, vectors.shape[1])
                        r = http.post("/search", json={"vector": v.astype(float).tolist(), "k": k})
                    ok = r.status_code == 200 and len(r.json()["results"]) == k
                    status = r.status_code if ok else -r.status_code
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    status = 0
                    errors.append(f"{kind}: {exc!r}")
                out.append((kind, time.perf_counter() - t0, status))
                n += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + duration
    t_start = time.perf_counter()
    start_barrier.wait()
    for t in threads:
        t.join(timeout=duration + 60)
    elapsed = time.perf_counter() - t_start
    flat = [r for rs in records for r in rs]
    return {"records": flat, "elapsed_s": elapsed, "error_messages": errors[:10]}


def summarise(records: list[tuple[str, float, int]], elapsed: float) -> dict[str, Any]:
    def stats(rows: list[tuple[str, float, int]]) -> dict[str, Any]:
        lat = np.array([r[1] for r in rows]) * 1000.0
        if not len(lat):
            return {"requests": 0}
        return {"requests": int(len(lat)), "errors": int(sum(r[2] != 200 for r in rows)),
                "throughput_rps": round(len(lat) / elapsed, 1),
                "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                               "p90": round(float(np.percentile(lat, 90)), 2),
                               "p99": round(float(np.percentile(lat, 99)), 2),
                               "mean": round(float(lat.mean()), 2), "max": round(float(lat.max()), 2)}}

    out = {"all": stats(records)}
    for kind in ("image", "vector"):
        out[kind] = stats([r for r in records if r[0] == kind])
    return out


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        "# bench_serve: search service under load",
        "",
        f"{c['clients']} concurrent clients for {c['duration_s']} s against `python -m deepmetric.serve` on "
        f"127.0.0.1 (uvicorn, 1 worker process, {c['server_threads']} torch/faiss thread); index: "
        f"{c['items']} Fashion-MNIST test items, {c['dim']}-d, {c['backend']}, k = {c['k']}. "
        f"Requests alternate an image upload (28×28 PNG, multipart; the server decodes, embeds with the "
        f"small CNN, searches) and a JSON vector query.",
        "",
        "| requests | count | errors | throughput (req/s) | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("all", "image", "vector"):
        s = result["results"][kind]
        if not s.get("requests"):
            continue
        lat = s["latency_ms"]
        lines.append(f"| {kind} | {s['requests']} | {s['errors']} | {s['throughput_rps']} | {lat['p50']} | "
                     f"{lat['p90']} | {lat['p99']} | {lat['max']} |")
    m = result["machine"]
    lines += ["", f"Machine: {m['cpus']} CPU cores ({m['platform']}), load average before the run "
                  f"{m['load_before']}, python {m['python']}. The clients run on the same cores as the server, "
                  "so absolute numbers depend on what else the machine is doing.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: a short default-job run in --work)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "deepmetric-bench-serve"),
                        help="work directory for the checkpoint, index and server log (reused)")
    parser.add_argument("--train-steps", type=int, default=60, help="steps of the short default-job run")
    parser.add_argument("--backend", default="flat", choices=["flat", "ivf", "hnsw"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "bench_serve"), help="output path without extension")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 0 < args.duration <= 60:
        parser.error("--clients must be 1..64 and --duration 0..60 s")

    import torch

    torch.set_num_threads(1)
    from deepmetric.index.build import build_index
    from deepmetric.io import atomic_write_text

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_job_checkpoint(work, args.train_steps)
    index_dir = work / f"index-{args.backend}"
    t0 = time.perf_counter()
    index = build_index(checkpoint, "fashion_mnist", backend=args.backend, device="cpu", progress=False)
    index.save(index_dir)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    sample = rng.choice(len(index), size=200, replace=False)
    pngs = [_png(index.thumbnail(int(i))) for i in index.ids[sample]]
    vectors = index.vectors[sample]
    load_before = os.getloadavg()

    proc, url = start_server(index_dir, work / "server.log", args.server_threads)
    try:
        run_clients(url, min(args.clients, 4), 1.0, args.k, pngs, vectors)  # warm-up, not counted
        run = run_clients(url, args.clients, args.duration, args.k, pngs, vectors)
    finally:
        stop_server(proc)

    result = {
        "benchmark": "bench_serve",
        "config": {"clients": args.clients, "duration_s": args.duration, "k": args.k, "backend": args.backend,
                   "items": len(index), "dim": index.dim, "server_threads": args.server_threads,
                   "checkpoint": str(checkpoint), "index_build_s": round(build_s, 1)},
        "results": summarise(run["records"], run["elapsed_s"]),
        "elapsed_s": round(run["elapsed_s"], 2),
        "error_messages": run["error_messages"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_before": [round(x, 2) for x in load_before]},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    errors = result["results"]["all"].get("errors", 0)
    if errors:
        print(f"{errors} errors: {run['error_messages']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
