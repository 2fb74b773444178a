"""Exporters: compressed models to ONNX and Apache TVM. Heavy imports stay inside functions.

``export.onnx(model_or_artifact, example_inputs, path)`` (see :mod:`kompakt.export.onnx`),
``export.tvm(model_or_artifact, example_inputs, out_dir, target=...)`` (:mod:`kompakt.export.tvm`).
Both are registered by name in ``EXPORTERS`` (:mod:`kompakt.export.base`), whose preamble,
validation and atomic write they share.
"""

from kompakt.export.base import EXPORTERS
from kompakt.export.onnx import export_onnx as onnx
from kompakt.export.tvm import export_tvm as tvm

__all__ = ["EXPORTERS", "onnx", "tvm"]
