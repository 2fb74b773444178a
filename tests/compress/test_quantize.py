"""Quantization: packing, Codebook layers, the four solvers, bit allocation, save/load, resume."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kompakt
from kompakt import artifact
from kompakt.compress import quantize
from kompakt.compress.quantize import block_tuning, decoder
from kompakt.compress.quantize.affine import gptq_coded, rtn_coded
from kompakt.compress.quantize.calibration import output_error
from kompakt.compress.quantize.codebooks import (
    group_count,
    kmeans_coded,
    nearest_codes,
    neuron_groups,
)
from kompakt.compress.quantize.jlcm import jlcm_coded
from kompakt.compress.quantize.layers import CodedLayer, coded_layer_for
from kompakt.compress.quantize.packing import pack_codes, packed_row_bytes, unpack_codes
from kompakt.errors import KompaktError
from kompakt.summary import inspect_artifact
from tests.models import tiny_cnn, tiny_llama
from tests.test_cli import kompakt_cli


def _layer_problem(seed: int = 0, rows: int = 96, cols: int = 64):
    """A weight with rows of different scales and correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.rand(cols, generator=g) * 3

    def inputs(n):
        return torch.randn(n, cols, generator=g) @ mix * scale

    calib, held_out = inputs(2048), inputs(2048)
    return w, calib.T @ calib / len(calib), held_out.T @ held_out / len(held_out)


# --- packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(511, 350), (1, 1), (3, 7), (2, 24)])
def test_pack_unpack_is_identity(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, shape[1]).long(), codes)


@pytest.mark.parametrize(("bits", "row_bytes"), [(2, 88), (3, 132), (4, 175)])
def test_packing_is_dense(bits, row_bytes):
    # 350 codes: 2-bit four to a byte; 3-bit eight to three bytes (last chunk padded); 4-bit two
    assert packed_row_bytes(350, bits) == row_bytes
    assert pack_codes(torch.zeros(5, 350, dtype=torch.long), bits).shape == (5, row_bytes)


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(KompaktError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([[0, 8]]), 3)
    with pytest.raises(KompaktError, match="1..8"):
        pack_codes(torch.tensor([[0]]), 9)


# --- codebook layers ------------------------------------------------------------------------


def _solvers(w, h, bits):
    groups = group_count(w.shape[0], 8)
    return {
        "rtn": rtn_coded(w, bits, 16),
        "gptq": gptq_coded(w, h, bits, 16),
        "kmeans": kmeans_coded(w, h, bits, groups),
        "jlcm": jlcm_coded(w, h, bits, groups, steps=10)[0],
    }


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_linear_equals_dense_matmul_with_decoded_weight(bits):
    w, h, _ = _layer_problem()
    dense = nn.Linear(64, 96)
    x = torch.randn(5, 7, 64)
    for method, coded in _solvers(w, h, bits).items():
        layer = coded_layer_for(dense, coded, method)
        assert torch.equal(layer.decoded_rows(), coded.decode()), method
        assert torch.allclose(layer(x), F.linear(x, coded.decode(), dense.bias), atol=1e-6), method
        assert int(coded.codes.max()) < 1 << bits


def test_codebook_conv2d_equals_conv_with_decoded_kernel():
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1, groups=2)
    w = conv.weight.detach().reshape(8, -1)
    coded = kmeans_coded(w, None, 3, 2)
    layer = coded_layer_for(conv, coded, "kmeans")
    x = torch.randn(2, 6, 9, 11)
    expected = F.conv2d(x, coded.decode().view_as(conv.weight), conv.bias, 2, 1, 1, 2)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_codebook_embedding_decodes_only_the_rows_it_reads():
    table = nn.Embedding(50, 12)
    coded = rtn_coded(table.weight.detach(), 4, 4)
    layer = coded_layer_for(table, coded, "rtn")
    ids = torch.tensor([[3, 49, 3], [0, 7, 7]])
    assert torch.equal(layer(ids), F.embedding(ids, coded.decode()))


def test_row_groups_are_stored_once_per_row_and_counted():
    w, h, _ = _layer_problem(rows=96)
    coded = kmeans_coded(w, h, 2, 12)
    layer = coded_layer_for(nn.Linear(64, 96), coded, "kmeans")
    assert layer.row_group is not None and layer.row_group.numel() == math.ceil(96 * 4 / 8)
    stored = 96 * 64 * 2 + coded.groups * 4 * 16 + 96 * 4
    assert layer.weight_bits() == stored
    assert layer.bits_per_weight() == pytest.approx(stored / (96 * 64))


