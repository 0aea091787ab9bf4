"""Multi-process training on ``torch.distributed``: losses that see the global batch.

Why a metric loss needs this: computed on each rank's local batch, a loss sees only local negatives.
deepmetric gathers the embeddings of every rank **with autograd** (uneven per-rank sizes allowed) and
computes the loss on the concatenated global batch, on every rank. The gradient is then exactly the
single-process gradient:

* the backward of the autograd all-gather sums, for a rank's local embeddings, the gradients that
  every rank's (identical) loss sends them: ``W · ∂L/∂x_r``;
* DistributedDataParallel averages parameter gradients over the ``W`` ranks, which divides by ``W``
  again, leaving ``Σ_r ∂L/∂x_r · ∂x_r/∂θ = ∂L/∂θ``.

So no ``× world_size`` fudge is needed (PML multiplies by it because its gather has no autograd).
Loss parameters (proxies, centers, β) are not wrapped in DDP: every rank computes the same global
loss, so their gradients agree; :func:`average_gradients` averages them anyway to stop float
drift, keeping them in sync.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepmetric.errors import ConfigError

__all__ = [
    "DistInfo",
    "init_from_env",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "shard_bounds",
    "average_gradients",
    "broadcast_object",
    "GlobalBatchLoss",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env(device_type: str = "cpu", timeout_s: float = 300.0) -> DistInfo | None:
    """Join the process group described by torchrun's environment variables.

    Returns None when not launched by torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE == 1``).
    Backend: gloo on CPU, nccl on CUDA.

    Raises:
        ConfigError: an inconsistent or incomplete environment (missing variables, rank out of range).
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                        dist.get_backend())
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return None
    try:
        world_size = int(world)
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            "distributed launch misconfigured: WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not "
            f"integers ({exc}); launch with `torchrun --nproc_per_node N -m deepmetric.cli train ...`"
        ) from exc
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"distributed launch misconfigured: RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    if world_size == 1:
        return None
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"distributed launch misconfigured: {', '.join(missing)} not set (torchrun sets them)")
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    from datetime import timedelta

    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, backend)


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _pad(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank in rank order, differentiable w.r.t. the local ``x``.

    Per-rank first dimensions may differ. Without a process group this returns ``x``.
    """
    if not is_distributed():
        return x
    sizes = _gather_sizes(x.shape[0], x.device)
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(_pad(x, max(sizes)))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Like :func:`all_gather_with_grad` without autograd (labels, evaluation embeddings)."""
    if not is_distributed():
        return x
    sizes = _gather_sizes(x.shape[0], x.device)
    padded = _pad(x.contiguous(), max(sizes))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of rank ``rank``'s share of ``n`` items (sizes differ by at most 1).

    Concatenating the shards in rank order gives back the original order, so the global batch of a
    distributed step is exactly the single-process batch.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """All-reduce-average the gradients of ``params`` (keeps loss parameters in sync)."""
    if not is_distributed():
        return
    world = get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


class GlobalBatchLoss(nn.Module):
    """Wrap a loss (and optional miner) so that it is computed on the global batch of all ranks.

    Every rank calls it with its local embeddings and labels; embeddings are all-gathered with
    autograd, labels without, the miner (if any) runs on the global batch, and the loss of the global
    batch is returned on every rank. Outside ``torch.distributed`` it is the plain loss.

    Example:
        >>> import torch
        >>> from deepmetric.losses import ContrastiveLoss
        >>> wrapped = GlobalBatchLoss(ContrastiveLoss())
        >>> emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> bool(torch.isclose(wrapped(emb, labels), ContrastiveLoss()(emb, labels)))
        True
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if is_distributed():
            embeddings = all_gather_with_grad(embeddings)
            labels = all_gather_no_grad(labels)
        if self.miner is not None:
            return self.loss(embeddings, labels, indices=self.miner(embeddings, labels))
        return self.loss(embeddings, labels)
