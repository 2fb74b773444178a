"""Exporters: compressed models to ONNX and Apache TVM. Heavy imports stay inside functions.

``export.onnx(model_or_artifact, example_inputs, path)`` (see :mod:`kompakt.export.onnx`).
"""

from kompakt.export.onnx import export_onnx as onnx

__all__ = ["onnx"]
