"""One registry type and the component registries of deepmetric.

A component registers itself with a decorator::

    from deepmetric.registry import LOSSES

    @LOSSES.register("triplet_margin")
    class TripletMarginLoss(nn.Module): ...

and is built from a name plus keyword arguments, which are validated against its constructor before
anything runs: an unknown keyword raises :class:`~deepmetric.errors.ConfigError` naming the valid ones.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Generic, TypeVar

from deepmetric.errors import ConfigError

__all__ = ["Registry", "LOSSES", "MINERS", "SAMPLERS", "MODELS", "DATASETS", "DISTANCES"]

T = TypeVar("T")


def _first_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """A name -> component map with constructor-argument validation."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (snake_case, unique)."""

        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            try:
                setattr(obj, "registry_name", name)
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def get(self, name: str) -> T:
        """The component registered as ``name``; an unknown name raises ConfigError naming the valid ones."""
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind} names: {', '.join(self.names())}"
            )
        return self._items[name]

    def describe(self, name: str) -> str:
        """One-line description (first docstring line)."""
        return _first_line(self.get(name))

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the component's constructor accepts."""
        obj = self.get(name)
        target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
        params = dict(inspect.signature(target).parameters)
        params.pop("self", None)
        return params

    def check_kwargs(self, name: str, kwargs: dict[str, Any], *, positional: tuple[str, ...] = ()) -> None:
        """Raise ConfigError if ``kwargs`` has a key the constructor does not accept."""
        params = self.parameters(name)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        valid = [
            k
            for k, p in params.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and k not in positional
        ]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown argument(s) {', '.join(map(repr, unknown))} for {self.kind} {name!r}; "
                f"valid arguments: {', '.join(valid) if valid else '(none)'}"
            )

    def build(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Construct the component ``name`` with validated keyword arguments."""
        obj = self.get(name)
        positional = tuple(list(self.parameters(name))[: len(args)])
        self.check_kwargs(name, kwargs, positional=positional)
        try:
            return obj(*args, **kwargs)  # type: ignore[operator]
        except TypeError as exc:
            raise ConfigError(f"cannot build {self.kind} {name!r}: {exc}") from exc


LOSSES: Registry[Any] = Registry("loss")
MINERS: Registry[Any] = Registry("miner")
SAMPLERS: Registry[Any] = Registry("sampler")
MODELS: Registry[Any] = Registry("model")
DATASETS: Registry[Any] = Registry("dataset")
DISTANCES: Registry[Any] = Registry("distance")
