"""``fit(config)``: P×K training with validation every epoch, checkpoints, resume and a summary.

Determinism: the model is initialised from ``seed``; the sampler's batches depend only on
``(seed, epoch)``; before every step the global RNG and the augmentation generator are re-seeded
from ``(seed, epoch, step)``. A run resumed from any checkpoint (epoch end or mid-epoch) therefore
continues exactly as if it had never stopped: same seed ⇒ same metrics.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from deepmetric.config import Config, config_from_dict, config_to_dict, dumps_toml, validate_components
from deepmetric.errors import ConfigError, DataError, NonFiniteError
from deepmetric.io import atomic_write_text
from deepmetric.train.checkpoint import load_checkpoint, save_checkpoint
from deepmetric.train.embed import embed_dataset, raw_features
from deepmetric.train.schedule import warmup_cosine

__all__ = ["fit", "FitResult", "build_components", "resolve_device", "load_model_from_checkpoint", "step_seed"]

_MIX = 1_000_003


def step_seed(seed: int, epoch: int, step: int) -> int:
    """Seed used for the global RNG and augmentation at ``(epoch, step)``."""
    return (seed * 7919 + epoch * _MIX + step) % (2**63 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device: unknown device {name!r} (use auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return device


@dataclass
class FitResult:
    """What :func:`fit` returns: where the run lives and its final numbers."""

    out_dir: Path
    history: list[dict[str, Any]]
    test: dict[str, float]
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    best_epoch: int = -1


def _accepts(obj: Any, name: str) -> bool:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _requires(obj: Any, name: str) -> bool:
    """True when the constructor has a parameter ``name`` without a default (the trainer fills it)."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        param = inspect.signature(target).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _build_model(config: Config, input_shape: tuple[int, ...], kind: str) -> nn.Module:
    from deepmetric.models import build_model
    from deepmetric.registry import MODELS

    kwargs = dict(config.model.args)
    backbone = MODELS.get(config.model.name)
    if kind == "image" and _accepts(backbone, "in_channels"):
        kwargs.setdefault("in_channels", int(input_shape[0]))
    if _accepts(backbone, "input_dim"):
        kwargs.setdefault("input_dim", int(np.prod(input_shape)))
    return build_model(
        config.model.name, embedding_dim=config.model.embedding_dim, normalize=config.model.normalize, **kwargs
    )


class LossSet(nn.Module):
    """The weighted sum of one or more losses; the miner feeds those that take mined tuples."""

    def __init__(self, names: list[str], losses: list[nn.Module], weights: list[float]) -> None:
        super().__init__()
        self.names = list(names)
        self.losses = nn.ModuleList(losses)
        self.weights = list(weights)

    @property
    def takes_tuples(self) -> bool:
        return any(getattr(l, "tuple_kind", None) is not None for l in self.losses)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, miner: nn.Module | None = None) -> torch.Tensor:
        tuple_losses = [l for l in self.losses if getattr(l, "tuple_kind", None) is not None]
        # a single tuple loss that mines itself gets the miner (fused: e.g. semi-hard triplets never listed)
        fused = miner is not None and len(tuple_losses) == 1 and getattr(tuple_losses[0], "fuses_miner", False)
        indices = miner(embeddings, labels) if miner is not None and not fused else None
        total = None
        for loss, weight in zip(self.losses, self.weights):
            if fused and getattr(loss, "tuple_kind", None) is not None:
                value = loss(embeddings, labels, miner=miner)
            elif indices is not None and getattr(loss, "tuple_kind", None) is not None:
                value = loss(embeddings, labels, indices=indices)
            else:
                value = loss(embeddings, labels)
            total = weight * value if total is None else total + weight * value
        assert total is not None
        return total


