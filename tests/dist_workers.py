"""Worker functions for tests/test_distributed.py (spawned processes import this module)."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LOSS_CASES: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "contrastive": ("contrastive", {}, None),
    "triplet_semi_hard": ("triplet_margin", {"margin": 0.5}, "semi_hard"),
    "multi_similarity": ("multi_similarity", {}, None),
    "proxy_anchor": ("proxy_anchor", {"num_classes": 5, "embedding_dim": 6}, None),
    "n_pair": ("n_pair", {}, None),
}


def make_problem(case: str, seed: int = 0):
    """A float64 model without BatchNorm, a loss (+miner) and a fixed global batch."""
    import deepmetric.losses  # noqa: F401
    import deepmetric.miners  # noqa: F401
    from deepmetric.distributed import GlobalBatchLoss
    from deepmetric.registry import LOSSES, MINERS

    name, kwargs, miner_name = LOSS_CASES[case]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    loss = LOSSES.build(name, **kwargs).double()
    miner = MINERS.build(miner_name) if miner_name else None
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])
    return model, GlobalBatchLoss(loss, miner), x, y


def grads_of(model: nn.Module, loss: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"model.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
    out.update({f"loss.{n}": p.grad.detach().clone() for n, p in loss.named_parameters() if p.grad is not None})
    return out


def single_process_grads(case: str, order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    model, loss, x, y = make_problem(case)
    if order is not None:
        x, y = x[order], y[order]
    value = loss(F.normalize(model(x), dim=1), y)
    value.backward()
    return grads_of(model, loss) | {"value": value.detach()}


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))


def grad_worker(rank: int, world: int, port: int, case: str, bounds: list[tuple[int, int]], order: list[int],
                out_dir: str) -> None:
    """One rank: its shard of the global batch through DDP; saves its gradients."""
    from deepmetric.distributed import average_gradients

    _init(rank, world, port)
    try:
        model, loss, x, y = make_problem(case)
        x, y = x[order], y[order]
        ddp = nn.parallel.DistributedDataParallel(model)
        start, end = bounds[rank]
        value = loss(F.normalize(ddp(x[start:end]), dim=1), y[start:end])
        value.backward()
        average_gradients(list(loss.parameters()))
        torch.save(grads_of(model, loss) | {"value": value.detach()}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while its peer is still talking to it
    finally:
        dist.destroy_process_group()


def fit_worker(rank: int, world: int, port: int, overrides: list[str], out_dir: str, resume: bool,
               stop_at_call: int) -> None:
    """One rank of a distributed `fit` run (env vars as torchrun sets them)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from deepmetric.config import apply_overrides, config_from_dict
    from deepmetric.registry import MINERS
    from deepmetric.train import fit

    class StopAfter(nn.Module):
        calls = 0

        def __init__(self) -> None:
            super().__init__()
            from deepmetric.miners import MultiSimilarityMiner

            self.inner = MultiSimilarityMiner()

        def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
            type(self).calls += 1
            if type(self).calls == stop_at_call:
                raise KeyboardInterrupt("test interrupt")
            return self.inner(embeddings, labels)

    if "_dist_stop_after" not in MINERS:
        MINERS.register("_dist_stop_after")(StopAfter)
    config = config_from_dict(apply_overrides({}, overrides))
    try:
        fit(config, out_dir, resume=resume, progress=False, log=lambda s: None)
    except KeyboardInterrupt:
        pass
