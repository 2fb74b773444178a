"""ONNX export: parity with torch through onnxruntime, compression kept, validation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kompakt import export, runtime
from kompakt.compress import boost, prune, quantize
from kompakt.errors import KompaktError
from kompakt.export.onnx import _check_codes_survived
from kompakt.models import build
from kompakt.runtime.ort import create_session
from tests.models import tiny_cnn, tiny_llama


def _images(n, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _pruned_cnn():
    model = tiny_cnn()
    oto = prune.OTO(model, (_images(2),))
    oto.zero_groups(0.5, seed=1)
    return oto.construct_subnet()


def _boosted_cnn():
    model = tiny_cnn()
    features = boost.head_features(model, "fc", _images(200), progress=False)
    labels = torch.arange(200) % 10
    gbnn = boost.GBNN(units_per_step=2, steps=3, max_iter=20).fit(features, labels, progress=False)
    boost.replace_head(model, "fc", gbnn.to_module())
    return model


def _coded_cnn(bits):
    return quantize.jlcm(
        tiny_cnn(), quantize.JLCMConfig(bits=bits, steps=5), _images(64), progress=False
    )


def _parity(model, example, other, path):
    """Export, then run an input of another shape in a fresh runtime session against torch."""
    report = export.onnx(model, example, path)
    assert report["validation"]["valid"] and len(report["validation"]["cases"]) == 3
    session = runtime.load(path)
    (name,) = [s.name for s in session.inputs]
    got = session.run({name: other.numpy()})
    with torch.no_grad():
        out = model(other)
    ref = getattr(out, "logits", out)
    (value,) = got.values()
    assert value.shape == tuple(ref.shape)
    assert np.abs(value - ref.numpy()).max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    return report


@pytest.mark.parametrize(
    "make", [tiny_cnn, _pruned_cnn, _boosted_cnn], ids=["dense", "pruned", "gbnn-head"]
)
def test_cnn_parity_on_two_batch_sizes(tmp_path, make):
    model = make()
    report = _parity(model, _images(4), _images(7, seed=1), tmp_path / "m.onnx")
    stored = sum(p.numel() for p in model.state_dict().values() if p.is_floating_point())
    # all float state (weights, BN statistics) is in the file, and nothing more
    assert report["initializer_bytes"]["float"] <= 4 * stored + 64


def test_pruned_model_exports_at_its_reduced_size(tmp_path):
    dense = export.onnx(tiny_cnn(), _images(2), tmp_path / "d.onnx")
    pruned = export.onnx(_pruned_cnn(), _images(2), tmp_path / "p.onnx")
    assert pruned["initializer_bytes"]["float"] < 0.7 * dense["initializer_bytes"]["float"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_layers_export_as_packed_codes(tmp_path, bits):
    model = _coded_cnn(bits)
    report = _parity(model, _images(4), _images(5, seed=2), tmp_path / "q.onnx")
    assert report["codebook_layers"] == 10 and report["constant_folding_disabled"]
    codes = sum(m.codes.numel() for m in model.modules() if isinstance(m, quantize.CodedLayer))
    assert report["initializer_bytes"]["uint8"] >= codes
    weights = sum(
        m.layout.rows * m.layout.cols for m in model.modules() if isinstance(m, quantize.CodedLayer)
    )
    # no dense copy of the coded weights: float initializers are BN and biases only
    assert report["initializer_bytes"]["float"] < 4 * weights / 4


def test_constant_folding_cannot_densify_and_a_dense_export_is_caught(tmp_path):
    model = _coded_cnn(3)
    export.onnx(model, _images(2), tmp_path / "q.onnx")
    # onnxruntime's own optimizers, ConstantFolding on: each decode depends on the layer's
    # input, so it is not a constant and the codes stay packed
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    assert _check_codes_survived(onnx.load(str(tmp_path / "folded.onnx")), model) > 0
    # and ConstantFolding is off in the kompakt runtime anyway: it reads the model's metadata
    assert runtime.load(tmp_path / "q.onnx").no_folding
    # the same architecture exported with dense weights is refused as a coded model
    export.onnx(tiny_cnn(), _images(2), tmp_path / "dense.onnx")
    with pytest.raises(KompaktError, match="dense float initializer"):
        _check_codes_survived(onnx.load(str(tmp_path / "dense.onnx")), model)


@pytest.mark.parametrize("bits", [None, 3], ids=["fp32", "jlcm-3bit"])
def test_tiny_llama_logits_parity_on_two_shapes(tmp_path, bits):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    if bits:
        model = quantize.jlcm(model, quantize.JLCMConfig(bits=bits, steps=5), ids, progress=False)
    other = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    report = _parity(model, ids, other, tmp_path / "lm.onnx")
    assert [c["shapes"] for c in report["validation"]["cases"]][0] == [[2, 12]]
    if bits:
        _assert_decodes_wait_for_inputs(onnx.load(str(tmp_path / "lm.onnx")))


def _assert_decodes_wait_for_inputs(proto):
    """Every node reading packed codes also reads a value computed from the graph's inputs,
    so no decode can run (and be held) before its layer's input exists; inside a ``Scan``
    body, from the body's state (the layer's input)."""
    graph = proto.graph
    codes = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.UINT8}
    readers = _assert_code_readers_derived(graph, {i.name for i in graph.input}, codes)
    assert readers


def _assert_code_readers_derived(graph, derived, codes) -> int:
    derived, readers = set(derived), 0
    for node in graph.node:  # nodes are in topological order
        if derived & set(node.input):
            derived.update(node.output)
        if codes & set(node.input):
            readers += 1
            assert derived & set(node.input), f"{node.op_type} {node.name} decodes before its input"
        for body in (a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
            scanned = next(a.i for a in node.attribute if a.name == "num_scan_inputs")
            states = [i.name for i in body.input[: len(body.input) - scanned]]
            body_codes = {
                i.name
                for i in body.input[len(states) :]
                if i.type.tensor_type.elem_type == onnx.TensorProto.UINT8
            }
            readers += _assert_code_readers_derived(body, derived | set(states), body_codes)
    return readers


def test_alike_decoder_layers_export_as_one_scan_over_stacked_codes(tmp_path):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    config = quantize.JLCMConfig(bits=3, steps=5, rows_per_group=3)
    model = quantize.jlcm(tiny_llama(), config, ids, progress=False)
    first, second = model.model.layers
    counts = [
        len(m.codebook)
        for layer in (first, second)
        for m in layer.modules()
        if hasattr(m, "codebook")
    ]
    assert counts[:7] != counts[7:]  # some codebook counts differ: the stacking pads them
    other = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    report = _parity(model, ids, other, tmp_path / "lm.onnx")
    assert report["stacked_layers"] == 2
    proto = onnx.load(str(tmp_path / "lm.onnx"))
    (scan,) = [n for n in proto.graph.node if n.op_type == "Scan"]
    body = next(a.g for a in scan.attribute if a.name == "body")
    # each decoder layer's 7 linear layers decode and multiply once, in the body; the main
    # graph keeps the LM head's
    assert [n.op_type for n in body.node].count("Gemm") == 7
    assert [n.op_type for n in proto.graph.node].count("Gemm") == 1
    _assert_decodes_wait_for_inputs(proto)
    # the layers are stored once, stacked: codes of [layers, rows, bytes]
    stacked = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert sum(len(i.dims) == 3 and i.dims[0] == 2 for i in stacked) == 7


def test_unlike_decoder_layers_stay_unrolled(tmp_path):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    config = quantize.JLCMConfig(bits=3, steps=5, skip=("model.layers.1.mlp.down_proj",))
    model = quantize.jlcm(tiny_llama(), config, ids, progress=False)
    other = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    report = _parity(model, ids, other, tmp_path / "lm.onnx")
    assert report["stacked_layers"] == 0
    assert "Scan" not in {n.op_type for n in onnx.load(str(tmp_path / "lm.onnx")).graph.node}


def test_large_codebook_linear_decodes_in_row_blocks_in_the_graph(tmp_path):
    from torch import nn

    from kompakt.compress.quantize.codebooks import kmeans_coded
    from kompakt.compress.quantize.layers import DECODE_ROWS, coded_layer_for

    rows = 2 * DECODE_ROWS + 300  # two whole blocks and a ragged one
    dense = nn.Linear(40, rows)
    layer = coded_layer_for(
        dense, kmeans_coded(dense.weight.detach(), None, 3, rows // 4), "kmeans"
    )
    report = export.onnx(layer.eval(), torch.randn(3, 40), tmp_path / "big.onnx")
    assert report["validation"]["max_rel_error"] < 1e-6
    proto = onnx.load(str(tmp_path / "big.onnx"))
    assert [n.op_type for n in proto.graph.node].count("Gemm") == 3
    _assert_decodes_wait_for_inputs(proto)


def test_batch_one_example_is_traced_with_two_and_stays_dynamic(tmp_path):
    report = export.onnx(tiny_cnn(), _images(1), tmp_path / "m.onnx")
    assert report["inputs"][0]["traced_shape"] == [2, 1, 28, 28]
    session = runtime.load(tmp_path / "m.onnx")
    assert session.run([_images(1).numpy()])["output"].shape == (1, 10)


def test_export_refuses_above_tolerance_and_writes_nothing(tmp_path):
    with pytest.raises(KompaktError, match="above the tolerance"):
        export.onnx(tiny_cnn(), _images(2), tmp_path / "m.onnx", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


def test_mobile_writes_ort_and_the_operator_config(tmp_path):
    # wide enough that dense float weights would outweigh the decode nodes in the file
    model = build("fmnist_resnet", widths=[32, 64, 128], blocks_per_stage=1).eval()
    quantize.jlcm(model, quantize.JLCMConfig(bits=2, steps=2), _images(32), progress=False)
    report = export.onnx(model, _images(2), tmp_path / "q.onnx", mobile=True)
    config = (tmp_path / "required_operators.config").read_text()
    assert "Conv" in config and "GatherElements" in config
    session = runtime.load(report["ort_path"])
    out = session.run({"input": _images(3).numpy()})["output"]
    with torch.no_grad():
        assert np.abs(out - model(_images(3)).numpy()).max() < 1e-4
    # the ORT-format file holds packed codes, not decoded float weights, even when written
    # with onnxruntime's ConstantFolding on (each decode depends on its layer's input)
    weights = sum(
        m.layout.rows * m.layout.cols for m in model.modules() if isinstance(m, quantize.CodedLayer)
    )
    create_session(tmp_path / "q.onnx", no_folding=False, save_optimized=tmp_path / "folded.ort")
    for written in ("q.ort", "folded.ort"):
        assert (tmp_path / written).stat().st_size < 2 * weights  # fp32 weights: 4 bytes each


@pytest.mark.parametrize("bits", [5, 7])
def test_odd_code_widths_and_row_groups_decode_exactly_in_onnx(tmp_path, bits):
    # 24 row groups (5-bit ids) and 5/7-bit codes span byte boundaries: each code is cut from
    # the 16-bit window of two bytes in the graph
    from torch import nn

    from kompakt.compress.quantize.codebooks import kmeans_coded
    from kompakt.compress.quantize.layers import coded_layer_for

    dense = nn.Linear(64, 192)
    coded = kmeans_coded(dense.weight.detach(), None, bits, 24)
    layer = coded_layer_for(dense, coded, "kmeans").eval()
    assert layer.row_group is not None
    report = export.onnx(layer, torch.randn(3, 64), tmp_path / "l.onnx")
    assert report["validation"]["max_rel_error"] < 1e-6


def test_a_transformers_encoder_exports_its_last_hidden_state(tmp_path):
    from tests.compress.prune_models import tiny_bert

    model = tiny_bert()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    report = export.onnx(model, ids, tmp_path / "bert.onnx")
    assert report["validation"]["valid"]
    other = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    (value,) = runtime.load(tmp_path / "bert.onnx").run({"input_ids": other.numpy()}).values()
    with torch.no_grad():
        ref = model(other).last_hidden_state.numpy()
    assert value.shape == ref.shape == (3, 9, 32)
    assert np.abs(value - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