def test_neuron_groups_put_alike_rows_together():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(20, 200, generator=g) * 0.01
    large = torch.randn(20, 200, generator=g) * 1.0
    order = torch.randperm(40, generator=g)
    group = neuron_groups(torch.cat([small, large])[order], 2)
    is_large = order >= 20
    assert len(set(group[is_large].tolist())) == 1
    assert len(set(group[~is_large].tolist())) == 1
    assert group[is_large][0] != group[~is_large][0]


@pytest.mark.parametrize("ordered", [True, False])
def test_nearest_codes_are_the_closest_codewords_with_sorted_and_unsorted_codebooks(ordered):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(50, 8, generator=g)
    codebook = codebook.sort(dim=1).values if ordered else codebook
    target = torch.randn(50, 300, generator=g) * 1.5
    expected = (target[:, :, None] - codebook[:, None, :]).abs().argmin(-1)
    # chunks of 16 rows, the last one partial
    assert torch.equal(nearest_codes(target, codebook, elements=16 * 300 * 7), expected)
    small = nearest_codes(target, codebook, dtype=torch.uint8)
    assert small.dtype == torch.uint8 and torch.equal(small.long(), expected)


# --- solvers --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_jlcm_output_error_below_kmeans_and_rtn_on_held_out_inputs(bits):
    w, h, held_out = _layer_problem(seed=bits)
    groups = group_count(w.shape[0], 8)
    errors = {
        "rtn": output_error(w, rtn_coded(w, bits, 64).decode(), held_out),
        "kmeans": output_error(w, kmeans_coded(w, h, bits, groups).decode(), held_out),
    }
    # ample calibration (2048 inputs for 64 columns): the light damping that suits it
    coded, info = jlcm_coded(w, h, bits, groups, steps=60, damp=0.01)
    jlcm = output_error(w, coded.decode(), held_out)
    assert info["accepted_steps"] > 0 and info["error"] < info["start_error"]
    assert jlcm < 0.8 * min(errors.values()), (jlcm, errors)


def test_gptq_beats_rtn_on_the_same_grid():
    w, h, held_out = _layer_problem(seed=5)
    rtn = output_error(w, rtn_coded(w, 3, 16).decode(), held_out)
    gptq = output_error(w, gptq_coded(w, h, 3, 16).decode(), held_out)
    assert gptq < rtn


def test_rtn_codes_are_round_to_nearest_on_the_block_grid():
    w = torch.tensor([[0.0, 0.1, 0.29, 0.31, 0.6, 0.9]])
    coded = rtn_coded(w, 2, 6)
    # grid 0, 0.3, 0.6, 0.9
    assert coded.codes.tolist() == [[0, 0, 1, 1, 2, 3]]
    assert torch.allclose(coded.decode(), torch.tensor([[0.0, 0.0, 0.3, 0.3, 0.6, 0.9]]), atol=1e-3)


# --- whole models ---------------------------------------------------------------------------


