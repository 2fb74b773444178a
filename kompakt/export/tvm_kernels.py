"""TIR kernels that read Codebook layers' packed codes directly.

Each kernel decodes weight rows into a small buffer (a tile of rows for the linear kernel,
one row for a lookup) from the packed codes, the fp16 codebook and the optional fp16 scales
and offsets, and uses them at once; the dense float weight matrix is never materialised. The bit layout is that of
:mod:`kompakt.compress.quantize.packing`: code ``k`` of a row starts at bit ``k * bits`` of
the row's little-endian bytes.

Kernel arguments, in order: the activation input, then ``codes`` (uint8 ``[rows, bytes]``),
``codebook`` (fp16 ``[C, K]``, C = 1 or one per group), ``group`` (int32 ``[rows]``: each
row's group), ``scales`` and ``offsets`` (fp16 ``[G, blocks]``; ``[1, 1]`` placeholders when
the layer has none), ``bias`` (fp32 ``[rows]``, zeros when none), then the output.
"""

from __future__ import annotations

import dataclasses
import math

from tvm.script import tirx as T

TILE = 8
"""Weight rows decoded together by ``codebook_linear`` (``TILE * cols`` floats at a time)."""
TOKENS = 4
"""Input rows ``codebook_linear`` multiplies at once."""
ROWS = 2
"""Weight rows ``codebook_linear`` multiplies at once (``ROWS * TOKENS`` vector accumulators)."""
PANEL_ROWS = 6
"""Large inputs: weight rows multiplied at once (``PANEL_ROWS x 2`` vector accumulators)."""
BIG_TILE = 48
"""Large inputs: weight rows decoded together (kept in L2; each input panel is read once per
tile)."""
ON_STACK = {"disable_lower_builtin": True}
"""For a small per-thread buffer: a stack array that LLVM can keep in registers, where TVM
would otherwise allocate it from its workspace pool on every iteration of the parallel loop
(and the accumulators would go through memory at every step)."""


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
    permute: bool = False  # the target has AVX2: decode 8 codes at a time with vpermps
    lanes: int = 8  # fp32 lanes of the target's vector register: 8 (AVX2; two NEON), 16 (AVX-512)

    @property
    def panel(self) -> int:
        """Large inputs: tokens per panel of the packed input, two vectors; also the input
        rows from which ``codebook_linear`` packs its input into panels (below one full
        panel, the row-by-row dot wastes no multiply-adds on padding tokens)."""
        return 2 * self.lanes


