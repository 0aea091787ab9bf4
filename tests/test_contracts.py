"""Contract suite: every registered loss (and every miner feeding every tuple loss) gets these for free.

Losses are built generically from their constructor signature: ``num_classes`` / ``embedding_dim``
and a few other well-known required arguments are filled in (see ``_FILL``); anything a loss needs
beyond that goes in ``_OVERRIDES`` (keyed by registry name). Each check builds a fresh instance
(seeded), so stateful losses (memory queues, center updates) start from the same state every call.
"""
from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
from typing import Any, Callable

import pytest
import torch

import deepmetric.losses as losses_pkg
from deepmetric.errors import ConfigError
from deepmetric.losses import build, names
from deepmetric.registry import LOSSES

P, K, D = 4, 3, 8  # classes, samples per class, embedding dimension
B = P * K
NUM_CLASSES = B  # large enough for the "all labels distinct" batch


def _contrastive() -> Any:
    return build("contrastive")


# Values for well-known required constructor arguments, by parameter name.
_FILL: dict[str, Callable[[], Any]] = {
    "num_classes": lambda: NUM_CLASSES,
    "embedding_dim": lambda: D,
    "loss": _contrastive,
    "memory_size": lambda: 64,
}

# Per-loss constructors for what generic filling cannot express.
_OVERRIDES: dict[str, Callable[[], Any]] = {
    "cross_batch_memory": lambda: build("cross_batch_memory", loss=_contrastive(), memory_size=64, embedding_dim=D),
}


def _make(name: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(1234)
    if name in _OVERRIDES:
        module = _OVERRIDES[name]()
    else:
        kwargs: dict[str, Any] = {}
        for pname, param in LOSSES.parameters(name).items():
            if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue
            if pname in _FILL:
                kwargs[pname] = _FILL[pname]()
            elif param.default is inspect.Parameter.empty:
                pytest.fail(f"loss {name!r}: cannot fill required argument {pname!r}; add it to _OVERRIDES")
        module = build(name, **kwargs)
    return module.to(dtype)


def _is_continuous(name: str) -> bool:
    return getattr(LOSSES.get(name), "label_kind", "class") == "continuous"


def _tuple_kind(name: str) -> str | None:
    return getattr(LOSSES.get(name), "tuple_kind", None)


def _batch(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    if _is_continuous(name):
        y = torch.rand(B, generator=g, dtype=dtype)
    else:
        y = torch.arange(P).repeat_interleave(K)[torch.randperm(B, generator=g)]
    return x, y


def _call(name: str, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.nn.Module]:
    loss = _make(name, dtype)
    torch.manual_seed(99)  # losses that sample inside forward see the same randomness
    return loss(x, y), loss


def _has_parameters(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


LOSS_NAMES = names()


def test_registry_is_not_empty():
    assert {"contrastive", "triplet_margin", "multi_similarity"} <= set(LOSS_NAMES)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_class_attributes(name):
    cls = LOSSES.get(name)
    assert getattr(cls, "tuple_kind", "missing") in ("pairs", "triplets", None)
    assert getattr(cls, "label_kind", "missing") in ("class", "continuous", "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_finite_scalar_gradients_and_dtype(name, dtype):
    x, y = _batch(name, dtype)
    x.requires_grad_()
    out, loss = _call(name, x, y, dtype)
    assert out.dim() == 0, f"{name} returned shape {tuple(out.shape)}"
    assert out.dtype == dtype
    assert torch.isfinite(out)
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in loss.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: parameter {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has non-finite gradient"


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_permutation_invariance(name):
    x, y = _batch(name)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(5))
    a, _ = _call(name, x, y)
    b, _ = _call(name, x[perm], y[perm])
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-8), (float(a), float(b))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_relabelling_invariance(name):
    if _is_continuous(name):
        pytest.skip("continuous labels: relabelling classes does not apply")
    probe = _make(name)
    if _has_parameters(probe):
        pytest.skip("learnable per-class parameters: a relabelling changes which parameter a class uses")
    x, y = _batch(name)
    relabel = torch.tensor([7, 2, 10, 0])  # bijection on the P classes, non-contiguous values
    a, _ = _call(name, x, y)
    b, _ = _call(name, x, relabel[y])
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-8), (float(a), float(b))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_no_positive_pair(name):
    if _is_continuous(name):
        pytest.skip("continuous labels: no notion of positive pairs")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.arange(B)  # every label distinct
    out, _ = _call(name, x, y)
    assert torch.isfinite(out)
    if _tuple_kind(name) is not None:
        assert float(out.detach()) == 0.0, f"{name}: a batch without positive pairs should give 0"
    out.backward()  # the graph is connected
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_docstring(name):
    doc = inspect.getdoc(LOSSES.get(name)) or ""
    assert "$$" in doc, f"{name}: the docstring needs the formula inside $$ … $$"
    assert re.search(r"\b(19|20)\d\d\b", doc), f"{name}: the docstring needs a reference with its year"
    for section in ("Args:", "Shape:", "Requirements:", "Example:"):
        assert section in doc or (section == "Args:" and not LOSSES.parameters(name)), f"{name}: missing {section}"


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_unknown_kwarg_is_config_error(name):
    with pytest.raises(ConfigError):
        build(name, definitely_not_an_argument=1)


# ------------------------------------------------------------------------------------------------
# every registered miner into every tuple loss
# ------------------------------------------------------------------------------------------------
def _miner_names() -> list[str]:
    import deepmetric.miners as miners_pkg

    return miners_pkg.names()


MINER_NAMES = _miner_names()
TUPLE_LOSSES = [n for n in LOSS_NAMES if _tuple_kind(n) is not None and not _is_continuous(n)]
_PAIRS = [pytest.param(m, l, id=f"{m}->{l}") for m in MINER_NAMES for l in TUPLE_LOSSES] or [
    pytest.param(None, None, marks=pytest.mark.skip(reason="no miners registered yet"))
]


@pytest.mark.parametrize("miner_name,loss_name", _PAIRS)
def test_miner_output_accepted(miner_name, loss_name):
    import deepmetric.miners as miners_pkg

    x, y = _batch(loss_name)
    x = torch.nn.functional.normalize(x, dim=1).requires_grad_()
    torch.manual_seed(7)
    miner = miners_pkg.build(miner_name)
    indices = miner(x.detach(), y)
    assert isinstance(indices, tuple) and len(indices) in (3, 4)
    loss = _make(loss_name)
    out = loss(x, y, indices)
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------
# doctests of every loss module
# ------------------------------------------------------------------------------------------------
LOSS_MODULES = sorted(m.name for m in pkgutil.iter_modules(losses_pkg.__path__) if not m.name.startswith("_"))


@pytest.mark.parametrize("module_name", LOSS_MODULES)
def test_doctests(module_name):
    module = importlib.import_module(f"deepmetric.losses.{module_name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {module_name}"
    registered = [obj for _, obj in LOSSES.items() if getattr(obj, "__module__", "") == module.__name__]
    if registered:
        assert result.attempted > 0, f"{module_name}: the loss docstring needs a runnable Example"
