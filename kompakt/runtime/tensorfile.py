"""KTNS: a plain tensor file that the C++ runner of a TVM bundle reads and writes.

Little endian: ``KTNS``, uint32 version (1), uint32 count, then per tensor uint32 name length,
name (utf-8), uint32 dtype length, dtype string, uint32 ndim, int64 shape[ndim], uint64 nbytes
and nbytes of C-contiguous data, with no padding. Numpy only.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kompakt.errors import KompaktError

MAGIC = b"KTNS"
VERSION = 1
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` to ``path`` in order, atomically (a temp file, then a rename)."""
    path = Path(path)
    parts = [MAGIC, struct.pack("<II", VERSION, len(tensors))]
    for name, value in tensors.items():
        array = np.asarray(value)
        dtype = array.dtype.name
        if dtype not in DTYPES:
            raise KompaktError(
                f"{path}: tensor {name!r} has dtype {dtype}; KTNS stores {', '.join(DTYPES)}"
            )
        data = (
            np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        )
        name_b, dtype_b = name.encode(), dtype.encode()
        parts += [struct.pack("<I", len(name_b)), name_b, struct.pack("<I", len(dtype_b)), dtype_b]
        parts += [struct.pack(f"<I{array.ndim}q", array.ndim, *array.shape)]
        parts += [struct.pack("<Q", len(data)), data]
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(b"".join(parts))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_tensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors in the KTNS file at ``path``, in file order."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise KompaktError(f"{path}: cannot read tensor file ({e.strerror})") from None
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise KompaktError(
                f"{path}: truncated KTNS file (needs {pos + n} bytes, has {len(buf)})"
            )
        pos += n
        return buf[pos - n : pos]

    def unpack(fmt: str):
        return struct.unpack(fmt, take(struct.calcsize(fmt)))

    if take(4) != MAGIC:
        raise KompaktError(f"{path}: not a KTNS tensor file (bad magic)")
    version, count = unpack("<II")
    if version != VERSION:
        raise KompaktError(f"{path}: KTNS version {version}, this kompakt reads version {VERSION}")
    out: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = take(unpack("<I")[0]).decode(errors="replace")
        dtype = take(unpack("<I")[0]).decode(errors="replace")
        if dtype not in DTYPES:
            raise KompaktError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        (ndim,) = unpack("<I")
        shape = unpack(f"<{ndim}q")
        (nbytes,) = unpack("<Q")
        want = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        if nbytes != want:
            raise KompaktError(
                f"{path}: tensor {name!r} has {nbytes} bytes, {dtype}{list(shape)} needs {want}"
            )
        data = np.frombuffer(take(nbytes), dtype=np.dtype(dtype).newbyteorder("<"))
        out[name] = data.astype(dtype).reshape(shape)
    if pos != len(buf):
        raise KompaktError(f"{path}: {len(buf) - pos} stray bytes after the last tensor")
    return out
