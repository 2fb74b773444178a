"""Codebook-coded weights and the layers that compute with them.

A weight matrix ``W [rows, cols]`` (a conv kernel is flattened to ``[out, in/groups * kh * kw]``)
is stored as

- ``codes``: one ``bits``-bit code per weight, bit-packed row by row (see :mod:`.packing`);
- ``codebook``: fp16 ``[C, 2**bits]``, one codebook per row group (``C == groups``) or one for
  the whole tensor (``C == 1``);
- ``row_group``: the group of each row, packed at ``ceil(log2(groups))`` bits per row (int16
  above 8 bits); absent when there is one group or one group per row (then the group of
  row ``r`` is ``r``);
- optional ``scales`` and ``offsets``: fp16 ``[groups, ceil(cols / block)]``.

and decodes to ``W[r, c] = codebook[g(r), code[r, c]] * scales[g(r), c // block] + offsets[...]``.
RTN and GPTQ store the integer grid ``0..2**b-1`` as a single codebook with per-row,
per-block scales and offsets; k-means and JLCM store learned codebooks per group of rows.
Every stored byte counts in :meth:`CodedLayer.bits_per_weight`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kompakt import artifact
from kompakt.compress.quantize.packing import pack_codes, packed_row_bytes, unpack_codes
from kompakt.errors import KompaktError

PLAN_KIND = "quantize"
DECODE_ROWS = 1024
"""Rows a CodebookLinear decodes at once; larger layers compute their output in row blocks."""


@dataclasses.dataclass
class CodedWeight:
    """A quantizer's result for one weight matrix, before packing (all tensors float32/int64)."""

    codes: torch.Tensor  # [rows, cols] int64 in [0, 2**bits)
    bits: int
    codebook: torch.Tensor  # [C, 2**bits], C in (1, groups)
    groups: int
    row_group: torch.Tensor | None = None  # [rows] int64; None when groups is 1 or rows
    scales: torch.Tensor | None = None  # [groups, blocks]
    offsets: torch.Tensor | None = None  # [groups, blocks]
    block: int | None = None  # columns per scale block; None = all columns

    def group_of_rows(self) -> torch.Tensor:
        return _group_of_rows(self.codes.shape[0], self.groups, self.row_group)

    def decode(self) -> torch.Tensor:
        """The dense float32 weight these codes stand for (codebook and scales rounded to fp16)."""
        return decode_codes(
            self.codes,
            self.group_of_rows(),
            _fp16(self.codebook),
            _fp16(self.scales),
            _fp16(self.offsets),
            self.block or self.codes.shape[1],
        )


def _fp16(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float16).float()


def _group_of_rows(rows: int, groups: int, row_group: torch.Tensor | None) -> torch.Tensor:
    if row_group is not None:
        return row_group.long()
    if groups == rows:
        return torch.arange(rows)
    return torch.zeros(rows, dtype=torch.int64)


