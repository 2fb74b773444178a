"""DHSPG: Dual Half-Space Projected Gradient (OTOv2 / OTOv3), a ``torch.optim.Optimizer``.

Each step first takes the base optimizer's trial step ``x_hat = x - lr * d`` (``d`` from
SGD with momentum, Adam or AdamW). At ``start_pruning_step`` the prunable groups are split
into *redundant* and *important* by a saliency score: the cosine between a group's
parameters and its direction ``d`` (a step that shrinks the group scores high) and the inverse
of its magnitude relative to its own layers (``groups.relative_energy``: each channel's energy
over its tensor's mean channel energy), each L2-normalised over the groups, half and half. The
``target_group_sparsity`` fraction with the highest scores is redundant; or, with
``target_flops_reduction``, the shortest run of the highest scores whose removal takes that
share of the model's FLOPs (the subnet's FLOPs are counted, found by bisection: a channel of an
early, high-resolution layer costs far more than one of a late layer, so the same group
sparsity removes a different share of FLOPs on each run).

With ``pruning_periods = P > 1`` the pruning window is cut into ``P`` equal periods and a split
opens each: it scores the groups not yet redundant with the weights and directions of that
step and adds the highest, so that ``k / P`` of the target (of the group count, or of the FLOPs
share) is redundant after the ``k``-th. Groups chosen later are picked knowing how the network
adapted to the earlier ones. (The OTOv2 DHSPG code splits once; the progressive choice over
periods is that of the authors' later HESSO.)

From then on, until the target is reached, each redundant group ``g`` also takes a
group-lasso step ``- lr * lambda_g * x_g / ||x_g||``, where ``lambda_g`` adapts to the angle
between ``x_g`` and ``d_g``: when ``<x_g, d_g> < 0`` (the base step would grow the group)
``lambda_g = clip(lmbda_amplify * lo, lmbda, lmbda * hat_lmbda_coeff)`` with
``lo = -<x_g, d_g> / ||x_g||``, the least penalty that still shrinks it, halved back toward
``lo`` if it would exceed ``hi = -||d_g||^2 ||x_g|| / <x_g, d_g>`` (beyond which the combined
step stops descending); otherwise ``lambda_g = lmbda``. Then the half-space projection sets
``x_hat_g = 0`` exactly whenever ``<x_hat_g, x_g> < epsilon * ||x_g||^2``.

Groups that reached zero stay zero.

Two things differ from the published defaults, so that the target is reached within a short
training budget (the published runs use tens of thousands of steps with a fixed
``lmbda = 1e-3``): unless ``lmbda`` is given, each redundant group's floor is
``||x_g|| / (lr * s)`` measured at its split, with ``s`` the steps left in the window: the
penalty that alone would shrink it to zero by the window's end (divided by the current
learning rate, so any schedule works); and at ``start_pruning_step + pruning_steps`` any
redundant group not yet zero is projected to zero (counted in ``forced``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from kompakt.compress.prune.groups import group_reduce, relative_energy
from kompakt.config import check
from kompakt.errors import KompaktError

if TYPE_CHECKING:
    from kompakt.compress.prune.oto import OTO

VARIANTS = ("sgd", "adam", "adamw")


@dataclasses.dataclass(frozen=True)
class DHSPGConfig:
    """Hyperparameters of DHSPG.

    lr: learning rate of the base step. variant: base direction, ``sgd`` (with ``momentum``,
    Nesterov's when ``nesterov``), ``adam`` or ``adamw`` (with ``betas``). weight_decay: L2
    penalty added to the gradient (decoupled for ``adamw``). target_group_sparsity: fraction
    of the prunable groups to zero. target_flops_reduction: None, or the share of the model's
    FLOPs (on ``oto``'s example inputs) to remove; it replaces ``target_group_sparsity``: the
    redundant set is the fewest highest-scoring groups whose removal reaches it.
    start_pruning_step: optimizer steps of plain training before the groups are split.
    pruning_steps: steps after the (first) split by which every redundant group is zero.
    epsilon: half-space projection threshold in [0, 1); larger projects earlier.
    pruning_periods: splits over the pruning window (1: one split at ``start_pruning_step``,
    as published); each adds an equal share of the target, chosen among the rest.
    lmbda: a fixed floor of the adaptive group-lasso weight (the published value for SGD is
    1e-3); None: each group's budget floor ``||x_g|| / (lr * steps left in the window)``.
    lmbda_amplify, hat_lmbda_coeff: the weight's multiplier over the least shrinking penalty
    and its cap as a multiple of the floor (the published SGD values; for Adam the authors
    used 20 and 1000 with ``lmbda = 1e-2``).
    """

    lr: float = 0.1
    variant: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    target_group_sparsity: float = 0.5
    target_flops_reduction: float | None = None
    start_pruning_step: int = 0
    pruning_steps: int = 1000
    epsilon: float = 0.9
    pruning_periods: int = 1
    lmbda: float | None = None
    lmbda_amplify: float = 2.0
    hat_lmbda_coeff: float = 10.0

    def __post_init__(self) -> None:
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.variant in VARIANTS, f"variant must be sgd, adam or adamw, got {self.variant!r}")
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(
            not self.nesterov or (self.variant == "sgd" and self.momentum > 0),
            "nesterov needs variant sgd with momentum > 0",
        )
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(
            0 <= self.target_group_sparsity < 1,
            f"target_group_sparsity must be in [0, 1), got {self.target_group_sparsity}",
        )
        check(
            self.target_flops_reduction is None or 0 < self.target_flops_reduction < 1,
            f"target_flops_reduction must be in (0, 1), got {self.target_flops_reduction}",
        )
        check(
            self.start_pruning_step >= 0,
            f"start_pruning_step must be >= 0, got {self.start_pruning_step}",
        )
        check(self.pruning_steps >= 1, f"pruning_steps must be >= 1, got {self.pruning_steps}")
        check(0 <= self.epsilon < 1, f"epsilon must be in [0, 1), got {self.epsilon}")
        check(
            1 <= self.pruning_periods <= self.pruning_steps,
            f"pruning_periods must be in [1, pruning_steps], got {self.pruning_periods}",
        )
        check(self.lmbda is None or self.lmbda > 0, f"lmbda must be > 0, got {self.lmbda}")
        check(self.lmbda_amplify > 0, f"lmbda_amplify must be > 0, got {self.lmbda_amplify}")
        check(
            self.hat_lmbda_coeff >= 1, f"hat_lmbda_coeff must be >= 1, got {self.hat_lmbda_coeff}"
        )


class DHSPG(torch.optim.Optimizer):
    """DHSPG over all parameters of ``oto.model``; build it with ``oto.dhspg(...)``.

    ``kind="erase"`` makes it H2SPG (``oto.h2spg(...)``): the candidates are the erasing
    groups, and the redundant set is picked in saliency order but only among branches whose
    removal keeps an input-to-output path (``oto.connected``).
    """

    def __init__(self, oto: OTO, config: DHSPGConfig, kind: str = "prune") -> None:
        self.oto = oto
        self.config = config
        self.kind = kind
        self.candidates = oto.prunable if kind == "prune" else oto.erasable
        self.names = dict(oto.model.named_parameters())
        # momentum (or Adam's betas) lives in the parameter group, as in torch's optimizers,
        # so that a scheduler such as OneCycleLR can cycle it
        momentum = (
            {"momentum": config.momentum} if config.variant == "sgd" else {"betas": config.betas}
        )
        super().__init__(list(self.names.values()), {"lr": config.lr, **momentum})
        n = len(oto.groups)
        self.redundant = torch.zeros(n, dtype=torch.bool)
        self.zero = torch.zeros(n, dtype=torch.bool)
        self.steps = 0
        self.period = 0
        self.forced = 0
        self.final = int(round(config.target_group_sparsity * len(self.candidates)))
        self.target = 0  # grows at each period's split
        if config.target_flops_reduction is not None:
            self.flops = oto.flops_without([])
            ids = oto.select(kind, [g.id for g in self.candidates])
            most = 1 - oto.flops_without(ids) / max(1, self.flops)
            if most < config.target_flops_reduction:
                raise KompaktError(
                    f"target_flops_reduction {config.target_flops_reduction} cannot be reached "
                    f"by {type(oto.model).__name__}: removing every candidate group that can go "
                    f"removes {most:.1%} of its FLOPs; ask for at most that"
                )
        self.budget = torch.zeros(n, dtype=torch.float64)  # norm to shed per step

    # -- bookkeeping -------------------------------------------------------------------
    @property
    def group_sparsity(self) -> float:
        """Fraction of the candidate groups that are exactly zero."""
        return int(self.zero.sum()) / max(1, len(self.candidates))

    @property
    def partitioned(self) -> bool:
        return self.steps > self.config.start_pruning_step

    def _directions(self) -> dict[str, torch.Tensor]:
        """The base optimizer's update direction ``d`` for every parameter with a gradient."""
        c, group = self.config, self.param_groups[0]
        directions = {}
        for name, p in self.names.items():
            if p.grad is None:
                continue
            g = p.grad.detach()
            if c.weight_decay and c.variant != "adamw":
                g = g + c.weight_decay * p.detach()
            state = self.state[p]
            if c.variant == "sgd":
                momentum = group["momentum"]
                if momentum:
                    buf = state.get("momentum")
                    state["momentum"] = buf = (
                        g.clone() if buf is None else buf.mul_(momentum).add_(g)
                    )
                    g = g + momentum * buf if c.nesterov else buf
                directions[name] = g
            else:
                b1, b2 = group["betas"]
                t = state["t"] = state.get("t", 0) + 1
                m = state["m"] = state.get("m", torch.zeros_like(p)).mul_(b1).add_(g, alpha=1 - b1)
                v = state["v"] = (
                    state.get("v", torch.zeros_like(p)).mul_(b2).addcmul_(g, g, value=1 - b2)
                )
                directions[name] = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-8)
        return directions

    def _group_products(
        self, directions: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per group: ``||x_g||^2``, ``<x_g, d_g>`` and ``||d_g||^2``."""
        oto, n = self.oto, len(self.oto.groups)
        params = {k: p.detach() for k, p in self.names.items()}
        xx = group_reduce(oto.model, oto.slots, n, torch.square)
        xd = group_reduce(oto.model, oto.slots, n, lambda t: t, _products(params, directions))
        dd = group_reduce(oto.model, oto.slots, n, torch.square, directions)
        return xx, xd, dd

    def _partition(self, directions: dict[str, torch.Tensor]) -> None:
        """Add the next period's redundant groups: the highest saliency scores of the rest."""
        self.period += 1
        share = self.period / self.config.pruning_periods
        oto, n = self.oto, len(self.oto.groups)
        xx, xd, dd = self._group_products(directions)
        cos = xd / (xx.sqrt() * dd.sqrt()).clamp_min(1e-12)
        # magnitude relative to the group's own layers: a magnitude per element ranks nearly
        # every channel of a wide-fan-in layer (small weights since initialisation) redundant
        inv_mag = 1.0 / (relative_energy(oto.model, oto.slots, n).sqrt() + 1e-6)
        ids = torch.tensor(
            [g.id for g in self.candidates if not self.redundant[g.id]], dtype=torch.long
        )
        if not len(ids):
            return
        score = (
            0.5 * cos[ids] / cos[ids].norm().clamp_min(1e-12)
            + 0.5 * inv_mag[ids] / inv_mag[ids].norm()
        )
        order = ids[torch.argsort(score, descending=True, stable=True)].tolist()
        before = self.redundant.nonzero().flatten().tolist()
        chosen = oto.select(self.kind, before + order)
        if self.config.target_flops_reduction is not None:
            self.target = max(len(before), self._fewest_reaching_flops_target(chosen, share))
        else:
            self.target = int(round(share * self.final))
        left = self.config.start_pruning_step + self.config.pruning_steps - self.steps + 1
        for g in chosen[len(before) : self.target]:
            self.redundant[g] = True
            self.budget[g] = xx[g].sqrt() / left

    def _fewest_reaching_flops_target(self, chosen: list[int], share: float) -> int:
        """The least ``k`` such that removing ``chosen[:k]`` removes the target FLOPs share
        (FLOPs never grow as groups go, so bisection finds it)."""
        goal = (1 - share * self.config.target_flops_reduction) * self.flops
        lo, hi = 0, len(chosen)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.oto.flops_without(chosen[:mid]) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # -- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        c, oto, n = self.config, self.oto, len(self.oto.groups)
        lr = self.param_groups[0]["lr"]
        directions = self._directions()
        self.steps += 1
        since = self.steps - c.start_pruning_step - 1
        period_steps = c.pruning_steps // c.pruning_periods
        if self.period < c.pruning_periods and since == self.period * period_steps:
            self._partition(directions)
        penalize = self.partitioned and self.redundant.any() and int(self.zero.sum()) < self.target
        if penalize:
            xx, xd, dd = self._group_products(directions)
            coef = self._lasso_coefficients(xx, xd, dd, lr)
        old = {k: p.detach().clone() for k, p in self.names.items()} if penalize else None
        for name, p in self.names.items():
            if name in directions:
                if c.variant == "adamw" and c.weight_decay:
                    p.mul_(1 - lr * c.weight_decay)
                p.sub_(directions[name], alpha=lr)
        if penalize:
            for slot in oto.slots:
                p = self.names[slot.param]
                scale = torch.where(slot.gid >= 0, coef[slot.gid.clamp(min=0)], 0.0).to(p.dtype)
                shape = [1] * p.dim()
                shape[slot.dim] = -1
                p.sub_(lr * scale.view(shape) * old[slot.param])
            # half-space test <x_hat_g, x_g> < epsilon ||x_g||^2, xx taken before the step
            cross = group_reduce(oto.model, oto.slots, n, lambda t: t, _products(old, self.names))
            self.zero |= self.redundant & (cross < c.epsilon * xx)
        if self.partitioned and self.steps >= c.start_pruning_step + c.pruning_steps:
            missing = self.redundant & ~self.zero
            self.forced += int(missing.sum())
            self.zero |= missing
        if self.zero.any():
            oto.project(self.zero)
        return loss

    def _lasso_coefficients(
        self, xx: torch.Tensor, xd: torch.Tensor, dd: torch.Tensor, lr: float
    ) -> torch.Tensor:
        """``lambda_g / ||x_g||`` for each redundant, not yet zero group (0 elsewhere), from the
        per-group products of :meth:`_group_products`."""
        c, n = self.config, len(self.oto.groups)
        norm = xx.sqrt().clamp_min(1e-12)
        floor = (
            self.budget / lr if c.lmbda is None else torch.full((n,), c.lmbda, dtype=torch.float64)
        )
        grows = xd < 0
        lo = -xd / norm
        hi = -dd * norm / xd.where(grows, torch.full_like(xd, -1.0))
        adaptive = torch.minimum(
            torch.maximum(c.lmbda_amplify * lo, floor), floor * c.hat_lmbda_coeff
        )
        adaptive = torch.where(adaptive >= hi, (lo + hi) / 2, adaptive)
        lam = torch.where(grows, adaptive, floor)
        active = self.redundant & ~self.zero
        return torch.where(active, lam / norm, torch.zeros_like(lam))


def _products(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor | None]:
    """Elementwise products ``a * b`` per parameter name (None where ``b`` has none)."""
    return {k: (a[k] * b[k].detach()) if k in b else None for k in a}
