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
from kompakt.registry import Registry

Factory = Callable[..., nn.Module]
MODELS: Registry[Factory] = Registry("model")


def register(name: str) -> Callable[[Factory], Factory]:
    """Register ``factory(**kwargs) -> nn.Module`` under ``name``."""
    return MODELS.register(name)


def names() -> list[str]:
    """Names of the registered architectures."""
    return MODELS.names()


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build registered architecture ``name`` with ``kwargs`` (fresh weights)."""
    factory = MODELS.get(name)
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise KompaktError(f"model {name!r}: {e}") from e
    source = {"kind": "registry", "name": name, "kwargs": kwargs, "label": name}
    return attach_record(model, Record(source=source))