def decode_codes(codes, group, codebook, scales, offsets, block) -> torch.Tensor:
    """Shared decode: ``codes [n, cols]`` of rows whose groups are ``group [n]``."""
    table = codebook[group] if codebook.shape[0] > 1 else codebook.expand(len(group), -1)
    w = torch.gather(table, 1, codes.long())
    if scales is None and offsets is None:
        return w
    rows, cols = codes.shape
    blocks = -(-cols // block)
    if blocks * block != cols:  # a ragged last block: pad to whole blocks, cut after
        w = F.pad(w, (0, blocks * block - cols))
    w = w.view(rows, blocks, block)  # scales broadcast over each block, never expanded
    if scales is not None:
        w = w * scales[group][:, :, None]
    if offsets is not None:
        w = w + offsets[group][:, :, None]
    return w.reshape(rows, blocks * block)[:, :cols]


def group_bits(groups: int, rows: int) -> int:
    """Bits per row that the row-to-group map takes (0 when it is implicit)."""
    return 0 if groups in (1, rows) else max(1, math.ceil(math.log2(groups)))


def pack_row_groups(row_group: torch.Tensor, groups: int) -> torch.Tensor:
    """The row-to-group map as stored: packed ``uint8 [1, bytes]``, or ``int16 [rows]``."""
    bits = group_bits(groups, len(row_group))
    return row_group.to(torch.int16) if bits > 8 else pack_codes(row_group[None], bits)


def unpack_row_groups(stored: torch.Tensor, groups: int, rows: int) -> torch.Tensor:
    if stored.dtype == torch.int16:
        return stored.long()
    return unpack_codes(stored, group_bits(groups, rows), rows)[0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shapes of a coded weight's stored tensors; recorded in the plan to rebuild the layer."""

    rows: int
    cols: int
    bits: int
    groups: int
    codebooks: int
    block: int
    scales: bool
    offsets: bool
    method: str

    @classmethod
    def of(cls, coded: CodedWeight, method: str) -> Layout:
        rows, cols = coded.codes.shape
        return cls(
            rows=rows,
            cols=cols,
            bits=coded.bits,
            groups=coded.groups,
            codebooks=coded.codebook.shape[0],
            block=coded.block or cols,
            scales=coded.scales is not None,
            offsets=coded.offsets is not None,
            method=method,
        )

    def empty_buffers(self) -> dict[str, torch.Tensor]:
        blocks = -(-self.cols // self.block)
        buffers = {
            "codes": torch.zeros(
                self.rows, packed_row_bytes(self.cols, self.bits), dtype=torch.uint8
            ),
            "codebook": torch.zeros(self.codebooks, 1 << self.bits, dtype=torch.float16),
        }
        if group_bits(self.groups, self.rows):
            buffers["row_group"] = pack_row_groups(
                torch.zeros(self.rows, dtype=torch.int64), self.groups
            )
        if self.scales:
            buffers["scales"] = torch.zeros(self.groups, blocks, dtype=torch.float16)
        if self.offsets:
            buffers["offsets"] = torch.zeros(self.groups, blocks, dtype=torch.float16)
        return buffers


class CodedLayer(nn.Module):
    """Base of the Codebook layers: holds the coded weight's buffers and decodes them."""

    layer_kind = ""

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = layout
        for name, tensor in layout.empty_buffers().items():
            self.register_buffer(name, tensor)
        for name in ("row_group", "scales", "offsets"):
            if not hasattr(self, name):
                setattr(self, name, None)

    def fill(self, coded: CodedWeight) -> None:
        """Store ``coded`` (packed codes, fp16 codebook and scales) in this layer's buffers."""
        if Layout.of(coded, self.layout.method) != self.layout:
            raise KompaktError(
                f"coded weight layout {Layout.of(coded, self.layout.method)} != {self.layout}"
            )
        self.codes = pack_codes(coded.codes, coded.bits)
        self.codebook = coded.codebook.to(torch.float16)
        if self.row_group is not None:
            self.row_group = pack_row_groups(coded.row_group, coded.groups)
        if coded.scales is not None:
            self.scales = coded.scales.to(torch.float16)
        if coded.offsets is not None:
            self.offsets = coded.offsets.to(torch.float16)

    def group_of_rows(self) -> torch.Tensor:
        lay = self.layout
        row_group = None
        if self.row_group is not None:
            row_group = unpack_row_groups(self.row_group, lay.groups, lay.rows)
        return _group_of_rows(lay.rows, lay.groups, row_group)

    def decoded_rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The decoded float32 weight ``[rows, cols]``, or only the rows in ``index``."""
        cache = self.__dict__.get("_dense")
        if callable(cache):  # a decoder installed by JLCM's block and model phases
            cache = cache()
        if cache is not None:
            return cache if index is None else cache[index]
        lay = self.layout
        codes, group = self.codes, self.group_of_rows()
        if index is not None:
            codes, group = codes[index], group[index]
        floats = [t if t is None else t.float() for t in (self.codebook, self.scales, self.offsets)]
        return decode_codes(unpack_codes(codes, lay.bits, lay.cols), group, *floats, lay.block)

    def weight_bits(self) -> int:
        """Stored bits of the coded weight: codes, codebooks, row groups, scales, offsets."""
        names = ("codes", "codebook", "row_group", "scales", "offsets")
        return sum(
            t.numel() * t.element_size() * 8 for n in names if (t := getattr(self, n)) is not None
        )

    def bits_per_weight(self) -> float:
        return self.weight_bits() / (self.layout.rows * self.layout.cols)

    def kompakt_encoding(self) -> dict[str, Any]:
        bias = getattr(self, "bias", None)
        params = self.layout.rows * self.layout.cols + (0 if bias is None else bias.numel())
        return {
            "method": self.layout.method,
            "bits": self.layout.bits,
            "bits_per_weight": round(self.bits_per_weight(), 4),
            "params": params,
            "fp32_bytes": 4 * params,
        }

    def plan_entry(self, module: str) -> dict[str, Any]:
        return {
            "kind": PLAN_KIND,
            "module": module,
            "layer": self.layer_kind,
            "args": self.layer_args(),
            "layout": dataclasses.asdict(self.layout),
        }

    def layer_args(self) -> dict[str, Any]:
        raise NotImplementedError


@contextlib.contextmanager
def decoded_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, Codebook layers keep their decoded weights instead of decoding on
    every call: as fast as the dense model, and as large. For evaluation loops."""
    layers = [m for m in model.modules() if isinstance(m, CodedLayer)]
    try:
        for layer in layers:
            layer.__dict__["_dense"] = layer.decoded_rows()
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("_dense", None)


class CodebookLinear(CodedLayer):
    """``nn.Linear`` whose weight is coded: ``forward(x) == F.linear(x, decoded, bias)``."""

    layer_kind = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool, layout: Layout) -> None:
        super().__init__(layout)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def layer_args(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.layout.rows
        if rows <= DECODE_ROWS or "_dense" in self.__dict__:
            return F.linear(x, self.decoded_rows().to(x.dtype), self.bias)
        # a large layer (an LM head) decodes and multiplies in row blocks, so that only one
        # block of decoded weights exists at a time
        outputs = []
        for start in range(0, rows, DECODE_ROWS):
            index = torch.arange(start, min(start + DECODE_ROWS, rows))
            bias = None if self.bias is None else self.bias[start : start + DECODE_ROWS]
            outputs.append(F.linear(x, self.decoded_rows(index).to(x.dtype), bias))
        return torch.cat(outputs, dim=-1)


class CodebookConv2d(CodedLayer):
    """``nn.Conv2d`` (zero padding) whose kernel is coded, one row per output channel."""

    layer_kind = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] | str,
        dilation: tuple[int, int],
        groups: int,
        bias: bool,
        layout: Layout,
    ) -> None:
        super().__init__(layout)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation, self.groups = tuple(dilation), groups
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def layer_args(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
        }

    def kernel(self) -> torch.Tensor:
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        return self.decoded_rows().view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x,
            self.kernel().to(x.dtype),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class CodebookEmbedding(CodedLayer):
    """``nn.Embedding`` whose table is coded; a lookup decodes only the rows it reads."""

    layer_kind = "embedding"

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, layout: Layout
    ) -> None:
        super().__init__(layout)
        self.num_embeddings, self.embedding_dim, self.padding_idx = (
            num_embeddings,
            embedding_dim,
            padding_idx,
        )

    def layer_args(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
        }

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.decoded_rows(ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim)


