"""The registry of reference architectures built in code.

A factory is registered by name with :func:`register`; :func:`build` calls it and attaches
the record that lets :func:`kompakt.save` write the model and :func:`kompakt.load` rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kompakt.artifact import Record, attach_record
from kompakt.errors import KompaktError

Factory = Callable[..., nn.Module]
_FACTORIES: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Register ``factory(**kwargs) -> nn.Module`` under ``name``."""

    def add(factory: Factory) -> Factory:
        if name in _FACTORIES:
            raise ValueError(f"model {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return add


def names() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_FACTORIES)


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build registered architecture ``name`` with ``kwargs`` (fresh weights)."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise KompaktError(f"unknown model {name!r}; registered models: {', '.join(names())}")
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise KompaktError(f"model {name!r}: {e}") from e
    source = {"kind": "registry", "name": name, "kwargs": kwargs, "label": name}
    return attach_record(model, Record(source=source))
