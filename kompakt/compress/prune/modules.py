"""Module classes that a pruned network needs where the stock class cannot hold its shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after head pruning: q, k and v are ``num_heads * head_dim``
    wide, which may be less than ``embed_dim``; inputs and outputs keep ``embed_dim``.

    Same parameters and state-dict names as the stock module, packed projections only.
    """

    def forward(  # noqa: D102 - the stock signature
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        tgt, batch, _ = query.shape
        src = key.shape[0]
        heads, hd = self.num_heads, self.head_dim
        inner = heads * hd
        w_q, w_k, w_v = self.in_proj_weight.split(inner)
        b_q, b_k, b_v = (
            self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None,) * 3
        )

        def split_heads(x: torch.Tensor, n: int) -> torch.Tensor:  # [n, B, inner] -> [B, H, n, hd]
            return x.reshape(n, batch, heads, hd).permute(1, 2, 0, 3)

        q = split_heads(F.linear(query, w_q, b_q), tgt)
        k = split_heads(F.linear(key, w_k, b_k), src)
        v = split_heads(F.linear(value, w_v, b_v), src)
        mask = _merge_masks(attn_mask, key_padding_mask, batch, heads, tgt, src, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / hd**0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores + torch.full((tgt, src), float("-inf")).triu(1)
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal and mask is None)
            weights = None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, batch, inner))
        return (out.transpose(0, 1) if self.batch_first else out), weights


def _merge_masks(attn_mask, key_padding_mask, batch, heads, tgt, src, dtype) -> torch.Tensor | None:
    """One additive float mask ``[B, H, T, S]`` from the stock module's two optional masks."""
    mask = None
    if attn_mask is not None:
        m = (
            attn_mask
            if attn_mask.dtype != torch.bool
            else torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf"))
        )
        mask = m.view(batch, heads, tgt, src) if m.dim() == 3 else m.view(1, 1, tgt, src)
    if key_padding_mask is not None:
        k = key_padding_mask
        k = (
            torch.zeros_like(k, dtype=dtype).masked_fill(k, float("-inf"))
            if k.dtype == torch.bool
            else k
        )
        k = k.view(batch, 1, 1, src)
        mask = k if mask is None else mask + k
    return mask
