"""The dependency graph: a ``torch.export`` trace whose values carry channel units.

Every traced tensor value may carry a :class:`Chan`: one *channel axis* and, for each index
along it, the id of the *unit* it belongs to. Units are joined with a union-find whenever
two channels must be removed together (a residual add, a gating multiply, a grouped conv),
and *frozen* when removing them would change the model's function (a norm that averages
over channels, a model output, an op without a rule). Each parameter slice that belongs to
a unit is recorded as an :class:`Attachment`. The zero-invariant groups are the unfrozen
unit classes with their attachments (see ``groups.py``).

Ops are handled by rules registered in ``rules.py``: one per ATen op, plus rules for
composite modules (attention, recurrent layers) whose whole region of the trace is handled
at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from kompakt.errors import KompaktError


@dataclasses.dataclass(frozen=True)
class Chan:
    """The channel structure of a tensor value: its channel ``axis`` and a unit id per index."""

    axis: int
    units: np.ndarray


@dataclasses.dataclass(frozen=True)
class Attachment:
    """Indices ``i`` of ``param``'s dimension ``dim`` belong to unit ``units[i]`` (-1: none)."""

    param: str
    dim: int
    units: np.ndarray


@dataclasses.dataclass
class Region:
    """The nodes of one composite module's call, with the values that cross its boundary."""

    path: str
    module: nn.Module
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]


class Units:
    """Union-find over channel units, with a frozen flag and the reason for it."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, u: int) -> int:
        root = u
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[u] != root:
            self.parent[u], u = root, self.parent[u]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(
            np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist(), strict=True
        ):
            if x < 0 or y < 0:
                continue
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx
                if ry in self.frozen and rx not in self.frozen:
                    self.frozen[rx] = self.frozen[ry]

    def union_all(self, units: np.ndarray) -> None:
        flat = np.asarray(units).ravel()
        if flat.size > 1:
            self.union(np.full(flat.size - 1, flat[0]), flat[1:])

    def freeze(self, units: np.ndarray, reason: str) -> None:
        for u in np.asarray(units).ravel().tolist():
            if u >= 0:
                self.frozen.setdefault(self.find(u), reason)

    def frozen_reason(self, u: int) -> str | None:
        return self.frozen.get(self.find(u))


OpRule = Callable[["Context", fx.Node], Any]
ModuleRule = Callable[["Context", Region], dict[fx.Node, Any]]
OP_RULES: dict[str, OpRule] = {}
MODULE_RULES: dict[str, ModuleRule] = {}


def op_rule(*targets: str) -> Callable[[OpRule], OpRule]:
    """Register the rule for ATen ops named like ``aten.conv2d.default``."""

    def register(fn: OpRule) -> OpRule:
        for target in targets:
            if target in OP_RULES:
                raise ValueError(f"op rule for {target} registered twice")
            OP_RULES[target] = fn
        return fn

    return register


def module_rule(*class_names: str) -> Callable[[ModuleRule], ModuleRule]:
    """Register the rule for a composite module class (by class name), handled as one region."""

    def register(fn: ModuleRule) -> ModuleRule:
        for name in class_names:
            if name in MODULE_RULES:
                raise ValueError(f"module rule for {name} registered twice")
            MODULE_RULES[name] = fn
        return fn

    return register


class Context:
    """What rules see: values' channels and shapes, parameters, units and attachments."""

    def __init__(self, model: nn.Module, program: torch.export.ExportedProgram) -> None:
        self.model = model
        self.units = Units()
        self.attachments: list[Attachment] = []
        self.chans: dict[fx.Node, Any] = {}
        self.messages: list[str] = []
        signature = program.graph_signature
        self.params: dict[str, str] = dict(signature.inputs_to_parameters)
        self.buffers: dict[str, str] = dict(signature.inputs_to_buffers)
        self.node_module: dict[fx.Node, str] = {}

    # -- values --------------------------------------------------------------------------
    def chan(self, arg: Any) -> Chan | None:
        value = self.chans.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, Chan) else None

    @staticmethod
    def shape(arg: Any) -> tuple[int, ...] | None:
        if not isinstance(arg, fx.Node):
            return None
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
        return None

    def param(self, arg: Any) -> str | None:
        """The parameter's or buffer's qualified name if ``arg`` is one, else None."""
        if isinstance(arg, fx.Node) and arg.op == "placeholder":
            return self.params.get(arg.name) or self.buffers.get(arg.name)
        return None

    def where(self, node: fx.Node) -> str:
        module = self.node_module.get(node)
        return f"node {node.name} ({node.target})" + (f" in module {module!r}" if module else "")

    # -- units ---------------------------------------------------------------------------
    def new_chan(self, axis: int, n: int) -> Chan:
        return Chan(axis, self.units.new(n))

    def attach(self, param: str | None, dim: int, units: np.ndarray) -> None:
        if param is None:
            return
        self.attachments.append(Attachment(param, dim, np.asarray(units, dtype=np.int64)))

    def freeze_value(self, arg: Any, reason: str) -> None:
        chan = self.chan(arg)
        if chan is not None:
            self.units.freeze(chan.units, reason)

    def unsupported(self, node: fx.Node, why: str) -> None:
        """Freeze the channels of every input of ``node`` and say why."""
        message = f"{self.where(node)}: {why}; its channels are kept (not pruned)"
        self.messages.append(message)
        for arg in node.all_input_nodes:
            self.freeze_value(arg, message)


