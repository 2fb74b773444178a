"""The helper every extension point's registry is made of: names mapped to things, filled
by the module that defines each thing (``@REGISTRY.register(name)``), with one error for a
name registered twice and one for a name nobody registered. Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kompakt.errors import KompaktError

T = TypeVar("T")


class Registry(Generic[T]):
    """Things of one kind by name. ``what`` names the kind in errors ("exporter", "model")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator: ``@REGISTRY.register("name")`` over the thing."""
        return lambda item: self.add(name, item)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KompaktError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def items(self) -> Iterator[tuple[str, T]]:
        """In registration order."""
        return iter(list(self._items.items()))