def _images(n=64, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["jlcm", "gptq", "rtn", "kmeans"])
def test_quantized_cnn_saves_and_loads_bit_identically(tmp_path, method):
    model = tiny_cnn()
    x = _images()
    config = quantize.QuantizeConfig(method=method, bits=3, block=16, steps=10)
    quantize.quantize(model, config, [x[:32], x[32:]], progress=False)
    assert all(not isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    metrics = artifact.record_of(model).steps[-1]["metrics"]
    assert metrics["coded_layers"] == 10
    kompakt.save(model, tmp_path / "q")
    loaded = kompakt.load(tmp_path / "q")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(loaded(x), model(x))


def test_fractional_bits_mix_two_widths_within_the_budget():
    model = tiny_cnn()
    quantize.quantize(model, quantize.JLCMConfig(bits=2.5, steps=5), _images(), progress=False)
    layers = [m for m in model.modules() if isinstance(m, CodedLayer)]
    widths = {m.layout.bits for m in layers}
    assert widths == {2, 3}
    weights = sum(m.layout.rows * m.layout.cols for m in layers)
    average = sum(m.layout.bits * m.layout.rows * m.layout.cols for m in layers) / weights
    assert 2.0 < average <= 2.5


def test_tied_llama_embedding_shares_lm_head_codes_after_load(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize.jlcm(model, quantize.JLCMConfig(bits=3, steps=5), ids, progress=False)
    kompakt.save(model, tmp_path / "q")
    loaded = kompakt.load(tmp_path / "q")
    assert loaded.model.embed_tokens.codes is loaded.lm_head.codes
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    info = inspect_artifact(tmp_path / "q")
    assert {r["encoding"] for r in info["rows"] if r["name"] == "lm_head"} == {"jlcm 3-bit"}


def test_jlcm_llama_logits_closer_to_fp_than_kmeans():
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama()(ids).logits

    def sqnr(method):
        config = quantize.QuantizeConfig(method=method, bits=4, steps=20)
        model = quantize.quantize(tiny_llama(), config, ids, progress=False)
        with torch.no_grad():
            out = model(ids).logits
        return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))

    jlcm, kmeans = sqnr("jlcm"), sqnr("kmeans")
    assert jlcm > 15  # dB
    assert jlcm > kmeans


def _peaked_llama():
    """A tiny Llama with weights 5x the init scale: logits peaked like a trained model's."""
    m = tiny_llama()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return m


def _kl_to_peaked(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(fp || ``model``) of the next-token distributions on ``ids``, the fp model being
    :func:`_peaked_llama`."""
    with torch.no_grad():
        ref = torch.log_softmax(_peaked_llama()(ids).logits, -1)
        out = torch.log_softmax(model(ids).logits, -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def test_jlcm_block_phase_lowers_each_blocks_error_the_heads_kl_and_the_models_kl():
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))

    def run(epochs):
        m = _peaked_llama()
        config = quantize.JLCMConfig(bits=2, steps=10, block_epochs=epochs)
        reports = decoder.quantize_decoder(m, config, ids, progress=False)
        return _kl_to_peaked(m, ids), reports

    plain, _ = run(0)
    tuned, reports = run(4)
    blocks = {
        name.split(".")[2]: (r["block_error_before"], r["block_error_after"])
        for name, r in reports.items()
        if "block_error_before" in r
    }
    assert len(blocks) == 2
    assert all(after < 0.95 * before for before, after in blocks.values())
    assert reports["lm_head"]["kl_after"] < reports["lm_head"]["kl_before"]
    assert tuned < 0.97 * plain


def test_jlcm_block_phase_mappings_move_to_neighbouring_codewords_and_lower_the_error():
    """Mappings learned on the block's loss: some codes change, by one rank in their row's
    sorted codebook (a neighbouring codeword), and the block error ends lower than with the
    codebooks alone."""
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))

    def run(map_lr):
        torch.manual_seed(0)
        m = tiny_llama()
        config = quantize.JLCMConfig(bits=3, steps=10, block_map_lr=map_lr)
        return m, decoder.quantize_decoder(m, config, ids, progress=False)

    fixed, fixed_reports = run(0.0)
    learned, learned_reports = run(0.01)
    first = "model.layers.0.mlp.down_proj"  # block 0: both runs code it from the same inputs
    assert fixed_reports[first]["block_codes_changed"] == 0
    assert learned_reports[first]["block_codes_changed"] > 0.01
    assert learned_reports[first]["block_error_after"] < fixed_reports[first]["block_error_after"]
    moves = []
    for name, a in fixed.model.layers[0].named_modules():
        if not isinstance(a, CodedLayer):
            continue
        b = learned.model.layers[0].get_submodule(name)
        lay, group = a.layout, a.group_of_rows()
        ranks = []
        for layer in (a, b):  # each code's rank in its row's sorted codebook
            codes = unpack_codes(layer.codes, lay.bits, lay.cols)
            ranks.append(layer.codebook.float().argsort(1).argsort(1)[group].gather(1, codes))
        moves.append((ranks[0] - ranks[1]).abs().flatten())
    moved = torch.cat(moves)
    assert (moved == 1).sum() > 0.9 * (moved > 0).sum()


def test_jlcm_block_phase_learns_the_norm_weights_only_when_asked():
    """``block_norms``: the blocks' and the final norm's weights move with the codebooks and
    the first block's error ends lower than with the codebooks alone; off, they stay fp."""
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))

    norms = {n: p.detach().clone() for n, p in _peaked_llama().named_parameters() if "norm" in n}

    def run(block_norms):
        m = _peaked_llama()
        config = quantize.JLCMConfig(bits=2, steps=10, block_norms=block_norms)
        return m, decoder.quantize_decoder(m, config, ids, progress=False)

    fixed, fixed_reports = run(False)
    learned, learned_reports = run(True)
    assert len(norms) == 5  # two per block, the final norm
    for name, value in norms.items():
        assert torch.equal(fixed.get_parameter(name), value), name
        assert not torch.equal(learned.get_parameter(name), value), name
    first = "model.layers.0.mlp.down_proj"
    assert learned_reports[first]["block_error_after"] < fixed_reports[first]["block_error_after"]
    assert learned_reports["lm_head"]["kl_after"] < fixed_reports["lm_head"]["kl_after"]


