"""Pruning rules, one per op kind: how channels flow through each op and which parameter
slices belong to which channel unit. Registered with ``graph.op_rule`` (ATen ops) and
``graph.module_rule`` (composite modules handled as one region of the trace).

The conventions every rule follows:

* an op that *creates* channels (conv, linear, embedding) gets fresh units and attaches its
  output rows (and bias) to them; it attaches its input columns to the input's units;
* an op that passes channels through (activations, BatchNorm, pooling, reshapes) keeps the
  units and attaches its per-channel parameters (gamma, beta, running statistics);
* an op that combines channels index by index (add, mul, concat along another axis) joins
  the units, so they are removed together;
* an op that mixes channels in a way removal would change (LayerNorm or RMSNorm over the
  channel axis, softmax over channels, a slice of channels) freezes them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from kompakt.compress.prune.graph import Chan, Context, Region, module_rule, op_rule

# --- helpers -------------------------------------------------------------------------------


def _rank(ctx: Context, node: fx.Node) -> int | None:
    shape = ctx.shape(node)
    return None if shape is None else len(shape)


def _dim(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# --- ops that keep channels where they are -----------------------------------------------

ZERO_PRESERVING = (
    "aten.relu.default",
    "aten.relu_.default",
    "aten.gelu.default",
    "aten.silu.default",
    "aten.silu_.default",
    "aten.tanh.default",
    "aten.hardswish.default",
    "aten.hardtanh.default",
    "aten.relu6.default",
    "aten.leaky_relu.default",
    "aten.elu.default",
    "aten.neg.default",
    "aten.abs.default",
    "aten.dropout.default",
    "aten.clone.default",
    "aten.contiguous.default",
    "aten.alias.default",
    "aten.detach.default",
    "aten.to.dtype",
    "aten.to.dtype_layout",
    "aten.to.device",
    "aten._to_copy.default",
    "aten.mul.Scalar",
    "aten.div.Scalar",
    "aten.pow.Tensor_Scalar",
    "aten.clamp.default",
    "aten.hardsigmoid.default",
    "aten.sigmoid.default",
    "aten.softplus.default",
    "aten.mish.default",
    "aten.exp.default",
    "aten.add.Scalar",
    "aten.sub.Scalar",
    "aten.sin.default",
    "aten.cos.default",
    "aten.adaptive_avg_pool1d.default",
    "aten.adaptive_avg_pool2d.default",
    "aten.avg_pool1d.default",
    "aten.avg_pool2d.default",
    "aten.max_pool1d.default",
    "aten.max_pool2d.default",
    "aten.upsample_nearest2d.vec",
    "aten.upsample_bilinear2d.vec",
    "aten.feature_dropout.default",
    "aten.pad.default",
    "aten.constant_pad_nd.default",
)
"""Elementwise (per channel) ops. Those that map 0 to non-zero (sigmoid, exp, +c) are fine
too: every group also zeroes its consumers' input columns."""

SPATIAL = {"pool", "upsample", "pad"}


@op_rule(*ZERO_PRESERVING)
def _passthrough(ctx: Context, node: fx.Node):
    chan = ctx.chan(node.args[0])
    if chan is None:
        return None
    if any(s in str(node.target) for s in SPATIAL) and chan.axis != 1:
        ctx.unsupported(node, "spatial op on a tensor whose channels are not on axis 1")
        return None
    return chan


@op_rule("<built-in function getitem>")
def _getitem(ctx: Context, node: fx.Node):
    value = ctx.chans.get(node.args[0])
    if isinstance(value, (tuple, list)):
        return value[node.args[1]]
    return None


# --- ops that create channels ------------------------------------------------------------


