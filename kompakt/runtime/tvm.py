"""Run a TVM bundle (written by :mod:`kompakt.export.tvm`) on the host with TVM's Relax VM.

Imports neither torch nor ``kompakt.compress``. The bundle's parameters are read once from
``params.ktns`` and passed to ``main`` after the inputs on every run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kompakt.errors import KompaktError
from kompakt.runtime.specs import TensorSpec, checked_inputs
from kompakt.runtime.tensorfile import read_tensors

BUNDLE_FORMAT = "kompakt-tvm-bundle"
MANIFEST = "manifest.json"
PARAMS = "params.ktns"


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    if not path.is_file():
        raise KompaktError(f"{bundle}: not a TVM bundle (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KompaktError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != 1:
        raise KompaktError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this kompakt reads {BUNDLE_FORMAT!r} version 1"
        )
    return manifest


def host_manifest(bundle: Path) -> dict[str, Any]:
    """The manifest of a bundle built for this host; a clear error for any other."""
    manifest = read_manifest(bundle)
    if not manifest["target"]["tvm"].get("kind") == "llvm" or manifest["library"] != "model.so":
        raise KompaktError(
            f"{bundle}: a {manifest['target']['name']} bundle; this host cannot load it"
        )
    triple = manifest["target"]["tvm"].get("mtriple", "")
    if triple and not triple.startswith(os.uname().machine):
        raise KompaktError(
            f"{bundle}: built for {triple}; run it on that machine "
            "(aarch64: kompakt.runtime.runner.run_bundle runs it under qemu)"
        )
    return manifest


def input_specs(manifest: dict[str, Any]) -> list[TensorSpec]:
    return [
        TensorSpec(i["name"], np.dtype(i["dtype"]), tuple(i["shape"])) for i in manifest["inputs"]
    ]


def usable_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class TvmSession:
    """A bundle loaded into a Relax VM; ``run`` returns ``{output name: array}``.

    ``threads``: TVM's worker threads, else ``TVM_NUM_THREADS``, else one per core this
    process may run on (TVM's own default halves the core count on x86). TVM starts its
    thread pool once per process: the first session to run sets it for all."""

    def __init__(self, bundle: str | os.PathLike[str], threads: int | None = None) -> None:
        import tvm
        from tvm import relax

        self.path = Path(bundle)
        manifest = host_manifest(self.path)
        if threads:
            os.environ["TVM_NUM_THREADS"] = str(threads)
        else:
            os.environ.setdefault("TVM_NUM_THREADS", str(usable_cores()))
        library = tvm.runtime.load_module(str(self.path / manifest["library"]))
        self._device = tvm.cpu()
        self._vm = relax.VirtualMachine(library, self._device)
        self._params = [
            tvm.runtime.tensor(a, self._device) for a in read_tensors(self.path / PARAMS).values()
        ]
        self.inputs = input_specs(manifest)
        self.outputs = [
            TensorSpec(o["name"], np.dtype(o["dtype"]), ()) for o in manifest["outputs"]
        ]
        self.manifest = manifest

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
        import tvm

        feed = checked_inputs(self.path.name, self.inputs, inputs)
        args = [
            tvm.runtime.tensor(np.ascontiguousarray(feed[s.name]), self._device)
            for s in self.inputs
        ]
        result = self._vm["main"](*args, *self._params)
        values = [result] if hasattr(result, "numpy") else list(result)
        return {s.name: v.numpy() for s, v in zip(self.outputs, values, strict=True)}