def test_jlcm_model_phase_lowers_the_models_kl_one_block_decoded_at_a_time(monkeypatch):
    """The model phase learns every codebook on the logits' KL to the fp model's: the KL ends
    lower than after the block phase alone, and with each block under a gradient checkpoint
    the decoded weights alive at once are at most one block's, never the whole model's."""
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    alive: list = []
    most = [0]
    real = block_tuning._Learned.values

    def counted(self, codebook):
        out = real(self, codebook)
        if torch.is_grad_enabled():
            alive[:] = [r for r in alive if r() is not None] + [weakref.ref(out)]
            most[0] = max(most[0], len(alive))
        return out

    def run(epochs):
        m = _peaked_llama()
        config = quantize.JLCMConfig(bits=2, steps=10, model_epochs=epochs, model_lr=1e-3)
        reports = decoder.quantize_decoder(m, config, ids, progress=False)
        return _kl_to_peaked(m, ids), reports

    blocks_only, _ = run(0)
    monkeypatch.setattr(block_tuning._Learned, "values", counted)
    most[0] = 0
    tuned, reports = run(4)
    assert reports["model"]["kl_after"] < reports["model"]["kl_before"]
    assert tuned < 0.97 * blocks_only
    assert most[0] == 7  # q, k, v, o, gate, up, down of one block; without checkpoints 14+


def test_jlcm_model_phase_learns_the_mappings_only_when_asked():
    """``model_map_lr``: the model phase also moves codes on the logits' KL, and ends with a
    lower KL than with the codebooks alone; at 0 it changes no code."""
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))

    def run(map_lr):
        m = _peaked_llama()
        config = quantize.JLCMConfig(
            bits=2, steps=10, model_epochs=4, model_lr=1e-3, model_map_lr=map_lr
        )
        return m, decoder.quantize_decoder(m, config, ids, progress=False)["model"]

    fixed, fixed_report = run(0.0)
    learned, learned_report = run(0.01)
    assert fixed_report["codes_changed"] == 0
    assert learned_report["codes_changed"] > 0
    assert learned_report["kl_before"] == fixed_report["kl_before"]
    assert learned_report["kl_after"] < fixed_report["kl_after"]
    codes = [n for n in fixed.state_dict() if n.endswith(".codes")]
    assert any(not torch.equal(learned.state_dict()[n], fixed.state_dict()[n]) for n in codes)


def test_decoder_metrics_split_the_wall_time_by_phase():
    """A decoder's run reports where its time went: the fp stream, the moments and quantized
    stream, the block phase and the model phase besides the layers' coding, together no more
    than the whole run."""
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    config = quantize.JLCMConfig(bits=3, steps=5, block_epochs=1, model_epochs=1)
    model = quantize.jlcm(tiny_llama(), config, ids, progress=False)
    metrics = artifact.record_of(model).steps[-1]["metrics"]
    phases = ("fp_stream", "moments", "block_phase", "model_phase", "coding")
    parts = {phase: metrics[f"{phase}_seconds"] for phase in phases}
    assert all(parts[phase] > 0 for phase in ("block_phase", "model_phase", "coding"))
    assert sum(parts.values()) <= metrics["seconds"] + 0.05  # each rounded to 0.01 s


