"""GBNN: a one-hidden-layer network trained sequentially by gradient boosting.

Emami & Martínez-Muñoz, "Sequential Training of Neural Networks with Gradient Boosting"
(arXiv 1909.12098). The ensemble starts from the constant that minimises the loss; each of
``T`` steps fits ``J`` new hidden units and their output weights (a small one-hidden-layer
network, trained with L-BFGS on a row subsample) to the pseudo-residuals of the current
ensemble, then adds it with a line-search or Newton step size times the shrinkage ``eta``.
All steps share the input, so the ``T`` partial networks and the constant merge into one
hidden layer of ``T * J`` units (:meth:`GBNN.to_module`) whose output is the staged sum.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kompakt.compress.boost.head import ACTIVATIONS, BoostedHead, check_units
from kompakt.compress.boost.losses import BinomialDeviance, MultinomialDeviance, SquaredError
from kompakt.config import check, from_mapping
from kompakt.errors import KompaktError

TASKS = ("classification", "regression")


@dataclasses.dataclass(frozen=True)
class GBNNConfig:
    """Hyperparameters of :class:`GBNN`.

    task: ``"classification"`` (binomial deviance for two classes, multinomial cross-entropy
        with one K-output step for more) or ``"regression"`` (squared error).
    units_per_step: J, hidden units added by each boosting step.
    steps: T, boosting steps; the merged layer has ``T * J`` hidden units (fewer after early
        stopping).
    eta: shrinkage; each step's Newton (classification) or exact line-search (regression)
        step size is multiplied by it.
    subsample: fraction of the training rows, drawn without replacement at every step, that
        the step's units are fitted on (the step size uses all rows).
    activation: hidden activation, ``"sigmoid"`` (the paper's logistic), ``"tanh"`` or ``"relu"``.
    max_iter: L-BFGS iterations that fit each step's units to the pseudo-residuals.
    weight_decay: L2 penalty on each step's weights while it is fitted (on a loss of
        0.5 * mean squared residual error, residuals scaled to unit RMS).
    num_classes: classes of a classification task (None: the largest label + 1).
    standardize: fit on features scaled to mean 0 and standard deviation 1 per column; the
        scaling is folded into the merged layer, which takes raw features.
    validation_fraction: fraction of the training rows held out for early stopping when
        ``fit`` gets no validation set (0: none).
    patience: with a validation set, stop after this many steps without a lower validation
        loss and keep the best prefix of steps (None: run all steps, only record the loss).
    seed: seeds the subsamples, the held-out split and each step's initial weights.
    """

    task: str = "classification"
    units_per_step: int = 8
    steps: int = 32
    eta: float = 0.5
    subsample: float = 0.5
    activation: str = "sigmoid"
    max_iter: int = 100
    weight_decay: float = 1e-3
    num_classes: int | None = None
    standardize: bool = True
    validation_fraction: float = 0.0
    patience: int | None = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        check(self.units_per_step >= 1, f"units_per_step must be >= 1, got {self.units_per_step}")
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.eta > 0, f"eta must be > 0, got {self.eta}")
        check(0 < self.subsample <= 1, f"subsample must be in (0, 1], got {self.subsample}")
        check(
            self.activation in ACTIVATIONS,
            f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}",
        )
        check(self.max_iter >= 1, f"max_iter must be >= 1, got {self.max_iter}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(
            self.num_classes is None or (self.task == "classification" and self.num_classes >= 2),
            f"num_classes must be None or >= 2 for classification, got {self.num_classes}",
        )
        check(
            0 <= self.validation_fraction < 1,
            f"validation_fraction must be in [0, 1), got {self.validation_fraction}",
        )
        check(
            self.patience is None or self.patience >= 1,
            f"patience must be None or >= 1, got {self.patience}",
        )


class _Step(NamedTuple):
    """One boosting step on standardized features; ``w2`` and ``b2`` include its step size."""

    w1: torch.Tensor  # [J, d]
    b1: torch.Tensor  # [J]
    w2: torch.Tensor  # [K, J]
    b2: torch.Tensor  # [K]


class GBNN:
    """Gradient-boosted one-hidden-layer network; ``GBNN(config)`` or ``GBNN(**config fields)``.

    After :meth:`fit`: ``units`` hidden units, ``history`` (per-step ``train_loss``,
    ``val_loss``, ``step_size``), :meth:`predict`, :meth:`predict_proba`, scores after every
    step (:meth:`staged_predict`), :meth:`truncate` and :meth:`to_module`. Scores are what the
    merged module outputs: class logits ``[N, K]`` (for two classes ``[0, log-odds]``) or the
    regression outputs ``[N, outputs]``.
    """

    def __init__(self, config: GBNNConfig | None = None, **fields: Any) -> None:
        if config is not None and fields:
            raise KompaktError("boost.GBNN: pass a GBNNConfig or keyword fields, not both")
        self.config = (
            config if config is not None else from_mapping(GBNNConfig, fields, "boost.GBNN")
        )
        self.history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "step_size": []}
        self._steps: list[_Step] = []

    # --- fitting --------------------------------------------------------------------------

    def fit(
        self,
        features: Any,
        y: Any,
        validation: tuple[Any, Any] | None = None,
        progress: bool = True,
    ) -> GBNN:
        """Boost on ``features`` ``[N, d]`` and targets ``y``; returns ``self``.

        Classification takes integer class indices ``[N]``; regression takes floats ``[N]`` or
        ``[N, outputs]``. ``validation=(features, y)`` enables early stopping (see
        ``GBNNConfig.patience``); without it ``validation_fraction`` of the rows is held out.
        """
        c = self.config
        x = _features(features, "features")
        self._setup(x, y)
        target = self._encode(y, len(x), "y")
        generator = torch.Generator().manual_seed(c.seed)
        x, target, val_x, val_y = self._split(x, target, validation, generator)
        self._mean, self._std = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        if c.standardize:
            std = x.std(0) if len(x) > 1 else torch.zeros(x.shape[1])
            self._mean, self._std = x.mean(0), torch.where(std > 1e-6, std, 1.0)
        xs = (x - self._mean) / self._std
        self._bias = self._loss.init(target)
        self._steps = []
        self.history = {"train_loss": [], "val_loss": [], "step_size": []}
        f = self._bias.expand(len(xs), -1).clone()
        if val_x is not None:
            val_xs = (val_x - self._mean) / self._std
            val_f = self._bias.expand(len(val_xs), -1).clone()
        best_loss, best_steps = math.inf, 0
        rows = max(1, round(c.subsample * len(xs)))
        act = ACTIVATIONS[c.activation]()
        bar = tqdm(
            range(c.steps), desc="GBNN steps", disable=None if progress else True, leave=False
        )
        for t in bar:
            residuals = self._loss.residuals(target, f)
            idx = torch.randperm(len(xs), generator=generator)[:rows]
            scale = residuals[idx].square().mean().sqrt().clamp_min(1e-12)
            w1, b1, w2, b2 = _fit_units(xs[idx], residuals[idx] / scale, act, c, generator)
            h = F.linear(act(F.linear(xs, w1, b1)), w2, b2)
            rho = c.eta * self._loss.step_size(target, f, h)
            step = _Step(w1, b1, rho * w2, rho * b2)
            self._steps.append(step)
            f = f + _step_output(step, xs, act)
            self.history["step_size"].append(rho)
            self.history["train_loss"].append(self._loss.value(target, f))
            postfix = {"loss": f"{self.history['train_loss'][-1]:.4f}"}
            if val_x is not None:
                val_f = val_f + _step_output(step, val_xs, act)
                val_loss = self._loss.value(val_y, val_f)
                self.history["val_loss"].append(val_loss)
                postfix["val"] = f"{val_loss:.4f}"
                if val_loss < best_loss:
                    best_loss, best_steps = val_loss, t + 1
                elif c.patience is not None and t + 1 - best_steps >= c.patience:
                    break
            bar.set_postfix(postfix)
        if val_x is not None and c.patience is not None:
            self._steps = self._steps[:best_steps]
        return self

    def _split(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        validation: tuple[Any, Any] | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(x, target, val_x, val_y)``: the given validation set, a held-out fraction or none."""
        if validation is not None:
            if not (isinstance(validation, tuple) and len(validation) == 2):
                raise KompaktError("validation must be a (features, y) tuple")
            val_x = self._check_width(_features(validation[0], "validation features"))
            return x, target, val_x, self._encode(validation[1], len(val_x), "validation y")
        fraction = self.config.validation_fraction
        if fraction == 0:
            return x, target, None, None
        held = max(1, round(fraction * len(x)))
        if held >= len(x):
            raise KompaktError(
                f"validation_fraction={fraction} leaves no training rows of {len(x)}; lower it"
            )
        order = torch.randperm(len(x), generator=generator)
        val, train = order[:held], order[held:]
        return x[train], target[train], x[val], target[val]

    def _setup(self, x: torch.Tensor, y: Any) -> None:
        """Choose the loss and the output width from the task and the training targets."""
        self.in_features = x.shape[1]
        y = _tensor(y, "y")
        if y.shape[:1] != (len(x),):
            raise KompaktError(
                f"y: {tuple(y.shape)} does not match {len(x)} feature rows; pass one target per row"
            )
        self._binary = False
        if self.config.task == "regression":
            self._loss = SquaredError()
            self._squeeze = y.dim() == 1
            self.out_features = 1 if y.dim() == 1 else y.shape[-1]
            return
        _check_labels(y, "y")
        if y.min() < 0:
            raise KompaktError(f"y: class labels must be >= 0, got {int(y.min())}")
        classes = self.config.num_classes or int(y.max()) + 1
        present = torch.unique(y).numel()
        if present < 2:
            raise KompaktError(
                f"y: classification needs at least two classes, got {present}; check the labels"
            )
        self.out_features = classes
        self._binary = classes == 2
        self._loss = BinomialDeviance() if self._binary else MultinomialDeviance()

    def _encode(self, y: Any, rows: int, name: str) -> torch.Tensor:
        """Targets ``[rows, K]`` in the loss's form (one-hot, 0/1 or float values)."""
        y = _tensor(y, name)
        if y.shape[:1] != (rows,):
            raise KompaktError(
                f"{name}: {tuple(y.shape)} does not match {rows} feature rows; pass one target per row"
            )
        if self.config.task == "regression":
            if not (y.dim() == 1 or (y.dim() == 2 and y.shape[1] == self.out_features)):
                raise KompaktError(
                    f"{name}: regression targets must be [N] or [N, outputs], got {tuple(y.shape)}"
                )
            y = y.float().reshape(rows, -1)
            if not torch.isfinite(y).all():
                raise KompaktError(f"{name}: contains NaN or inf")
            if y.shape[1] != self.out_features:
                raise KompaktError(
                    f"{name}: has {y.shape[1]} outputs, fitted on {self.out_features}"
                )
            return y
        _check_labels(y, name)
        if y.min() < 0 or y.max() >= self.out_features:
            raise KompaktError(
                f"{name}: class labels must be in [0, {self.out_features}), got "
                f"[{int(y.min())}, {int(y.max())}]; set num_classes to cover every class"
            )
        if self._binary:
            return y.float().unsqueeze(1)
        return F.one_hot(y.long(), self.out_features).float()

    # --- prediction -----------------------------------------------------------------------

    @property
    def units(self) -> int:
        """Hidden units of the fitted model (steps kept times units_per_step)."""
        return len(self._steps) * self.config.units_per_step

    def staged_predict(self, features: Any) -> Iterator[torch.Tensor]:
        """Scores after each step: the t-th equals ``truncate(t * J).to_module()(features)``."""
        xs = self._standardized(features)
        act = ACTIVATIONS[self.config.activation]()
        with torch.no_grad():
            f = self._bias.expand(len(xs), -1).clone()
            for step in self._steps:
                f = f + _step_output(step, xs, act)
                yield self._scores(f)

    def decision_function(self, features: Any) -> torch.Tensor:
        """Scores of the merged module (logits or regression outputs), ``[N, K]``."""
        self._check_fitted()
        x = self._check_width(_features(features, "features"))
        with torch.no_grad():
            return self.to_module()(x)

    def predict(self, features: Any) -> torch.Tensor:
        """Class indices ``[N]`` (classification) or values shaped like the training targets."""
        scores = self.decision_function(features)
        if self.config.task == "classification":
            return scores.argmax(1)
        return scores.squeeze(1) if self._squeeze else scores

    def predict_proba(self, features: Any) -> torch.Tensor:
        """Class probabilities ``[N, K]`` (rows sum to one); classification only."""
        if self.config.task != "classification":
            raise KompaktError("predict_proba: this GBNN does regression; use predict")
        return torch.softmax(self.decision_function(features), 1)

    def truncate(self, units: int) -> GBNN:
        """A copy keeping the first ``units`` hidden units: the model boosting would have
        stopped at after ``units / units_per_step`` steps. ``units`` must be a multiple of
        ``units_per_step``; anything else is refused rather than rounded."""
        self._check_fitted()
        steps = check_units(units, self.config.units_per_step, self.units)
        cut = copy.copy(self)
        cut._steps = self._steps[:steps]
        return cut

    def to_module(self) -> BoostedHead:
        """The merged layer: raw features -> Linear(d, units) -> activation -> Linear(units, K)."""
        self._check_fitted()
        w1 = torch.cat([s.w1 for s in self._steps]) / self._std
        b1 = torch.cat([s.b1 for s in self._steps]) - w1 @ self._mean
        w2 = torch.cat([s.w2 for s in self._steps], 1)
        prefix, acc = [], self._bias
        for s in self._steps:
            acc = acc + s.b2
            prefix.append(acc)
        prefix_bias = torch.stack(prefix)
        if self._binary:
            w2 = torch.cat([torch.zeros(1, w2.shape[1]), w2])
            prefix_bias = torch.cat([torch.zeros(len(prefix_bias), 1), prefix_bias], 1)
        head = BoostedHead(
            self.in_features,
            self.units,
            self.out_features,
            self.config.units_per_step,
            self.config.activation,
        )
        with torch.no_grad():
            head.hidden.weight.copy_(w1)
            head.hidden.bias.copy_(b1)
            head.out.weight.copy_(w2)
            head.out.bias.copy_(prefix_bias[-1])
            head.prefix_bias.copy_(prefix_bias)
        return head.eval()

    # --- helpers --------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self._steps:
            raise KompaktError("GBNN is not fitted; call fit(features, y) first")

    def _check_width(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_features:
            raise KompaktError(
                f"features have {x.shape[1]} columns, the GBNN was fitted on {self.in_features}"
            )
        return x

    def _standardized(self, features: Any) -> torch.Tensor:
        self._check_fitted()
        x = self._check_width(_features(features, "features"))
        return (x - self._mean) / self._std

    def _scores(self, f: torch.Tensor) -> torch.Tensor:
        """Internal scores as the module outputs them (two logits ``[0, f]`` for binary)."""
        if self._binary:
            return torch.cat([torch.zeros_like(f), f], 1)
        return f


def _step_output(step: _Step, xs: torch.Tensor, act: nn.Module) -> torch.Tensor:
    return F.linear(act(F.linear(xs, step.w1, step.b1)), step.w2, step.b2)


def _fit_units(
    x: torch.Tensor,
    target: torch.Tensor,
    act: nn.Module,
    config: GBNNConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, ...]:
    """Fit J hidden units and a linear output to ``target`` (squared error, L-BFGS)."""
    units, d, k = config.units_per_step, x.shape[1], target.shape[1]
    bound1 = math.sqrt(6 / (d + units))
    w1 = (torch.rand(units, d, generator=generator) * 2 - 1) * bound1
    b1 = (torch.rand(units, generator=generator) * 2 - 1) * bound1
    bound2 = math.sqrt(6 / (units + k))
    w2 = (torch.rand(k, units, generator=generator) * 2 - 1) * bound2
    b2 = torch.zeros(k)
    params = [p.requires_grad_() for p in (w1, b1, w2, b2)]
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=config.max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        out = F.linear(act(F.linear(x, w1, b1)), w2, b2)
        loss = 0.5 * (out - target).square().sum(1).mean()
        loss = loss + 0.5 * config.weight_decay * (w1.square().sum() + w2.square().sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return tuple(p.detach() for p in params)


def _tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise KompaktError(
            f"{name}: cannot be read as a tensor ({type(value).__name__}); pass a torch.Tensor "
            "or a numeric numpy array"
        ) from e


def _features(value: Any, name: str) -> torch.Tensor:
    x = _tensor(value, name)
    if x.dim() != 2 or len(x) == 0:
        raise KompaktError(f"{name}: must be a non-empty [N, d] matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise KompaktError(f"{name}: must be floating point, got {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise KompaktError(f"{name}: contains NaN or inf; clean or impute the features first")
    return x


def _check_labels(y: torch.Tensor, name: str) -> None:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise KompaktError(
            f"{name}: classification labels must be integer class indices, got {y.dtype}; "
            "convert them (e.g. y.long()) or use task='regression'"
        )
    if y.dim() != 1:
        raise KompaktError(
            f"{name}: class labels must be one-dimensional [N], got {tuple(y.shape)}"
        )
