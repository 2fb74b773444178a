"""The quantization config, one solver call per layer, and the per-layer bit allocation."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

import torch
from torch import nn

from kompakt.compress.quantize.affine import GPTQ_DAMP, gptq_coded, rtn_coded
from kompakt.compress.quantize.calibration import output_error
from kompakt.compress.quantize.codebooks import group_count, kmeans_coded
from kompakt.compress.quantize.jlcm import JLCM_DAMP, jlcm_coded
from kompakt.compress.quantize.layers import CodedWeight
from kompakt.config import check

METHODS = ("jlcm", "gptq", "rtn", "kmeans")
DAMP = {"jlcm": JLCM_DAMP, "gptq": GPTQ_DAMP}  # each method's default damping


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize the Linear, Conv2d and Embedding layers of a model.

    method: ``jlcm`` (learned codebooks and mappings), ``kmeans`` (importance-weighted k-means
    codebooks), ``gptq`` or ``rtn`` (affine grids with an fp16 scale and offset per block).
    bits: average code bits per quantized weight. A fractional value (e.g. 2.5) mixes
    ``floor(bits)`` and ``ceil(bits)`` layers, giving the extra bit to the layers whose output
    error it reduces most per weight. Stored codebooks, scales and row groups come on top and
    are reported in ``bits_per_weight``.
    codebook: jlcm / kmeans: ``group`` (one codebook per group of similarly distributed output
    neurons) or ``tensor`` (one codebook per layer). rows_per_group: neurons per group on average.
    block: rtn / gptq: input columns sharing one scale and offset.
    steps: jlcm joint-learning steps per layer. kmeans_iters: k-means iterations.
    block_epochs, block_lr: jlcm on a decoder language model: epochs and Adam learning rate of
    the block phase (:mod:`.block_tuning`), which learns each block's codebooks together on
    its output and the LM head's on its logits; 0 epochs skips it. block_map_lr: the block
    phase's step for the mappings' latent weights, as a fraction of each layer's weight
    spread (standard deviation); 0 (the default) keeps the codes as the per-layer phase left
    them: on SmolLM2-135M with 16 calibration windows, 0.01 fitted the calibration blocks
    better and the test perplexity worse (docs/benchmarks.md). block_norms: the block phase
    also learns the blocks' normalisation weights (and the head's phase the final norm's),
    which stay dense, so this costs no storage.
    model_epochs, model_lr: jlcm on a decoder language model: epochs and Adam learning rate of
    the model phase, after every layer is coded: all codebooks (and, with block_norms, all
    normalisation weights) learned together on the KL divergence of the model's next-token
    distributions to the fp model's over the calibration windows, one block in memory at a
    time (gradient checkpointing); 0 epochs skips it. model_map_lr: the model phase's step for
    the mappings' latent weights, as block_map_lr is the block phase's (0: the codes stay).
    block_windows: decoder language models: the per-block phases (each layer's fit, the
    block and head phases) calibrate on the first ``block_windows`` calibration windows,
    whose cost grows with every window, while the model phase learns from all of them and
    checks its result on the last ``block_windows`` (where they do not overlap the first);
    None: every phase uses all.
    damp: gptq / jlcm damping of the input moments H (fraction of their mean diagonal);
    None: the method's own, 0.01 for gptq, 0.2 for jlcm (the better of the two for each on
    SmolLM2-135M with 16 calibration windows).
    skip: module names or fnmatch patterns kept dense (e.g. ``"*.lm_head"``).
    """

    method: str = "jlcm"
    bits: float = 3.0
    codebook: str = "group"
    rows_per_group: int = 8
    block: int = 128
    steps: int = 100
    block_epochs: int = 4
    block_lr: float = 1e-3
    block_map_lr: float = 0.0
    block_norms: bool = True
    model_epochs: int = 4
    model_lr: float = 3e-4
    model_map_lr: float = 0.0
    block_windows: int | None = None
    kmeans_iters: int = 25
    damp: float | None = None
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(
            self.method in METHODS,
            f"method must be one of {', '.join(METHODS)}, got {self.method!r}",
        )
        check(1 <= self.bits <= 8, f"bits must be between 1 and 8, got {self.bits}")
        check(
            self.codebook in ("group", "tensor"),
            f"codebook must be group or tensor, got {self.codebook!r}",
        )
        check(self.rows_per_group >= 1, f"rows_per_group must be >= 1, got {self.rows_per_group}")
        check(self.block >= 1, f"block must be >= 1, got {self.block}")
        check(
            self.steps >= 0 and self.kmeans_iters >= 1, "steps must be >= 0 and kmeans_iters >= 1"
        )
        check(
            self.block_epochs >= 0 and self.block_lr > 0,
            f"block_epochs must be >= 0 and block_lr > 0, got {self.block_epochs}, {self.block_lr}",
        )
        check(
            self.model_epochs >= 0 and self.model_lr > 0,
            f"model_epochs must be >= 0 and model_lr > 0, got {self.model_epochs}, {self.model_lr}",
        )
        check(
            self.block_windows is None or self.block_windows >= 1,
            f"block_windows must be >= 1 (or None: all), got {self.block_windows}",
        )
        check(self.block_map_lr >= 0, f"block_map_lr must be >= 0, got {self.block_map_lr}")
        check(self.model_map_lr >= 0, f"model_map_lr must be >= 0, got {self.model_map_lr}")
        check(self.damp is None or self.damp >= 0, f"damp must be >= 0, got {self.damp}")
        object.__setattr__(self, "skip", tuple(self.skip))

    def skips(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.skip)