@op_rule("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default")
def _conv(ctx: Context, node: fx.Node):
    # args: input, weight, bias, stride, padding, dilation, groups
    x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    groups = int(_arg(node, 6, "groups", 1) or 1)
    w = ctx.param(weight)
    if w is None:
        ctx.unsupported(node, "convolution whose weight is not a parameter")
        return None
    per_in = ctx.shape(weight)[1]
    out = ctx.new_chan(1, ctx.shape(weight)[0])
    ctx.attach(w, 0, out.units)
    ctx.attach(ctx.param(bias), 0, out.units)
    inp = ctx.chan(x)
    if inp is not None and inp.axis != 1:
        ctx.unsupported(node, "convolution input whose channels are not on axis 1")
        inp = None
    if groups == 1:
        if inp is not None:
            ctx.attach(w, 1, inp.units)
        return out
    # a whole conv group (its input and output channels) is the smallest removable unit;
    # the weight's dim 1 holds a group's own inputs and is never sliced
    per_out = len(out.units) // groups
    for g in range(groups):
        block = out.units[g * per_out : (g + 1) * per_out]
        ctx.units.union_all(block)
        if inp is not None:
            ctx.units.union(np.full(per_in, block[0]), inp.units[g * per_in : (g + 1) * per_in])
    if inp is None:
        ctx.units.freeze(out.units, f"{ctx.where(node)}: grouped conv on the model input")
    return out


@op_rule(
    "aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input"
)
def _conv_transposed(ctx: Context, node: fx.Node):
    # args: input, weight, bias, stride, padding, output_padding, groups, dilation
    x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    groups = int(_arg(node, 6, "groups", 1) or 1)
    w = ctx.param(weight)
    if w is None:
        ctx.unsupported(node, "transposed convolution whose weight is not a parameter")
        return None
    if groups != 1:
        ctx.unsupported(node, "grouped transposed convolution")
        return ctx.new_chan(1, ctx.shape(weight)[1] * groups)
    out = ctx.new_chan(1, ctx.shape(weight)[1])
    ctx.attach(w, 1, out.units)
    ctx.attach(ctx.param(bias), 0, out.units)
    inp = ctx.chan(x)
    if inp is not None and inp.axis == 1:
        ctx.attach(w, 0, inp.units)
    elif inp is not None:
        ctx.unsupported(node, "transposed convolution input whose channels are not on axis 1")
    return out


@op_rule("aten.linear.default")
def _linear(ctx: Context, node: fx.Node):
    x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    w = ctx.param(weight)
    if w is None:
        ctx.unsupported(node, "linear whose weight is not a parameter")
        return None
    rank = _rank(ctx, node)
    out = ctx.new_chan(rank - 1, ctx.shape(weight)[0])
    ctx.attach(w, 0, out.units)
    ctx.attach(ctx.param(bias), 0, out.units)
    inp = ctx.chan(x)
    if inp is not None:
        if inp.axis == rank - 1:
            ctx.attach(w, 1, inp.units)
        else:  # a linear over a non-channel axis (token mixing): keep those channels
            ctx.freeze_value(x, f"{ctx.where(node)}: linear over a non-channel axis")
    return out


@op_rule("aten.embedding.default")
def _embedding(ctx: Context, node: fx.Node):
    weight = node.args[0]
    w = ctx.param(weight)
    if w is None:
        return None
    out = ctx.new_chan(_rank(ctx, node) - 1, ctx.shape(weight)[1])
    ctx.attach(w, 1, out.units)
    return out


# --- per-channel parameters and normalisation ---------------------------------------------


@op_rule("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")
def _batch_norm(ctx: Context, node: fx.Node):
    x = node.args[0]
    chan = ctx.chan(x)
    if chan is None:
        return None
    if chan.axis != 1:
        ctx.unsupported(node, "batch norm over a tensor whose channels are not on axis 1")
        return None
    for arg in node.args[1:5]:
        ctx.attach(ctx.param(arg), 0, chan.units)
    if str(node.target).startswith("aten._native"):
        return (chan, None, None)
    return chan


@op_rule("aten.layer_norm.default")
def _layer_norm(ctx: Context, node: fx.Node):
    x, normalized = node.args[0], node.args[1]
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    chan = ctx.chan(x)
    rank = _rank(ctx, node)
    if chan is not None and chan.axis >= rank - len(normalized):
        ctx.freeze_value(x, f"{ctx.where(node)}: layer norm averages over these channels")
        if len(normalized) == 1:
            ctx.attach(ctx.param(weight), 0, chan.units)
            ctx.attach(ctx.param(bias), 0, chan.units)
    return chan


