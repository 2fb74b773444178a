"""Exporters: compressed models to ONNX and Apache TVM. Heavy imports stay inside functions."""
