"""Runtimes for exported models; imports neither torch nor ``kompakt.compress``.

``runtime.load(path)`` returns a session with ``inputs`` / ``outputs`` specs and
``run(inputs) -> {output name: array}``: onnxruntime for ``.onnx`` and ``.ort`` files, TVM's
Relax VM for a TVM bundle directory (``manifest.json`` inside). Each runtime is registered
by the name of the export target whose output it runs (``RUNTIMES``, beside ``EXPORTERS``);
its session class is imported only when a path is its kind, so that importing this package
imports neither onnxruntime nor TVM.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path

from kompakt.errors import KompaktError
from kompakt.registry import Registry


@dataclasses.dataclass(frozen=True)
class Runtime:
    runs: Callable[[Path], bool]  # whether a path is what this runtime loads (cheap)
    session: str  # "module:Class" of the session, called as Class(path, threads)
    what: str  # what it runs, for errors


RUNTIMES: Registry[Runtime] = Registry("runtime")
RUNTIMES.add(
    "onnx",
    Runtime(
        lambda p: p.suffix in (".onnx", ".ort"),
        "kompakt.runtime.ort:OrtSession",
        ".onnx or .ort files (onnxruntime)",
    ),
)
RUNTIMES.add(
    "tvm",
    Runtime(
        lambda p: p.is_dir() and (p / "manifest.json").is_file(),
        "kompakt.runtime.tvm:TvmSession",
        "TVM bundle directories (holding manifest.json)",
    ),
)


def load(path: str | os.PathLike[str], threads: int | None = None):
    """A session for the exported model at ``path``, from the first runtime that runs it."""
    path = Path(path)
    for _, runtime in RUNTIMES.items():
        if runtime.runs(path):
            module, _, cls = runtime.session.partition(":")
            return getattr(importlib.import_module(module), cls)(path, threads)
    kinds = "; ".join(r.what for _, r in RUNTIMES.items())
    raise KompaktError(f"{path}: not an exported model kompakt can run ({kinds})")


__all__ = ["RUNTIMES", "Runtime", "load"]
