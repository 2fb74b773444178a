"""Run an exported ONNX (or ORT-format) model in onnxruntime, with checked inputs.

Imports neither torch nor ``kompakt.compress``. A model whose metadata says so (a model with
Codebook layers, see :mod:`kompakt.export.onnx`) runs with onnxruntime's ConstantFolding
disabled, so its packed codes are decoded per run instead of being expanded to dense float
weights when the session is created.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kompakt.errors import KompaktError

NO_FOLDING_KEY = "kompakt.disable_constant_folding"
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """An input or output: its name, numpy dtype and shape (``None`` or a name for dynamic axes)."""

    name: str
    dtype: Any
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name}[{dims}]"


def _spec(arg) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise KompaktError(
            f"model input/output {arg.name!r} has type {arg.type}, which kompakt does not run"
        )
    return TensorSpec(arg.name, dtype, tuple(arg.shape))


def _needs_no_folding(path: Path) -> bool:
    if path.suffix == ".ort":  # saved already optimised, with the optimizers the export chose
        return False
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(p.key == NO_FOLDING_KEY and p.value == "1" for p in proto.metadata_props)


def create_session(
    path: Path, no_folding: bool, threads: int | None = None, save_ort: Path | None = None
):
    """An onnxruntime CPU session. ``no_folding`` (models with Codebook layers): ConstantFolding
    off, so packed codes are not expanded to dense weights, and no memory arena, so decoded
    weights are returned to the system at once (SmolLM2 JLCM, one run: peak RSS 1226 -> 698 MB).
    ``save_ort``: also write the model, after basic optimizations, in ORT format there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if no_folding:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    if save_ort is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(save_ort)
        options.add_session_config_entry("session.save_model_format", "ORT")
    disabled = ["ConstantFolding"] if no_folding else []
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


class OrtSession:
    """An onnxruntime session with input checks; ``run`` returns ``{output name: array}``."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:

        self.path = Path(path)
        if not self.path.is_file():
            raise KompaktError(f"{self.path}: no such model file")
        self.no_folding = _needs_no_folding(self.path)
        try:
            self._session = create_session(self.path, self.no_folding, threads)
        except Exception as e:  # onnxruntime raises its own error types
            raise KompaktError(
                f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0]})"
            ) from e
        self.inputs = [_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_spec(a) for a in self._session.get_outputs()]

    def _check(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
        if not isinstance(inputs, Mapping):
            inputs = list(inputs) if not isinstance(inputs, np.ndarray) else [inputs]
            if len(inputs) != len(self.inputs):
                raise KompaktError(
                    f"{self.path.name}: expects {len(self.inputs)} input(s) "
                    f"({'; '.join(s.describe() for s in self.inputs)}), got {len(inputs)}"
                )
            inputs = {s.name: v for s, v in zip(self.inputs, inputs, strict=True)}
        expected = {s.name for s in self.inputs}
        unknown, missing = sorted(set(inputs) - expected), sorted(expected - set(inputs))
        if unknown or missing:
            raise KompaktError(
                f"{self.path.name}: input names {sorted(inputs)} do not match the model's "
                f"({'; '.join(s.describe() for s in self.inputs)})"
            )
        feed = {}
        for spec in self.inputs:
            value = np.asarray(inputs[spec.name])
            if value.dtype != np.dtype(spec.dtype):
                raise KompaktError(
                    f"{self.path.name}: input {spec.name!r} has dtype {value.dtype}, expected "
                    f"{np.dtype(spec.dtype).name} ({spec.describe()})"
                )
            fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int)]
            if value.ndim != len(spec.shape) or any(value.shape[i] != d for i, d in fixed):
                raise KompaktError(
                    f"{self.path.name}: input {spec.name!r} has shape {list(value.shape)}, expected "
                    f"{spec.describe()}"
                )
            feed[spec.name] = value
        return feed

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
        feed = self._check(inputs)
        values = self._session.run(None, feed)
        return {s.name: v for s, v in zip(self.outputs, values, strict=True)}
