"""ONNX lowering of the Codebook custom ops (:mod:`kompakt.export.codebook_ops`).

Each op becomes a short chain of standard opset-18 ops that decodes the packed codes next to
their use, shaped for onnxruntime's fast kernels (no broadcast over a small last axis, no
element-wise Gather):

- unpack: the packed bytes of a chunk (``8 / gcd(bits, 8)`` codes in ``bits * n / 8`` bytes,
  :mod:`kompakt.compress.quantize.packing`) go through one float MatMul with a constant
  ``[bytes, codes]`` matrix that places the two bytes each code starts in at the code's bit
  offset (``2**(8 * (i - first) - shift)``); the integer part's low ``bits`` bits are the
  code (Cast to int32 truncates, BitwiseAnd masks). Every value is a sum of at most two
  byte multiples below ``2**16`` times powers of two, so float32 holds it exactly.
- lookup: ``GatherElements`` into each row's codebook (``[rows, 2**bits]``); scales and
  offsets apply per block of columns;
- a linear layer multiplies (``Gemm``) in blocks of ``DECODE_ROWS`` weight rows, so at most
  one block of decoded weights exists at a time.

Ordering: a decode that read only initializers could run as soon as the model starts (and
onnxruntime would hold every layer's decoded weights at once), or be folded into a dense
initializer by an optimizer. Each decode therefore slices its codes from a start index that
depends on the layer's input (an empty ``Shape`` of the input concatenated to the constant
start), and each row block of a large layer on the previous block's output.
"""

from __future__ import annotations

import math

import numpy as np

from kompakt.compress.quantize.layers import DECODE_ROWS
from kompakt.compress.quantize.packing import chunk_layout

FLOAT, INT32 = 1, 6  # ONNX TensorProto data types


