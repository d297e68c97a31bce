"""Name -> factory registries whose misses list the valid names."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "check_options"]

T = TypeVar("T")


def check_options(what: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise ValueError naming any option that `factory` does not accept (and listing those it does)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {what}; valid options: {sorted(valid)}")


class Registry(Generic[T]):
    """Maps names to factories; `get(name, **options)` builds one, with errors that name the problem."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return add

    def names(self) -> list[str]:
        return sorted(self._factories)

    def factory(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def get(self, name: str, **options: Any) -> T:
        factory = self.factory(name)
        check_options(f"{self.kind} {name!r}", factory, options)
        return factory(**options)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
