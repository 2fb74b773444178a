"""Dense bit packing of b-bit codes, row by row.

Each row of codes is cut into chunks of ``n = 8 / gcd(b, 8)`` codes that fill exactly
``m = b * n / 8`` bytes: 2-bit codes go four to a byte, 3-bit codes eight to three bytes,
4-bit codes two to a byte. Code ``j`` of a chunk sits at bits ``[b*j, b*(j+1))`` of the
chunk's little-endian integer. A row is padded with zero codes to a whole number of chunks
(the padding is stored and counted), so every row starts on a byte and single rows (an
embedding lookup) unpack on their own. The same layout is decoded inside exported graphs
with shifts and masks.
"""

from __future__ import annotations

import math

import torch

from kompakt.errors import KompaktError


def chunk_layout(bits: int) -> tuple[int, int]:
    """``(codes per chunk, bytes per chunk)`` for ``bits``-bit codes."""
    check_bits(bits)
    codes = 8 // math.gcd(bits, 8)
    return codes, bits * codes // 8


def check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise KompaktError(f"code width {bits!r} bits is not supported; use an integer 1..8")


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes that one packed row of ``cols`` codes takes."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    return -(-cols // per_chunk) * chunk_bytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[rows, cols]`` (values below ``2**bits``) into uint8 ``[rows, bytes]``."""
    if codes.dim() != 2:
        raise KompaktError(
            f"pack_codes expects a 2-D [rows, cols] tensor, got shape {tuple(codes.shape)}"
        )
    per_chunk, chunk_bytes = chunk_layout(bits)
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise KompaktError(
            f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing; "
            f"got values {int(codes.min())}..{int(codes.max())}"
        )
    rows, cols = codes.shape
    pad = -cols % per_chunk
    chunks = torch.nn.functional.pad(codes, (0, pad)).view(rows, -1, per_chunk)
    shifts = torch.arange(per_chunk, dtype=torch.int64) * bits
    words = (chunks << shifts).sum(-1)  # disjoint bit fields: sum == bitwise or
    byte_shifts = torch.arange(chunk_bytes, dtype=torch.int64) * 8
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.reshape(rows, -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: int32 codes ``[rows, cols]``."""
    per_chunk, chunk_bytes = chunk_layout(bits)
    rows = packed.shape[0]
    expected = packed_row_bytes(cols, bits)
    if packed.dim() != 2 or packed.shape[1] != expected or packed.dtype != torch.uint8:
        raise KompaktError(
            f"packed codes have shape {tuple(packed.shape)} and dtype {packed.dtype}; "
            f"{cols} {bits}-bit codes per row need uint8 [rows, {expected}]"
        )
    # Arithmetic instead of shifts, so that the same code exports to ONNX, where integer
    # division goes through float32: each code is read from the 16-bit window of the two bytes
    # it starts in (a code of b <= 8 bits at bit offset < 8 ends within them), so every value
    # stays below 2**16 and is exact.
    chunks = torch.nn.functional.pad(packed.to(torch.int32).view(rows, -1, chunk_bytes), (0, 1))
    first = [bits * j // 8 for j in range(per_chunk)]
    windows = chunks[..., first] + 256 * chunks[..., [b + 1 for b in first]]
    divisors = torch.tensor([1 << (bits * j % 8) for j in range(per_chunk)], dtype=torch.int32)
    codes = torch.div(windows, divisors, rounding_mode="trunc") % (1 << bits)
    return codes.reshape(rows, -1)[:, :cols]
