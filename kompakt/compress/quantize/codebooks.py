"""Neuron grouping and importance-weighted k-means codebooks (k-means baseline, JLCM's start).

**Neuron grouping.** Output neurons (rows) whose weight distributions are alike share a
codebook. Each row is described by its quantiles (the shape *and* scale of its
distribution); rows are clustered by k-means on those descriptions into ``groups`` groups.
The group of each row is stored once per row (``ceil(log2 groups)`` bits, counted in the
size), never per weight.

**Codebooks.** Per group, a 1-D k-means over the group's weights, each weight weighted by
the calibration importance of its input column (``H[c, c] = E[x_c^2]``), started from
weighted quantiles. Codebooks are kept sorted so that code order is value order.
"""

from __future__ import annotations

import torch

from kompakt.compress.quantize.layers import CodedWeight


def neuron_groups(w: torch.Tensor, groups: int, iters: int = 10) -> torch.Tensor:
    """The group (``0..groups-1``) of every row of ``w``, by k-means on row quantiles."""
    rows = w.shape[0]
    if groups <= 1:
        return torch.zeros(rows, dtype=torch.int64)
    if groups >= rows:
        return torch.arange(rows)
    probs = torch.linspace(0.02, 0.98, 9)
    features = torch.quantile(w, probs, dim=1).T  # [rows, 9]
    # deterministic start: rows sorted by spread, cut into equal runs
    order = torch.argsort(features[:, -1] - features[:, 0])
    assign = torch.empty(rows, dtype=torch.int64)
    assign[order] = torch.arange(rows) * groups // rows
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=groups).clamp_min(1).unsqueeze(1)
        centers = torch.zeros(groups, features.shape[1]).index_add_(0, assign, features) / counts
        # nearest center by ||c||^2 - 2 f.c, in row chunks (a token table has 6k groups)
        norms = (centers * centers).sum(1)
        new = torch.cat([(norms - 2 * part @ centers.T).argmin(1) for part in features.split(4096)])
        if torch.equal(new, assign):
            break
        assign = new
    # renumber so that used group ids are 0..n-1 (empty clusters vanish)
    _, assign = torch.unique(assign, return_inverse=True)
    return assign


def nearest_codes(
    target: torch.Tensor,
    codebook_rows: torch.Tensor,
    elements: int = 1 << 19,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """For each ``target[r, c]`` the index of the nearest value in ``codebook_rows[r]``."""
    values, order = codebook_rows.sort(dim=1, stable=True)
    # k-means leaves every codebook sorted and learning seldom reorders one: then a
    # codeword's rank is its code
    ranked = bool((order == torch.arange(order.shape[1])).all())
    midpoints = (values[:, 1:] + values[:, :-1]) / 2
    rows, cols = target.shape
    # row chunks whose comparisons with every midpoint (``elements`` floats) stay in cache
    chunk = max(1, min(rows, elements // (cols * max(1, midpoints.shape[1]))))
    passed = torch.empty(chunk, midpoints.shape[1], cols)
    rank = torch.empty(chunk, cols)
    out = torch.empty(target.shape, dtype=dtype)
    for start in range(0, rows, chunk):
        part, mids = target[start : start + chunk], midpoints[start : start + chunk]
        n = part.shape[0]
        # rank among the sorted codewords = midpoints passed; the comparison written as
        # 1.0 / 0.0 runs several times faster on the CPU than one written as bool
        torch.gt(part.unsqueeze(1), mids.unsqueeze(2), out=passed[:n])
        torch.sum(passed[:n], 1, out=rank[:n])
        out[start : start + n] = (
            rank[:n] if ranked else order[start : start + n].gather(1, rank[:n].long())
        )
    return out


def weighted_kmeans(
    w: torch.Tensor,
    group: torch.Tensor,
    bits: int,
    importance: torch.Tensor,
    iters: int = 25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group 1-D k-means of ``w`` with per-column ``importance``: ``(codebook [G, K], codes)``."""
    k = 1 << bits
    groups = int(group.max()) + 1
    probs = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    row_q = torch.quantile(w, probs, dim=1).T  # [rows, K]
    counts = torch.bincount(group, minlength=groups).clamp_min(1).unsqueeze(1)
    codebook = torch.zeros(groups, k).index_add_(0, group, row_q) / counts
    weight = importance.clamp_min(1e-12).expand_as(w)
    weighted = w * weight
    for _ in range(iters):
        codebook = codebook.sort(dim=1).values
        codes = nearest_codes(w, codebook[group])
        num = codeword_sums(codes, weighted, group, groups, k)
        den = codeword_sums(codes, weight, group, groups, k)
        # an empty codeword keeps its value
        new = torch.where(den > 0, num / den.clamp_min(1e-30), codebook)
        if torch.allclose(new, codebook, rtol=0, atol=1e-7):
            break
        codebook = new
    codebook = codebook.to(torch.float16).float().sort(dim=1).values
    return codebook, nearest_codes(w, codebook[group])


def codeword_sums(
    codes: torch.Tensor, values: torch.Tensor, group: torch.Tensor, groups: int, k: int
) -> torch.Tensor:
    """``[groups, k]``: the sum of ``values`` over the weights mapped to each group's codeword."""
    per_row = torch.zeros(codes.shape[0], k).scatter_add_(1, codes, values)
    return torch.zeros(groups, k).index_add_(0, group, per_row)


def group_count(rows: int, rows_per_group: int) -> int:
    """How many neuron groups a layer of ``rows`` output neurons gets."""
    return max(1, min(rows, round(rows / rows_per_group)))


def kmeans_coded(
    w: torch.Tensor,
    h: torch.Tensor | None,
    bits: int,
    groups: int,
    iters: int = 25,
) -> CodedWeight:
    """k-means codebooks: one per tensor (``groups == 1``) or one per neuron group."""
    group = neuron_groups(w, groups)
    groups = int(group.max()) + 1
    importance = torch.ones(w.shape[1]) if h is None else torch.diagonal(h).clone()
    codebook, codes = weighted_kmeans(w, group, bits, importance, iters)
    implicit = groups in (1, w.shape[0]) and torch.equal(
        group, _implicit_groups(w.shape[0], groups)
    )
    return CodedWeight(
        codes=codes,
        bits=bits,
        codebook=codebook,
        groups=groups,
        row_group=None if implicit else group,
    )


def _implicit_groups(rows: int, groups: int) -> torch.Tensor:
    return torch.zeros(rows, dtype=torch.int64) if groups == 1 else torch.arange(rows)