def build_components(
    config: Config, num_train_classes: int, input_shape: tuple[int, ...], kind: str
) -> tuple[nn.Module, LossSet, nn.Module | None]:
    """Model, losses (num_classes/embedding_dim injected where taken) and optional miner."""
    from deepmetric.config import loss_constructor_args, loss_training_args
    from deepmetric.registry import LOSSES, MINERS

    torch.manual_seed(config.seed)
    model = _build_model(config, input_shape, kind)
    names, losses, weights = [], [], []
    for comp in (config.loss, *config.extra_losses):
        loss_cls = LOSSES.get(comp.name)
        if getattr(loss_cls, "label_kind", "class") not in ("class", "none"):  # "none": ignores labels
            raise ConfigError(
                f"loss {comp.name!r} needs {loss_cls.label_kind} labels, but fit() trains on class labels; "
                "use it from your own training loop (see its docstring)"
            )
        kwargs = loss_constructor_args(comp)
        # Filled by the trainer when the constructor requires them; an optional num_classes (e.g. the
        # margin loss's per-class beta) stays the user's choice: `loss.num_classes = N` in the config.
        if _requires(loss_cls, "num_classes"):
            kwargs["num_classes"] = num_train_classes
        if _requires(loss_cls, "embedding_dim"):
            kwargs["embedding_dim"] = config.model.embedding_dim
        names.append(comp.name)
        losses.append(LOSSES.build(comp.name, **kwargs))
        weights.append(loss_training_args(comp)[0])
    loss_set = LossSet(names, losses, weights)
    miner = None
    if config.miner is not None:
        miner = MINERS.build(config.miner.name, **dict(config.miner.args))
        if not loss_set.takes_tuples:
            raise ConfigError(
                f"loss {config.loss.name!r} does not take mined tuples; set [miner] name = \"none\""
            )
    return model, loss_set, miner


def _param_groups(config: Config, model: nn.Module, loss_set: LossSet) -> list[dict[str, Any]]:
    from deepmetric.config import loss_training_args

    groups = [{"params": [p for p in model.parameters() if p.requires_grad],
               "weight_decay": config.optim.weight_decay}]
    for comp, loss in zip((config.loss, *config.extra_losses), loss_set.losses):
        params = [p for p in loss.parameters() if p.requires_grad]
        if params:
            lr = loss_training_args(comp)[1] or config.optim.loss_lr or config.optim.lr
            groups.append({"params": params, "lr": lr, "weight_decay": 0.0})
    return groups


class _IndexView:
    """Rows ``indices`` of a dataset, with the ``get_batch`` interface (used for per-rank shards)."""

    def __init__(self, dataset: Any, indices: torch.Tensor) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, idx: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.get_batch(self.indices[idx], **kwargs)


def _embed_global(model: nn.Module, dataset: Any, config: Config, device: torch.device,
                  desc: str, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``dataset``; under torch.distributed each rank embeds a contiguous shard and the
    results are gathered once (in order) on every rank."""
    from deepmetric import distributed as D

    if not D.is_distributed():
        return embed_dataset(model, dataset, batch_size=config.train.embed_batch_size, device=device,
                             progress=progress, desc=desc)
    start, end = D.shard_bounds(len(dataset), D.get_rank(), D.get_world_size())
    view = _IndexView(dataset, torch.arange(start, end))
    emb, labels = embed_dataset(model, view, batch_size=config.train.embed_batch_size, device=device, desc=desc)
    emb_t = D.all_gather_no_grad(torch.as_tensor(emb).reshape(len(emb), -1).to(device))
    lab_t = D.all_gather_no_grad(torch.as_tensor(labels).to(device))
    return emb_t.cpu().numpy(), lab_t.cpu().numpy()


def _build_sampler(config: Config, labels: torch.Tensor) -> Any:
    from deepmetric.registry import SAMPLERS

    return SAMPLERS.build(config.sampler.name, labels, seed=config.seed, **dict(config.sampler.args))


class _EpochBatches(torch.utils.data.Dataset):
    """Batches of one epoch, fetched with a per-step seeded generator (so workers stay deterministic)."""

    def __init__(self, dataset: Any, batches: list[list[int]], seed: int, epoch: int, start: int, augment: bool):
        self.dataset, self.batches, self.seed, self.epoch = dataset, batches, seed, epoch
        self.start, self.augment = start, augment

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.start + i
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, step))
        idx = torch.as_tensor(self.batches[step], dtype=torch.long)
        return self.dataset.get_batch(idx, generator=gen, augment=self.augment)


def _evaluate(model: nn.Module, dataset: Any, config: Config, device: torch.device, desc: str) -> dict[str, float]:
    from deepmetric import distributed as D
    from deepmetric.metrics import evaluate

    emb, labels = _embed_global(model, dataset, config, device, desc)
    metrics = None
    if D.get_rank() == 0:
        metrics = evaluate(emb, labels, ks=tuple(config.eval.ks), metric=config.eval.metric,
                           clustering=config.eval.clustering, seed=config.seed)
    return D.broadcast_object(metrics)


def _history_read(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


class _Interrupt:
    """Graceful stop on SIGINT/SIGTERM: the first signal sets :attr:`requested` and the training loop
    saves its position at the next step boundary; a second signal interrupts at once."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested = False
        self._log = log
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread: leave the defaults
                pass
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"signal {signum}")
        self.requested = True
        self._log("\nstopping after the current step (interrupt again to stop at once)")

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", which: str = "model") -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the embedding model stored in a checkpoint. Returns ``(model, config, checkpoint)``."""
    from deepmetric.errors import CheckpointError

    ckpt = load_checkpoint(path, map_location="cpu")
    config = config_from_dict(ckpt["config"])
    meta = ckpt.get("data", {})
    input_shape = tuple(meta.get("input_shape", (1, 28, 28)))
    model = _build_model(config, input_shape, meta.get("kind", "image"))
    try:
        model.load_state_dict(ckpt[which])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: model weights do not match the model in its config: {exc}") from exc
    model.to(device).eval()
    return model, config, ckpt


