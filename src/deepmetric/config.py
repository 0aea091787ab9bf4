"""Run configuration: frozen dataclasses read from TOML, strictly validated.

A configuration file has one table per section; every key is optional (defaults below form the
**default job**: Fashion-MNIST, closed-set, small CNN, triplet loss on semi-hard triplets plus a
uniformity regulariser)::

    seed = 0

    [data]
    name = "fashion_mnist"        # fashion_mnist | digits | image_folder:<dir> | csv:<file> | npz:<file>
    protocol = "closed"           # closed | disjoint

    [model]
    name = "small_cnn"
    embedding_dim = 64

    [loss]                        # a component: name + the constructor's keyword arguments
    name = "triplet_margin"
    margin = 0.2                  # on squared euclidean distances of unit vectors

    [[extra_losses]]              # more weighted losses (dropped when [loss] names another loss)
    name = "uniformity"           # spread over the sphere (Wang & Isola 2020): helps unseen classes
    weight = 0.3

    [miner]
    name = "semi_hard"            # "none" = every triplet of the batch
    fallback = "easiest"          # no semi-hard negative: the farthest one (FaceNet's reference code)

    [sampler]
    name = "m_per_class"
    m = 32                        # samples per class in a batch (P = batch_size // m classes)
    batch_size = 128

Unknown keys anywhere are an error (:class:`~deepmetric.errors.ConfigError`, exit code 2 on the command
line) that names the valid ones; component keyword arguments are checked against the registered
constructor before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from deepmetric.errors import ConfigError

__all__ = [
    "Component",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "dumps_toml",
    "validate_components",
    "loss_constructor_args",
    "loss_training_args",
]


@dataclass(frozen=True)
class Component:
    """A registered component: its name and constructor keyword arguments."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"
    protocol: str = "closed"
    root: str = ""
    val_fraction: float = 0.1
    augment: bool = True
    image_size: int = 0
    train_classes: tuple[int, ...] = ()
    download: bool = True


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small_cnn"
    embedding_dim: int = 64
    normalize: bool = True
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-4
    loss_lr: float = 0.0  # learning rate of learnable loss parameters; 0 = same as lr
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01
    grad_clip: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    device: str = "auto"
    amp: bool = False
    num_threads: int = 0  # 0 = all cores
    num_workers: int = 0
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    max_steps_per_epoch: int = 0  # 0 = full epochs
    embed_batch_size: int = 1024
    baselines: bool = True
    plots: bool = True


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (1, 2, 4, 8)
    metric: str = "euclidean"
    clustering: bool = True
    select: str = "map@r"  # validation metric that picks the best checkpoint


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: Component = field(default_factory=lambda: Component("triplet_margin", {}))
    # fallback="easiest": a positive pair without a semi-hard negative uses its farthest negative, as
    # FaceNet's reference triplet_semihard_loss does (class-disjoint MAP@R +0.012, closed-set unchanged;
    # benchmarks/results/recipe_exploration.jsonl, labels "c1" vs the default)
    miner: Component | None = field(default_factory=lambda: Component("semi_hard", {"fallback": "easiest"}))
    sampler: Component = field(default_factory=lambda: Component("m_per_class", {"m": 32, "batch_size": 128}))
    # The default job adds a uniformity regulariser with weight 0.3 (see README and
    # benchmarks/results/train_fashion_mnist.md); replacing [loss] by another loss drops it (and the miner)
    # unless [[extra_losses]] / [miner] are given explicitly.
    extra_losses: tuple[Component, ...] = field(
        default_factory=lambda: (Component("uniformity", {"weight": 0.3}),))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
_COMPONENTS = ("loss", "miner", "sampler")
_TOP_LEVEL = ("seed", "extra_losses")
# Keys of a loss table that configure training, not the loss constructor.
LOSS_TRAINING_KEYS = ("weight", "lr")