def test_rtn_at_a_whole_width_reads_no_calibration_data():
    """RTN's codes are the rounded weights: at 3 bits the decoder collects no input moments
    (no time spent on them; each layer's error is its weights' own), while at 2.5 bits the
    bit allocation needs them."""
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    fp = dict(tiny_llama().named_modules())

    def run(bits):
        config = quantize.QuantizeConfig(method="rtn", bits=bits)
        model = quantize.quantize(tiny_llama(), config, ids, progress=False)
        return model, artifact.record_of(model).steps[-1]["metrics"]

    whole, metrics = run(3)
    assert "moments_seconds" not in metrics
    coded = {n: m for n, m in whole.named_modules() if isinstance(m, CodedLayer)}
    coded.pop("model.embed_tokens")  # lm_head's codes, counted once
    errors = [output_error(fp[n].weight.detach(), m.decoded_rows(), None) for n, m in coded.items()]
    assert metrics["mean_layer_error"] == pytest.approx(sum(errors) / len(errors), rel=1e-5)
    _, fractional = run(2.5)
    assert "moments_seconds" in fractional


def test_block_windows_limit_the_per_block_phases_and_the_model_phase_sees_every_window():
    """With ``block_windows=3`` of 8 windows, the layers, blocks and head are coded exactly as
    from the first 3 windows alone; the model phase then learns from all 8, and its
    keep-if-better check measures the KL on the last 3, which the per-block phases did not fit."""
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(2))

    def run(windows, block_windows, model_epochs):
        m = _peaked_llama()
        config = quantize.JLCMConfig(
            bits=2, steps=10, block_windows=block_windows, model_epochs=model_epochs
        )
        return m, decoder.quantize_decoder(m, config, windows, progress=False)

    limited, _ = run(ids, 3, 0)
    first, _ = run(ids[:3], None, 0)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, limited.state_dict()[name]), name
    everything, _ = run(ids, None, 0)
    assert not torch.equal(
        everything.state_dict()["lm_head.codebook"], first.state_dict()["lm_head.codebook"]
    )

    # the KL of the coded models going into the model phase
    _, limited_reports = run(ids, 3, 1)
    last = _kl_to_peaked(limited, ids[5:])
    assert limited_reports["model"]["kl_before"] == pytest.approx(last, rel=1e-4)
    assert last != pytest.approx(_kl_to_peaked(limited, ids), rel=1e-2)
    _, all_reports = run(ids, None, 1)  # no per-block subset: the check covers every window
    assert all_reports["model"]["kl_before"] == pytest.approx(
        _kl_to_peaked(everything, ids), rel=1e-4
    )
    with pytest.raises(ValueError, match="block_windows"):
        quantize.JLCMConfig(block_windows=0)


# --- streaming and resume -------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_streaming_checkpoint_equals_in_memory_and_resumes_bit_identically(
    tie, tmp_path, monkeypatch
):
    ids = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(1))
    tiny_llama(tie=tie).save_pretrained(tmp_path / "ckpt")
    config = quantize.JLCMConfig(bits=2.5, steps=5, model_epochs=1)

    whole = quantize.quantize_checkpoint(tmp_path / "ckpt", config, ids, progress=False)
    kompakt.save(whole, tmp_path / "whole")
    in_memory = quantize.jlcm(tiny_llama(tie=tie), config, ids, progress=False)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, in_memory.state_dict()[name]), name

    loads: list[str] = []
    real = decoder._materialise

    def interrupted(module, files, prefix):
        loads.append(prefix)
        if prefix == "model.layers.1.":
            raise KeyboardInterrupt
        real(module, files, prefix)

    monkeypatch.setattr(decoder, "_materialise", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize.quantize_checkpoint(
            tmp_path / "ckpt", config, ids, work_dir=tmp_path / "work", progress=False
        )
    monkeypatch.setattr(decoder, "_materialise", lambda m, f, p: (loads.append(p), real(m, f, p)))
    loads.clear()
    resumed = quantize.quantize_checkpoint(
        tmp_path / "ckpt", config, ids, work_dir=tmp_path / "work", progress=False
    )
    assert "model.layers.0." not in loads and "model.layers.1." in loads
    kompakt.save(resumed, tmp_path / "resumed")
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "resumed" / "model.safetensors").read_bytes()

    other = quantize.JLCMConfig(bits=3, steps=5)
    with pytest.raises(KompaktError, match="another config"):
        quantize.quantize_checkpoint(tmp_path / "ckpt", other, ids, work_dir=tmp_path / "work")


