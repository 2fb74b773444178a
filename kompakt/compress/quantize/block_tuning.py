"""JLCM's block phase: a transformer block's codebooks and mappings learned together on its
output.

After each layer of a block is coded on its own (:mod:`.jlcm`, one layer's output error), the
block's codebooks and mappings are learned jointly by gradient descent on the block's output
error over the calibration windows,

    mean || block_q(x_q) - block_fp(x_fp) ||^2

where ``x_q`` are the hidden states of the quantized model so far and ``x_fp`` those of the
fp model: a block also learns to undo the error of the blocks before it.

- Codebooks: the decoded weights ``codebook[g(r), code]`` are differentiable in the codebook
  values, so Adam moves each codeword by the gradient summed over its weights.
- Mappings, with ``map_lr > 0`` (the proximal straight-through rule on the block's loss;
  ``QuantizeConfig.block_map_lr``, off by default): every weight has a
  latent value, starting at its decoded value, which receives the gradient of its decoded
  weight (straight through the lookup) and moves by Adam at ``map_lr`` times the layer's
  weight spread per step; after each step the weight takes the codeword nearest its latent
  value. A code thus changes only when its latent value crosses the midpoint to a
  neighbouring codeword: weights move to neighbouring codewords, and farther only under a
  sustained gradient, never jumping to the codebook's extremes.

The codebooks are rounded to fp16 (their stored precision), the codes re-read against them,
and both are kept only if the loss over all calibration windows went down, so the phase never
makes a block worse. The LM head is learned the same way on the KL divergence of its
next-token distribution to the fp head's (:func:`logits_kl`), and so, in the model phase,
are all codebooks at once on the whole model's (each layer decodes on every call, so a
forward under gradient checkpoints holds one block's decoded weights at a time).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kompakt.compress.quantize.codebooks import nearest_codes
from kompakt.compress.quantize.layers import CodedLayer
from kompakt.compress.quantize.packing import pack_codes, unpack_codes

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Learned:
    """One coded weight's codebook as a learnable fp32 tensor, its codes, and (when mappings
    are learned) the latent value of each weight. ``layers`` are the Codebook layers that
    read it (a tied LM head and token embedding share one)."""

    def __init__(self, layers: list[CodedLayer], mappings: bool) -> None:
        layer = layers[0]
        lay = layer.layout
        self.layers = layers
        # uint8: a model's codes at one byte per weight; widened per layer as it decodes
        self.codes = unpack_codes(layer.codes, lay.bits, lay.cols).to(torch.uint8)
        self.group = layer.group_of_rows()
        self.codebook = nn.Parameter(layer.codebook.float())
        self.latent = nn.Parameter(self.values(self.codebook.detach())) if mappings else None

    def values(self, codebook: torch.Tensor) -> torch.Tensor:
        return codebook[self.group].gather(1, self.codes.long())

    def decode(self, codebook: torch.Tensor) -> None:
        """Make the layers compute with ``codebook``: each call decodes (inside the caller's
        gradient checkpoint, if any), and the gradient of each decoded weight also reaches
        its latent value (straight through)."""

        def dense() -> torch.Tensor:
            weights = self.values(codebook)
            if self.latent is not None:
                weights = _StraightThrough.apply(weights, self.latent)
            return weights

        for layer in self.layers:
            layer.__dict__["_dense"] = dense

    def remap(self, codebook: torch.Tensor) -> None:
        """Every weight takes the codeword of ``codebook`` nearest its latent value."""
        if self.latent is not None:
            self.codes = nearest_codes(
                self.latent.detach(), codebook[self.group], dtype=torch.uint8
            )

    def store(self, codebook: torch.Tensor) -> None:
        codes = pack_codes(self.codes, self.layers[0].layout.bits)
        for layer in self.layers:
            layer.codebook, layer.codes = codebook.to(torch.float16), codes

    def release(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("_dense", None)


class _StraightThrough(torch.autograd.Function):
    """The decoded weights, whose gradient also reaches the latent values unchanged (one
    pass, not a sum with ``latent - latent.detach()``)."""

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return weights.view_as(weights)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad


def _learned(layers: list[CodedLayer], mappings: bool) -> list[_Learned]:
    """One learned codebook per coded weight of ``layers`` (codebook layers only: affine
    layers have none), layers sharing their coded tensors together."""
    shared: dict[int, list[CodedLayer]] = {}
    for layer in layers:
        if layer.scales is None:
            shared.setdefault(id(layer.codes), []).append(layer)
    return [_Learned(group, mappings) for group in shared.values()]


def tune_codebooks(
    layers: list[CodedLayer],
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    loss: Loss,
    epochs: int,
    lr: float,
    batch: int,
    map_lr: float = 0.0,
    norms: Sequence[nn.Parameter] = (),
    seed: int = 0,
    check: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Learn the codebooks of ``layers`` (which ``forward`` computes with) by Adam on
    ``loss(forward(inputs[index]), index)``, mean over the calibration windows ``inputs``, with
    ``map_lr > 0`` their mappings too, and the ``norms`` (normalisation weights ``forward``
    uses, learned in place); returns that loss before and after over the windows ``check``
    (indices; default all), the result being kept only if it went down there, and the
    fraction of codes that changed."""
    learned = _learned(layers, map_lr > 0)
    check = torch.arange(len(inputs)) if check is None else check
    batches = list(check.split(batch))
    start_codes = [item.codes for item in learned]
    start_norms = [p.detach().clone() for p in norms]

    def total(codebooks: list[torch.Tensor]) -> float:
        with torch.no_grad():
            for item, codebook in zip(learned, codebooks, strict=True):
                item.decode(codebook)
            return sum(float(loss(forward(inputs[i]), i)) * len(i) for i in batches) / len(check)

    groups = [{"params": [item.codebook for item in learned], "lr": lr}]
    # a norm weight moves by the same fraction of its size per step as a codeword does
    codeword_size = statistics.fmean(float(item.codebook.detach().abs().mean()) for item in learned)
    groups += [
        {"params": [p], "lr": lr * float(p.detach().abs().mean()) / max(codeword_size, 1e-12)}
        for p in norms
    ]
    groups += [
        {"params": [item.latent], "lr": map_lr * float(item.latent.detach().std())}
        for item in learned
        if item.latent is not None
    ]
    try:
        before = total([item.codebook.detach() for item in learned])
        optimizer = torch.optim.Adam(groups, fused=True)  # one pass over the latent weights
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for index in torch.randperm(len(inputs), generator=generator).split(batch):
                for item in learned:
                    item.decode(item.codebook)
                value = loss(forward(inputs[index]), index)
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                for item in learned:
                    item.remap(item.codebook.detach())
        tuned = [item.codebook.detach().to(torch.float16).float() for item in learned]
        for item, codebook in zip(learned, tuned, strict=True):
            item.remap(codebook)
        after = total(tuned)
        changed = sum(
            int((item.codes != c).sum()) for item, c in zip(learned, start_codes, strict=True)
        )
        weights = sum(c.numel() for c in start_codes)
        if after < before:
            for item, codebook in zip(learned, tuned, strict=True):
                item.store(codebook)
        else:
            changed = 0
            with torch.no_grad():
                for p, value in zip(norms, start_norms, strict=True):
                    p.copy_(value)
    finally:
        for item in learned:
            item.release()
    return {
        "before": before,
        "after": min(before, after),
        "codes_changed": changed / max(weights, 1),
    }


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