def JLCMConfig(**fields: Any) -> QuantizeConfig:  # noqa: N802 - reads like the class it builds
    """A :class:`QuantizeConfig` with ``method="jlcm"``."""
    return QuantizeConfig(method="jlcm", **fields)


def quantize_weight(
    w: torch.Tensor, h: torch.Tensor | None, bits: int, config: QuantizeConfig
) -> tuple[CodedWeight, dict[str, Any]]:
    """Run ``config.method`` on one weight matrix; returns the codes and what was measured."""
    groups = 1 if config.codebook == "tensor" else group_count(w.shape[0], config.rows_per_group)
    info: dict[str, Any] = {}
    damp = config.damp if config.damp is not None else DAMP.get(config.method)
    if config.method == "jlcm":
        coded, info = jlcm_coded(w, h, bits, groups, config.steps, config.kmeans_iters, damp)
    elif config.method == "kmeans":
        coded = kmeans_coded(w, h, bits, groups, config.kmeans_iters)
    elif config.method == "gptq" and h is not None:
        coded = gptq_coded(w, h, bits, config.block, damp)
    else:  # rtn, and gptq on a layer without input moments (an embedding table)
        coded = rtn_coded(w, bits, config.block)
    info["error"] = output_error(w, coded.decode(), h)
    return coded, info


class BitBudget:
    """Per-layer code widths averaging ``bits``, spent greedily where they cut the most error.

    Layers come in sets (a transformer block, or the whole model); each set gets its share
    ``bits * weights`` plus what earlier sets left unspent.
    """

    def __init__(self, bits: float) -> None:
        self.low = math.floor(bits)
        self.fraction = bits - self.low
        self.carry = 0.0

    @property
    def uniform(self) -> bool:
        return self.fraction == 0

    def allocate(
        self, layers: dict[str, tuple[torch.Tensor, torch.Tensor | None]], block: int
    ) -> dict[str, int]:
        """Code bits for each of ``layers`` (name -> (weight, input moments))."""
        if self.uniform:
            return dict.fromkeys(layers, self.low)
        gains = {}
        for name, (w, h) in layers.items():
            low = output_error(w, rtn_coded(w, self.low, block).decode(), h)
            high = output_error(w, rtn_coded(w, self.low + 1, block).decode(), h)
            gains[name] = (low - high) / w.numel()
        extra = self.fraction * sum(w.numel() for w, _ in layers.values()) + self.carry
        widths = dict.fromkeys(layers, self.low)
        for name in sorted(gains, key=lambda n: -gains[n]):
            size = layers[name][0].numel()
            if size <= extra:
                widths[name] = self.low + 1
                extra -= size
        self.carry = extra
        return widths


def quantizable(model: nn.Module, config: QuantizeConfig, prefix: str = "") -> dict[str, nn.Module]:
    """The Linear, Conv2d and Embedding layers of ``model`` not skipped by ``config``.

    Only these exact types: subclasses (e.g. the out_proj of ``nn.MultiheadAttention``,
    whose weight its parent reads directly) stay dense. ``prefix`` is prepended to the
    names matched against ``config.skip``.
    """
    kinds = (nn.Linear, nn.Conv2d, nn.Embedding)
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) in kinds and not config.skips(prefix + name) and not _circular_conv(m)
    }


def _circular_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.padding_mode != "zeros"
