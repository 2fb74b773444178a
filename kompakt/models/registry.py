"""The registry of reference architectures built in code.

A factory is registered by name with :func:`register`; :func:`build` calls it and attaches
the record that lets :func:`kompakt.save` write the model and :func:`kompakt.load` rebuild it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from kompakt.artifact import Record, attach_record
from kompakt.errors import KompaktError
from kompakt.registry import Registry

Factory = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class Entry:
    factory: Factory
    inputs: tuple[dict[str, Any], ...]  # what the architecture takes (artifact.input_specs)


MODELS: Registry[Entry] = Registry("model")


def register(name: str, inputs: Sequence[dict[str, Any]] = ()) -> Callable[[Factory], Factory]:
    """Register ``factory(**kwargs) -> nn.Module`` under ``name``; ``inputs`` describes what
    the models it builds take (name, dtype, shape with ``None`` for the batch axis)."""

    def add(factory: Factory) -> Factory:
        MODELS.add(name, Entry(factory, tuple(inputs)))
        return factory

    return add


def names() -> list[str]:
    """Names of the registered architectures."""
    return MODELS.names()


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build registered architecture ``name`` with ``kwargs`` (fresh weights)."""
    entry = MODELS.get(name)
    try:
        model = entry.factory(**kwargs)
    except TypeError as e:
        raise KompaktError(f"model {name!r}: {e}") from e
    source = {"kind": "registry", "name": name, "kwargs": kwargs, "label": name}
    inputs = [dict(spec) for spec in entry.inputs]
    return attach_record(model, Record(source=source, inputs=inputs))
