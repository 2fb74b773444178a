"""Physically smaller sub-networks: slice parameters to the kept indices, then fix each
module's size attributes. The same code replays a saved artifact's ``prune`` plan entry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kompakt.artifact import plan_step

Resize = Callable[[nn.Module, dict[str, torch.Size]], None]
_RESIZERS: dict[str, Resize] = {}


def resizer(*class_names: str) -> Callable[[Resize], Resize]:
    """Register how a module class updates its attributes after its tensors were sliced.

    The function gets the module (already holding the sliced tensors) and the old shapes of
    its own tensors by local name.
    """

    def register(fn: Resize) -> Resize:
        for name in class_names:
            _RESIZERS[name] = fn
        return fn

    return register


@resizer("Conv1d", "Conv2d", "Conv3d")
def _conv(m: nn.Module, old: dict[str, torch.Size]) -> None:
    per_out = old["weight"][0] // m.groups
    m.out_channels = m.weight.shape[0]
    if m.groups > 1:
        m.groups = m.out_channels // per_out
    m.in_channels = m.weight.shape[1] * m.groups


@resizer("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
def _conv_transposed(m: nn.Module, old: dict[str, torch.Size]) -> None:
    m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


@resizer("Linear", "NonDynamicallyQuantizableLinear")
def _linear(m: nn.Module, old: dict[str, torch.Size]) -> None:
    m.out_features, m.in_features = m.weight.shape


@resizer("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
def _batch_norm(m: nn.Module, old: dict[str, torch.Size]) -> None:
    m.num_features = (m.weight if m.weight is not None else m.running_mean).shape[0]


@resizer("GroupNorm")
def _group_norm(m: nn.Module, old: dict[str, torch.Size]) -> None:
    per_group = m.num_channels // m.num_groups
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // per_group


@resizer("Embedding")
def _embedding(m: nn.Module, old: dict[str, torch.Size]) -> None:
    m.embedding_dim = m.weight.shape[1]


@resizer("LSTM", "GRU")
def _recurrent(m: nn.Module, old: dict[str, torch.Size]) -> None:
    m.hidden_size = m.weight_hh_l0.shape[1]
    m.input_size = m.weight_ih_l0.shape[1]
    m._init_flat_weights()


@resizer("BertSelfAttention", "BertSdpaSelfAttention", "RobertaSelfAttention")
def _bert_attention(m: nn.Module, old: dict[str, torch.Size]) -> None:
    m.all_head_size = m.query.out_features
    m.num_attention_heads = m.all_head_size // m.attention_head_size


@resizer("MultiheadAttention", "HeadPrunedMultiheadAttention")
def _multihead_attention(m: nn.Module, old: dict[str, torch.Size]) -> None:
    from kompakt.compress.prune.modules import HeadPrunedMultiheadAttention

    m.num_heads = m.in_proj_weight.shape[0] // 3 // m.head_dim
    m.__class__ = HeadPrunedMultiheadAttention


def apply_kept(model: nn.Module, kept: dict[str, dict[int, list[int]]]) -> None:
    """Slice every listed tensor (parameter or buffer) to its kept indices, in place."""
    replaced: dict[int, nn.Parameter] = {}
    touched: dict[str, dict[str, torch.Size]] = {}
    for name, dims in kept.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, leaf)
        touched.setdefault(owner_name, {})[leaf] = old.shape
        new = old.detach()
        for dim, idx in sorted(dims.items()):
            new = new.index_select(int(dim), torch.as_tensor(idx, dtype=torch.long))
        if isinstance(old, nn.Parameter):
            if id(old) not in replaced:
                replaced[id(old)] = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
            setattr(owner, leaf, replaced[id(old)])
        else:
            owner._buffers[leaf] = new.contiguous()
    modules = dict(model.named_modules())
    for path, shapes in touched.items():
        fn = _RESIZERS.get(type(modules[path]).__name__)
        if fn is not None:
            fn(modules[path], shapes)


@plan_step("prune")
def _replay(model: nn.Module, entry: dict[str, Any]) -> None:
    kept = {name: {int(d): idx for d, idx in dims.items()} for name, dims in entry["kept"].items()}
    apply_kept(model, kept)
