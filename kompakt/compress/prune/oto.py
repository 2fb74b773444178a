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
from kompakt.compress.prune.graph import analyze, trace
from kompakt.compress.prune.groups import Group, build_groups, group_reduce, zero_mask
from kompakt.compress.prune.subnet import resized_copy
from kompakt.errors import KompaktError


def _as_args(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


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
    args, kwargs = _as_args(example_inputs)
    return output_tensors(model(*args, **kwargs))


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Floating-point operations of one forward pass (2 per multiply-add), by torch's counter."""
    args, kwargs = _as_args(example_inputs)
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

    ``unprunable``: module or parameter names whose groups must be kept (e.g. ``["fc"]``).
    Groups that reach the model outputs are always kept.
    """

    def __init__(
        self, model: nn.Module, example_inputs: Any, unprunable: Iterable[str] = ()
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        program = trace(model, example_inputs)
        ctx = analyze(model, program)
        self.groups, self.slots = build_groups(ctx, model, tuple(unprunable))
        self.messages = ctx.messages
        n = len(self.groups) + 1
        self._slot_counts = [
            torch.bincount(torch.where(s.gid >= 0, s.gid, n - 1), minlength=n) for s in self.slots
        ]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def group_norms(self) -> torch.Tensor:
        """The L2 norm of every group's parameters, indexed by group id."""
        return group_reduce(self.model, self.slots, len(self.groups), torch.square).sqrt()

    def removable(self, ids: Iterable[int]) -> list[int]:
        """``ids`` in order, skipping each group whose removal (with those before it) would leave
        some layer with no channel at all."""
        remaining = [c.sum().item() for c in self._slot_counts]
        chosen = []
        for g in ids:
            touched = [(i, c[g].item()) for i, c in enumerate(self._slot_counts) if c[g] > 0]
            if all(remaining[i] > k for i, k in touched):
                for i, k in touched:
                    remaining[i] -= k
                chosen.append(g)
        return chosen

    def zero_groups(self, fraction: float, seed: int = 0) -> list[int]:
        """Zero a random ``fraction`` of the prunable groups in place (never a layer's last
        channel); returns their ids."""
        if not 0 <= fraction <= 1:
            raise KompaktError(f"zero_groups: fraction must be in [0, 1], got {fraction}")
        ids = [g.id for g in self.prunable]
        order = np.random.default_rng(seed).permutation(ids).tolist()
        chosen = sorted(self.removable(order)[: round(fraction * len(ids))])
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

    def zeroed_groups(self) -> list[int]:
        """Ids of the prunable groups whose parameters are all exactly zero."""
        norms = self.group_norms()
        return [g.id for g in self.prunable if norms[g.id] == 0]

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

        With ``check``, both run on the example inputs and a difference above ``atol``
        raises. The subnet carries the model's record plus a ``prune`` plan entry, so
        ``kompakt.save`` writes it and ``kompakt.load`` rebuilds it.
        """
        kept = self.kept_indices(self.removable(self.zeroed_groups()))
        small = resized_copy(self.model, kept).eval()
        if check:
            was_training = self.model.training
            full = run(self.model.eval(), self.example_inputs)
            self.model.train(was_training)
            mine = run(small, self.example_inputs)
            for a, b in zip(full, mine, strict=True):
                err = (a - b).abs().max().item() if a.numel() else 0.0
                if a.shape != b.shape or err > atol * max(1.0, a.abs().max().item()):
                    raise KompaktError(
                        f"subnet of {type(self.model).__name__} differs from the zeroed model "
                        f"(max error {err:.3g}); the model's forward may hard-code channel counts"
                    )
        try:
            record = copy.deepcopy(artifact.record_of(self.model))
        except KompaktError:  # an architecture kompakt cannot rebuild: usable, not saveable
            return small
        record.plan.append(
            {
                "kind": "prune",
                "kept": {n: {str(d): i for d, i in dims.items()} for n, dims in kept.items()},
            }
        )
        return artifact.attach_record(small, record)
