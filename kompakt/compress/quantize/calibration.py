"""Input second moments ``H = E[x x^T]`` of a layer on calibration data.

The output error of a layer whose weight ``W`` is replaced by ``Wq`` is, over the calibration
inputs, ``mean ||x^T (Wq - W)^T||^2 = tr((Wq - W) H (Wq - W)^T)``: every quantizer here
minimises (or, for RTN, is measured by) that quadratic form. For a convolution ``x`` is an
unfolded input patch; for a grouped convolution ``H`` is averaged over the groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class InputMoments:
    """Accumulates ``sum x x^T`` and the count of the inputs ``x`` a layer sees."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = _input_rows(self.module, x.detach().float())
        xtx = rows.T @ rows
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.count += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum is None:
            raise RuntimeError("no calibration input reached this layer")
        return self.sum / self.count


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows ``[n, cols]`` matching the flattened weight's columns."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        b, cols_all, positions = patches.shape
        groups = module.groups
        per_group = cols_all // groups
        # [b, groups, per_group, L] -> rows of one group each: groups share one averaged H
        return (
            patches.view(b, groups, per_group, positions).permute(0, 1, 3, 2).reshape(-1, per_group)
        )
    return x.reshape(-1, x.shape[-1])


@contextlib.contextmanager
def record_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, InputMoments]]:
    """While active, every forward of the given Linear / Conv2d layers adds to their moments."""
    moments = {name: InputMoments(m) for name, m in modules.items()}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, acc=moments[name]: acc.add(args[0]))
        for name, m in modules.items()
    ]
    try:
        yield moments
    finally:
        for h in handles:
            h.remove()


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor | None) -> float:
    """``tr(E H E^T) / tr(W H W^T)``: the layer's relative output error (weight MSE if no H)."""
    e = wq - w
    if h is None:
        return float((e * e).sum() / (w * w).sum().clamp_min(1e-30))
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum().clamp_min(1e-30))
