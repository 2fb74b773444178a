"""Zero-invariant groups (ZIGs) built from the analysed graph.

A pruning group (PZIG) is one class of joined channel units: every parameter slice attached
to it (producer rows, biases, norm parameters, consumers' input columns, attention heads,
recurrent hidden units across the stacked gates). Zeroing all of them leaves the remaining
network's function unchanged, and so does removing them.

Groups are stored per attachment as a vector ``gid`` mapping each index of the parameter's
dimension to its group id (-1: none), so norms and projections over all groups are a few
vectorised scatter operations per parameter.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from kompakt.compress.prune.graph import Context


@dataclasses.dataclass
class Group:
    """One zero-invariant group: the parameter slices ``(name, dim, indices)`` removed together.

    ``kind`` is ``"prune"`` (channels, heads, hidden units) or ``"erase"`` (a whole operator
    chain). ``prunable`` is False for groups touching the model output, mixed by a norm,
    marked by the user, or otherwise kept; ``reason`` says why.
    """

    id: int
    kind: str
    slices: list[tuple[str, int, np.ndarray]]
    prunable: bool = True
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Slot:
    """Dimension ``dim`` of parameter ``param``: ``gid[i]`` is the group of index ``i``."""

    param: str
    dim: int
    gid: torch.Tensor


def build_groups(
    ctx: Context, model: nn.Module, unprunable: tuple[str, ...] = ()
) -> tuple[list[Group], list[Slot]]:
    """Pruning groups from the unit classes of ``ctx``; slots for vectorised access."""
    named_params = dict(model.named_parameters())
    roots: dict[int, int] = {}
    slices: dict[int, list[tuple[str, int, np.ndarray]]] = {}
    frozen: dict[int, str | None] = {}
    per_slot: list[tuple[str, int, np.ndarray]] = []
    for att in ctx.attachments:
        gid = np.full(len(att.units), -1, dtype=np.int64)
        for i, u in enumerate(att.units.tolist()):
            if u < 0:
                continue
            root = ctx.units.find(u)
            if root not in roots:
                roots[root] = len(roots)
                slices[roots[root]] = []
                frozen[roots[root]] = ctx.units.frozen_reason(root)
            gid[i] = roots[root]
        for g in np.unique(gid[gid >= 0]).tolist():
            slices[g].append((att.param, att.dim, np.flatnonzero(gid == g)))
        if att.param in named_params:
            per_slot.append((att.param, att.dim, gid))
    groups = []
    for g, group_slices in slices.items():
        reason = frozen[g]
        names = {name for name, _, _ in group_slices}
        if reason is None:
            marked = [n for n in names if any(n == k or n.startswith(k + ".") for k in unprunable)]
            if marked:
                reason = f"marked unprunable by the user ({marked[0]})"
        if reason is None and not names & named_params.keys():
            reason = "holds no trainable parameter"
        groups.append(Group(g, "prune", group_slices, prunable=reason is None, reason=reason))
    slots = [Slot(p, d, torch.from_numpy(gid)) for p, d, gid in per_slot]
    return groups, slots


def _index_sums(values: torch.Tensor, slot: Slot) -> torch.Tensor:
    """``values`` summed over every dimension but the slot's: one value per slot index."""
    dims = [d for d in range(values.dim()) if d != slot.dim]
    return values.sum(dim=dims) if dims else values


def _slot_gids(slot: Slot, n_groups: int) -> torch.Tensor:
    """The slot's group ids, with indices in no group sent to the spare bin ``n_groups``."""
    return torch.where(slot.gid >= 0, slot.gid, n_groups)


def group_reduce(
    model: nn.Module,
    slots: list[Slot],
    n_groups: int,
    fn,
    tensors: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum ``fn(param_tensor)`` (elementwise) over each group's elements: a ``[n_groups]`` vector.

    ``tensors`` maps parameter names to the tensors to reduce (default: the parameters).
    """
    params = dict(model.named_parameters())
    out = torch.zeros(n_groups + 1, dtype=torch.float64)
    for slot in slots:
        t = (params if tensors is None else tensors).get(slot.param)
        if t is None:
            continue
        out.index_add_(0, _slot_gids(slot, n_groups), _index_sums(fn(t.detach()).double(), slot))
    return out[:n_groups]


def relative_energy(model: nn.Module, slots: list[Slot], n_groups: int) -> torch.Tensor:
    """Each group's magnitude relative to its own layers: a ``[n_groups]`` vector.

    For every slot, an index's squared norm is divided by the mean squared norm of all indices
    of that tensor along the slot's dimension; a group's value is the mean of these ratios over
    its slot indices. A uniform rescaling of one layer (e.g. the ``1 / sqrt(fan_in)`` of its
    initialisation) or a group's size leaves it unchanged. All-zero tensors carry no ranking
    and are skipped.
    """
    params = dict(model.named_parameters())
    total = torch.zeros(n_groups + 1, dtype=torch.float64)
    count = torch.zeros(n_groups + 1, dtype=torch.float64)
    for slot in slots:
        per_index = _index_sums(params[slot.param].detach().double().square(), slot)
        mean = per_index.mean()
        if mean <= 0:
            continue
        gid = _slot_gids(slot, n_groups)
        total.index_add_(0, gid, per_index / mean)
        count.index_add_(0, gid, torch.ones_like(per_index))
    return (total / count.clamp_min(1))[:n_groups]


def zero_mask(slot: Slot, zero: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A {0, 1} tensor broadcastable to ``shape``: 0 where the slot's index is in a zeroed group."""
    gid = slot.gid
    keep = ~(zero[gid.clamp(min=0)] & (gid >= 0))
    view = [1] * len(shape)
    view[slot.dim] = shape[slot.dim]
    return keep.view(view)
