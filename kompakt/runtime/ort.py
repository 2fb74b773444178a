"""Run an exported ONNX (or ORT-format) model in onnxruntime, with checked inputs.

Imports neither torch nor ``kompakt.compress``. A model whose metadata says so (a model with
Codebook layers, see :mod:`kompakt.export.onnx`) runs with onnxruntime's ConstantFolding
disabled, so its packed codes are decoded per run instead of being expanded to dense float
weights when the session is created.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kompakt.errors import KompaktError
from kompakt.runtime.specs import TensorSpec, checked_inputs

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


def _spec(arg) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise KompaktError(
            f"model input/output {arg.name!r} has type {arg.type}, which kompakt does not run"
        )
    return TensorSpec(arg.name, dtype, tuple(arg.shape))


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def model_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read from its top-level protobuf fields
    without parsing the graph (``onnx.load`` would hold a second copy of every weight)."""
    entries: dict[str, str] = {}
    if path.stat().st_size == 0:
        raise KompaktError(f"{path}: empty file, not an ONNX model")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0
        try:
            while pos < len(buf):
                tag, pos = _varint(buf, pos)
                wire = tag & 7
                if wire == 0:
                    _, pos = _varint(buf, pos)
                    continue
                if wire != 2:  # ModelProto has no fixed-width top-level fields
                    raise ValueError(f"wire type {wire}")
                size, pos = _varint(buf, pos)
                if tag >> 3 == 14:  # metadata_props: StringStringEntryProto {1: key, 2: value}
                    entry, at, fields = bytes(buf[pos : pos + size]), 0, {}
                    while at < size:
                        field, at = _varint(entry, at)
                        length, at = _varint(entry, at)
                        fields[field >> 3] = entry[at : at + length].decode()
                        at += length
                    entries[fields.get(1, "")] = fields.get(2, "")
                pos += size
        except (IndexError, ValueError, UnicodeDecodeError) as e:
            raise KompaktError(f"{path}: not a readable ONNX model ({e})") from e
    return entries


def _needs_no_folding(path: Path) -> bool:
    if path.suffix == ".ort":  # saved already optimised, with the optimizers the export chose
        return False
    return model_metadata(path).get(NO_FOLDING_KEY) == "1"


def create_session(
    path: Path, no_folding: bool, threads: int | None = None, save_optimized: Path | None = None
):
    """An onnxruntime CPU session. ``no_folding`` (models with Codebook layers): ConstantFolding
    off, so packed codes are not expanded to dense weights, and no memory pattern (planned
    for the largest shapes); the memory arena stays, reusing each decode's buffers for the
    next (without it the C allocator keeps freed decode buffers: about twice the peak for
    SmolLM2 JLCM 3-bit at batch 1 x 128 tokens).
    ``save_optimized``: also write the model there after onnxruntime's basic (hardware
    independent, standard-op) optimizations, in ORT format for a ``.ort`` suffix."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if no_folding:
        options.enable_mem_pattern = False
    if save_optimized is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(save_optimized)
        if save_optimized.suffix == ".ort":
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

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
        feed = checked_inputs(self.path.name, self.inputs, inputs)
        values = self._session.run(None, feed)
        return {s.name: v for s, v in zip(self.outputs, values, strict=True)}
