"""Quantize any model layer after layer, each layer calibrated on the outputs of the already
quantized layers before it (one forward pass over the calibration batches per layer)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kompakt.compress.quantize.calibration import record_inputs
from kompakt.compress.quantize.config import BitBudget, QuantizeConfig, quantize_weight
from kompakt.compress.quantize.layers import coded_layer_for, weight_matrix
from kompakt.errors import KompaktError

Batch = torch.Tensor | tuple | list | dict


def as_batches(calibration: Batch | Iterable[Batch]) -> list[Batch]:
    """A single tensor is one batch; a list of tensors / tuples / dicts is many."""
    if isinstance(calibration, torch.Tensor | dict | tuple):
        return [calibration]
    batches = list(calibration)
    if not batches:
        raise KompaktError("calibration is empty; pass at least one batch of model inputs")
    return batches


def run_batches(model: nn.Module, batches: list[Batch]) -> None:
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, tuple | list):
                model(*batch)
            else:
                model(batch)


def input_moments(
    model: nn.Module, layers: dict[str, nn.Module], batches: list[Batch]
) -> dict[str, Any]:
    """``H`` of each Linear / Conv2d layer in ``layers`` (``None`` for embeddings)."""
    seen = {n: m for n, m in layers.items() if not isinstance(m, nn.Embedding)}
    with record_inputs(seen) as moments:
        run_batches(model, batches)
    missing = [n for n, acc in moments.items() if acc.sum is None]
    if missing:
        raise KompaktError(
            f"layer {missing[0]!r} received no input from the calibration batches; skip it "
            "(config.skip) or pass calibration that reaches it"
        )
    return {n: moments[n].hessian() if n in moments else None for n in layers}


def quantize_layers(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[Batch],
    config: QuantizeConfig,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Replace each of ``layers`` (in order) by its Codebook layer; returns per-layer reports."""
    budget = BitBudget(config.bits)
    widths = dict.fromkeys(layers, budget.low)
    if not budget.uniform:
        moments = input_moments(model, layers, batches)
        widths = budget.allocate(
            {n: (weight_matrix(m), moments[n]) for n, m in layers.items()}, config.block
        )
    reports = {}
    for name in tqdm(layers, desc=f"quantize {config.method}", unit="layer", disable=not progress):
        start = time.perf_counter()
        module = layers[name]
        h = input_moments(model, {name: module}, batches)[name]
        coded, info = quantize_weight(weight_matrix(module), h, widths[name], config)
        layer = coded_layer_for(module, coded, config.method)
        model.set_submodule(name, layer)
        reports[name] = {**info, "bits": widths[name], "seconds": time.perf_counter() - start}
    return reports
