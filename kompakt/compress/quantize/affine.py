"""Affine grids: RTN and GPTQ, stored in the codebook format as the grid ``0..2**b-1`` with a
per-row, per-block fp16 scale and offset (``w = code * scale + offset``, asymmetric).

- **RTN**: every block of ``block`` columns of a row gets ``scale = (max - min) / (2**b - 1)``
  and ``offset = min``; each weight is rounded to the nearest grid point.
- **GPTQ** (Frantar et al., 2023): columns are quantized in order; the rounding error of each
  column is spread over the not-yet-quantized columns through the Cholesky factor of the
  inverse input Hessian (``H + damp * mean(diag H) * I``), in lazy batches of 128 columns.
  A block's grid is fixed from the updated weights when its first column is reached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kompakt.compress.quantize.layers import CodedWeight

GPTQ_DAMP = 0.01
"""GPTQ's damping of the input moments, ``H + damp * mean(diag H) * I`` (its paper's value; on
SmolLM2-135M at 3 bits 0.2 gave a worse perplexity, docs/benchmarks.md)."""


def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-exact ``(scale, offset)`` per row of ``w`` covering its min..max."""
    lo = w.min(dim=1).values
    hi = w.max(dim=1).values
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8)
    scale = scale.to(torch.float16).float().clamp_min(6e-8)
    offset = lo.to(torch.float16).float()
    return scale, offset


def _round(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(
        torch.round((w - offset.unsqueeze(1)) / scale.unsqueeze(1)), 0, (1 << bits) - 1
    ).long()


def _coded(codes, scales, offsets, bits, block) -> CodedWeight:
    rows = codes.shape[0]
    return CodedWeight(
        codes=codes,
        bits=bits,
        codebook=torch.arange(1 << bits, dtype=torch.float32).unsqueeze(0),
        groups=rows,
        scales=scales,
        offsets=offsets,
        block=block,
    )


def rtn_coded(w: torch.Tensor, bits: int, block: int) -> CodedWeight:
    """Round-to-nearest on a group-wise asymmetric grid."""
    rows, cols = w.shape
    block = min(block, cols)
    codes = torch.empty(rows, cols, dtype=torch.int64)
    scales, offsets = [], []
    for start in range(0, cols, block):
        part = w[:, start : start + block]
        scale, offset = _grid(part, bits)
        codes[:, start : start + block] = _round(part, scale, offset, bits)
        scales.append(scale)
        offsets.append(offset)
    return _coded(codes, torch.stack(scales, 1), torch.stack(offsets, 1), bits, block)


def error_feedback(
    w: torch.Tensor,
    h: torch.Tensor,
    damp: float,
    quantize_column: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """GPTQ's column loop: codes ``[rows, cols]`` for ``w``, each column's rounding error spread
    over the later columns. ``quantize_column(col, values, upcoming)`` returns the codes and
    dequantized values of column ``col``; ``upcoming`` holds the columns from ``col`` on, as
    updated so far."""
    rows, cols = w.shape
    w = w.clone()
    h = h.clone().double()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True
    ).float()
    codes = torch.empty(rows, cols, dtype=torch.int64)
    batch = 128
    for b0 in range(0, cols, batch):
        b1 = min(b0 + batch, cols)
        wb = w[:, b0:b1].clone()
        errors = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            upcoming = torch.cat([wb[:, i:], w[:, b1:]], 1)
            q, deq = quantize_column(b0 + i, wb[:, i], upcoming)
            codes[:, b0 + i] = q
            err = (wb[:, i] - deq) / hb[i, i]
            wb[:, i:] -= err.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    return codes


def gptq_coded(
    w: torch.Tensor, h: torch.Tensor, bits: int, block: int, damp: float = GPTQ_DAMP
) -> CodedWeight:
    """GPTQ with lazy batch updates; grids per ``block`` columns as in RTN, each fixed from the
    block's weights as updated when its first column is reached."""
    block = min(block, w.shape[1])
    scales, offsets = [], []

    def quantize_column(col, values, upcoming):
        if col % block == 0:
            scale, offset = _grid(upcoming[:, :block], bits)
            scales.append(scale)
            offsets.append(offset)
        q = _round(values[:, None], scales[-1], offsets[-1], bits)[:, 0]
        return q, q.float() * scales[-1] + offsets[-1]

    codes = error_feedback(w, h, damp, quantize_column)
    return _coded(codes, torch.stack(scales, 1), torch.stack(offsets, 1), bits, block)
