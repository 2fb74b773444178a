"""Run a TVM bundle with the C++ runner: on arm64 (qemu on x86 hosts), or natively on the host.

A bundle (written by :mod:`kompakt.export.tvm`) holds ``model.so``, a Relax executable
cross-compiled for aarch64, and ``params.ktns``, its parameters. ``run_bundle`` runs it with
``native/tvm_runner.cc`` (``kompakt-tvm-runner``), linked against ``libtvm_runtime.so`` and
``libtvm_ffi.so`` taken from the aarch64 wheels of the TVM versions installed here; on an x86
host it runs under ``qemu-aarch64`` (Debian ``qemu-user``), so its timings are emulated.
``arch="host"`` builds the same runner with the host's ``g++`` against the TVM runtime of the
installed wheels: a process with the TVM runtime alone, whose peak memory and latency are
those of the bundle rather than of Python and TVM's compiler (used by the benchmarks).

The runtime lives in ``$KOMPAKT_TVM_AARCH64`` or ``<venv>/share/kompakt/tvm-aarch64``;
``make setup`` fetches it with ``python -m kompakt.runtime.runner fetch``. Imports no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kompakt.errors import KompaktError
from kompakt.runtime.tensorfile import read_tensors, write_tensors

CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
RUNNER_SOURCE = Path(__file__).with_name("native") / "tvm_runner.cc"
# distribution -> the library taken from its aarch64 wheel
WHEEL_LIBS = {
    "apache-tvm": "tvm/lib/libtvm_runtime.so",
    "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so",
}
INSTALL_HINT = "apt-get install g++-aarch64-linux-gnu qemu-user"


def _versions() -> dict[str, str]:
    return {dist: importlib.metadata.version(dist) for dist in WHEEL_LIBS}


def runtime_dir() -> Path:
    """Where the aarch64 TVM runtime libraries live (``$KOMPAKT_TVM_AARCH64`` overrides)."""
    env = os.environ.get("KOMPAKT_TVM_AARCH64")
    return Path(env) if env else Path(sys.prefix) / "share" / "kompakt" / "tvm-aarch64"


def fetch_runtime(dest: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Download the aarch64 wheels of the installed TVM versions and keep their runtime libraries.

    Skipped when ``dest`` already holds them for these versions. Atomic: the libraries are
    gathered in a temp folder beside ``dest`` that then replaces it.
    """
    dest = Path(dest) if dest else runtime_dir()
    versions = _versions()
    stamp = dest / "versions.json"
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == versions:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        wheels = tmp / "wheels"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        cmd += ["--platform", "manylinux_2_28_aarch64", "-d", str(wheels)]
        cmd += [f"{dist}=={version}" for dist, version in versions.items()]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise KompaktError(
                f"pip download of the aarch64 TVM wheels failed: {_tail(done.stderr)}"
            )
        for dist, member in WHEEL_LIBS.items():
            prefix = dist.replace("-", "_") + "-"
            wheel = next((w for w in wheels.glob("*.whl") if w.name.startswith(prefix)), None)
            if wheel is None:
                raise KompaktError(f"pip download brought no aarch64 wheel of {dist}")
            with zipfile.ZipFile(wheel) as z:
                (tmp / Path(member).name).write_bytes(z.read(member))
        shutil.rmtree(wheels)
        (tmp / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
        tmp.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _libs() -> Path:
    lib = runtime_dir()
    stamp = lib / "versions.json"
    found = json.loads(stamp.read_text()) if stamp.is_file() else None
    if found != _versions():
        what = f"the runtime of {found}" if found else "no aarch64 TVM runtime"
        raise KompaktError(
            f"{lib}: {what}, this Python has {_versions()}; run `make setup` or `python -m kompakt.runtime.runner fetch`"
        )
    return lib


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise KompaktError(f"{name} is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0])


def _toolchain(arch: str) -> tuple[str, list[Path], Path]:
    """(C++ compiler, library folders to link and run against, folder for built runners)."""
    if arch == "aarch64":
        lib = _libs()
        return CXX, [lib], lib / "bin"
    if arch == "host":
        libs = [_package_dir("tvm") / "lib", _package_dir("tvm_ffi") / "lib"]
        return "g++", libs, Path(sys.prefix) / "share" / "kompakt" / "tvm-host-runner"
    raise KompaktError(f"runner arch {arch!r}: use 'aarch64' or 'host'")


def build_runner(out_dir: str | os.PathLike[str] | None = None, arch: str = "aarch64") -> Path:
    """The compiled ``kompakt-tvm-runner`` for ``arch``, rebuilt when its source or the TVM
    versions change."""
    cxx, libs, default_dir = _toolchain(arch)
    if shutil.which(cxx) is None:
        raise KompaktError(f"{cxx} not found: {INSTALL_HINT}")
    include = _package_dir("tvm_ffi") / "include"
    source = RUNNER_SOURCE.read_bytes()
    key = hashlib.sha256(source + json.dumps(_versions()).encode()).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir else default_dir
    binary = out_dir / f"kompakt-tvm-runner-{key}"
    if binary.is_file():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{binary.name}.{os.getpid()}.tmp"
    cmd = [cxx, "-O2", "-std=c++17", f"-I{include}", str(RUNNER_SOURCE), "-o", str(tmp)]
    cmd += [f"-L{lib}" for lib in libs] + ["-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KompaktError(f"{RUNNER_SOURCE}: compiling the runner failed: {_tail(done.stderr)}")
    os.replace(tmp, binary)
    for stale in out_dir.glob("kompakt-tvm-runner-*"):
        if stale != binary:
            stale.unlink(missing_ok=True)
    return binary


def missing() -> str | None:
    """Why aarch64 bundles cannot run here (a missing tool or runtime), or ``None``."""
    if shutil.which(CXX) is None:
        return f"{CXX} not found: {INSTALL_HINT}"
    if platform.machine() not in ("aarch64", "arm64") and shutil.which(QEMU) is None:
        return f"{QEMU} not found: {INSTALL_HINT}"
    try:
        _libs()
    except KompaktError as e:
        return str(e)
    return None


def run_bundle(
    bundle_dir: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    repeat: int = 1,
    timeout: float | None = None,
    arch: str = "aarch64",
    threads: int | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Run the bundle's ``main`` on ``inputs`` (in its input order), ``repeat`` times, in a
    fresh runner process for ``arch`` (``aarch64``: under qemu on other hosts; ``host``).

    Returns the outputs of the last run (named as in the bundle's manifest, else
    ``output_0``, ...) and ``{"median_ms", "runs", "threads", "peak_rss_bytes", "ms",
    "emulated"}`` (``ms``: each run's time, in order); under qemu the times are not the
    device's. ``threads``: the TVM runtime's worker threads (default: ``TVM_NUM_THREADS``,
    else one per core the runner may use).
    """
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "model.so").is_file():
        raise KompaktError(f"{bundle_dir}: not a TVM bundle (no model.so)")
    runner = build_runner(arch=arch)
    _, libs, _ = _toolchain(arch)
    path = os.pathsep.join(str(lib) for lib in libs)
    native = arch == "host" or platform.machine() in ("aarch64", "arm64")
    settings = {"LD_LIBRARY_PATH": path, **({"TVM_NUM_THREADS": str(threads)} if threads else {})}
    if native:
        cmd, env = [str(runner)], {**os.environ, **settings}
    else:
        if shutil.which(QEMU) is None:
            raise KompaktError(f"{QEMU} not found: {INSTALL_HINT}")
        exported = [a for k, v in settings.items() for a in ("-E", f"{k}={v}")]
        cmd, env = [QEMU, "-L", SYSROOT, *exported, str(runner)], None
    with tempfile.TemporaryDirectory(prefix="kompakt-runner-") as tmp:
        write_tensors(Path(tmp) / "inputs.ktns", inputs)
        cmd += [
            str(bundle_dir),
            f"{tmp}/inputs.ktns",
            f"{tmp}/outputs.ktns",
            "--repeat",
            str(repeat),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KompaktError(f"{bundle_dir}: the TVM runner took more than {timeout} s") from None
        if done.returncode != 0:
            raise KompaktError(
                f"{bundle_dir}: the TVM runner failed (exit {done.returncode}): {_tail(done.stderr)}"
            )
        outputs = read_tensors(Path(tmp) / "outputs.ktns")
    manifest = bundle_dir / "manifest.json"
    if manifest.is_file():
        names = [o["name"] for o in json.loads(manifest.read_text()).get("outputs", [])]
        if len(names) == len(outputs):
            outputs = dict(zip(names, outputs.values(), strict=True))
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    return outputs, {**timing, "emulated": not native}


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kompakt.runtime.runner")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download the aarch64 TVM runtime libraries")
    fetch.add_argument("--dest", help=f"folder (default: {runtime_dir()})")
    fetch.add_argument("--force", action="store_true", help="download again")
    args = parser.parse_args(argv)
    try:
        print(fetch_runtime(args.dest, force=args.force))
    except KompaktError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