@op_rule("aten.group_norm.default")
def _group_norm(ctx: Context, node: fx.Node):
    x, groups, weight, bias = (
        node.args[0],
        int(node.args[1]),
        _arg(node, 2, "weight"),
        _arg(node, 3, "bias"),
    )
    chan = ctx.chan(x)
    if chan is None:
        return None
    if chan.axis != 1:
        ctx.unsupported(node, "group norm over a tensor whose channels are not on axis 1")
        return None
    per_group = len(chan.units) // groups
    for g in range(groups):  # a whole norm group is removed or kept
        ctx.units.union_all(chan.units[g * per_group : (g + 1) * per_group])
    ctx.attach(ctx.param(weight), 0, chan.units)
    ctx.attach(ctx.param(bias), 0, chan.units)
    return chan


# --- ops that combine tensors ------------------------------------------------------------


def _broadcast_axis(chan: Chan, rank: int, other_shape: tuple[int, ...]) -> int | None:
    """The axis of ``other`` (right-aligned broadcasting) that lines up with ``chan.axis``."""
    offset = rank - len(other_shape)
    axis = chan.axis - offset
    return axis if axis >= 0 else None


@op_rule(
    "aten.add.Tensor",
    "aten.sub.Tensor",
    "aten.mul.Tensor",
    "aten.div.Tensor",
    "aten.maximum.default",
    "aten.minimum.default",
)
def _elementwise(ctx: Context, node: fx.Node):
    a, b = node.args[0], node.args[1]
    rank = _rank(ctx, node)
    ca, cb = ctx.chan(a), ctx.chan(b)
    target = str(node.target)
    if ca is not None and cb is not None:
        if ca.axis != cb.axis or len(ca.units) != len(cb.units):
            ctx.unsupported(node, "operands whose channels do not line up")
            return None
        if target == "aten.div.Tensor":
            ctx.freeze_value(b, f"{ctx.where(node)}: divides by these channels")
        ctx.units.union(ca.units, cb.units)
        return ca
    chan, other = (ca, b) if ca is not None else (cb, a)
    if chan is None:
        return None
    if target == "aten.div.Tensor" and chan is cb:
        ctx.unsupported(node, "divides by these channels")
        return None
    shape = ctx.shape(other)
    if shape is None:  # a Python scalar
        return chan
    axis = _broadcast_axis(chan, rank, shape)
    if axis is None or shape[axis] == 1:
        return chan
    param = ctx.param(other)
    if param is not None:
        ctx.attach(param, axis, chan.units)
    elif target in (
        "aten.add.Tensor",
        "aten.sub.Tensor",
        "aten.maximum.default",
        "aten.minimum.default",
    ):
        ctx.freeze_value(
            a if ca is not None else b, f"{ctx.where(node)}: combined with an untracked tensor"
        )
    return chan


@op_rule("aten.cat.default")
def _cat(ctx: Context, node: fx.Node):
    tensors = node.args[0]
    rank = _rank(ctx, node)
    dim = _dim(_arg(node, 1, "dim", 0), rank)
    chans = [ctx.chan(t) for t in tensors]
    if all(c is None for c in chans):
        return None
    axes = {c.axis for c in chans if c is not None}
    if len(axes) != 1:
        ctx.unsupported(node, "concatenates tensors whose channels are on different axes")
        return None
    axis = axes.pop()
    if dim == axis:  # channel concat: the output's units are the inputs' units in order
        parts = []
        for t, c in zip(tensors, chans, strict=True):
            if c is None:
                units = ctx.units.new(ctx.shape(t)[dim])
                ctx.units.freeze(units, f"{ctx.where(node)}: concatenated with an untracked tensor")
                parts.append(units)
            else:
                parts.append(c.units)
        return Chan(axis, np.concatenate(parts))
    tracked = [c for c in chans if c is not None]
    for c in tracked[1:]:
        ctx.units.union(tracked[0].units, c.units)
    if len(tracked) != len(chans):
        for t in tensors:
            ctx.freeze_value(t, f"{ctx.where(node)}: concatenated with an untracked tensor")
    return tracked[0]


