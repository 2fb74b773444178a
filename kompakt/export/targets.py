"""Where a TVM bundle runs: named targets, and any TVM JSON target.

A :class:`Target` says how TVM compiles for it (its JSON target) and how the compiled
library is linked: a shared library for the host, a shared library cross-linked with the
GNU aarch64 toolchain, or an archive of object files that an Android NDK links into the app.
Named targets live in one registry, filled by :func:`register`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import shutil
from pathlib import Path
from typing import Any

from kompakt.errors import KompaktError
from kompakt.registry import Registry


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    tvm: dict[str, Any]  # the TVM JSON target
    library: str = "model.so"  # file name of the compiled library in the bundle
    cross_compiler: str | None = None  # the C++ compiler that links the library; None: host's
    runs_on_host: bool = False  # the host can load and run the bundle
    runs_under_qemu: bool = False  # `qemu-aarch64` with the kompakt arm64 runner can run it
    link_note: str = ""  # how to use the library, for the bundle manifest

    def fcompile(self):
        """The ``export_library`` compile function, or ``None`` for the host's default."""
        import tvm.support.cc as cc

        if self.library.endswith(".tar"):
            return None  # export_library writes the object files into an archive
        if self.cross_compiler is None:
            return None
        if shutil.which(self.cross_compiler) is None:
            raise KompaktError(
                f"target {self.name!r} links with {self.cross_compiler}, which is not installed; "
                "install it (Debian: apt-get install g++-aarch64-linux-gnu) or run `make setup`"
            )
        return cc.cross_compiler(self.cross_compiler)


TARGETS: Registry[Target] = Registry("TVM target")


def register(target: Target) -> Target:
    return TARGETS.add(target.name, target)


_X86_FEATURES = {
    "sse4_2": "+sse4.2",
    "avx": "+avx",
    "avx2": "+avx2",
    "fma": "+fma",
    "f16c": "+f16c",
    "avx512f": "+avx512f",
    "avx512cd": "+avx512cd",
    "avx512bw": "+avx512bw",
    "avx512dq": "+avx512dq",
    "avx512vl": "+avx512vl",
}


def _host() -> Target:
    """The machine this runs on. Its vector features come from /proc/cpuinfo: LLVM's own
    CPU detection can name a newer CPU than a virtual machine exposes (AVX-512 instructions
    that then fault)."""
    target: dict[str, Any] = {"kind": "llvm"}
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        target["mattr"] = ["+neon"]
    elif machine in ("x86_64", "AMD64"):
        flags: set[str] = set()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        target["mattr"] = [f for flag, f in _X86_FEATURES.items() if flag in flags]
    return Target(
        "host",
        target,
        runs_on_host=True,
        link_note="load with kompakt.runtime.load(bundle) on this machine",
    )


register(
    Target(
        "aarch64-linux-gnu",
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        cross_compiler="aarch64-linux-gnu-g++",
        runs_under_qemu=True,
        link_note="run with the kompakt runner (kompakt/runtime/native/tvm_runner.cc) against the aarch64 "
        "libtvm_runtime.so and libtvm_ffi.so",
    )
)
register(
    Target(
        "aarch64-linux-android",
        {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
        library="model.tar",
        link_note="an archive of object files: link them into a shared library with the NDK, "
        "e.g. `$NDK/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android24-clang++ "
        "-shared -o libmodel.so *.o`, and load it with the TVM Android runtime",
    )
)


def resolve(target: str | dict[str, Any]) -> Target:
    """A named target, or a TVM JSON target (a dict, or its JSON text)."""
    if isinstance(target, str) and target == "host":
        return _host()
    if isinstance(target, str) and target in TARGETS:
        return TARGETS.get(target)
    if isinstance(target, str):
        if not target.lstrip().startswith("{"):
            raise KompaktError(
                f"unknown TVM target {target!r}; use one of host, {', '.join(TARGETS.names())}, "
                'or a TVM JSON target such as \'{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}\''
            )
        try:
            target = json.loads(target)
        except json.JSONDecodeError as e:
            raise KompaktError(f"TVM target is not valid JSON ({e}): {target!r}") from e
    if not isinstance(target, dict) or "kind" not in target:
        raise KompaktError(f"a TVM JSON target is an object with a 'kind'; got {target!r}")
    import tvm

    try:
        tvm.target.Target(target)
    except Exception as e:  # TVM raises its own error types
        raise KompaktError(f"TVM refuses the target {json.dumps(target)}: {e}") from e
    triple = target.get("mtriple", "")
    if target["kind"] == "llvm" and not triple:
        return Target("custom", target, runs_on_host=True, link_note="host shared library")
    if triple.startswith("aarch64") and "android" in triple:
        return dataclasses.replace(TARGETS.get("aarch64-linux-android"), name="custom", tvm=target)
    if triple.startswith("aarch64-linux-gnu"):
        return dataclasses.replace(TARGETS.get("aarch64-linux-gnu"), name="custom", tvm=target)
    return Target(
        "custom", target, library="model.tar", link_note="an archive of object files to link"
    )
