"""JLCM's block phase: the codebooks of a transformer block learned together on its output.

After each layer of a block is coded on its own (:mod:`.jlcm`, one layer's output error), the
block's codebooks are learned jointly by gradient descent on the block's output error over
the calibration windows, the codes held fixed: the decoded weights ``codebook[g(r), code]``
are differentiable in the codebook values, so Adam moves each codeword by the gradient of

    mean || block_q(x_q) - block_fp(x_fp) ||^2

where ``x_q`` are the hidden states of the quantized model so far and ``x_fp`` those of the
fp model: a block also learns to undo the error of the blocks before it. The codebooks are
rounded to fp16 (their stored precision) and kept only if the block's error over all
calibration windows went down, so the phase never makes a block worse. The LM head's
codebooks are learned the same way on the KL divergence of its next-token distribution to the
fp head's (:func:`logits_kl`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kompakt.compress.quantize.layers import CodedLayer
from kompakt.compress.quantize.packing import unpack_codes

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Learned:
    """One coded layer's codebook as a learnable fp32 tensor, and its fixed codes."""

    def __init__(self, layer: CodedLayer) -> None:
        lay = layer.layout
        self.layer = layer
        self.codes = unpack_codes(layer.codes, lay.bits, lay.cols)
        self.group = layer.group_of_rows()
        self.codebook = nn.Parameter(layer.codebook.float())

    def decode(self, codebook: torch.Tensor) -> None:
        """Make the layer compute with ``codebook`` (its ``decoded_weights`` cache)."""
        self.layer.__dict__["_dense"] = codebook[self.group].gather(1, self.codes)


def tune_codebooks(
    layers: list[CodedLayer],
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    loss: Loss,
    epochs: int,
    lr: float,
    batch: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Learn the codebooks of ``layers`` (which ``forward`` computes with) by Adam on
    ``loss(forward(inputs[index]), index)``, mean over the calibration windows ``inputs``;
    returns that loss before and after (the codebooks are kept only if it went down)."""
    learned = [_Learned(layer) for layer in layers if layer.scales is None]
    batches = list(torch.arange(len(inputs)).split(batch))

    def total(codebooks: list[torch.Tensor]) -> float:
        with torch.no_grad():
            for item, codebook in zip(learned, codebooks, strict=True):
                item.decode(codebook)
            return sum(float(loss(forward(inputs[i]), i)) * len(i) for i in batches) / len(inputs)

    try:
        before = total([item.codebook.detach() for item in learned])
        optimizer = torch.optim.Adam([item.codebook for item in learned], lr=lr)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for index in torch.randperm(len(inputs), generator=generator).split(batch):
                for item in learned:
                    item.decode(item.codebook)
                value = loss(forward(inputs[index]), index)
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
        tuned = [item.codebook.detach().to(torch.float16).float() for item in learned]
        after = total(tuned)
        if after < before:
            for item, codebook in zip(learned, tuned, strict=True):
                item.layer.codebook = codebook.to(torch.float16)
    finally:
        for item in learned:
            item.layer.__dict__.pop("_dense", None)
    return {"before": before, "after": min(before, after)}


def relative_mse(targets: torch.Tensor) -> Loss:
    """The output error relative to the targets' mean square (a block's loss)."""
    norm = (targets * targets).mean().clamp_min(1e-30)
    return lambda out, index: ((out - targets[index]) ** 2).mean() / norm


def logits_kl(features: torch.Tensor, weight: torch.Tensor) -> Loss:
    """KL(fp || quantized) of the next-token distributions, the fp logits being
    ``features @ weight.T`` (an LM head's loss: what perplexity measures)."""

    def loss(out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            reference = torch.log_softmax(features[index] @ weight.T, dim=-1)
        return (
            F.kl_div(torch.log_softmax(out, dim=-1), reference, log_target=True, reduction="sum")
            / out[..., 0].numel()
        )

    return loss
