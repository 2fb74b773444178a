"""KTNS tensor files: exact round trips for every dtype and clear errors on bad files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kompakt.errors import KompaktError
from kompakt.runtime.tensorfile import DTYPES, read_tensors, write_tensors


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for dtype in DTYPES:
        base = rng.standard_normal((3, 4, 5)) * 50
        out[f"{dtype}/3d"] = base.astype(dtype)
        out[f"{dtype}/scalar"] = np.array(7, dtype=dtype)
        out[f"{dtype}/empty"] = np.zeros((2, 0, 3), dtype=dtype)
    out["strided"] = np.arange(12, dtype=np.int64).reshape(3, 4).T  # not C-contiguous
    out["ünïcode name"] = np.array([True, False])
    return out


def test_round_trip_every_dtype(tmp_path):
    tensors = _tensors()
    write_tensors(tmp_path / "t.ktns", tensors)
    back = read_tensors(tmp_path / "t.ktns")
    assert list(back) == list(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert np.array_equal(back[name], value), name
    assert [p.name for p in tmp_path.iterdir()] == ["t.ktns"]  # no temp file left
    write_tensors(tmp_path / "none.ktns", {})
    assert read_tensors(tmp_path / "none.ktns") == {}


def test_bad_files_give_clear_errors(tmp_path):
    path = tmp_path / "t.ktns"
    write_tensors(path, {"x": np.ones((4, 4), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(KompaktError, match=r"t\.ktns: truncated KTNS file"):
        read_tensors(path)
    path.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(KompaktError, match="bad magic"):
        read_tensors(path)
    path.write_bytes(data[:4] + struct.pack("<I", 2) + data[8:])
    with pytest.raises(KompaktError, match="KTNS version 2"):
        read_tensors(path)
    path.write_bytes(data.replace(b"float32", b"float99"))
    with pytest.raises(KompaktError, match="unknown dtype 'float99'"):
        read_tensors(path)
    with pytest.raises(KompaktError, match="missing.ktns: cannot read"):
        read_tensors(tmp_path / "missing.ktns")
    with pytest.raises(KompaktError, match="dtype complex64"):
        write_tensors(path, {"z": np.zeros(2, np.complex64)})
