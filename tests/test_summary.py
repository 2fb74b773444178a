import torch

import kompakt
from kompakt.summary import format_inspection, inspect_artifact
from tests.models import tiny_cnn, tiny_llama


def test_dense_fp32_artifact_totals(tmp_path):
    model = tiny_cnn()
    path = kompakt.save(model, tmp_path / "m")
    info = inspect_artifact(path)
    totals = info["totals"]
    assert totals["params"] == sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert totals["bytes"] == stored
    assert totals["ratio_vs_fp32"] == 1.0
    assert totals["ratio_vs_fp16"] == 0.5
    names = [r["name"] for r in info["rows"]]
    assert names[0] == "stem.0" and names[-1] == "fc"
    fc = next(r for r in info["rows"] if r["name"] == "fc")
    assert fc["params"] == 8 * 10 + 10 and fc["bytes"] == 4 * (8 * 10 + 10)


def test_half_model_reports_its_real_ratio(tmp_path):
    model = tiny_llama(tie=True).to(torch.float16)
    info = inspect_artifact(kompakt.save(model, tmp_path / "m"))
    # tied lm_head is stored once; every float tensor takes 2 bytes instead of 4
    assert info["totals"]["ratio_vs_fp32"] == 2.0
    assert info["totals"]["params"] == sum(p.numel() for p in model.parameters())
    text = format_inspection(info)
    assert "2.00x vs fp32" in text and "1.00x vs fp16" in text
    assert "model.layers.1.mlp.up_proj" in text
    assert "tied to model.embed_tokens.weight" in text