def call_arguments(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments ``model`` is called with for ``example_inputs`` (a
    tuple, a tensor, or a dict of keyword tensors). A model whose forward takes ``use_cache``
    (transformers decoders, on by default) is called with ``use_cache=False`` unless the
    inputs say otherwise: the cache it returns is an object torch.export cannot trace, and
    pruning needs none."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    else:
        args, kwargs = (example_inputs,), {}
    try:
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature
        takes_cache = False
    if takes_cache:
        kwargs.setdefault("use_cache", False)
    return args, kwargs


def trace(model: nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """Export ``model`` (in eval mode) with ``example_inputs`` (see :func:`call_arguments`)."""
    args, kwargs = call_arguments(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KompaktError(
            f"cannot trace {type(model).__name__} with torch.export ({first}); pass example "
            "inputs the model's forward accepts (a tuple of tensors or a dict of keyword tensors)"
        ) from e
    finally:
        model.train(was_training)


def _module_path(node: fx.Node, model: nn.Module) -> list[str]:
    """The module paths enclosing ``node``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if path]


def _normalize_path(path: str) -> str:
    # torch.export writes attribute paths like "L['self'].layers[0]" in some versions
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "")


def _regions(model: nn.Module, graph: fx.Graph) -> dict[fx.Node, Region]:
    """Map each node inside a composite module's call to that module's region."""
    modules = dict(model.named_modules())
    by_path: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for raw in _module_path(node, model):
            path = _normalize_path(raw)
            module = modules.get(path)
            if module is not None and type(module).__name__ in MODULE_RULES:
                by_path.setdefault(path, []).append(node)
                break
    regions: dict[fx.Node, Region] = {}
    for path, nodes in by_path.items():
        inside = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        region = Region(path, modules[path], nodes, inputs, outputs)
        for node in nodes:
            regions[node] = region
    return regions


def _schedule(graph: fx.Graph, regions: dict[fx.Node, Region]) -> list[fx.Node | Region]:
    """Nodes and whole regions in a dependency-respecting order."""
    items: list[fx.Node | Region] = []
    key: dict[fx.Node, int] = {}
    seen_regions: dict[int, int] = {}
    for node in graph.nodes:
        region = regions.get(node)
        if region is None:
            key[node] = len(items)
            items.append(node)
        else:
            if id(region) not in seen_regions:
                seen_regions[id(region)] = len(items)
                items.append(region)
            key[node] = seen_regions[id(region)]
    deps: list[set[int]] = [set() for _ in items]
    for i, item in enumerate(items):
        nodes = item.nodes if isinstance(item, Region) else [item]
        for node in nodes:
            for arg in node.all_input_nodes:
                if key[arg] != i:
                    deps[i].add(key[arg])
    order, done = [], set()
    ready = [i for i, d in enumerate(deps) if not d]
    users: list[list[int]] = [[] for _ in items]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    while ready:
        i = min(ready)
        ready.remove(i)
        order.append(items[i])
        done.add(i)
        for j in users[i]:
            remaining[j] -= 1
            if remaining[j] == 0:
                ready.append(j)
    if len(order) != len(items):
        raise KompaktError(
            "the traced graph has a cycle through a composite module; cannot order it"
        )
    return order


def analyze(model: nn.Module, program: torch.export.ExportedProgram) -> Context:
    """Run every rule over the trace; returns the context holding units and attachments."""
    from kompakt.compress.prune import rules  # noqa: F401  (registers the rules)

    ctx = Context(model, program)
    graph = program.graph
    for node in graph.nodes:
        paths = _module_path(node, model)
        if paths:
            ctx.node_module[node] = _normalize_path(paths[-1])
    regions = _regions(model, graph)
    for item in _schedule(graph, regions):
        if isinstance(item, Region):
            results = MODULE_RULES[type(item.module).__name__](ctx, item)
            for node in item.outputs:
                ctx.chans[node] = results.get(node)
                if node not in results:
                    ctx.unsupported(
                        node, f"composite module {item.path!r} gave no channels for this output"
                    )
            continue
        node = item
        if node.op == "placeholder":
            ctx.chans[node] = None
        elif node.op == "output":
            for arg in node.all_input_nodes:
                ctx.freeze_value(arg, f"reaches the model output through {arg.name}")
        elif node.op == "call_function":
            rule = OP_RULES.get(str(node.target))
            if rule is None:
                ctx.chans[node] = None
                if any(ctx.chan(a) is not None for a in node.all_input_nodes):
                    ctx.unsupported(node, "no pruning rule for this op")
            else:
                ctx.chans[node] = rule(ctx, node)
    return ctx
