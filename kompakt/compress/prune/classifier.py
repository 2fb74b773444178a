"""Prune a trained image classifier with DHSPG, end to end: trace, train, build the subnet."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from kompakt import artifact
from kompakt.compress.prune.erase import ErasedBranch
from kompakt.compress.prune.oto import OTO, count_flops, count_params
from kompakt.config import check, to_dict
from kompakt.eval import accuracy
from kompakt.train import TrainConfig, check_schedule, train_classifier


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """DHSPG pruning of a classifier within a fixed epoch budget, with no fine-tuning after.

    target_group_sparsity: fraction of prunable groups to remove. target_flops_reduction:
    None, or the share of FLOPs to remove instead (see :class:`DHSPGConfig`). epochs: total DHSPG
    training epochs. start_epochs: plain epochs before the groups are split (warm-up).
    pruning_epochs: epochs over which the redundant groups are driven to zero; the rest of
    the budget trains the remaining groups. pruning_periods: splits over the pruning window,
    each adding an equal share of the target to the redundant set (see :class:`DHSPGConfig`).
    lr, momentum, weight_decay, batch_size, seed: SGD settings. schedule: the learning rate's,
    ``cosine`` (from ``lr`` down to 0) or ``onecycle`` (warm up to ``lr``, then anneal).
    nesterov: Nesterov momentum.
    epsilon: half-space projection threshold.
    unprunable: module names to keep whole (the classifier head is always kept).
    mode: ``prune`` (DHSPG over channel groups; ``target_group_sparsity`` of them) or
    ``erase`` (H2SPG over residual branches; ``target_group_sparsity`` of the erasable ones).
    """

    target_group_sparsity: float = 0.5
    target_flops_reduction: float | None = None
    epochs: int = 2
    start_epochs: float = 0.1
    pruning_epochs: float = 1.0
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    epsilon: float = 0.9
    pruning_periods: int = 1
    unprunable: tuple[str, ...] = ()
    mode: str = "prune"

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(0 <= self.start_epochs, f"start_epochs must be >= 0, got {self.start_epochs}")
        check(self.pruning_epochs > 0, f"pruning_epochs must be > 0, got {self.pruning_epochs}")
        check(
            self.start_epochs + self.pruning_epochs <= self.epochs,
            "start_epochs + pruning_epochs must fit in epochs",
        )
        check_schedule(self.schedule)
        check(self.mode in ("prune", "erase"), f"mode must be prune or erase, got {self.mode!r}")
        object.__setattr__(self, "unprunable", tuple(self.unprunable))


def prune_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: PruneConfig,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` with DHSPG and return ``(subnet, metrics)``.

    The step is recorded in the subnet's record (config and metrics), with the ``prune`` plan
    entry that lets the saved artifact be rebuilt.
    """
    example = images[:2]
    oto = OTO(model, (example,), unprunable=config.unprunable)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    make = oto.dhspg if config.mode == "prune" else oto.h2spg
    optimizer = make(
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        target_group_sparsity=config.target_group_sparsity,
        target_flops_reduction=config.target_flops_reduction,
        start_pruning_step=int(config.start_epochs * steps_per_epoch),
        pruning_steps=max(1, int(config.pruning_epochs * steps_per_epoch)),
        epsilon=config.epsilon,
        pruning_periods=config.pruning_periods,
    )
    train = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        schedule=config.schedule,
    )
    metrics: dict[str, Any] = {
        "groups": len(oto.groups),
        "prunable_groups": len(oto.prunable),
        "erasable_groups": len(oto.erasable),
        "flops_before": count_flops(model, (example[:1],)),
        "params_before": count_params(model),
    }
    if test is not None:
        metrics["test_accuracy_before"] = accuracy(model, *test)
    method = "dhspg" if config.mode == "prune" else "h2spg"
    step_config = {"method": method, **to_dict(config)}
    with artifact.step(model, "prune", step_config, inputs=example) as recorded:
        metrics.update(
            train_classifier(model, images, labels, train, progress, optimizer=optimizer)
        )
        subnet = oto.construct_subnet()
        metrics.update(
            group_sparsity=optimizer.group_sparsity,
            erased_branches=sum(isinstance(m, ErasedBranch) for m in subnet.modules()),
            groups_projected_at_budget_end=optimizer.forced,
            flops_after=count_flops(subnet, (example[:1],)),
            params_after=count_params(subnet),
        )
        if test is not None:
            metrics["test_accuracy"] = accuracy(subnet, *test)
        recorded.update(metrics)
    artifact.record_of(subnet).steps.append(artifact.record_of(model).steps[-1])
    return subnet, metrics
