"""Codebook layers as calls to two torch custom ops, for the exporters.

In a copy of the model, every Codebook layer becomes a :class:`Fused` module that calls
``kompakt::codebook_linear`` (the matmul with the coded weight) or ``kompakt::codebook_rows``
(decoded rows: an embedding lookup, or a conv kernel), with the packed codes, the fp16
codebook, each row's group (int32), the scales and offsets as arguments. Each exporter lowers
the two ops its own way (TVM: fused TIR kernels; ONNX: a decode in standard ops next to its
use), so neither traces the eager decode, and the float weight matrix is never a constant.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kompakt.compress.quantize.layers import (
    CodebookConv2d,
    CodebookLinear,
    CodedLayer,
    decode_codes,
)
from kompakt.compress.quantize.packing import unpack_codes


def _decode(codes, codebook, group, scales, offsets, bits, cols, block, has_scales, has_offsets):
    return decode_codes(
        unpack_codes(codes, bits, cols),
        group.long(),
        codebook.float(),
        scales.float() if has_scales else None,
        offsets.float() if has_offsets else None,
        block,
    )


@torch.library.custom_op("kompakt::codebook_linear", mutates_args=())
def codebook_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    group: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor,
    bits: int,
    cols: int,
    block: int,
    has_scales: bool,
    has_offsets: bool,
) -> torch.Tensor:
    """``x [n, cols] @ decode(codes).T + bias``; TVM lowers it to a fused kernel."""
    w = _decode(codes, codebook, group, scales, offsets, bits, cols, block, has_scales, has_offsets)
    return F.linear(x, w, bias)


@codebook_linear.register_fake
def _(x, codes, codebook, group, scales, offsets, bias, bits, cols, block, has_scales, has_offsets):
    return x.new_empty(x.shape[0], codes.shape[0])


@torch.library.custom_op("kompakt::codebook_rows", mutates_args=())
def codebook_rows(
    index: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    group: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    cols: int,
    block: int,
    has_scales: bool,
    has_offsets: bool,
) -> torch.Tensor:
    """The decoded rows ``index [n]`` of the coded weight: ``[n, cols]`` float32."""
    static = (bits, cols, block, has_scales, has_offsets)
    return _decode(codes[index], codebook, group[index], scales, offsets, *static)


@codebook_rows.register_fake
def _(index, codes, codebook, group, scales, offsets, bits, cols, block, has_scales, has_offsets):
    return codebook.new_empty(index.shape[0], cols, dtype=torch.float32)


def frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class Fused(nn.Module):
    """A Codebook layer as a call to a kompakt custom op, its tensors as parameters."""

    def __init__(self, layer: CodedLayer, shared: dict[int, dict[str, nn.Parameter]]) -> None:
        super().__init__()
        lay = layer.layout
        self.layer = layer.layer_kind
        self.static = (lay.bits, lay.cols, lay.block, lay.scales, lay.offsets)
        key = id(layer.codes)  # a tied embedding and LM head share their coded tensors
        if key not in shared:
            placeholder = torch.zeros(1, 1, dtype=torch.float16)
            shared[key] = {
                "codes": frozen(layer.codes),
                "codebook": frozen(layer.codebook),
                "group": frozen(layer.group_of_rows().to(torch.int32)),
                "scales": frozen(layer.scales if lay.scales else placeholder + 1),
                "offsets": frozen(layer.offsets if lay.offsets else placeholder),
            }
        for name, p in shared[key].items():
            self.register_parameter(name, p)
        if isinstance(layer, CodebookLinear):
            self.bias = frozen(
                layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
            )
        if isinstance(layer, CodebookConv2d):
            self.conv = {
                "shape": (
                    layer.out_channels,
                    layer.in_channels // layer.groups,
                    *layer.kernel_size,
                ),
                "stride": layer.stride,
                "padding": layer.padding,
                "dilation": layer.dilation,
                "groups": layer.groups,
            }
            self.index = frozen(torch.arange(lay.rows))
            self.bias = None if layer.bias is None else frozen(layer.bias)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.codebook, self.group, self.scales, self.offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer == "linear":
            flat = x.reshape(-1, x.shape[-1])
            y = codebook_linear(flat, *self._tensors(), self.bias, *self.static)
            return y.view(*x.shape[:-1], y.shape[-1])
        if self.layer == "embedding":
            rows = codebook_rows(x.reshape(-1), *self._tensors(), *self.static)
            return rows.view(*x.shape, rows.shape[-1])
        c = self.conv
        # the row index plus an empty sum over the input (exactly 0): a kernel decode that
        # read only constants would be folded into a dense kernel by graph optimizers
        index = self.index + x[..., :0].sum().to(self.index.dtype)
        kernel = codebook_rows(index, *self._tensors(), *self.static).view(c["shape"])
        return F.conv2d(x, kernel, self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])


def fused_copy(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` in eval mode with its Codebook layers fused; and how many there were."""
    model = copy.deepcopy(model).eval()
    shared: dict[int, dict[str, nn.Parameter]] = {}
    if isinstance(model, CodedLayer):  # a single layer
        return Fused(model, shared), 1
    coded = [(n, m) for n, m in model.named_modules() if isinstance(m, CodedLayer)]
    for name, layer in coded:
        model.set_submodule(name, Fused(layer, shared))
    return model, len(coded)