def fit(
    config: Config,
    out_dir: str | Path = "runs/default",
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train an embedding model as configured and write a run directory.

    ``out_dir`` receives ``config.toml`` (resolved), ``metrics.jsonl`` (one line per epoch),
    ``last.pt`` and ``best.pt`` (atomic), ``curves.png``, ``projection.png``, ``summary.json`` and
    ``summary.md``. With ``resume=True`` training continues from ``out_dir/last.pt``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel (gloo on
    CPU, nccl on CUDA), every global P×K batch is split into contiguous per-rank shards, the losses
    see the all-gathered global batch (see :mod:`deepmetric.distributed`), and rank 0 alone writes
    files and logs.

    Raises:
        ConfigError: bad configuration (checked before any work).
        DataError: missing or unusable data.
        NonFiniteError: NaN/inf loss or gradients (names epoch and step; the last checkpoint is kept).
    """
    from deepmetric import distributed as D
    from deepmetric.data import load_splits

    validate_components(config)
    device = resolve_device(config.train.device)
    dist_info = D.init_from_env(device.type)
    owns_group = dist_info is not None
    finished = False
    try:
        if dist_info is not None and device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
            torch.cuda.set_device(device)
        result = _fit(config, Path(out_dir), device, resume, progress, log)
        finished = True
        return result
    finally:
        if owns_group and D.is_distributed():
            import torch.distributed as dist

            if finished:  # every rank got here: meet before tearing the group down (not after an error,
                dist.barrier()  # where a peer may be gone and the barrier would only wait for the timeout)
            dist.destroy_process_group()


def _fit(config: Config, out: Path, device: torch.device, resume: bool, progress: bool,
         log: Callable[[str], None]) -> FitResult:
    from deepmetric import distributed as D
    from deepmetric.data import load_splits

    rank, world = D.get_rank(), D.get_world_size()
    is_main = rank == 0
    if not is_main:
        log = lambda s: None  # noqa: E731
        progress = False
    last_path, best_path = out / "last.pt", out / "best.pt"
    ckpt: dict[str, Any] | None = None
    if resume:
        if not last_path.is_file():
            raise ConfigError(f"cannot resume: no checkpoint at {last_path}")
        ckpt = load_checkpoint(last_path)
        saved = config_to_dict(config_from_dict(ckpt["config"]))
        if saved != config_to_dict(config):
            log(f"resuming with the configuration stored in {last_path} (the one given differs)")
        config = config_from_dict(ckpt["config"])

    threads = config.train.num_threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    use_amp = bool(config.train.amp and device.type == "cuda")

    data = config.data
    splits = load_splits(
        data.name, data.protocol, root=data.root or None, val_fraction=data.val_fraction, seed=config.seed,
        train_classes=list(data.train_classes) or None, image_size=data.image_size or None, download=data.download,
    )
    train_set = splits.train
    if len(train_set) == 0:
        raise DataError("the training set is empty")
    input_shape = tuple(train_set.input_shape)
    kind = getattr(train_set, "kind", "image")
    model, loss_set, miner = build_components(config, splits.num_train_classes, input_shape, kind)
    model.to(device)
    loss_set.to(device)
    net: nn.Module = model
    if D.is_distributed():
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = _build_sampler(config, train_set.labels)
    steps_per_epoch = len(sampler)
    if config.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise DataError("the sampler yields no batch: the training set is smaller than one batch")

    optimizer = torch.optim.AdamW(_param_groups(config, model, loss_set), lr=config.optim.lr)
    loss_params = [p for p in loss_set.parameters() if p.requires_grad]
    total_steps = config.train.epochs * steps_per_epoch
    scheduler = warmup_cosine(
        optimizer, total_steps, int(round(config.optim.warmup_epochs * steps_per_epoch)), config.optim.min_lr_ratio
    )
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    start_epoch, start_step, best_value, best_epoch = 0, 0, -math.inf, -1
    running = {"loss_sum": 0.0, "count": 0, "images": 0, "seconds": 0.0}
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        loss_set.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
        best_value, best_epoch = float(ckpt["best_value"]), int(ckpt["best_epoch"])
        running = dict(ckpt["running"])
        history = _history_read(out / "metrics.jsonl", start_epoch)
        log(f"resumed from {last_path} at epoch {start_epoch + 1}, step {start_step}")

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", dumps_toml(config_to_dict(config)))
    meta = {"input_shape": list(input_shape), "kind": kind, "num_train_classes": splits.num_train_classes,
            "mean": _plain(getattr(train_set, "mean", None)), "std": _plain(getattr(train_set, "std", None)),
            "info": _plain(splits.info), "world_size": world}

    def checkpoint(epoch: int, step: int, path: Path = last_path) -> None:
        if not is_main:
            return
        save_checkpoint(path, {
            "config": config_to_dict(config), "data": meta, "model": model.state_dict(),
            "loss": loss_set.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "step": step, "best_value": best_value, "best_epoch": best_epoch,
            "running": dict(running),
        })

    select = config.eval.select
    params = [p for g in optimizer.param_groups for p in g["params"]]
    net.train()
    loss_set.train()
    with _Interrupt(log) as interrupt:
        for epoch in range(start_epoch, config.train.epochs):
            sampler.set_epoch(epoch)
            batches = [list(b) for b in sampler][:steps_per_epoch]
            if world > 1:
                batches = [b[slice(*D.shard_bounds(len(b), rank, world))] for b in batches]
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                running = {"loss_sum": 0.0, "count": 0, "images": 0, "seconds": 0.0}
            loader = torch.utils.data.DataLoader(
                _EpochBatches(train_set, batches, config.seed, epoch, first, data.augment),
                batch_size=None, shuffle=False, num_workers=config.train.num_workers,
            )
            bar = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{config.train.epochs}",
                       unit="batch", disable=not progress, dynamic_ncols=True)
            step = first
            updated, buffers = True, []
            try:
                t0 = time.perf_counter()
                for x, y in loader:
                    # Buffers (BatchNorm statistics) change in the forward pass: keep a copy so that an
                    # interrupt inside this step can save the state of the step boundary.
                    buffers = [b.detach().clone() for b in model.buffers()]
                    updated = False
                    torch.manual_seed(step_seed(config.seed, epoch, step))
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        emb = net(x)
                    emb = D.all_gather_with_grad(emb.float())
                    y = D.all_gather_no_grad(y)
                    where = f"epoch {epoch + 1}, step {step + 1} of {len(batches)}"
                    if not bool(torch.isfinite(emb).all()):
                        raise NonFiniteError(
                            f"non-finite embeddings at {where}; the last good checkpoint is {last_path}. "
                            "Lower optim.lr or check the input data for NaNs."
                        )
                    loss = loss_set(emb, y, miner)
                    if not bool(torch.isfinite(loss)):
                        raise NonFiniteError(
                            f"non-finite loss ({loss.item()}) at {where}; the last good checkpoint is {last_path}. "
                            "Lower optim.lr (or set optim.grad_clip)."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                    else:
                        loss.backward()
                    D.average_gradients(loss_params)
                    norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip or math.inf)
                    if not bool(torch.isfinite(norm)):
                        raise NonFiniteError(
                            f"non-finite gradients at {where}; the last good checkpoint is {last_path}. "
                            "Lower optim.lr or set optim.grad_clip."
                        )
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    step += 1
                    updated = True
                    t1 = time.perf_counter()
                    running["loss_sum"] += float(loss.detach())
                    running["count"] += 1
                    running["images"] += len(y)
                    running["seconds"] += t1 - t0
                    t0 = t1
                    bar.set_postfix(loss=f"{running['loss_sum'] / running['count']:.4f}",
                                    img_s=f"{running['images'] / max(running['seconds'], 1e-9):.0f}")
                    bar.update(1)
                    if config.train.checkpoint_every and step % config.train.checkpoint_every == 0 and step < len(batches):
                        checkpoint(epoch, step)
                    stop = interrupt.requested
                    if D.is_distributed():
                        flag = torch.tensor([float(stop)], device=device)
                        import torch.distributed as dist

                        dist.all_reduce(flag)
                        stop = bool(flag.item() > 0)
                    if stop:
                        raise KeyboardInterrupt("stop requested")
            except KeyboardInterrupt:
                bar.close()
                if not updated:
                    for b, saved in zip(model.buffers(), buffers):
                        b.copy_(saved)
                checkpoint(epoch, step)
                log(f"\ninterrupted: position saved to {last_path} (epoch {epoch + 1}, step {step}); "
                    f"continue with: deepmetric train --resume --out {out}")
                raise
            bar.close()

            val_set = splits.val if splits.val is not None and len(splits.val) > 0 else None
            val = _evaluate(model, val_set, config, device, "validate") if val_set is not None else {}
            net.train()
            row = {
                "epoch": epoch + 1, "steps": len(batches),
                "train_loss": running["loss_sum"] / max(1, running["count"]),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": running["images"] / max(running["seconds"], 1e-9),
                "epoch_seconds": running["seconds"], "val": val,
            }
            history.append(row)
            value = val.get(select, -row["train_loss"]) if val else -row["train_loss"]
            improved = value > best_value
            if improved:
                best_value, best_epoch = value, epoch + 1
            if is_main:
                _write_history(out / "metrics.jsonl", history)
            checkpoint(epoch + 1, 0)
            if improved:
                checkpoint(epoch + 1, 0, best_path)
            vtxt = "  ".join(f"{k}={val[k]:.4f}" for k in ("recall@1", "map@r") if k in val)
            log(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}  {row['images_per_s']:.0f} img/s  "
                f"val {vtxt}{'  (best)' if improved else ''}")
            if config.train.plots and is_main:
                from deepmetric.train.plots import plot_curves

                plot_curves(history, out / "curves.png", select=select)
            if D.is_distributed():
                import torch.distributed as dist

                dist.barrier()

    return _finish(config, out, model, splits, device, history, best_epoch, meta, log, progress)


def _plain(obj: Any) -> Any:
    """Make ``obj`` safe for weights_only checkpoints and JSON (plain Python types)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


_SUMMARY_KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi", "ami")


def summary_markdown(summary: dict[str, dict[str, float]], title: str) -> str:
    keys = [k for k in _SUMMARY_KEYS if any(k in row for row in summary.values())]
    lines = [f"### {title}", "", "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, row in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4f}" if k in row else "—" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _finish(config: Config, out: Path, model: nn.Module, splits: Any, device: torch.device,
            history: list[dict[str, Any]], best_epoch: int, meta: dict[str, Any],
            log: Callable[[str], None], progress: bool) -> FitResult:
    """Test-set evaluation of the best checkpoint beside the raw-input and untrained baselines."""
    from deepmetric import distributed as D
    from deepmetric.metrics import evaluate

    test_set = splits.test
    is_main = D.get_rank() == 0
    ev = dict(ks=tuple(config.eval.ks), metric=config.eval.metric, clustering=config.eval.clustering, seed=config.seed)
    best_path = out / "best.pt"
    if D.is_distributed():
        import torch.distributed as dist

        dist.barrier()  # best.pt is complete before any rank reads it
    if best_path.is_file() and best_epoch > 0:
        model.load_state_dict(load_checkpoint(best_path)["model"])
    emb, lab = _embed_global(model, test_set, config, device, "test", progress)
    summary: dict[str, dict[str, float]] = {}
    test: dict[str, float] = {}
    if is_main:
        if config.train.baselines:
            raw, raw_labels = raw_features(test_set)
            summary["raw inputs (L2-normalised)"] = evaluate(raw, raw_labels, **ev)
            untrained, _, _ = build_components(config, splits.num_train_classes, tuple(meta["input_shape"]),
                                               meta["kind"])
            u_emb, u_lab = embed_dataset(untrained.to(device), test_set, batch_size=config.train.embed_batch_size,
                                         device=device)
            summary["untrained network"] = evaluate(u_emb, u_lab, **ev)
        test = evaluate(emb, lab, **ev)
        losses = "+".join([config.loss.name, *(c.name for c in config.extra_losses)])
        summary[f"trained ({losses}, best epoch {best_epoch})"] = test
        title = (f"{splits.info.get('name', config.data.name)} {config.data.protocol} — test split, "
                 f"{len(test_set)} items, leave-one-out retrieval")
        md = summary_markdown(summary, title)
        atomic_write_text(out / "summary.md", md)
        atomic_write_text(out / "summary.json", json.dumps({"title": title, "best_epoch": best_epoch,
                                                             "rows": _plain(summary)}, indent=2))
        if config.train.plots:
            from deepmetric.train.plots import plot_projection

            plot_projection(emb, lab, out / "projection.png", seed=config.seed,
                            title=f"Test embeddings ({losses})", class_names=getattr(test_set, "class_names", None))
        log("\n" + md)
        log(f"run directory: {out}  (config.toml, metrics.jsonl, best.pt, last.pt, curves.png, projection.png, "
            "summary.md)")
    test = D.broadcast_object(test)
    return FitResult(out_dir=out, history=history, test=test, summary=summary, best_epoch=best_epoch)


def replace_config(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, **changes)