def _valid_keys_message(section: str, valid: list[str]) -> str:
    return f"valid keys in [{section}]: {', '.join(valid)}" if section else f"valid top-level keys: {', '.join(valid)}"


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of ``default`` (int/float/bool/str/tuple)."""
    where = f"{section}.{key}" if section else key
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    return value


def _section(section: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table, got {raw!r}")
    defaults = cls()
    names = [f.name for f in fields(cls)]
    has_args = "args" in names
    plain = [n for n in names if n != "args"]
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if key in plain:
            values[key] = _coerce(section, key, value, getattr(defaults, key))
        elif has_args:
            extra[key] = value  # backbone keyword arguments, validated against the registry later
        else:
            raise ConfigError(f"unknown key {key!r} in [{section}]; {_valid_keys_message(section, plain)}")
    if has_args:
        args = dict(raw.get("args", {})) if isinstance(raw.get("args"), dict) else {}
        args.update(extra)
        values["args"] = args
    return cls(**values)


def _component(section: str, raw: Any, default: Component | None) -> Component | None:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table with a 'name' key, got {raw!r}")
    raw = dict(raw)
    name = raw.pop("name", None if default is None else default.name)
    if section == "miner" and (name is None or name in ("", "none")):
        if raw:
            raise ConfigError(f"[miner] has arguments {sorted(raw)} but no miner name")
        return None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"[{section}] needs a 'name' string")
    if default is not None and name == default.name:
        merged = dict(default.args)
        merged.update(raw)
        raw = merged
    return Component(name, raw)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a parsed TOML mapping, rejecting unknown keys."""
    base = Config()
    valid_top = list(_TOP_LEVEL) + list(_SECTIONS) + list(_COMPONENTS)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "seed":
            values["seed"] = _coerce("", "seed", value, 0)
        elif key in _SECTIONS:
            values[key] = _section(key, _SECTIONS[key], value)
        elif key in _COMPONENTS:
            values[key] = _component(key, value, getattr(base, key))
        elif key == "extra_losses":
            if not isinstance(value, list):
                raise ConfigError("extra_losses must be an array of tables: [[extra_losses]] name = ...")
            values[key] = tuple(_component("extra_losses", v, None) for v in value)
        else:
            raise ConfigError(f"unknown top-level key {key!r}; {_valid_keys_message('', valid_top)}")
    if "loss" in values and values["loss"].name != base.loss.name:
        # the default miner and extra term belong to the default loss: another loss starts without them
        if "extra_losses" not in values:
            values["extra_losses"] = ()
        if "miner" not in values:
            values["miner"] = None
    return dataclasses.replace(base, **values)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as TOML, else taken as strings)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        value = _parse_value(text.strip())
        if len(parts) == 1:
            raw[parts[0]] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"--set key must be 'section.key' or 'seed', got {key!r}")
        section, name = parts
        table = raw.setdefault(section, {})
        if isinstance(table, str):
            table = {"name": table}
            raw[section] = table
        if not isinstance(table, dict):
            raise ConfigError(f"cannot set {key!r}: [{section}] is not a table")
        if name == "name" and section in _COMPONENTS and table.get("name") not in (None, value):
            table.clear()  # switching component drops the previous component's arguments
        table[name] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain-data form (str/int/float/bool/list/dict) for TOML and checkpoints."""
    out: dict[str, Any] = {"seed": config.seed}
    for name in _SECTIONS:
        sec = getattr(config, name)
        table: dict[str, Any] = {}
        for f in fields(sec):
            value = getattr(sec, f.name)
            if f.name == "args":
                table.update(dict(value))
            else:
                table[f.name] = list(value) if isinstance(value, tuple) else value
        out[name] = table
    for name in _COMPONENTS:
        comp = getattr(config, name)
        out[name] = {"name": "none"} if comp is None else {"name": comp.name, **dict(comp.args)}
    out["extra_losses"] = [{"name": c.name, **dict(c.args)} for c in config.extra_losses]
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError(f"cannot write {value!r} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Serialise top-level scalars, tables and arrays of tables to TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items()
             if not isinstance(v, dict) and not _is_table_array(v)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append("")
            lines.append(f"[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        elif _is_table_array(value):
            for table in value:
                lines.append("")
                lines.append(f"[[{key}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def loss_constructor_args(component: Component) -> dict[str, Any]:
    """A loss component's arguments without the training keys (weight, lr)."""
    return {k: v for k, v in component.args.items() if k not in LOSS_TRAINING_KEYS}


def loss_training_args(component: Component) -> tuple[float, float | None]:
    """``(weight, lr)`` of a loss component (weight 1, lr None = optim.loss_lr or optim.lr)."""
    weight = component.args.get("weight", 1.0)
    lr = component.args.get("lr")
    for key, value in (("weight", weight), ("lr", lr)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"loss {component.name!r}: {key} must be a number, got {value!r}")
    return float(weight), (None if lr is None else float(lr))


def validate_components(config: Config) -> None:
    """Check names and keyword arguments of every component against the registries (no work done)."""
    import deepmetric.losses  # noqa: F401  (importing fills the registries)
    import deepmetric.miners  # noqa: F401
    import deepmetric.models  # noqa: F401
    import deepmetric.samplers  # noqa: F401
    from deepmetric.registry import LOSSES, MINERS, MODELS, SAMPLERS

    for comp in (config.loss, *config.extra_losses):
        LOSSES.get(comp.name)
        params = LOSSES.parameters(comp.name)
        injected = tuple(n for n in ("num_classes", "embedding_dim")
                         if n in params and params[n].default is params[n].empty)
        LOSSES.check_kwargs(comp.name, loss_constructor_args(comp), positional=injected)
        loss_training_args(comp)
    if config.miner is not None:
        MINERS.get(config.miner.name)
        MINERS.check_kwargs(config.miner.name, dict(config.miner.args))
    SAMPLERS.get(config.sampler.name)
    SAMPLERS.check_kwargs(config.sampler.name, dict(config.sampler.args), positional=("labels", "seed"))
    MODELS.get(config.model.name)
    MODELS.check_kwargs(config.model.name, dict(config.model.args), positional=("in_channels", "input_dim"))
    if config.data.protocol not in ("closed", "disjoint"):
        raise ConfigError(f"data.protocol must be 'closed' or 'disjoint', got {config.data.protocol!r}")
    if config.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {config.train.epochs}")
    if config.eval.metric not in ("euclidean", "cosine"):
        raise ConfigError(f"eval.metric must be 'euclidean' or 'cosine', got {config.eval.metric!r}")
    selectable = [f"recall@{k}" for k in config.eval.ks] + ["precision@1", "r_precision", "map@r"]
    if config.eval.clustering:
        selectable += ["nmi", "ami"]
    if config.eval.select not in selectable:
        raise ConfigError(f"eval.select {config.eval.select!r} is not a computed metric; choose one of: "
                          f"{', '.join(selectable)}")
