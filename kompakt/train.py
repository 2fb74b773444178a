"""Training and evaluating classifiers on in-memory tensors (the reference CNN, boosted heads)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from kompakt.config import check

SCHEDULES = ("onecycle", "cosine")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """SGD with Nesterov momentum under a one-cycle learning-rate schedule.

    epochs: passes over the training set. batch_size: examples per step. lr: peak learning
    rate. momentum, weight_decay: SGD settings. seed: shuffling and initialisation seed.
    limit: train on only the first ``limit`` examples (None: all). schedule: ``onecycle``
    (warm up to ``lr``, then anneal) or ``cosine`` (start at ``lr``, anneal to 0).
    """

    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    limit: int | None = None
    schedule: str = "onecycle"

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        check_schedule(self.schedule)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Train ``model`` in place with cross-entropy; returns the last epoch's mean loss.

    ``optimizer`` replaces the default SGD (e.g. a pruning optimizer over the same model).
    """
    if config.limit is not None:
        images, labels = images[: config.limit], labels[: config.limit]
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    if optimizer is None:
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total
        )
    else:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    mean_loss = float("nan")
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        total, seen = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"train epoch {epoch + 1}/{config.epochs}",
            disable=None if progress else True,
            leave=False,
        )
        for i in bar:
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            loss = loss_fn(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        mean_loss = total / seen
    model.eval()
    return {"train_loss": mean_loss}


def check_schedule(schedule: str) -> None:
    """Refuse a learning-rate schedule that is not one of :data:`SCHEDULES`."""
    check(schedule in SCHEDULES, f"schedule must be onecycle or cosine, got {schedule!r}")
