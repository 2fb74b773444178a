"""A TVM bundle cross-compiled for aarch64 runs under qemu and matches torch eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.errors import KompaktError
from kompakt.runtime import runner
from kompakt.runtime.tensorfile import write_tensors
from kompakt.runtime.tvm import usable_cores

TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
        )

    def forward(self, x):
        y = self.net(x)
        return y, y.argmax(-1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(bundle dir, model): the model traced at batch 3 with a dynamic batch."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model = TwoHeads().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (torch.randn(3, 8),), dynamic_shapes=({0: batch},))
    mod, params = relax.frontend.detach_params(from_exported_program(ep, keep_params_as_input=True))
    path = tmp_path_factory.mktemp("bundle")
    exe = tvm.compile(mod, tvm.target.Target(TARGET))
    exe.export_library(
        str(path / "model.so"), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++")
    )
    write_tensors(path / "params.ktns", {f"p{i}": p.numpy() for i, p in enumerate(params["main"])})
    return path, model


def test_bundle_matches_torch_under_qemu(bundle):
    path, model = bundle
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    outputs, timing = runner.run_bundle(path, {"x": x}, repeat=3)
    y, idx = model(torch.from_numpy(x))
    assert list(outputs) == ["output_0", "output_1"]
    assert outputs["output_0"].shape == (5, 4) and outputs["output_1"].dtype == np.int64
    np.testing.assert_allclose(outputs["output_0"], y.detach().numpy(), atol=1e-4)
    np.testing.assert_array_equal(outputs["output_1"], idx.numpy())
    assert timing["runs"] == 3 and timing["median_ms"] > 0 and timing["emulated"]
    assert runner.build_runner() == runner.build_runner()  # cached by source hash


def test_wrong_inputs_give_clear_errors(bundle):
    path, _ = bundle
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(KompaktError, match=r"wrong number of inputs: 2 in .*the model takes 1"):
        runner.run_bundle(path, {"x": x, "y": x})
    with pytest.raises(KompaktError, match="expect Tensor with dtype float32 but get float64"):
        runner.run_bundle(path, {"x": x.astype(np.float64)})
    with pytest.raises(KompaktError, match="not a TVM bundle"):
        runner.run_bundle(path.parent, {"x": x})


def test_missing_runtime_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_TVM_AARCH64", str(tmp_path))
    with pytest.raises(KompaktError, match=r"no aarch64 TVM runtime.*make setup"):
        runner.build_runner()


def test_host_runner_matches_the_aarch64_one(bundle, tmp_path, monkeypatch):
    """The same runner source built for the host runs a host bundle in a torch-free process,
    with one TVM thread per core unless told otherwise."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    _, model = bundle
    ep = torch.export.export(model, (torch.randn(3, 8),))
    mod, params = relax.frontend.detach_params(from_exported_program(ep, keep_params_as_input=True))
    tvm.compile(mod, tvm.target.Target({"kind": "llvm"})).export_library(str(tmp_path / "model.so"))
    write_tensors(
        tmp_path / "params.ktns", {f"p{i}": p.numpy() for i, p in enumerate(params["main"])}
    )
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    outputs, timing = runner.run_bundle(tmp_path, {"x": x}, repeat=2, arch="host")
    np.testing.assert_allclose(
        outputs["output_0"], model(torch.from_numpy(x))[0].detach().numpy(), atol=1e-5
    )
    assert not timing["emulated"] and timing["peak_rss_bytes"] > 0
    assert timing["threads"] == usable_cores()  # TVM alone takes half of them on x86
    assert runner.run_bundle(tmp_path, {"x": x}, arch="host", threads=1)[1]["threads"] == 1