# --- ops that move or reshape the channel axis -------------------------------------------


@op_rule("aten.transpose.int")
def _transpose(ctx: Context, node: fx.Node):
    chan = ctx.chan(node.args[0])
    if chan is None:
        return None
    rank = _rank(ctx, node)
    d0, d1 = _dim(node.args[1], rank), _dim(node.args[2], rank)
    axis = {d0: d1, d1: d0}.get(chan.axis, chan.axis)
    return Chan(axis, chan.units)


@op_rule("aten.permute.default")
def _permute(ctx: Context, node: fx.Node):
    chan = ctx.chan(node.args[0])
    if chan is None:
        return None
    rank = _rank(ctx, node)
    dims = [_dim(d, rank) for d in node.args[1]]
    return Chan(dims.index(chan.axis), chan.units)


@op_rule(
    "aten.view.default",
    "aten.reshape.default",
    "aten.flatten.using_ints",
    "aten.unflatten.int",
    "aten.squeeze.dim",
    "aten.squeeze.dims",
    "aten.squeeze.default",
    "aten.unsqueeze.default",
    "aten._unsafe_view.default",
    "aten.expand.default",
)
def _reshape(ctx: Context, node: fx.Node):
    x = node.args[0]
    chan = ctx.chan(x)
    if chan is None:
        return None
    src, dst = ctx.shape(x), ctx.shape(node)
    mapped = reshape_units(src, dst, chan)
    if mapped is None:
        ctx.unsupported(node, f"reshape {list(src)} -> {list(dst)} splits the channel axis")
    return mapped


def reshape_units(src: tuple[int, ...], dst: tuple[int, ...], chan: Chan) -> Chan | None:
    """Follow the channel axis through a reshape, repeating units where it merges with others.

    Dimensions are matched in blocks of equal element count; the block holding the channel
    axis must map to a single output dimension (merging keeps one unit per element), or the
    channel dimension must survive unchanged among size-1 dimensions.
    """
    i = j = 0
    while i < len(src) or j < len(dst):
        bi, bj = [i], [j]
        ps = src[i] if i < len(src) else 1
        pd = dst[j] if j < len(dst) else 1
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd and i < len(src):
                ps *= src[i]
                bi.append(i)
                i += 1
            elif j < len(dst):
                pd *= dst[j]
                bj.append(j)
                j += 1
            else:
                return None
        if chan.axis not in bi:
            continue
        real_out = [d for d in bj if d < len(dst) and dst[d] != 1]
        if len(real_out) == 1 or (len(real_out) == 0 and len(chan.units) == 1):
            out = real_out[0] if real_out else bj[0]
            before = int(np.prod([src[k] for k in bi if k < chan.axis], dtype=np.int64))
            after = int(np.prod([src[k] for k in bi if k > chan.axis], dtype=np.int64))
            units = np.tile(np.repeat(chan.units, after), before)
            return Chan(out, units)
        return None
    return None


@op_rule("aten.select.int")
def _select(ctx: Context, node: fx.Node):
    chan = ctx.chan(node.args[0])
    if chan is None:
        return None
    rank = _rank(ctx, node.args[0])
    dim = _dim(node.args[1], rank)
    if dim == chan.axis:
        ctx.unsupported(node, "reads a single channel")
        return None
    return Chan(chan.axis - (1 if dim < chan.axis else 0), chan.units)


@op_rule("aten.slice.Tensor")
def _slice(ctx: Context, node: fx.Node):
    chan = ctx.chan(node.args[0])
    if chan is None:
        return None
    rank = _rank(ctx, node.args[0])
    dim = _dim(_arg(node, 1, "dim", 0), rank)
    if dim == chan.axis:
        if ctx.shape(node) == ctx.shape(node.args[0]):
            return chan
        ctx.unsupported(node, "slices the channel axis at fixed positions")
        return None
    return chan


