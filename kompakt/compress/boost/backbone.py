"""Boosting the final layers of a trained network on its frozen features.

:func:`head_features` runs the network and collects the input of a named head module;
:func:`replace_head` puts a :class:`BoostedHead` in its place and records the plan entry that
lets ``kompakt.load`` rebuild it; :func:`boost_classifier_head` does both around a GBNN fit and
measures test accuracy with all hidden units and with half of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kompakt import artifact
from kompakt.compress.boost.gbnn import GBNN, GBNNConfig
from kompakt.compress.boost.head import BoostedHead
from kompakt.config import check, to_dict
from kompakt.errors import KompaktError
from kompakt.eval import accuracy


@dataclasses.dataclass(frozen=True)
class BoostHeadConfig(GBNNConfig):
    """A GBNN classification head for a trained network: the GBNN fields, plus

    head: the dotted name of the module to replace (its input is the feature vector; for the
        reference CNN ``fc``, after global pooling and flatten).
    limit: fit on only the first ``limit`` training examples (None: all).
    """

    validation_fraction: float = 0.1
    head: str = "fc"
    limit: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.task == "classification", f"task must be 'classification', got {self.task!r}")
        check(bool(self.head), "head must name a module, e.g. 'fc'")
        check(self.limit is None or self.limit >= 2, f"limit must be >= 2, got {self.limit}")


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        children = ", ".join(n for n, _ in model.named_children())
        raise KompaktError(
            f"{type(model).__name__} has no module {name!r}; name the head module by its dotted "
            f"path (top-level modules: {children})"
        ) from e


@torch.no_grad()
def head_features(
    model: nn.Module, head: str, inputs: torch.Tensor, batch_size: int = 500, progress: bool = True
) -> torch.Tensor:
    """The input of module ``head`` for each row of ``inputs``, as ``[rows, features]``.

    The model runs in eval mode (restored afterwards); like ``nn.Linear`` the head acts on the
    last dimension, so any leading dimensions are folded into rows.
    """
    module = _module(model, head)
    captured: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    was_training = model.training
    model.eval()
    try:
        batches = range(0, len(inputs), batch_size)
        for i in tqdm(
            batches, desc=f"features of {head}", disable=None if progress else True, leave=False
        ):
            try:
                model(inputs[i : i + batch_size])
            except RuntimeError as e:
                raise KompaktError(
                    f"{type(model).__name__} cannot run on inputs of shape {tuple(inputs.shape)} "
                    f"({str(e).splitlines()[0]}); pass the inputs the network was trained on"
                ) from e
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured)


def replace_head(model: nn.Module, head: str, new: BoostedHead) -> None:
    """Put ``new`` in place of module ``head`` and record it in the model's plan.

    A ``nn.Linear`` (or an earlier BoostedHead) being replaced must have the same input and
    output widths, so the rest of the network is unchanged.
    """
    old = _module(model, head)
    if isinstance(old, nn.Linear):
        widths = (old.in_features, old.out_features)
    elif isinstance(old, BoostedHead):
        widths = (old.hidden.in_features, old.out.out_features)
    else:
        widths = None
    new_widths = (new.hidden.in_features, new.out.out_features)
    if widths is not None and widths != new_widths:
        raise KompaktError(
            f"{head}: {type(old).__name__} maps {widths[0]} -> {widths[1]} features, the boosted "
            f"head maps {new_widths[0]} -> {new_widths[1]}; fit it on this head's features and classes"
        )
    record = artifact.record_of(model)
    model.set_submodule(head, new)
    record.plan.append(new.plan_entry(head))


def boost_classifier_head(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    config: BoostHeadConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Replace ``config.head`` of a trained classifier by a GBNN head fitted on its frozen
    features of ``train`` (inputs, labels); record the step and return its metrics: test
    accuracy before, with all ``units`` and with ``half_units`` (whole steps, rounded down)."""
    inputs, labels = train
    if config.limit is not None:
        inputs, labels = inputs[: config.limit], labels[: config.limit]
    with artifact.step(model, "boost", to_dict(config), inputs=inputs[:2]) as metrics:
        old = _module(model, config.head)
        train_features = head_features(model, config.head, inputs, progress=progress)
        test_features = head_features(model, config.head, test[0], progress=progress)
        gbnn = GBNN(config).fit(train_features, labels, progress=progress)
        new = gbnn.to_module()
        replace_head(model, config.head, new)
        steps = new.units // config.units_per_step
        metrics.update(
            test_accuracy_before=accuracy(old, test_features, test[1]),
            steps=steps,
            units=new.units,
            test_accuracy=accuracy(new, test_features, test[1]),
            train_loss=gbnn.history["train_loss"][steps - 1],
        )
        if gbnn.history["val_loss"]:
            metrics["val_loss"] = gbnn.history["val_loss"][steps - 1]
        if steps >= 2:
            half = new.truncate(steps // 2 * config.units_per_step)
            metrics["half_units"] = half.units
            metrics["test_accuracy_half"] = accuracy(half, test_features, test[1])
    return metrics


def describe(metrics: dict[str, Any], head: str) -> str:
    """One line of test accuracies from :func:`boost_classifier_head`'s metrics."""
    line = (
        f"test accuracy {metrics['test_accuracy_before']:.2%} with the original {head}, "
        f"{metrics['test_accuracy']:.2%} with {metrics['units']} boosted units ({metrics['steps']} steps)"
    )
    if "half_units" in metrics:
        line += (
            f", {metrics['test_accuracy_half']:.2%} with the first {metrics['half_units']} (half)"
        )
    return line
