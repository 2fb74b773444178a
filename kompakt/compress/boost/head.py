"""``BoostedHead``: the merged GBNN, an ordinary Linear -> activation -> Linear layer.

The hidden units are in training order: the first ``t * units_per_step`` units with the output
bias ``prefix_bias[t - 1]`` are exactly the model after ``t`` boosting steps, so units can be
switched off from the end (:meth:`BoostedHead.truncate`). The artifact rebuilds the layer from
its plan entry (``kind: boost_head``), replayed by the handler registered here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kompakt import artifact
from kompakt.errors import KompaktError

ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
PLAN_KIND = "boost_head"


class BoostedHead(nn.Module):
    """``out(act(hidden(x)))`` over the last dimension of ``x``, like ``nn.Linear``.

    ``units`` hidden units come from ``units // units_per_step`` boosting steps.
    ``prefix_bias[t - 1]`` is the output bias of the model cut after ``t`` steps (so
    ``prefix_bias[-1]`` equals ``out.bias``).
    """

    def __init__(
        self,
        in_features: int,
        units: int,
        out_features: int,
        units_per_step: int,
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise KompaktError(
                f"BoostedHead: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}"
            )
        if units_per_step < 1 or units < units_per_step or units % units_per_step:
            raise KompaktError(
                f"BoostedHead: units={units} must be a positive multiple of units_per_step={units_per_step}"
            )
        self.units_per_step = units_per_step
        self.activation = activation
        self.hidden = nn.Linear(in_features, units)
        self.act = ACTIVATIONS[activation]()
        self.out = nn.Linear(units, out_features)
        self.register_buffer("prefix_bias", torch.zeros(units // units_per_step, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(x)))

    @property
    def units(self) -> int:
        return self.hidden.out_features

    def truncate(self, units: int) -> BoostedHead:
        """A new head with the first ``units`` hidden units: the model after ``units / J`` steps."""
        steps = check_units(units, self.units_per_step, self.units)
        head = BoostedHead(
            self.hidden.in_features,
            units,
            self.out.out_features,
            self.units_per_step,
            self.activation,
        )
        with torch.no_grad():
            head.hidden.weight.copy_(self.hidden.weight[:units])
            head.hidden.bias.copy_(self.hidden.bias[:units])
            head.out.weight.copy_(self.out.weight[:, :units])
            head.out.bias.copy_(self.prefix_bias[steps - 1])
            head.prefix_bias.copy_(self.prefix_bias[:steps])
        return head.train(self.training)

    def plan_entry(self, module: str) -> dict[str, Any]:
        """The plan entry that rebuilds this layer in place of ``module``."""
        return {
            "kind": PLAN_KIND,
            "module": module,
            "in_features": self.hidden.in_features,
            "units": self.units,
            "out_features": self.out.out_features,
            "units_per_step": self.units_per_step,
            "activation": self.activation,
        }


def check_units(units: int, units_per_step: int, available: int) -> int:
    """The number of whole steps that ``units`` hidden units make; refuses anything else."""
    if not (isinstance(units, int) and 1 <= units <= available and units % units_per_step == 0):
        raise KompaktError(
            f"truncate(units={units!r}): units must be a multiple of units_per_step={units_per_step} "
            f"between {units_per_step} and {available} (whole boosting steps are kept, never rounded)"
        )
    return units // units_per_step


@artifact.plan_step(PLAN_KIND)
def _replay(model: nn.Module, entry: dict[str, Any]) -> None:
    """Replace ``entry['module']`` by an empty BoostedHead of the recorded shape."""
    fields = ("module", "in_features", "units", "out_features", "units_per_step", "activation")
    missing = [f for f in fields if f not in entry]
    if missing:
        raise KompaktError(
            f"plan entry {PLAN_KIND}: field(s) {', '.join(missing)} missing; re-create the artifact"
        )
    try:
        model.get_submodule(entry["module"])
    except AttributeError as e:
        raise KompaktError(
            f"plan entry {PLAN_KIND}: the base model has no module {entry['module']!r}; re-create the artifact"
        ) from e
    head = BoostedHead(*(entry[f] for f in fields[1:]))
    model.set_submodule(entry["module"], head)