@op_rule("aten.mean.dim", "aten.sum.dim_IntList", "aten.amax.default", "aten.amin.default")
def _reduce(ctx: Context, node: fx.Node):
    x = node.args[0]
    chan = ctx.chan(x)
    if chan is None:
        return None
    rank = _rank(ctx, x)
    dims = node.args[1] if len(node.args) > 1 else list(range(rank))
    dims = [_dim(d, rank) for d in ([dims] if isinstance(dims, int) else dims)]
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if chan.axis in dims:
        ctx.freeze_value(x, f"{ctx.where(node)}: reduces over the channel axis")
        return None
    return Chan(chan.axis if keepdim else chan.axis - sum(d < chan.axis for d in dims), chan.units)


@op_rule(
    "aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default"
)
def _softmax(ctx: Context, node: fx.Node):
    chan = ctx.chan(node.args[0])
    if chan is None:
        return None
    if _dim(node.args[1], _rank(ctx, node)) == chan.axis:
        ctx.freeze_value(node.args[0], f"{ctx.where(node)}: softmax over the channel axis")
    return chan


# --- composite modules ---------------------------------------------------------------------


def _region_input(ctx: Context, region: Region, weight: str) -> Chan | None:
    """The channels of the outside value that reaches the linear using ``weight``."""
    inside = set(region.nodes)
    for node in region.nodes:
        if str(node.target) == "aten.linear.default" and ctx.param(node.args[1]) == weight:
            x = node.args[0]
            while x in inside and x.all_input_nodes:
                x = x.all_input_nodes[0]
            chan = ctx.chan(x)
            if chan is not None and chan.axis == len(ctx.shape(x)) - 1:
                return chan
            return None
    return None


def _freeze_region_inputs(ctx: Context, region: Region, reason: str) -> None:
    for x in region.inputs:
        ctx.freeze_value(x, f"module {region.path!r}: {reason}")


def _outputs_with_width(ctx: Context, region: Region, width: int, chan: Chan) -> dict:
    results = {}
    for node in region.outputs:
        shape = ctx.shape(node)
        if shape is not None and shape and shape[-1] == width:
            results[node] = Chan(len(shape) - 1, chan.units)
        else:
            results[node] = None
    return results


@module_rule(
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "GemmaAttention",
)
def _llama_attention(ctx: Context, region: Region):
    """Units are key/value heads; each takes its ``num_key_value_groups`` query heads along."""
    m, p = region.module, region.path
    hd, rep = m.head_dim, m.num_key_value_groups
    n_kv = m.k_proj.out_features // hd
    kv = ctx.units.new(n_kv)
    q_rows, kv_rows = np.repeat(kv, rep * hd), np.repeat(kv, hd)
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        ctx.attach(f"{p}.{name}.weight", 0, rows)
        if getattr(m, name).bias is not None:
            ctx.attach(f"{p}.{name}.bias", 0, rows)
    ctx.attach(f"{p}.o_proj.weight", 1, q_rows)
    inp = _region_input(ctx, region, f"{p}.q_proj.weight")
    if inp is not None:
        for name in ("q_proj", "k_proj", "v_proj"):
            ctx.attach(f"{p}.{name}.weight", 1, inp.units)
    else:
        _freeze_region_inputs(ctx, region, "attention input not traced")
    out = ctx.new_chan(0, m.o_proj.out_features)
    ctx.attach(f"{p}.o_proj.weight", 0, out.units)
    if m.o_proj.bias is not None:
        ctx.attach(f"{p}.o_proj.bias", 0, out.units)
    return _outputs_with_width(ctx, region, m.o_proj.out_features, out)


