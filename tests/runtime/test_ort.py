"""The onnxruntime session: checked inputs, no torch, and the bench command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kompakt import export, runtime
from kompakt.errors import KompaktError
from kompakt.runtime.bench import bench
from tests.models import tiny_cnn
from tests.test_cli import kompakt_cli


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    export.onnx(tiny_cnn(), torch.randn(2, 1, 28, 28), path)
    return path


def test_wrong_inputs_give_clear_errors(cnn_onnx):
    session = runtime.load(cnn_onnx)
    good = np.zeros((3, 1, 28, 28), np.float32)
    assert session.run({"input": good})["output"].shape == (3, 10)
    with pytest.raises(
        KompaktError, match=r"input names \['image'\].*input: float32\[batch, 1, 28, 28\]"
    ):
        session.run({"image": good})
    with pytest.raises(KompaktError, match="dtype float64, expected float32"):
        session.run({"input": good.astype(np.float64)})
    with pytest.raises(KompaktError, match=r"shape \[3, 1, 28, 27\], expected"):
        session.run({"input": good[..., :27]})
    with pytest.raises(KompaktError, match="expects 1 input"):
        session.run([good, good])
    with pytest.raises(KompaktError, match="no such model file"):
        runtime.load(cnn_onnx.with_name("missing.onnx"))


def test_runtime_imports_neither_torch_nor_compress(cnn_onnx):
    code = (
        "import sys, numpy as np\n"
        "from kompakt import runtime\n"
        f"s = runtime.load({str(cnn_onnx)!r})\n"
        "s.run({'input': np.zeros((1, 1, 28, 28), np.float32)})\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('kompakt.compress')}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_bench_reports_latency_percentiles_and_memory(cnn_onnx):
    result = bench(cnn_onnx, [1, 8], repeats=5, warmup=1)
    assert [r["batch"] for r in result["latency"]] == [1, 8]
    for row in result["latency"]:
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert result["model_bytes"] == cnn_onnx.stat().st_size
    assert result["peak_rss_bytes"] > 10 * 2**20


def test_cli_export_run_and_bench(tmp_path):
    import kompakt

    artifact = kompakt.save(tiny_cnn(), tmp_path / "cnn")
    out = tmp_path / "cnn.onnx"
    done = kompakt_cli("export", "onnx", str(artifact), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "max abs error" in done.stdout
    assert json.loads((tmp_path / "cnn.onnx.json").read_text())["validation"]["valid"]
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 28, 28), np.float32))
    done = kompakt_cli(
        "run", str(out), "--input", f"input={tmp_path / 'x.npy'}", "--out", str(tmp_path / "y.npz")
    )
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "y.npz")["output"].shape == (2, 10)
    done = kompakt_cli("run", str(out), "--input", f"pixels={tmp_path / 'x.npy'}")
    assert done.returncode == 2 and "input names ['pixels']" in done.stderr
    done = kompakt_cli("bench", str(out), "--batch", "1", "2", "--repeats", "3")
    assert done.returncode == 0, done.stderr
    assert "p99 ms" in done.stdout and "cnn.onnx" in done.stdout