def _decoder(s: CodedShape):
    """A TIR macro ``decode_row(dst, r, codes, codebook, group, scales, offsets, row)`` that
    writes weight row ``row`` into ``dst[r, :]``.

    The row's codebook is first converted to a float32 table. With ``s.permute`` and at most
    4 bits (at most 16 entries), each 8 codes (``bits`` bytes, one 32-bit word) become one
    vector of weights: the word is shifted per lane and masked into 8 indices, which AVX2's
    ``vpermps`` looks up in the table held in a register (two lookups and a blend for 16
    entries). The rest of the row, or all of it otherwise, is read a packing chunk at a time
    (``8 / gcd(bits, 8)`` codes in ``bits * n / 8`` bytes, one 64-bit word), with the chunk
    loops unrolled so every shift is a constant. Scales and offsets apply per block of
    columns."""
    mask = (1 << s.bits) - 1
    per_chunk = 8 // math.gcd(s.bits, 8)
    chunk_bytes = s.bits * per_chunk // 8
    chunks = s.row_bytes // chunk_bytes
    full = s.cols // per_chunk  # chunks without padding codes
    affine = s.has_scales or s.has_offsets
    eights = s.cols // 8 if s.permute and s.bits <= 4 else 0  # 8-code groups for vpermps
    first_chunk = eights * 8 // per_chunk  # where the chunk loop takes over
    table_len = max(8, s.entries) if eights else s.entries

    def word32(codes, row, start):
        """The little-endian 32-bit word of bytes ``start .. start + bits - 1``."""
        word = T.Cast("int32", codes[row, start])
        for i in range(1, s.bits):
            word = word | T.shift_left(T.Cast("int32", codes[row, start + i]), 8 * i)
        return word

    def permute(table, start, idx):
        return T.call_llvm_pure_intrin(
            "float32x8", "llvm.x86.avx2.permps", table[T.ramp(start, 1, 8)], idx
        )

    @T.macro
    def put(dst, r, word, table, c, j):
        """Code ``j`` of the chunk in ``word``, looked up in ``table``, into ``dst[r, ...]``."""
        code = T.bitwise_and(T.shift_right(word[0], T.int64(j * s.bits)), mask)
        dst[r, c * per_chunk + j] = table[T.Cast("int32", code)]

    @T.macro
    def decode_row(dst, r, codes, codebook, group, scales, offsets, row):
        g = group[row]
        table = T.alloc_buffer((table_len,), "float32", annotations=ON_STACK)
        for e in range(table_len):  # entries past K (vpermps reads 8) repeat the last one
            table[e] = T.Cast(
                "float32", codebook[T.min(g, s.codebooks - 1), T.min(e, s.entries - 1)]
            )
        if eights > 0:  # not built otherwise (wider codes overflow its 32-bit word)
            for q in range(eights):
                idx = T.bitwise_and(
                    T.shift_right(
                        T.broadcast(word32(codes, row, q * s.bits), 8), T.ramp(0, s.bits, 8)
                    ),
                    T.broadcast(T.int32(mask), 8),
                )
                if s.entries > 8:
                    dst[r, T.ramp(q * 8, 1, 8)] = T.Select(
                        idx > T.broadcast(T.int32(7), 8),
                        permute(table, 8, idx),
                        permute(table, 0, idx),
                    )
                else:
                    dst[r, T.ramp(q * 8, 1, 8)] = permute(table, 0, idx)
        word = T.alloc_buffer((1,), "int64", annotations=ON_STACK)
        for c in range(first_chunk, chunks):
            word[0] = T.int64(0)
            for i in T.unroll(chunk_bytes):
                word[0] = word[0] | T.shift_left(
                    T.Cast("int64", codes[row, c * chunk_bytes + i]), T.int64(8 * i)
                )
            if c < full:  # every code of the chunk is in the row
                for j in T.unroll(per_chunk):
                    put(dst, r, word, table, c, j)
            else:  # the last chunk's padding codes are skipped
                for j in T.unroll(per_chunk):
                    if c * per_chunk + j < s.cols:
                        put(dst, r, word, table, c, j)
        if affine:
            for b in range(s.blocks):
                scale = T.float32(1)
                if s.has_scales:
                    scale = T.Cast("float32", scales[g, b])
                offset = T.float32(0)
                if s.has_offsets:
                    offset = T.Cast("float32", offsets[g, b])
                for j in range(s.block):
                    if b * s.block + j < s.cols:
                        k = b * s.block + j
                        dst[r, k] = dst[r, k] * scale + offset

    return decode_row


