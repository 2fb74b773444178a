"""Tiny seeded models shared by the tests."""

from __future__ import annotations

import torch

from kompakt.models import build


def tiny_cnn(seed: int = 0):
    """The registered Fashion-MNIST ResNet at small widths, with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = build("fmnist_resnet", widths=[4, 8, 8], blocks_per_stage=1)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 1, 28, 28))
    return model.eval()


def tiny_llama(seed: int = 0, tie: bool = True):
    """A 2-layer LlamaForCausalLM with grouped-query attention, built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()
