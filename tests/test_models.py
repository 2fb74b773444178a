import math

import pytest
import torch

import kompakt
from kompakt.errors import KompaktError
from kompakt.models import build, load_smollm2, names


def test_registry():
    assert "fmnist_resnet" in names()
    with pytest.raises(KompaktError, match="unknown model 'resnet9000'.*fmnist_resnet"):
        build("resnet9000")
    with pytest.raises(KompaktError, match="fmnist_resnet"):
        build("fmnist_resnet", depth=3)


def test_reference_cnn_is_a_residual_net_with_batchnorm():
    model = build("fmnist_resnet")
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BasicBlock", "BatchNorm2d", "Conv2d", "Linear"} <= kinds
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    block = model.stages[1][1]
    x = torch.randn(1, 32, 7, 7)
    with torch.no_grad():  # zero the residual branch: the block passes relu(x) through
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    assert torch.equal(block.eval()(x), torch.relu(x))


@pytest.mark.slow
def test_smollm2_is_a_plain_saveable_llama_that_knows_english(tmp_path):
    model, tokenizer = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # random weights would give a perplexity near the vocabulary size (49,152)
    assert math.exp(loss) < 20
    kompakt.save(model, tmp_path / "smol")
    loaded = kompakt.load(tmp_path / "smol")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
