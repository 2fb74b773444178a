"""Measures shared by the library, the pipeline and the benchmarks: top-1 accuracy,
perplexity of a causal language model, and the median latency of a torch module."""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def accuracy(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 100
) -> float:
    """Top-1 accuracy of ``model`` (run in eval mode, then put back) on ``inputs``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(inputs), batch_size):
        predicted = model(inputs[i : i + batch_size]).argmax(1)
        correct += (predicted == labels[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(inputs)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch: int = 2) -> float:
    """exp of the mean next-token cross-entropy of a causal LM over the windows ``ids``
    ``[windows, seq]``: every position but the first of each window is predicted."""
    total, count = 0.0, 0
    for start in range(0, len(ids), batch):
        part = ids[start : start + batch]
        logits = model(part, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += part[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: torch.Tensor, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of ``model(inputs)`` in eval mode, in milliseconds, after ``warmup``
    untimed calls."""
    model.eval()
    for _ in range(warmup):
        model(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(inputs)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
