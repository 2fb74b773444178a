"""TVM export: host parity through the Relax VM, fused codebook kernels, arm64 under qemu."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from kompakt import export, runtime
from kompakt.compress import quantize
from kompakt.compress.quantize.layers import CodebookLinear, CodedLayer
from kompakt.errors import KompaktError
from kompakt.export import tvm_kernels
from kompakt.models.registry import build, register
from kompakt.runtime import runner
from kompakt.runtime.tensorfile import read_tensors
from kompakt.runtime.tvm import usable_cores
from tests import user_models
from tests.export.test_onnx import _boosted_cnn, _coded_cnn, _images, _parity, _pruned_cnn
from tests.models import tiny_cnn, tiny_llama


def _reference(model, inputs):
    with torch.no_grad():
        out = model(inputs)
    return getattr(out, "logits", out).numpy()


def _host_parity(model, example, other, path):
    """Export for the host, load the bundle in a fresh session, run another shape vs torch."""
    report = export.tvm(model, example, path)
    assert report["validation"]["valid"] and len(report["validation"]["cases"]) == 3
    session = runtime.load(path)
    (value,) = session.run([other.numpy()]).values()
    ref = _reference(model, other)
    assert value.shape == ref.shape
    assert np.abs(value - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    return report


def _no_dense_coded_weights(model, bundle):
    """Every coded layer's codes are in the bundle as packed uint8; no float parameter has a
    coded weight's size (beyond dense layers of that size)."""
    params = read_tensors(bundle / "params.ktns")
    coded = {id(m.codes): m for m in model.modules() if isinstance(m, CodedLayer)}.values()
    uint8_shapes = [a.shape for a in params.values() if a.dtype == np.uint8]
    float_sizes = [a.size for a in params.values() if a.dtype.kind == "f"]
    dense_sizes = [p.numel() for p in model.parameters()]
    for layer in coded:
        assert tuple(layer.codes.shape) in uint8_shapes
        weights = layer.layout.rows * layer.layout.cols
        assert float_sizes.count(weights) <= dense_sizes.count(weights)