@module_rule("BertSelfAttention", "BertSdpaSelfAttention", "RobertaSelfAttention")
def _bert_self_attention(ctx: Context, region: Region):
    """Units are attention heads; the context's channels flow to the output projection."""
    m, p = region.module, region.path
    hd = m.attention_head_size
    heads = ctx.units.new(m.query.out_features // hd)
    rows = np.repeat(heads, hd)
    for name in ("query", "key", "value"):
        ctx.attach(f"{p}.{name}.weight", 0, rows)
        ctx.attach(f"{p}.{name}.bias", 0, rows)
    inp = _region_input(ctx, region, f"{p}.query.weight")
    if inp is not None:
        for name in ("query", "key", "value"):
            ctx.attach(f"{p}.{name}.weight", 1, inp.units)
    else:
        _freeze_region_inputs(ctx, region, "attention input not traced")
    return _outputs_with_width(ctx, region, len(rows), Chan(0, rows))


@module_rule("MultiheadAttention")
def _multihead_attention(ctx: Context, region: Region):
    """Units are heads: rows of the packed q, k, v projections and columns of out_proj."""
    m, p = region.module, region.path
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        _freeze_region_inputs(ctx, region, "only packed-projection attention heads are pruned")
        return {node: None for node in region.outputs}
    hd, e = m.head_dim, m.embed_dim
    heads = ctx.units.new(m.num_heads)
    rows = np.repeat(heads, hd)
    packed = np.concatenate([rows, rows, rows])
    ctx.attach(f"{p}.in_proj_weight", 0, packed)
    if m.in_proj_bias is not None:
        ctx.attach(f"{p}.in_proj_bias", 0, packed)
    ctx.attach(f"{p}.out_proj.weight", 1, rows)
    inp = _region_input(ctx, region, f"{p}.in_proj_weight")
    if inp is not None and len(region.inputs) == 1:  # self-attention: one input feeds q, k, v
        ctx.attach(f"{p}.in_proj_weight", 1, inp.units)
    else:
        _freeze_region_inputs(ctx, region, "attention inputs other than self-attention are kept")
    out = ctx.new_chan(0, e)
    ctx.attach(f"{p}.out_proj.weight", 0, out.units)
    if m.out_proj.bias is not None:
        ctx.attach(f"{p}.out_proj.bias", 0, out.units)
    return _outputs_with_width(ctx, region, e, out)


@module_rule("LSTM", "GRU")
def _recurrent(ctx: Context, region: Region):
    """Units are hidden units; a unit's rows in every stacked gate go together. All layers
    share one ``hidden_size``, so unit ``h`` is removed from every layer at once."""
    m, p = region.module, region.path
    gates = 4 if type(m).__name__ == "LSTM" else 3
    if m.bidirectional or getattr(m, "proj_size", 0):
        _freeze_region_inputs(ctx, region, "bidirectional or projected recurrent layers are kept")
        return {node: None for node in region.outputs}
    x = next((n for n in region.inputs if ctx.chan(n) is not None), None)
    below = ctx.chan(x) if x is not None else None
    if below is not None and below.axis != len(ctx.shape(x)) - 1:
        ctx.freeze_value(x, f"module {p!r}: recurrent input channels not on the last axis")
        below = None
    hidden = ctx.units.new(m.hidden_size)  # shared by all layers: they must keep one width
    rows = np.tile(hidden, gates)
    for layer in range(m.num_layers):
        ctx.attach(f"{p}.weight_ih_l{layer}", 0, rows)
        ctx.attach(f"{p}.weight_hh_l{layer}", 0, rows)
        ctx.attach(f"{p}.weight_hh_l{layer}", 1, hidden)
        if m.bias:
            ctx.attach(f"{p}.bias_ih_l{layer}", 0, rows)
            ctx.attach(f"{p}.bias_hh_l{layer}", 0, rows)
        if below is not None:
            ctx.attach(f"{p}.weight_ih_l{layer}", 1, below.units)
        below = Chan(0, hidden)
    results = {}  # the output sequence, h_n and c_n all carry the hidden units on their last axis
    for node in region.outputs:
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            results[node] = tuple(
                Chan(v.dim() - 1, hidden) if isinstance(v, torch.Tensor) else None for v in val
            )
        elif isinstance(val, torch.Tensor) and val.shape[-1] == m.hidden_size:
            results[node] = Chan(val.dim() - 1, hidden)
        else:
            results[node] = None
    return results