# --- bad input ------------------------------------------------------------------------------


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="method"):
        quantize.QuantizeConfig(method="awq")
    with pytest.raises(ValueError, match="bits"):
        quantize.QuantizeConfig(bits=0.5)
    with pytest.raises(KompaktError, match="method='rtn'"):
        quantize.jlcm(tiny_cnn(), quantize.QuantizeConfig(method="rtn"), _images())
    with pytest.raises(KompaktError, match="token ids"):
        quantize.quantize(tiny_llama(), quantize.JLCMConfig(), torch.randn(2, 8).long().float())
    with pytest.raises(KompaktError, match="no Linear, Conv2d or Embedding"):
        quantize.quantize(tiny_cnn(), quantize.JLCMConfig(skip=("*",)), _images())
    coded = quantize.quantize(tiny_cnn(), quantize.QuantizeConfig(method="rtn"), _images())
    with pytest.raises(KompaktError, match="already quantized"):
        quantize.quantize(coded, quantize.QuantizeConfig(method="rtn"), _images())
    with pytest.raises(KompaktError, match="config.json"):
        quantize.quantize_checkpoint(
            "/nonexistent", quantize.JLCMConfig(), torch.zeros(1, 4).long()
        )


# --- command line and pipeline ------------------------------------------------------------


def test_cli_compress_quantize_a_checkpoint_folder_and_an_artifact(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ckpt = tmp_path / "ckpt"
    tiny_llama().save_pretrained(ckpt)
    vocab = {f"w{i}": i for i in range(95)} | {"[UNK]": 95}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(ckpt)
    args = ["--method", "rtn", "--bits", "4", "--block", "16", "--calib", "2"]
    result = kompakt_cli("compress", "quantize", str(ckpt), "--out", str(tmp_path / "q"), *args)
    assert result.returncode == 0, result.stderr
    assert "rtn 15 layers" in result.stdout
    loaded = kompakt.load(tmp_path / "q")
    assert isinstance(loaded.lm_head, quantize.CodebookLinear) and loaded.lm_head.layout.bits == 4

    again = kompakt_cli("compress", "quantize", str(ckpt), "--out", str(tmp_path / "q"), *args)
    assert again.returncode == 2 and "already exists" in again.stderr
    lm_artifact = kompakt_cli(
        "compress", "quantize", str(tmp_path / "q"), "--out", str(tmp_path / "r")
    )
    assert lm_artifact.returncode == 2 and "--tokenizer" in lm_artifact.stderr
    assert not (tmp_path / "r").exists()

    cnn = kompakt.save(tiny_cnn(), tmp_path / "cnn")
    result = kompakt_cli(
        "compress",
        "quantize",
        str(cnn),
        "--out",
        str(tmp_path / "c"),
        "--calib",
        "64",
        "--steps",
        "5",
        "--damp",
        "0.05",
        "--no-block-norms",
    )
    assert result.returncode == 0, result.stderr
    assert "jlcm 10 layers" in result.stdout
    config = kompakt.artifact.record_of(kompakt.load(tmp_path / "c")).steps[-1]["config"]
    assert config["damp"] == 0.05 and config["block_norms"] is False


def test_decoded_weights_cache_gives_the_same_outputs_and_is_dropped_after():
    model = quantize.jlcm(
        tiny_cnn(), quantize.JLCMConfig(bits=3, steps=5), _images(), progress=False
    )
    x = _images(8, seed=3)
    expected = model(x)
    with quantize.decoded_weights(model):
        assert torch.equal(model(x), expected)
        assert all("_dense" in m.__dict__ for m in model.modules() if isinstance(m, CodedLayer))
    assert not any("_dense" in m.__dict__ for m in model.modules())
    assert all(not k.endswith("_dense") for k in model.state_dict())


def test_large_codebook_linear_computes_in_row_blocks_with_the_same_result():
    from kompakt.compress.quantize.layers import DECODE_ROWS

    dense = nn.Linear(16, DECODE_ROWS * 2 + 5)
    coded = kmeans_coded(dense.weight.detach(), None, 3, 64)
    layer = coded_layer_for(dense, coded, "kmeans")
    x = torch.randn(2, 3, 16)
    assert torch.allclose(layer(x), F.linear(x, coded.decode(), dense.bias), atol=1e-6)