@pytest.mark.parametrize(
    "make", [tiny_cnn, _pruned_cnn, _boosted_cnn], ids=["dense", "pruned", "gbnn"]
)
def test_host_parity_cnns(make, tmp_path):
    model = make()
    report = _host_parity(model, _images(3), _images(5, seed=1), tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [None, 1, 28, 28]
    # every batch norm follows a conv: folded into it, its four vectors give way to one bias
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and report["batch_norms_folded"] == len(norms)
    dense = sum(p.numel() for p in model.parameters())
    dense += sum(
        b.numel()
        for name, b in model.named_buffers()
        # a GBNN head's prefix biases serve to cut it, its forward does not read them
        if b.is_floating_point() and not name.endswith("prefix_bias")
    )
    assert report["params"]["bytes_by_dtype"]["float32"] == 4 * (
        dense - sum(3 * m.num_features for m in norms)
    )


class _NegativeIndices(nn.Module):
    def forward(self, x):
        return x[:, -1] + x[-1, 0]  # the last step; the last sample's first step (dynamic dim)


def test_negative_index_selects_match_torch(tmp_path):
    _host_parity(_NegativeIndices(), torch.randn(2, 5, 3), torch.randn(4, 5, 3), tmp_path / "b")


@pytest.mark.parametrize("name", sorted(user_models.INPUTS))
def test_users_coded_models_run_in_tvm_and_onnxruntime_like_torch(name, tmp_path):
    model, make = user_models.build(name)
    quantize.jlcm(model, quantize.JLCMConfig(bits=3, steps=5), [make(32)], progress=False)
    assert any(isinstance(m, CodedLayer) for m in model.modules())
    _host_parity(model, make(2), make(5), tmp_path / "bundle")
    _no_dense_coded_weights(model, tmp_path / "bundle")
    _parity(model, make(2), make(5), tmp_path / "m.onnx")


def test_pruned_bundle_is_smaller(tmp_path):
    dense = export.tvm(tiny_cnn(), _images(2), tmp_path / "dense")
    pruned = export.tvm(_pruned_cnn(), _images(2), tmp_path / "pruned")
    assert (
        pruned["params"]["bytes_by_dtype"]["float32"] < dense["params"]["bytes_by_dtype"]["float32"]
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_host_parity_codebook_cnn(bits, tmp_path):
    model = _coded_cnn(bits)
    report = _host_parity(model, _images(2), _images(6, seed=2), tmp_path / "bundle")
    assert report["codebook_layers"] == sum(isinstance(m, CodedLayer) for m in model.modules())
    _no_dense_coded_weights(model, tmp_path / "bundle")


@pytest.mark.parametrize("method", ["jlcm", "gptq"])
def test_host_parity_llama(method, tmp_path):
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    model = quantize.quantize(
        tiny_llama(), quantize.QuantizeConfig(method=method, bits=3, steps=5), ids
    )
    other = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    report = _host_parity(model, ids, other, tmp_path / "bundle")
    assert report["inputs"][0]["shape"] == [None, None]
    _no_dense_coded_weights(model, tmp_path / "bundle")
    # the tied embedding and LM head share one set of codes in the bundle
    embed = model.model.embed_tokens
    params = read_tensors(tmp_path / "bundle" / "params.ktns")
    assert (
        sum(a.shape == tuple(embed.codes.shape) and a.dtype == np.uint8 for a in params.values())
        == 1
    )


def test_dense_llama_host_parity(tmp_path):
    """Parity, and the bundle holds the Linear weights input-major (``[in, out]``, so no
    transpose runs per call) and the tied token table once, as it is."""
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    model = tiny_llama()
    _host_parity(model, ids, other, tmp_path / "bundle")
    shapes = [a.shape for a in read_tensors(tmp_path / "bundle" / "params.ktns").values()]
    assert shapes.count((96, 32)) == 1 and (32, 96) not in shapes  # the tied table
    attention = model.model.layers[0].self_attn
    assert tuple(attention.k_proj.weight.shape) == (16, 32)  # [out, in] in torch
    assert shapes.count((32, 16)) == 4 and (16, 32) not in shapes  # k and v of each block
    assert shapes.count((32, 64)) == 4 and shapes.count((64, 32)) == 2  # gate, up; down


@register("test_linear_stack")
def _linear_stack(cols: int = 37, rows: int = 29):
    return nn.Sequential(nn.Linear(cols, rows), nn.ReLU(), nn.Linear(rows, cols, bias=False))


def _coded_stack(bits):
    """The odd-shaped linear stack, RTN-coded at ``bits``, and its example input."""
    torch.manual_seed(bits)
    x = torch.randn(4, 37)
    config = quantize.QuantizeConfig(method="rtn", bits=bits, block=16)
    return quantize.quantize(build("test_linear_stack"), config, x, progress=False), x


def _assert_bundle_matches(bundle, model, x):
    (value,) = runtime.load(bundle).run([x.numpy()]).values()
    ref = _reference(model, x)
    assert np.abs(value - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def _coded_shape(**fields):
    base = dict(
        rows=512,
        cols=256,
        bits=3,
        row_bytes=96,
        codebooks=4,
        entries=8,
        scale_rows=1,
        blocks=1,
        block=256,
        has_scales=False,
        has_offsets=False,
    )
    return tvm_kernels.CodedShape(**{**base, **fields})


@pytest.mark.parametrize("bits", range(1, 9))
def test_kernels_every_bit_width_odd_shapes(bits, tmp_path):
    """Straddling codes (3, 5, 6, 7 bits), ragged scale blocks and a dot-product tail."""
    coded, x = _coded_stack(bits)
    assert isinstance(coded[0], CodebookLinear)
    _host_parity(coded, x, torch.randn(7, 37), tmp_path / "bundle")
    # from one panel of input rows on (16 tokens, 32 with AVX-512), the linear kernel packs
    # its input into panels: 49 rows end in a ragged panel either way
    _assert_bundle_matches(tmp_path / "bundle", coded, torch.randn(49, 37))


NARROWER = {
    "plain x86-64": '{"kind": "llvm"}',  # the scalar decode, not vpermps
    "AVX2 only": '{"kind": "llvm", "mattr": ["+avx", "+avx2", "+fma", "+f16c"]}',  # 8 lanes
}


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("target", NARROWER)
def test_kernels_on_narrower_targets(bits, target, tmp_path):
    """The kernels of targets below the host's vector width, on the host."""
    coded, x = _coded_stack(bits)
    report = export.tvm(coded, x, tmp_path / "b", target=NARROWER[target])
    assert report["validation"]["valid"], report["validation"]
    _assert_bundle_matches(tmp_path / "b", coded, torch.randn(19, 37))  # one 16-token panel


def test_vector_decode_only_where_asked():
    shape = _coded_shape(rows=16, cols=40, bits=4, row_bytes=20, codebooks=2, entries=16)
    assert "permps" not in tvm_kernels.codebook_linear(shape).script()
    permuted = tvm_kernels.codebook_rows(dataclasses.replace(shape, permute=True)).script()
    assert permuted.count("llvm.x86.avx2.permps") == 2  # 16 entries: two lookups, one blend
    wide = dataclasses.replace(shape, bits=5, entries=32, row_bytes=25, permute=True)
    assert "permps" not in tvm_kernels.codebook_linear(wide).script()  # over 16 entries


def test_linear_kernel_never_builds_the_weight():
    """The kernel's buffers are a tile of weight rows, the packed input and accumulators."""
    text = tvm_kernels.codebook_linear(_coded_shape()).script()
    allocs = [line for line in text.splitlines() if "alloc_buffer" in line]
    assert allocs and all("512" not in line for line in allocs), allocs


def test_arm64_bundle_under_qemu_matches_torch(tmp_path):
    reason = runner.missing()
    assert reason is None, reason  # `make setup` installs the cross toolchain, qemu and runtime
    model = _coded_cnn(3)
    report = export.tvm(model, _images(2), tmp_path / "arm", target="aarch64-linux-gnu")
    assert report["validation"]["valid"], report["validation"]
    other = _images(5, seed=3)
    outputs, timing = runner.run_bundle(tmp_path / "arm", {"input": other.numpy()}, repeat=2)
    (value,) = outputs.values()
    assert np.abs(value - _reference(model, other)).max() <= 1e-4
    assert timing["runs"] == 2 and timing["emulated"]
    with pytest.raises(KompaktError, match="built for aarch64"):
        runtime.load(tmp_path / "arm")


def test_android_bundle_is_an_object_archive(tmp_path):
    report = export.tvm(
        tiny_cnn(), _images(2), tmp_path / "android", target="aarch64-linux-android"
    )
    assert (tmp_path / "android" / "model.tar").is_file()
    assert "skipped" in report["validation"] and "NDK" in report["link"]


def test_unknown_target_and_unsupported_op(tmp_path):
    with pytest.raises(KompaktError, match="unknown TVM target 'riscv'"):
        export.tvm(tiny_cnn(), _images(2), tmp_path / "x", target="riscv")
    with pytest.raises(KompaktError, match="TVM JSON target"):
        export.tvm(tiny_cnn(), _images(2), tmp_path / "x", target={"mtriple": "x"})
    with pytest.raises(KompaktError, match="cannot run aarch64-linux-gnu code"):
        export.tvm(tiny_cnn(), _images(2), tmp_path / "x", target="aarch64-linux-gnu", tune=1)

    class Erfcx(nn.Module):
        def forward(self, x):
            return torch.special.erfcx(x)

    with pytest.raises(KompaktError, match="special_erfcx"):
        export.tvm(Erfcx(), torch.randn(2, 3), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_refused_above_tolerance_writes_nothing(tmp_path):
    with pytest.raises(KompaktError, match="above the tolerance"):
        export.tvm(_coded_cnn(3), _images(2), tmp_path / "b", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


def test_run_checks_inputs(tmp_path):
    export.tvm(tiny_cnn(), _images(2), tmp_path / "b")
    session = runtime.load(tmp_path / "b")
    with pytest.raises(KompaktError, match="dtype float64"):
        session.run([np.zeros((2, 1, 28, 28))])
    with pytest.raises(KompaktError, match=r"shape \[2, 28, 28\]"):
        session.run([np.zeros((2, 28, 28), np.float32)])


@pytest.mark.slow
def test_tuning_writes_a_reusable_database(tmp_path):
    torch.manual_seed(0)
    model = build("test_linear_stack")
    x = torch.randn(1, 37)
    report = export.tvm(model, x, tmp_path / "tuned", tune=1, tune_dir=tmp_path / "db")
    assert report["tuning_trials"] == 1 and report["validation"]["valid"]
    assert report["inputs"][0]["shape"] == [1, 37]  # tuning compiles the example's static shape
    records = (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 1


@pytest.mark.slow
def test_tuning_a_coded_model_searches_around_the_fused_kernels(tmp_path):
    """MetaSchedule tunes the other operators and leaves the hand-scheduled codebook kernels
    as written (searching them fails: its FLOPs estimate cannot read their vector code)."""
    model, x = _coded_stack(3)
    report = export.tvm(model, x, tmp_path / "tuned", tune=1, tune_dir=tmp_path / "db")
    assert report["validation"]["valid"]
    assert (tmp_path / "db" / "database_tuning_record.json").read_text().strip()  # the ReLU
    _assert_bundle_matches(tmp_path / "tuned", model, x)


def test_bundle_runtime_imports_neither_torch_nor_compress_and_benches(tmp_path):
    import subprocess
    import sys

    from kompakt.runtime.bench import bench

    export.tvm(tiny_cnn(), _images(2), tmp_path / "b")
    # as on a device without torch (tvm_ffi imports torch whenever it can, so block it)
    code = (
        "import sys, numpy as np, tvm_ffi\n"
        "sys.modules['torch'] = None\n"
        "from kompakt import runtime\n"
        f"s = runtime.load({str(tmp_path / 'b')!r})\n"
        "print(s.run({'input': np.zeros((1, 1, 28, 28), np.float32)})['output'].shape)\n"
        "print(sorted(m for m in sys.modules if m.startswith('kompakt.compress')))\n"
        "print(tvm_ffi.get_global_func('runtime.NumThreads')())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    # one TVM thread per core (TVM alone takes half of them on x86)
    assert done.stdout.strip().splitlines()[-3:] == ["(1, 10)", "[]", str(usable_cores())]
    result = bench(tmp_path / "b", [1, 3], repeats=3, warmup=1)
    assert [r["batch"] for r in result["latency"]] == [1, 3]
    assert all(r["p50_ms"] <= r["p99_ms"] for r in result["latency"])
    # run by the C++ runner: a Python process that imports TVM alone peaks far above this
    assert 0 < result["peak_rss_bytes"] < 60e6
    files = ("model.so", "params.ktns")
    assert result["model_bytes"] == sum((tmp_path / "b" / f).stat().st_size for f in files)


@pytest.mark.slow
def test_tuning_remeasures_the_best_records(tmp_path):
    """A record whose time in the database is a fluke (planted: 1 ps) is measured again
    before the best schedule is chosen, side by side with the other best records."""
    import tvm
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.s_tir import meta_schedule as ms

    from kompakt.export import tvm_tuning

    torch.manual_seed(0)
    model = build("test_linear_stack").eval()
    mod = from_exported_program(torch.export.export(model, (torch.randn(1, 37),)))
    target = tvm.target.Target({"kind": "llvm", "num-cores": usable_cores()})
    threads = os.environ.get("TVM_NUM_THREADS")
    tvm_tuning.tuned(mod, target, 2, tmp_path)
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    with target:
        lowered = tvm_tuning.tuning_module(mod)
    tasks = [t.dispatched[0] for t in ms.relax_integration.extract_tasks(lowered, target)]
    for task in tasks:
        worst = database.get_top_k(database.commit_workload(task), 100)[-1]
        fluke = ms.database.TuningRecord(
            worst.trace, worst.workload, [1e-12], worst.target, worst.args_info
        )
        database.commit_tuning_record(fluke)
    remeasured = tvm_tuning.remeasured(lowered, target, database)
    for task in tasks:
        records = remeasured.get_top_k(remeasured.commit_workload(task), 100)
        stored = database.get_top_k(database.commit_workload(task), 100)
        assert len(records) == min(len(stored), tvm_tuning.REMEASURE_TOP)
        assert all(float(r.run_secs[0]) > 1e-9 for r in records)  # the fluke measured for real
    assert os.environ.get("TVM_NUM_THREADS") == threads  # the measuring setting is undone
