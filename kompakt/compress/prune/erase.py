"""Erasing groups (EZIGs): whole operator chains that a residual add can do without.

A candidate is one operand of an ``add`` of two traced tensors: the nodes that only that
operand depends on (its *branch*), entered through exactly one outside tensor (the fork).
The branch must be made of whole modules (conv, norm, linear, an MLP block...) and of
elementwise ops that map zero to zero, so that zeroing every parameter of those modules
makes the branch output exactly zero, and the add passes the other operand through.

Erasing replaces the branch's first module with :class:`ErasedBranch`, which returns a
scalar zero (broadcast by the add), and the others with :class:`Skipped`: nothing of the
branch is computed any more. Since the Python code that calls the modules is not in the
trace, each candidate is also tried once on the example inputs (``OTO`` does this) and kept
only if the erased model runs and matches the model with the branch zeroed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from kompakt.artifact import plan_step
from kompakt.compress.prune.graph import Context, _module_path, _normalize_path

ZERO_TO_ZERO = {
    "aten.relu.default",
    "aten.relu_.default",
    "aten.gelu.default",
    "aten.silu.default",
    "aten.tanh.default",
    "aten.hardswish.default",
    "aten.relu6.default",
    "aten.hardtanh.default",
    "aten.leaky_relu.default",
    "aten.elu.default",
    "aten.neg.default",
    "aten.dropout.default",
    "aten.clone.default",
    "aten.contiguous.default",
    "aten.alias.default",
    "aten.mul.Scalar",
    "aten.div.Scalar",
    "aten.mish.default",
}
"""Elementwise ops with f(0) = 0 that may sit between the modules of an erasable branch."""

ENDS_AT_ZERO = ZERO_TO_ZERO | {
    "aten.conv1d.default",
    "aten.conv2d.default",
    "aten.conv3d.default",
    "aten.linear.default",
    "aten.batch_norm.default",
    "aten.layer_norm.default",
    "aten.group_norm.default",
    "aten.mul.Tensor",
    "<built-in function getitem>",
    "aten._native_batch_norm_legit_no_training.default",
}
"""Ops whose output is zero when their parameters are zero: a branch's modules must end in one."""

SHAPE_OPS = {
    "aten.view.default",
    "aten.reshape.default",
    "aten.transpose.int",
    "aten.permute.default",
    "aten.contiguous.default",
    "aten.flatten.using_ints",
    "aten.unflatten.int",
}
"""Ops that only move values: looked through when checking how a module ends."""


class ErasedBranch(nn.Module):
    """Stands in for the first module of an erased branch: returns a scalar zero."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.new_zeros(())


class Skipped(nn.Module):
    """Stands in for the later modules of an erased branch: passes its first input through."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


@dataclasses.dataclass
class Branch:
    """An erasable branch: its modules in call order and the traced nodes it consists of."""

    modules: list[str]
    nodes: set[str]
    add: str


def _branch_nodes(operand: fx.Node) -> set[fx.Node]:
    """Nodes only ``operand`` depends on: all their users lie inside the branch."""
    branch = {operand}
    frontier = [operand]
    while frontier:
        node = frontier.pop()
        for arg in node.all_input_nodes:
            if arg in branch or arg.op != "call_function":
                continue
            if all(u in branch for u in arg.users if u.users or u.op == "output"):  # skip asserts
                branch.add(arg)
                frontier.append(arg)
    return branch


def find_branches(ctx: Context, graph: fx.Graph, model: nn.Module) -> list[Branch]:
    """Every erasable branch of the traced graph (see the module docstring for the rules)."""
    module_nodes: dict[str, set[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.users:  # not asserts
            for raw in _module_path(node, model):
                module_nodes.setdefault(_normalize_path(raw), set()).add(node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    branches = []
    for add in graph.nodes:
        if str(add.target) != "aten.add.Tensor" or len(add.all_input_nodes) != 2:
            continue
        a, b = add.args[0], add.args[1]
        if ctx.chan(a) is None or ctx.chan(b) is None or a is b:
            continue
        for operand in (a, b):
            branch = _branch(ctx, operand, add, module_nodes, order)
            if branch is not None:
                branches.append(branch)
    return branches


def _branch(
    ctx: Context,
    operand: fx.Node,
    add: fx.Node,
    module_nodes: dict[str, set[fx.Node]],
    order: dict[fx.Node, int],
) -> Branch | None:
    if any(u is not add for u in operand.users if u.users):
        return None
    nodes = _branch_nodes(operand)
    outside = {
        a for n in nodes for a in n.all_input_nodes if a not in nodes and ctx.param(a) is None
    }
    if len(outside) != 1:
        return None
    (fork,) = outside
    # a module may produce the fork itself as a no-op (RMSNorm's ``x.to(float32)``)
    inside = [p for p, ns in module_nodes.items() if p and ns - {fork} and ns - {fork} <= nodes]
    top = [p for p in inside if not any(p.startswith(q + ".") for q in inside)]
    if not top:
        return None
    covered = set().union(*(module_nodes[p] for p in top)) - {fork}
    loose = nodes - covered
    if any(str(n.target) not in ZERO_TO_ZERO for n in loose):
        return None
    for path in top:  # each module's output must be zero once its parameters are
        last = max(module_nodes[path], key=order.__getitem__)
        while str(last.target) in SHAPE_OPS and last.all_input_nodes:
            last = last.all_input_nodes[0]
        if str(last.target) not in ENDS_AT_ZERO:
            return None
    if any(ctx.param(a) is not None for n in loose for a in n.all_input_nodes):
        return None
    top.sort(key=lambda p: min(order[n] for n in module_nodes[p]))
    if not any(fork in n.all_input_nodes for n in module_nodes[top[0]]):
        return None
    return Branch(top, {n.name for n in nodes}, add.name)


def erase_slices(model: nn.Module, branch: Branch) -> list[tuple[str, int, np.ndarray]]:
    """Every parameter of the branch's modules, whole (dim 0, all indices)."""
    slices = []
    for path in branch.modules:
        for name, p in model.get_submodule(path).named_parameters():
            slices.append((f"{path}.{name}", 0, np.arange(p.shape[0])))
    return slices


def reachable(
    edges: dict[str, list[str]], sources: list[str], target: str, removed: set[str]
) -> bool:
    """Whether ``target`` is reachable from any source without passing through ``removed``."""
    seen = set(s for s in sources if s not in removed)
    frontier = list(seen)
    while frontier:
        node = frontier.pop()
        if node == target:
            return True
        for nxt in edges.get(node, ()):
            if nxt not in seen and nxt not in removed:
                seen.add(nxt)
                frontier.append(nxt)
    return False


def erase_modules(model: nn.Module, modules: list[str]) -> list[nn.Module]:
    """Replace the first module of a branch with :class:`ErasedBranch`, the rest with
    :class:`Skipped`; returns the modules replaced."""
    replaced = []
    for i, path in enumerate(modules):
        parent_name, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        replaced.append(getattr(parent, leaf))
        setattr(parent, leaf, ErasedBranch() if i == 0 else Skipped())
    return replaced


def restore_modules(model: nn.Module, modules: list[str], originals: list[nn.Module]) -> None:
    """Undo :func:`erase_modules`."""
    for path, module in zip(modules, originals, strict=True):
        parent_name, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, module)


@plan_step("erase")
def _replay(model: nn.Module, entry: dict[str, Any]) -> None:
    for modules in entry["branches"]:
        erase_modules(model, modules)
