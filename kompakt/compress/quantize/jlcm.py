"""JLCM: jointly learnable codebooks and mappings (Yvinec, Dapogny, Bailly, ICLR 2024).

For one layer with weight ``W [rows, cols]`` and calibration input moments ``H = E[x x^T]``
(:mod:`.calibration`), JLCM minimises the layer's output reconstruction error

    L(C, I) = tr((Wq - W) H (Wq - W)^T),   Wq[r, c] = C[g(r), I[r, c]]

jointly over the codebooks ``C`` (one per group of similarly distributed neurons, see
:func:`.codebooks.neuron_groups`) and the mapping ``I`` of every weight to a codeword.

1. **Start**: neuron groups, then per-group k-means codebooks weighted by input importance
   ``H[c, c]``. The mapping starts from the nearest codewords, or, when it has a lower ``L``,
   from an error-compensated assignment to the same codebooks (GPTQ's column order: each
   column's rounding error is spread over the later columns through ``H^-1``).
2. **Straight-through gradient**: ``G = dL/dWq = 2 (Wq - W) H`` is computed once per step on
   the decoded weight and passed straight through to both the codebook and the mapping.
3. **Codebook step**: each codeword moves by its summed gradient over the summed diagonal
   curvature of the weights mapped to it (a diagonal Newton step, damped by ``rho``), then
   is rounded to fp16, the stored precision.
4. **Proximal mapping step**: each weight picks the codeword ``j`` minimising
   ``G (C_j - Wq) + rho * H[c, c] * (C_j - Wq)^2``, i.e. the codeword nearest to
   ``Wq - G / (2 rho H[c, c])``. The linear gradient term alone would favour the codeword
   furthest away along ``-G`` (the extreme values of the codebook); the proximal term makes the
   pull of a codeword decrease with its distance, so weights move to neighbouring codewords
   unless the gradient is large.
5. **Trust region**: a joint step is kept only if ``L`` decreases; otherwise ``rho`` doubles and
   the step is retried. Accepted steps relax ``rho``. The result is never worse than the start.

The rows' group ids cost ``ceil(log2(groups))`` bits per row, counted in the size.
Deviation from the paper: it learns codebooks and mappings with gradient-based PTQ over
calibration batches; here the per-layer objective is written through ``H`` so each step
costs one ``[rows, cols] x [cols, cols]`` product, independent of the calibration size. In a
decoder language model the block phase (:mod:`.block_tuning`) then learns each block's
codebooks by gradient descent on calibration batches of the block's output.
"""

from __future__ import annotations

from typing import Any

import torch

from kompakt.compress.quantize.affine import error_feedback
from kompakt.compress.quantize.codebooks import codeword_sums, kmeans_coded, nearest_codes
from kompakt.compress.quantize.layers import CodedWeight

JLCM_DAMP = 0.2
"""JLCM's damping of the input moments, ``H + damp * mean(diag H) * I``: on SmolLM2-135M with
16 calibration windows 0.2 gave lower held-out layer errors and perplexity than 0.01
(docs/benchmarks.md); with ample calibration a lighter damping fits better."""

CHUNK_ROWS = 8192
"""Rows learned at once: a large table (an LM head) is learned in chunks of whole groups, each
with its own trust region. The objective is a sum over rows and codebooks belong to groups,
so a chunk is an independent problem; chunking bounds the peak memory."""


def jlcm_coded(
    w: torch.Tensor,
    h: torch.Tensor | None,
    bits: int,
    groups: int,
    steps: int,
    kmeans_iters: int = 25,
    damp: float = JLCM_DAMP,
    feedback_start: bool = True,
) -> tuple[CodedWeight, dict[str, Any]]:
    """Quantize ``w`` by JLCM; returns the coded weight and the error before and after learning."""
    coded = kmeans_coded(w, h, bits, groups, kmeans_iters)
    group = coded.group_of_rows()
    h = torch.eye(w.shape[1]) if h is None else h
    # damping keeps directions the calibration barely excites from absorbing large errors
    h = h + damp * torch.diagonal(h).mean() * torch.eye(w.shape[1])
    norm = float(((w @ h) * w).sum().clamp_min(1e-30))
    sizes = torch.bincount(group, minlength=coded.groups).tolist()
    start = best = 0.0
    accepted = []
    first = 0
    while first < coded.groups:
        last, rows = first, 0
        while last < coded.groups and (last == first or rows + sizes[last] <= CHUNK_ROWS):
            rows += sizes[last]
            last += 1
        index = torch.nonzero((group >= first) & (group < last))[:, 0]
        part = _learn(
            w[index],
            h,
            coded.codebook[first:last].clone(),
            group[index] - first,
            coded.codes[index],
            steps,
            feedback_start,
        )
        coded.codebook[first:last], coded.codes[index] = part["codebook"], part["codes"]
        start, best = start + part["start"], best + part["best"]
        accepted.append(part["accepted"])
        first = last
    info = {"start_error": start / norm, "error": best / norm, "accepted_steps": min(accepted)}
    return coded, info


def _learn(w, h, codebook, group, codes, steps, feedback_start) -> dict[str, Any]:
    """Joint learning on rows ``w`` whose groups ``group`` index ``codebook``; errors unscaled."""
    k = codebook.shape[1]
    curvature = torch.diagonal(h).clamp_min(1e-12 * float(torch.diagonal(h).max().clamp_min(1e-30)))
    two_curvature = (2 * curvature).expand_as(w)

    def error(codebook, codes) -> tuple[float, torch.Tensor, torch.Tensor]:
        wq = torch.gather(codebook[group], 1, codes)
        e = wq - w
        eh = e @ h
        return float((eh * e).sum()), wq, eh

    start, wq, eh = error(codebook, codes)
    if feedback_start:
        rows_codebook = codebook[group]
        feedback = error_feedback(w, h, 0.0, lambda _c, values, _u: _nearest(values, rows_codebook))
        candidate = error(codebook, feedback)
        if candidate[0] < start:
            codes, (start, wq, eh) = feedback, candidate
    best = start
    rho, accepted = 1.0, 0
    for _ in range(steps):
        grad = 2 * eh
        g_sum = codeword_sums(codes, grad, group, codebook.shape[0], k)
        c_sum = codeword_sums(codes, two_curvature, group, codebook.shape[0], k)
        step = torch.where(c_sum > 0, g_sum / (rho * c_sum.clamp_min(1e-30)), torch.zeros(()))
        new_codebook = (codebook - step).to(torch.float16).float()
        target = wq - grad / (2 * rho * curvature)
        new_codes = nearest_codes(target, new_codebook[group])
        candidate, new_wq, new_eh = error(new_codebook, new_codes)
        if candidate < best:
            best, codebook, codes, wq, eh = candidate, new_codebook, new_codes, new_wq, new_eh
            rho, accepted = max(rho * 0.7, 0.5), accepted + 1
        else:
            rho *= 2.0
            if rho > 1e6:
                break
    return {
        "codebook": codebook,
        "codes": codes,
        "start": start,
        "best": best,
        "accepted": accepted,
    }


def _nearest(
    values: torch.Tensor, rows_codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and values of the codeword nearest each ``values[r]`` in ``rows_codebook[r]``."""
    codes = nearest_codes(values[:, None], rows_codebook)[:, 0]
    return codes, rows_codebook.gather(1, codes[:, None])[:, 0]
