"""TIR kernels that read Codebook layers' packed codes directly.

Each kernel decodes one weight row at a time into a small buffer (``cols`` floats) from the
packed codes, the fp16 codebook and the optional fp16 scales and offsets, and uses it at
once; the dense float weight matrix is never materialised. The bit layout is that of
:mod:`kompakt.compress.quantize.packing`: code ``k`` of a row starts at bit ``k * bits`` of
the row's little-endian bytes.

Kernel arguments, in order: the activation input, then ``codes`` (uint8 ``[rows, bytes]``),
``codebook`` (fp16 ``[C, K]``, C = 1 or one per group), ``group`` (int32 ``[rows]``: each
row's group), ``scales`` and ``offsets`` (fp16 ``[G, blocks]``; ``[1, 1]`` placeholders when
the layer has none), ``bias`` (fp32 ``[rows]``, zeros when none), then the output.
"""

from __future__ import annotations

import dataclasses

from tvm.script import tirx as T

LANES = 8
"""Vector width of the dot products (fp32 lanes: two NEON or one AVX2 register)."""


@dataclasses.dataclass(frozen=True)
class CodedShape:
    """What a kernel is specialised for (all static)."""

    rows: int
    cols: int
    bits: int
    row_bytes: int
    codebooks: int  # C: 1, or one codebook per group
    entries: int  # K = 2**bits
    scale_rows: int
    blocks: int
    block: int
    has_scales: bool
    has_offsets: bool


def _decoder(s: CodedShape):
    """A TIR macro ``decode_row(dst, codes, codebook, group, scales, offsets, row)``."""
    mask = (1 << s.bits) - 1
    straddles = 8 % s.bits != 0  # codes of 3, 5, 6, 7 bits may span two bytes

    @T.macro
    def decode_row(dst, codes, codebook, group, scales, offsets, row):
        g = group[row]
        for k in range(s.cols):
            bit = k * s.bits
            byte = bit // 8
            window = T.Cast("int32", codes[row, byte])
            if straddles:
                window = window + T.if_then_else(
                    byte + 1 < s.row_bytes, T.Cast("int32", codes[row, byte + 1]) * 256, 0
                )
            code = T.bitwise_and(T.shift_right(window, bit % 8), mask)
            value = T.Cast("float32", codebook[T.min(g, s.codebooks - 1), code])
            if s.has_scales:
                value = value * T.Cast("float32", scales[g, k // s.block])
            if s.has_offsets:
                value = value + T.Cast("float32", offsets[g, k // s.block])
            dst[k] = value

    return decode_row


def codebook_linear(s: CodedShape):
    """``y[n, rows] = x[n, cols] @ decode(codes).T + bias``, rows in parallel."""
    decode_row = _decoder(s)
    whole = s.cols // LANES * LANES

    @T.prim_func(private=True)
    def kernel(
        var_x: T.handle,
        codes: T.Buffer((s.rows, s.row_bytes), "uint8"),
        codebook: T.Buffer((s.codebooks, s.entries), "float16"),
        group: T.Buffer((s.rows,), "int32"),
        scales: T.Buffer((s.scale_rows, s.blocks), "float16"),
        offsets: T.Buffer((s.scale_rows, s.blocks), "float16"),
        bias: T.Buffer((s.rows,), "float32"),
        var_y: T.handle,
    ):
        n = T.int64()
        x = T.match_buffer(var_x, (n, s.cols), "float32")
        y = T.match_buffer(var_y, (n, s.rows), "float32")
        for o in T.parallel(s.rows):
            w = T.alloc_buffer((s.cols,), "float32")
            decode_row(w, codes, codebook, group, scales, offsets, o)
            for i in range(n):
                acc = T.alloc_buffer((LANES,), "float32")
                for j in T.vectorized(LANES):
                    acc[j] = T.float32(0)
                for kk in range(whole // LANES):
                    for j in T.vectorized(LANES):
                        acc[j] = acc[j] + x[i, kk * LANES + j] * w[kk * LANES + j]
                total = T.alloc_buffer((1,), "float32")
                total[0] = bias[o]
                for j in range(LANES):
                    total[0] = total[0] + acc[j]
                for k in range(whole, s.cols):
                    total[0] = total[0] + x[i, k] * w[k]
                y[i, o] = total[0]

    return kernel


def codebook_rows(s: CodedShape):
    """``out[n, cols] = decode(codes)[index]``: an embedding lookup decoding only its rows."""
    decode_row = _decoder(s)

    @T.prim_func(private=True)
    def kernel(
        var_index: T.handle,
        codes: T.Buffer((s.rows, s.row_bytes), "uint8"),
        codebook: T.Buffer((s.codebooks, s.entries), "float16"),
        group: T.Buffer((s.rows,), "int32"),
        scales: T.Buffer((s.scale_rows, s.blocks), "float16"),
        offsets: T.Buffer((s.scale_rows, s.blocks), "float16"),
        var_out: T.handle,
    ):
        n = T.int64()
        index = T.match_buffer(var_index, (n,), "int64")
        out = T.match_buffer(var_out, (n, s.cols), "float32")
        for i in T.parallel(n):
            row = T.alloc_buffer((s.cols,), "float32")
            decode_row(row, codes, codebook, group, scales, offsets, index[i])
            for k in range(s.cols):
                out[i, k] = row[k]

    return kernel
