"""Inputs and outputs of an exported model: specs, and the checks ``run`` applies."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kompakt.errors import KompaktError


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """An input or output: its name, numpy dtype and shape (``None`` or a name for dynamic axes)."""

    name: str
    dtype: Any
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name}[{dims}]"


def checked_inputs(
    label: str, specs: list[TensorSpec], inputs: Mapping[str, Any] | Sequence[Any]
) -> dict[str, np.ndarray]:
    """``inputs`` (by name, or in order) as ``{name: array}``, after checking names, dtypes
    and fixed dimensions against ``specs``; errors name ``label``, the input and the spec."""
    if not isinstance(inputs, Mapping):
        inputs = list(inputs) if not isinstance(inputs, np.ndarray) else [inputs]
        if len(inputs) != len(specs):
            raise KompaktError(
                f"{label}: expects {len(specs)} input(s) "
                f"({'; '.join(s.describe() for s in specs)}), got {len(inputs)}"
            )
        inputs = {s.name: v for s, v in zip(specs, inputs, strict=True)}
    expected = {s.name for s in specs}
    unknown, missing = sorted(set(inputs) - expected), sorted(expected - set(inputs))
    if unknown or missing:
        raise KompaktError(
            f"{label}: input names {sorted(inputs)} do not match the model's "
            f"({'; '.join(s.describe() for s in specs)})"
        )
    feed = {}
    for spec in specs:
        value = np.asarray(inputs[spec.name])
        if value.dtype != np.dtype(spec.dtype):
            raise KompaktError(
                f"{label}: input {spec.name!r} has dtype {value.dtype}, expected "
                f"{np.dtype(spec.dtype).name} ({spec.describe()})"
            )
        fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int)]
        if value.ndim != len(spec.shape) or any(value.shape[i] != d for i, d in fixed):
            raise KompaktError(
                f"{label}: input {spec.name!r} has shape {list(value.shape)}, expected "
                f"{spec.describe()}"
            )
        feed[spec.name] = value
    return feed
