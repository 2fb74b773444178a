"""Exporters: compressed models to ONNX and Apache TVM. Heavy imports stay inside functions.

``export.onnx(model_or_artifact, example_inputs, path)`` (see :mod:`kompakt.export.onnx`),
``export.tvm(model_or_artifact, example_inputs, out_dir, target=...)`` (:mod:`kompakt.export.tvm`).
"""

from kompakt.export.onnx import export_onnx as onnx
from kompakt.export.tvm import export_tvm as tvm

__all__ = ["onnx", "tvm"]
