"""Runtimes for exported models; imports neither torch nor ``kompakt.compress``.

``runtime.load(path)`` returns a session with ``inputs`` / ``outputs`` specs and
``run(inputs) -> {output name: array}``: onnxruntime for ``.onnx`` and ``.ort`` files.
"""

from __future__ import annotations

import os
from pathlib import Path

from kompakt.errors import KompaktError


def load(path: str | os.PathLike[str], threads: int | None = None):
    """A session for the exported model at ``path``."""
    path = Path(path)
    if path.suffix in (".onnx", ".ort"):
        from kompakt.runtime.ort import OrtSession

        return OrtSession(path, threads)
    raise KompaktError(f"{path}: not an exported model kompakt can run (.onnx or .ort)")


__all__ = ["load"]
