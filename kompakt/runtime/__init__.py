"""Runtimes for exported models; imports neither torch nor ``kompakt.compress``.

``runtime.load(path)`` returns a session with ``inputs`` / ``outputs`` specs and
``run(inputs) -> {output name: array}``: onnxruntime for ``.onnx`` and ``.ort`` files, TVM's
Relax VM for a TVM bundle directory (``manifest.json`` inside).
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
    if path.is_dir() and (path / "manifest.json").is_file():
        from kompakt.runtime.tvm import TvmSession

        return TvmSession(path, threads)
    raise KompaktError(
        f"{path}: not an exported model kompakt can run (.onnx, .ort, or a TVM bundle directory)"
    )


__all__ = ["load"]
