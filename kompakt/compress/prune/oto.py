"""``prune.OTO``: the entry point of OTOv3 pruning for any PyTorch model.

``OTO(model, example_inputs)`` traces the model, builds its zero-invariant groups, and
then offers the optimizers that drive whole groups to zero (``dhspg``, ``h2spg``) and
``construct_subnet`` to build the physically smaller network with the same function.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kompakt import artifact
from kompakt.compress.prune.dhspg import DHSPG, DHSPGConfig
from kompakt.compress.prune.erase import (
    Branch,
    erase_modules,
    erase_slices,
    find_branches,
    reachable,
    restore_modules,
)
from kompakt.compress.prune.graph import analyze, call_arguments, trace
from kompakt.compress.prune.groups import Group, Slot, build_groups, group_reduce, zero_mask
from kompakt.compress.prune.subnet import apply_kept
from kompakt.config import from_mapping
from kompakt.errors import KompaktError


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, a tuple, a dict or a transformers output)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


@torch.no_grad()
def run(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    args, kwargs = call_arguments(model, example_inputs)
    return output_tensors(model(*args, **kwargs))


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Floating-point operations of one forward pass (2 per multiply-add), by torch's counter."""
    args, kwargs = call_arguments(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class OTO:
    """Zero-invariant groups of ``model`` traced with ``example_inputs``.

    ``groups`` holds both kinds: pruning groups (``kind="prune"``: channels, heads, hidden
    units) and erasing groups (``kind="erase"``: whole residual branches). ``unprunable``:
    module or parameter names whose groups must be kept (e.g. ``["fc"]``). Groups that reach
    the model outputs are always kept.
    """

    def __init__(
        self, model: nn.Module, example_inputs: Any, unprunable: Iterable[str] = ()
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        program = trace(model, example_inputs)
        ctx = analyze(model, program)
        unprunable = tuple(unprunable)
        self.groups, self.slots = build_groups(ctx, model, unprunable)
        self.messages = ctx.messages
        n = len(self.groups) + 1
        self._slot_counts = [
            torch.bincount(torch.where(s.gid >= 0, s.gid, n - 1), minlength=n) for s in self.slots
        ]
        self._add_erase_groups(ctx, program.graph, unprunable)

    def _add_erase_groups(self, ctx, graph, unprunable: tuple[str, ...]) -> None:
        """Append one erasing group per erasable branch; keep the graph's connectivity."""
        self.branches: dict[int, Branch] = {}
        for branch in find_branches(ctx, graph, self.model):
            gid = len(self.groups)
            slices = erase_slices(self.model, branch)
            if not self._erases_cleanly(branch, slices):
                continue
            marked = [
                m
                for m in branch.modules
                if any(m == k or m.startswith(k + ".") for k in unprunable)
            ]
            reason = f"marked unprunable by the user ({marked[0]})" if marked else None
            self.groups.append(Group(gid, "erase", slices, prunable=reason is None, reason=reason))
            self.branches[gid] = branch
            self.slots += [Slot(name, 0, torch.full((len(idx),), gid)) for name, _, idx in slices]
        self._edges = {n.name: [u.name for u in n.users] for n in graph.nodes}
        self._sources = [
            n.name for n in graph.nodes if n.op == "placeholder" and ctx.param(n) is None
        ]
        self._output = next(n.name for n in graph.nodes if n.op == "output")

    @torch.no_grad()
    def _erases_cleanly(self, branch: Branch, slices) -> bool:
        """Try erasing ``branch`` on the example inputs: the model must run and match the
        model with the branch's parameters zeroed. Everything is restored afterwards."""
        params = dict(self.model.named_parameters())
        saved = {name: params[name].detach().clone() for name, _, _ in slices}
        was_training = self.model.training
        self.model.eval()
        try:
            for name in saved:
                params[name].zero_()
            reference = run(self.model, self.example_inputs)
            originals = erase_modules(self.model, branch.modules)
            try:
                erased = run(self.model, self.example_inputs)
            except Exception:
                return False
            finally:
                restore_modules(self.model, branch.modules, originals)
            return len(erased) == len(reference) and all(
                a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
                for a, b in zip(reference, erased, strict=True)
            )
        finally:
            for name, value in saved.items():
                params[name].copy_(value)
            self.model.train(was_training)

    @property
    def prunable(self) -> list[Group]:
        """The pruning groups (channels, heads, hidden units) that may be removed."""
        return [g for g in self.groups if g.prunable and g.kind == "prune"]

    @property
    def erasable(self) -> list[Group]:
        """The erasing groups (whole residual branches) that may be removed."""
        return [g for g in self.groups if g.prunable and g.kind == "erase"]

    def group_norms(self) -> torch.Tensor:
        """The L2 norm of every group's parameters, indexed by group id."""
        return group_reduce(self.model, self.slots, len(self.groups), torch.square).sqrt()

    def removable(self, ids: Iterable[int]) -> list[int]:
        """``ids`` (pruning groups) in order, skipping each whose removal, with those before
        it, would leave some layer with no channel at all."""
        remaining = [c.sum().item() for c in self._slot_counts]
        chosen = []
        for g in ids:
            touched = [(i, c[g].item()) for i, c in enumerate(self._slot_counts) if c[g] > 0]
            if all(remaining[i] > k for i, k in touched):
                for i, k in touched:
                    remaining[i] -= k
                chosen.append(g)
        return chosen

    def connected(self, ids: Iterable[int]) -> list[int]:
        """``ids`` (erasing groups) in order, skipping each whose branch, removed together with
        those before it, would cut every path from the inputs to the output."""
        removed: set[str] = set()
        chosen = []
        for g in ids:
            trial = removed | self.branches[g].nodes
            if reachable(self._edges, self._sources, self._output, trial):
                removed = trial
                chosen.append(g)
        return chosen

    def select(self, kind: str, ids: Iterable[int]) -> list[int]:
        """The groups of ``ids`` that can go together: :meth:`removable` or :meth:`connected`."""
        return self.removable(ids) if kind == "prune" else self.connected(ids)

    def zero_groups(self, fraction: float, seed: int = 0, kind: str = "prune") -> list[int]:
        """Zero a random ``fraction`` of the prunable groups of ``kind`` in place (never a
        layer's last channel, never a branch the network needs); returns their ids."""
        if not 0 <= fraction <= 1:
            raise KompaktError(f"zero_groups: fraction must be in [0, 1], got {fraction}")
        ids = [g.id for g in (self.prunable if kind == "prune" else self.erasable)]
        order = np.random.default_rng(seed).permutation(ids).tolist()
        chosen = sorted(self.select(kind, order)[: round(fraction * len(ids))])
        zero = torch.zeros(len(self.groups), dtype=torch.bool)
        zero[chosen] = True
        self.project(zero)
        return chosen

    @torch.no_grad()
    def project(self, zero: torch.Tensor) -> None:
        """Set every parameter slice of the groups flagged in ``zero`` (bool, by id) to 0."""
        params = dict(self.model.named_parameters())
        for slot in self.slots:
            p = params[slot.param]
            p.mul_(zero_mask(slot, zero, p.shape).to(p.dtype))

    def dhspg(self, **config: Any) -> DHSPG:
        """DHSPG over the model's parameters, pruning channel groups (:class:`DHSPGConfig`)."""
        return DHSPG(self, from_mapping(DHSPGConfig, config, "dhspg"), kind="prune")

    def h2spg(self, **config: Any) -> DHSPG:
        """H2SPG: DHSPG over the erasing groups, whose redundant set is chosen in saliency order
        but only where the network stays connected (:class:`DHSPGConfig`;
        ``target_group_sparsity`` is the fraction of erasable branches to remove)."""
        return DHSPG(self, from_mapping(DHSPGConfig, config, "h2spg"), kind="erase")

    def zeroed_groups(self) -> list[int]:
        """Ids of the prunable groups (of both kinds) whose parameters are all exactly zero."""
        norms = self.group_norms()
        return [g.id for g in self.prunable + self.erasable if norms[g.id] == 0]

    def kept_indices(self, removed_groups: Iterable[int]) -> dict[str, dict[int, list[int]]]:
        """For each tensor touched by ``removed_groups``: the indices kept along each dim."""
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        removed: dict[str, dict[int, set[int]]] = {}
        for gid in removed_groups:
            for name, dim, idx in self.groups[gid].slices:
                removed.setdefault(name, {}).setdefault(dim, set()).update(idx.tolist())
        return {
            name: {
                dim: sorted(set(range(tensors[name].shape[dim])) - gone)
                for dim, gone in dims.items()
            }
            for name, dims in removed.items()
        }

    def construct_subnet(self, check: bool = True, atol: float = 1e-5) -> nn.Module:
        """The physically smaller model without the zeroed groups; same outputs as the model.

        Zeroed erasing groups have their modules replaced (nothing of the branch runs);
        zeroed pruning groups have their slices cut out. With ``check``, both models run on
        the example inputs and a difference above ``atol`` raises. The subnet carries the
        model's record plus ``erase`` and ``prune`` plan entries, so ``kompakt.save`` writes
        it and ``kompakt.load`` rebuilds it.
        """
        small, branches, kept = self._without(self.zeroed_groups())
        if check:
            self._check_same(small, atol)
        record = copy.deepcopy(artifact.record_of(self.model))
        if not record.inputs:
            args, kwargs = call_arguments(self.model, self.example_inputs)
            record.inputs = artifact.input_specs(args or kwargs)
        if branches:
            record.plan.append({"kind": "erase", "branches": branches})
        record.plan.append(
            {
                "kind": "prune",
                "kept": {n: {str(d): i for d, i in ds.items()} for n, ds in kept.items()},
            }
        )
        return artifact.attach_record(small, record)

    def _without(
        self, removed_groups: Iterable[int]
    ) -> tuple[nn.Module, list[list[str]], dict[str, dict[int, list[int]]]]:
        """A copy of the model without ``removed_groups`` (those that can go together), with
        the erased branches' module names and the kept indices of the pruned tensors."""
        removed = list(removed_groups)
        erased = self.connected([g for g in removed if self.groups[g].kind == "erase"])
        branches = [self.branches[g].modules for g in erased]
        gone = tuple(m + "." for modules in branches for m in modules)
        pruned = self.removable([g for g in removed if self.groups[g].kind == "prune"])
        kept = {n: dims for n, dims in self.kept_indices(pruned).items() if not n.startswith(gone)}
        small = copy.deepcopy(self.model)
        for modules in branches:
            erase_modules(small, modules)
        apply_kept(small, kept)
        return small.eval(), branches, kept

    def flops_without(self, removed_groups: Iterable[int]) -> int:
        """FLOPs (:func:`count_flops`, on the example inputs) of the subnet that would remain
        without ``removed_groups``; the model itself is not changed."""
        return count_flops(self._without(removed_groups)[0], self.example_inputs)

    def _check_same(self, small: nn.Module, atol: float) -> None:
        was_training = self.model.training
        full = run(self.model.eval(), self.example_inputs)
        self.model.train(was_training)
        for a, b in zip(full, run(small, self.example_inputs), strict=True):
            err = (a - b).abs().max().item() if a.numel() and a.shape == b.shape else float("inf")
            if err > atol * max(1.0, a.abs().max().item()):
                raise KompaktError(
                    f"subnet of {type(self.model).__name__} differs from the zeroed model "
                    f"(max error {err:.3g}); the model's forward may hard-code channel counts"
                )