LAYERS: dict[str, type[CodedLayer]] = {
    cls.layer_kind: cls for cls in (CodebookLinear, CodebookConv2d, CodebookEmbedding)
}


def coded_layer_for(module: nn.Module, coded: CodedWeight, method: str) -> CodedLayer:
    """A Codebook layer replacing dense ``module``, holding ``coded`` and the module's bias."""
    layout = Layout.of(coded, method)
    if isinstance(module, nn.Linear):
        layer: CodedLayer = CodebookLinear(
            module.in_features, module.out_features, module.bias is not None, layout
        )
    elif isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise KompaktError(
                f"Conv2d with padding_mode={module.padding_mode!r} cannot be coded; skip it"
            )
        layer = CodebookConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            layout,
        )
    elif isinstance(module, nn.Embedding):
        layer = CodebookEmbedding(
            module.num_embeddings, module.embedding_dim, module.padding_idx, layout
        )
    else:
        raise KompaktError(
            f"{type(module).__name__} has no Codebook layer (Linear, Conv2d, Embedding have)"
        )
    layer.fill(coded)
    bias = getattr(module, "bias", None)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone())
    return layer.to(next(module.parameters()).device)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The dense weight of a Linear, Conv2d or Embedding as float32 ``[rows, cols]``."""
    return module.weight.detach().float().reshape(module.weight.shape[0], -1)


@artifact.plan_step(PLAN_KIND)
def replay(model: nn.Module, entry: dict[str, Any]) -> None:
    """Replace ``entry['module']`` by an empty Codebook layer of the recorded layout."""
    missing = [f for f in ("module", "layer", "args", "layout") if f not in entry]
    if missing:
        raise KompaktError(
            f"plan entry {PLAN_KIND}: field(s) {', '.join(missing)} missing; re-create the artifact"
        )
    cls = LAYERS.get(entry["layer"])
    if cls is None:
        raise KompaktError(
            f"plan entry {PLAN_KIND} for {entry['module']!r}: unknown layer kind {entry['layer']!r} "
            f"(known: {', '.join(LAYERS)})"
        )
    try:
        model.get_submodule(entry["module"])
        layout = Layout(**entry["layout"])
        layer = cls(**entry["args"], layout=layout)
    except (AttributeError, TypeError) as e:
        raise KompaktError(
            f"plan entry {PLAN_KIND} for {entry['module']!r}: {e}; re-create the artifact"
        ) from e
    model.set_submodule(entry["module"], layer)


def summarize(
    model: nn.Module, reports: dict[str, dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """Bits per weight over the coded layers (codes, codebooks, scales, row groups), and their errors."""
    # tied layers (an embedding sharing lm_head's codes) count once
    unique = list({id(m.codes): m for m in model.modules() if isinstance(m, CodedLayer)}.values())
    weights = sum(m.layout.rows * m.layout.cols for m in unique)
    stored = sum(m.weight_bits() for m in unique)
    model_phase = reports.get("model", {})  # JLCM's model phase: KL before, after; codes changed
    phases = reports.get("phases", {})  # a decoder's wall time outside the layers' coding
    reports = {name: r for name, r in reports.items() if name not in ("model", "phases")}
    errors = [r["error"] for r in reports.values()]
    metrics = {
        **{"model_" + key: value for key, value in model_phase.items()},
        **{f"{phase}_seconds": round(value, 2) for phase, value in phases.items()},
        "coding_seconds": round(sum(r.get("seconds", 0.0) for r in reports.values()), 2),
        "coded_layers": len(reports),
        "bits_per_weight": stored / weights if weights else 0.0,
        "coded_weight_bytes": stored // 8,
        "mean_layer_error": sum(errors) / len(errors) if errors else 0.0,
        "seconds": round(seconds, 2),
    }
    # JLCM's block phase: each block's relative output error before and after it, and the
    # fraction of its codes it changed
    blocks = [r for r in reports.values() if "block_error_before" in r]
    for key in ("block_error_before", "block_error_after", "block_codes_changed"):
        if blocks:
            metrics["mean_" + key] = sum(r[key] for r in blocks) / len(blocks)
    return metrics
