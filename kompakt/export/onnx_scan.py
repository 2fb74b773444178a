"""A transformer's alike decoder layers as one ONNX ``Scan`` over their stacked parameters.

onnxruntime keeps about 4 KB of memory for each node it loads, and a Codebook layer decodes
in about a dozen nodes: SmolLM2-135M's 30 decoder layers exported one after the other came to
6,600 nodes and about 30 MB. When the layers of a transformers decoder (``model.model.layers``)
are alike (one class, the same parameter names and shapes, the same Codebook settings and the
same attributes but for ``layer_idx``), the exported copy runs them with torch's ``scan`` over
their stacked parameters: each step calls the first layer's code with one layer's slice
(``torch.func.functional_call``), and the exporter lowers the loop to one ``Scan`` whose body
holds one layer's nodes. The codebooks, scales and offsets of a Codebook layer may differ in
count from layer to layer (one per group of rows); they are zero-padded to the largest count,
which no row of a layer indexes.

The body must be free of Python side effects: torch refuses to trace a ``scan`` whose step
mutates an object from outside it. transformers 5.25 made the ``kernels`` package a
dependency and wraps attention forwards in its routing (``use_kernelized_func``), which sets a
context variable on every call to find the module's hub kernels; it changes nothing unless
the model was ``kernelize``-d for a GPU. The template's modules call the forward under that
wrapper instead (:func:`_without_kernel_routing`), and the math is the same.
"""

from __future__ import annotations

import itertools
import types

import torch
from torch import nn

from kompakt.export.codebook_ops import Fused, frozen

PADDED = ("codebook", "scales", "offsets")  # indexed by a Fused layer's row groups


class StackedLayers(nn.Module):
    """``layers`` run in order by one ``scan`` over their stacked parameters and buffers."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self._template = [_without_kernel_routing(layers[0])]  # a list: not this module's
        tensors = [_tensors(layer) for layer in layers]
        self.names = list(tensors[0])
        for i, name in enumerate(self.names):
            stacked = torch.stack(_padded([t[name] for t in tensors]))
            self.register_parameter(f"stacked_{i}", frozen(stacked))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        from torch._higher_order_ops.scan import scan
        from torch.func import functional_call

        template = self._template[0]
        names = self.names

        def step(hidden, tensors):
            state = dict(zip(names, tensors, strict=True))
            out = functional_call(template, state, (hidden, *args), kwargs)
            return out, hidden.new_zeros(())

        stacked = [getattr(self, f"stacked_{i}") for i in range(len(names))]
        return scan(step, hidden_states, stacked)[0]


def stack_layers(model: nn.Module) -> int:
    """Replace ``model.model.layers`` by one :class:`StackedLayers` where the layers are alike;
    returns how many layers were stacked (0: left as they were). ``model`` must be a copy that
    owns its config (its ``num_hidden_layers`` becomes 1)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    config = getattr(model, "config", None)
    if (
        not isinstance(layers, nn.ModuleList)
        or len(layers) < 2
        or getattr(config, "num_hidden_layers", None) != len(layers)
        or not _alike(list(layers))
    ):
        return 0
    inner.layers = nn.ModuleList([StackedLayers(list(layers))])
    config.num_hidden_layers = 1
    return len(layers)


def _without_kernel_routing(layer: nn.Module) -> nn.Module:
    """``layer`` with each submodule whose class forward is the ``kernels`` package's routing
    wrapper calling the wrapped forward instead (see the module's docstring)."""
    for module in layer.modules():
        forward = type(module).forward
        wrapped = getattr(forward, "__wrapped__", None)
        # functools.wraps copies __module__; the wrapper's globals tell where it was defined
        defined_in = getattr(forward, "__globals__", {}).get("__name__", "")
        if wrapped is not None and defined_in.split(".")[0] == "kernels":
            module.forward = types.MethodType(wrapped, module)
    return layer


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(layer.named_parameters(), layer.named_buffers()))


def _padded(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    rows = max(t.shape[0] for t in tensors)
    return [torch.cat([t, t.new_zeros(rows - len(t), *t.shape[1:])]) for t in tensors]


def _attributes(layer: nn.Module) -> list[tuple[str, dict]]:
    """Each submodule's plain attributes (not its tensors or children), but ``layer_idx``."""
    return [
        (name, {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "layer_idx"})
        for name, m in layer.named_modules()
    ]


def _alike(layers: list[nn.Module]) -> bool:
    first = layers[0]
    if not any(isinstance(m, Fused) for m in first.modules()):
        return False  # dense layers stay unrolled: their weights would be sliced on every call
    tensors = [_tensors(layer) for layer in layers]
    attributes = _attributes(first)
    for layer, own in zip(layers[1:], tensors[1:], strict=True):
        if type(layer) is not type(first) or list(own) != list(tensors[0]):
            return False
        try:
            if _attributes(layer) != attributes:
                return False
        except Exception:  # an attribute that cannot be compared: keep the layers apart
            return False
        for name, t in own.items():
            ref = tensors[0][name]
            same = t.shape == ref.shape
            paddable = name.rsplit(".", 1)[-1] in PADDED and t.shape[1:] == ref.shape[1:]
            if t.dtype != ref.dtype or not (same or paddable):
                return False
    return True
