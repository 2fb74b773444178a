"""Quantize: JLCM learned codebooks, with RTN, k-means and GPTQ on the same storage format.

``quantize.jlcm(model, quantize.JLCMConfig(bits=3), calibration)`` replaces the model's
Linear, Conv2d and Embedding layers by :class:`CodebookLinear`, :class:`CodebookConv2d` and
:class:`CodebookEmbedding` (bit-packed codes, fp16 codebooks), records the step and the plan
so that ``kompakt.save`` / ``kompakt.load`` round-trip it bit for bit.
``quantize_checkpoint(folder, config, calibration, work_dir=...)`` streams a Llama-family
safetensors checkpoint block by block and resumes interrupted runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn

from kompakt import artifact
from kompakt.compress.quantize.config import JLCMConfig, QuantizeConfig, quantizable
from kompakt.compress.quantize.decoder import is_decoder_lm, quantize_checkpoint, quantize_decoder
from kompakt.compress.quantize.layers import (
    CodebookConv2d,
    CodebookEmbedding,
    CodebookLinear,
    CodedLayer,
    decoded_weights,
    summarize,
)
from kompakt.compress.quantize.sequential import Batch, as_batches, quantize_layers
from kompakt.config import to_dict
from kompakt.errors import KompaktError


def quantize(
    model: nn.Module,
    config: QuantizeConfig,
    calibration: Batch | Iterable[Batch],
    *,
    work_dir: str | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place with ``config.method``; returns it (in eval mode).

    ``calibration``: for a decoder language model, token ids ``[windows, seq]`` (quantized
    block by block, resumable with ``work_dir``); otherwise model inputs: one batch (a tensor,
    tuple or dict) or a list of batches.
    """
    model.eval()
    coded = [n for n, m in model.named_modules() if isinstance(m, CodedLayer)]
    if coded:
        raise KompaktError(
            f"{type(model).__name__} is already quantized ({len(coded)} Codebook layers, e.g. "
            f"{coded[0]!r}); quantize the float model"
        )
    decoder_lm = is_decoder_lm(model)
    if decoder_lm and not isinstance(calibration, torch.Tensor):
        raise KompaktError(
            "calibration for a decoder language model must be a [windows, seq] token id tensor"
        )
    if not decoder_lm and work_dir is not None:
        raise KompaktError("work_dir (resume) applies to decoder language models only")
    layers = {} if decoder_lm else quantizable(model, config)
    if not decoder_lm and not layers:
        raise KompaktError(
            f"{type(model).__name__} has no Linear, Conv2d or Embedding layer to quantize"
        )
    batches = [calibration] if decoder_lm else as_batches(calibration)
    with artifact.step(model, config.method, to_dict(config), inputs=batches[0]) as metrics:
        t0 = time.perf_counter()
        if decoder_lm:
            reports = quantize_decoder(
                model, config, calibration, work_dir=work_dir, progress=progress
            )
        else:
            reports = quantize_layers(model, layers, batches, config, progress)
            record = artifact.record_of(model)
            record.plan.extend(model.get_submodule(n).plan_entry(n) for n in reports)
        metrics.update(summarize(model, reports, time.perf_counter() - t0))
    return model


def jlcm(
    model: nn.Module,
    config: QuantizeConfig,
    calibration: Batch | Iterable[Batch],
    **kwargs,
) -> nn.Module:
    """JLCM: :func:`quantize` with a ``method="jlcm"`` config (see :func:`JLCMConfig`)."""
    if config.method != "jlcm":
        raise KompaktError(
            f"jlcm() got a config with method={config.method!r}; use quantize() for it"
        )
    return quantize(model, config, calibration, **kwargs)


__all__ = [
    "CodebookConv2d",
    "CodebookEmbedding",
    "CodebookLinear",
    "CodedLayer",
    "JLCMConfig",
    "QuantizeConfig",
    "decoded_weights",
    "jlcm",
    "is_decoder_lm",
    "quantize",
    "quantize_checkpoint",
]