def codebook_linear(s: CodedShape):
    """``y[n, rows] = x[n, cols] @ decode(codes).T + bias``, tiles of rows in parallel.

    Vectors have ``s.lanes`` fp32 lanes. Fewer than ``s.panel`` input rows: each tile of
    ``TILE`` decoded rows is multiplied ``ROWS`` weight rows by ``TOKENS`` input rows at a
    time (``dot``), so each vector load feeds several multiply-adds. From ``s.panel`` on: the
    input is first packed into panels of ``s.panel`` tokens (``[panels, cols, panel]``); each
    tile of ``BIG_TILE`` decoded rows then multiplies every panel ``PANEL_ROWS`` rows at a
    time (``panel_dot``): per column, two vector loads of tokens and one broadcast weight per
    row feed ``PANEL_ROWS x 2`` vector multiply-adds into register accumulators, with no
    horizontal sums."""
    decode_row = _decoder(s)
    lanes, panel = s.lanes, s.panel
    whole = s.cols // lanes * lanes
    tiles = -(-s.rows // TILE)
    big_tiles = -(-s.rows // BIG_TILE)

    @T.macro
    def panel_dot(y, xt, w, bias, n, b, t, r):
        """``y[b * panel + k, t * BIG_TILE + r + m] = x[b * panel + k] . w[r + m] + bias`` for
        the panel's tokens below ``n`` and ``m < PANEL_ROWS``."""
        acc = T.alloc_buffer((PANEL_ROWS, panel), "float32", annotations=ON_STACK)
        for m in T.unroll(PANEL_ROWS):
            for k in T.vectorized(panel):
                acc[m, k] = T.float32(0)
        for c in range(s.cols):
            for m in T.unroll(PANEL_ROWS):
                for k in T.vectorized(panel):
                    acc[m, k] = acc[m, k] + w[r + m, c] * xt[b, c, k]
        for m in T.unroll(PANEL_ROWS):
            row = t * BIG_TILE + r + m
            if row < s.rows:
                for k in range(panel):
                    if b * panel + k < n:
                        y[b * panel + k, row] = acc[m, k] + bias[row]

    @T.macro
    def dot(y, x, w, bias, i, count, t, r):
        """``y[i + k, t * TILE + r + m] = x[i + k] . w[r + m] + bias`` for ``k < count`` and
        ``m < ROWS``: ``ROWS x TOKENS`` vector accumulators, each weight vector loaded once
        for ``TOKENS`` inputs and each input vector once for ``ROWS`` weight rows."""
        acc = T.alloc_buffer((ROWS, TOKENS, lanes), "float32", annotations=ON_STACK)
        for m in T.unroll(ROWS):
            for k in T.unroll(TOKENS):
                for j in T.vectorized(lanes):
                    acc[m, k, j] = T.float32(0)
        for kk in range(whole // lanes):
            for k in T.unroll(TOKENS):
                if T.Cast("int64", k) < count:
                    for m in T.unroll(ROWS):
                        for j in T.vectorized(lanes):
                            acc[m, k, j] = (
                                acc[m, k, j]
                                + x[i + T.Cast("int64", k), kk * lanes + j]
                                * w[r + m, kk * lanes + j]
                            )
        for m in T.unroll(ROWS):
            for k in T.unroll(TOKENS):
                if T.Cast("int64", k) < count and t * TILE + r + m < s.rows:
                    total = T.alloc_buffer((1,), "float32", annotations=ON_STACK)
                    total[0] = bias[t * TILE + r + m]
                    for j in T.unroll(lanes):
                        total[0] = total[0] + acc[m, k, j]
                    for c in range(whole, s.cols):
                        total[0] = total[0] + x[i + T.Cast("int64", k), c] * w[r + m, c]
                    y[i + T.Cast("int64", k), t * TILE + r + m] = total[0]

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
        if n < panel:
            for t in T.parallel(tiles):
                # a tile of decoded rows; each input row is read once per tile, from L1
                w = T.alloc_buffer((TILE, s.cols), "float32")
                for r in range(TILE):
                    if t * TILE + r < s.rows:
                        decode_row(w, r, codes, codebook, group, scales, offsets, t * TILE + r)
                for b in range(n // TOKENS):
                    for r in range(TILE // ROWS):
                        dot(y, x, w, bias, b * TOKENS, T.int64(TOKENS), t, r * ROWS)
                if n % TOKENS > 0:
                    for r in range(TILE // ROWS):
                        dot(y, x, w, bias, n // TOKENS * TOKENS, n % TOKENS, t, r * ROWS)
        else:
            # xt[b, c, k] = x[b * panel + k, c], zero past the last token
            xt = T.alloc_buffer(((n + panel - 1) // panel, s.cols, panel), "float32")
            for b in T.parallel((n + panel - 1) // panel):
                for c in range(s.cols):
                    for k in range(panel):
                        i = b * panel + k
                        xt[b, c, k] = T.if_then_else(i < n, x[T.min(i, n - 1), c], T.float32(0))
            for t in T.parallel(big_tiles):
                # past the last weight row, the last row again (its outputs are not stored)
                w = T.alloc_buffer((BIG_TILE, s.cols), "float32")
                for r in range(BIG_TILE):
                    row = T.min(t * BIG_TILE + r, s.rows - 1)
                    decode_row(w, r, codes, codebook, group, scales, offsets, row)
                for b in range((n + panel - 1) // panel):
                    for r in range(BIG_TILE // PANEL_ROWS):
                        panel_dot(y, xt, w, bias, n, b, t, r * PANEL_ROWS)

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
            row = T.alloc_buffer((1, s.cols), "float32")
            decode_row(row, 0, codes, codebook, group, scales, offsets, index[i])
            for k in range(s.cols):
                out[i, k] = row[0, k]

    return kernel
