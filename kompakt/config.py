"""Building frozen config dataclasses from user mappings (recipes, CLI), with clear errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from kompakt.errors import KompaktError

C = TypeVar("C")


def from_mapping(cls: type[C], values: Mapping[str, Any] | None, where: str) -> C:
    """Build config dataclass ``cls`` from ``values``; unknown or ill-typed fields name ``where``."""
    values = dict(values or {})
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KompaktError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(known)}"
        )
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise KompaktError(f"{where}: {e}") from e


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``; for ``__post_init__`` validation."""
    if not condition:
        raise ValueError(message)


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (for the artifact's step list)."""
    return dataclasses.asdict(config)