class _Lowering:
    """The two translation functions for one export; constants are created once per value
    and graph (the model's, or the body of a ``Scan`` over stacked layers)."""

    def __init__(self) -> None:
        from onnxscript import opset18

        self.op = opset18
        self._graphs: dict[int, tuple[object, dict]] = {}  # graph id -> (graph, constants)
        self._floats: dict[int, tuple] = {}  # a tensor's cast, in the tensor's own graph

    def _enter(self, codes) -> None:
        """Use the constants of the graph that holds ``codes`` (an initializer or input)."""
        graph = codes.graph
        assert graph is not None, "the exporter gave a Codebook tensor outside any graph"
        if id(graph) not in self._graphs:  # the graph is kept, so its id stays its own
            self._graphs[id(graph)] = (graph, {})
        self._constants = self._graphs[id(graph)][1]

    def const(self, values, dtype):
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            from onnxscript import ir

            self._constants[key] = self.op.Constant(value=ir.tensor(array))
        return self._constants[key]

    def float32(self, tensor):
        """``tensor`` (an fp16 codebook, scales or offsets) as float32, cast once per layer."""
        if id(tensor) not in self._floats:  # the tensor is kept, so its id stays its own
            self._floats[id(tensor)] = (tensor, self.op.Cast(tensor, to=FLOAT))
        return self._floats[id(tensor)][1]

    def ints(self, *values):
        return self.const(list(values), np.int64)

    def _rows(self, tensors, start: int, stop: int, after=None):
        """``t[start:stop]`` (axis 0) of each tensor; computed once ``after`` exists if given
        (an empty ``Shape`` of ``after`` concatenated to the start)."""
        op = self.op
        starts = self.ints(start)
        if after is not None:
            starts = op.Concat(starts, op.Shape(after, start=0, end=0), axis=0)
        return [op.Slice(t, starts, self.ints(stop), self.ints(0)) for t in tensors]

    def _unpack(self, codes, bits: int, cols: int):
        """Packed uint8 ``[n, bytes]`` -> int32 codes ``[n, cols]``."""
        op = self.op
        per_chunk, chunk_bytes = chunk_layout(bits)
        place = np.zeros((chunk_bytes, per_chunk), np.float32)
        for j in range(per_chunk):
            first, shift = divmod(bits * j, 8)
            for i in (first, first + 1):
                if i < chunk_bytes:
                    place[i, j] = 2.0 ** (8 * (i - first) - shift)
        chunks = op.Reshape(op.Cast(codes, to=FLOAT), self.ints(0, -1, chunk_bytes))
        placed = op.Cast(op.MatMul(chunks, self.const(place, np.float32)), to=INT32)
        fields = op.BitwiseAnd(placed, self.const((1 << bits) - 1, np.int32))
        flat = op.Reshape(fields, self.ints(0, -1))
        if -(-cols // per_chunk) * per_chunk != cols:  # padding codes at the end of each row
            flat = op.Slice(flat, self.ints(0), self.ints(cols), self.ints(1))
        return flat

    def _decode(self, codes, codebook, group, scales, offsets, static):
        """Float32 weight rows ``[n, cols]`` from packed codes ``[n, bytes]``, groups ``[n]``."""
        op = self.op
        bits, cols, block, has_scales, has_offsets = static
        index = self._unpack(codes, bits, cols)
        # each row's codebook [n, 2**bits]: gathered by the row's group, which is always 0
        # with one codebook (read from the sliced groups, so that it is never a constant)
        row_group = group if codebook.shape[0] > 1 else op.Mul(group, self.const(0, np.int32))
        table = op.Gather(self.float32(codebook), row_group, axis=0)
        weight = op.GatherElements(table, index, axis=1)
        if not (has_scales or has_offsets):
            return weight
        blocks = math.ceil(cols / block)
        if blocks * block != cols:  # a ragged last block: pad to whole blocks, cut after
            weight = op.Pad(weight, self.ints(0, 0, 0, blocks * block - cols))
        weight = op.Reshape(weight, self.ints(0, blocks, block))
        for tensor, present, combine in (
            (scales, has_scales, op.Mul),
            (offsets, has_offsets, op.Add),
        ):
            if present:
                per_row = self.float32(tensor)
                if tensor.shape[0] > 1:
                    per_row = op.Gather(per_row, group, axis=0)
                weight = combine(weight, op.Unsqueeze(per_row, self.ints(-1)))
        weight = op.Reshape(weight, self.ints(0, blocks * block))
        if blocks * block != cols:
            weight = op.Slice(weight, self.ints(0), self.ints(cols), self.ints(1))
        return weight

    def codebook_linear(self, x, codes, codebook, group, scales, offsets, bias, *static):
        """``x [n, cols] @ decode(codes).T + bias``, in row blocks of ``DECODE_ROWS``."""
        self._enter(codes)
        op = self.op
        rows = codes.shape[0]
        if rows <= DECODE_ROWS:
            codes, group = self._rows((codes, group), 0, rows, x)
            weight = self._decode(codes, codebook, group, scales, offsets, static)
            return op.Gemm(x, weight, bias, transB=1)
        outputs, after = [], x
        for start in range(0, rows, DECODE_ROWS):
            stop = min(start + DECODE_ROWS, rows)
            block_codes, block_group = self._rows((codes, group), start, stop, after)
            (block_bias,) = self._rows((bias,), start, stop)
            weight = self._decode(block_codes, codebook, block_group, scales, offsets, static)
            outputs.append(op.Gemm(x, weight, block_bias, transB=1))
            after = outputs[-1]
        return op.Concat(*outputs, axis=1)

    def codebook_rows(self, index, codes, codebook, group, scales, offsets, *static):
        """The decoded rows ``index [n]`` of the coded weight: float32 ``[n, cols]``."""
        self._enter(codes)
        op = self.op
        rows_codes, rows_group = (op.Gather(t, index, axis=0) for t in (codes, group))
        return self._decode(rows_codes, codebook, rows_group, scales, offsets, static)


def translation_table() -> dict:
    """For ``torch.onnx.export(custom_translation_table=...)``; one per export."""
    import torch

    from kompakt.export import codebook_ops  # noqa: F401  (registers the custom ops)

    lowering = _Lowering()

    # plain functions: the exporter annotates them with attributes, which methods refuse
    def codebook_linear(x, codes, codebook, group, scales, offsets, bias, *static):
        return lowering.codebook_linear(x, codes, codebook, group, scales, offsets, bias, *static)

    def codebook_rows(index, codes, codebook, group, scales, offsets, *static):
        return lowering.codebook_rows(index, codes, codebook, group, scales, offsets, *static)

    return {
        torch.ops.kompakt.codebook_linear.default: codebook_linear,
        torch.ops.kompakt.codebook_rows.default: codebook_rows,
    }
