"""The three GBNN losses: what the ensemble starts from, what each step fits, how far it steps.

Scores ``f`` and targets ``y`` are ``[N, K]`` float tensors. For squared error ``y`` holds the
regression targets; for the binomial deviance ``K == 1``, ``f`` is the log-odds of class 1 and
``y`` is 0 or 1; for the multinomial cross-entropy ``f`` holds the ``K`` class logits and ``y``
is one-hot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Smallest prior used for a class absent from the training labels (its log is the initial logit).
MIN_PRIOR = 1e-6


class SquaredError:
    """Regression: 0.5 (y - f)^2, started at the mean, stepped by exact line search."""

    def init(self, y: torch.Tensor) -> torch.Tensor:
        return y.mean(0)

    def residuals(self, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return y - f

    def step_size(self, y: torch.Tensor, f: torch.Tensor, h: torch.Tensor) -> float:
        """The rho minimising the loss of ``f + rho h`` (exact for a quadratic)."""
        r = y - f
        return _ratio((r * h).sum(), (h * h).sum())

    def value(self, y: torch.Tensor, f: torch.Tensor) -> float:
        """Mean squared error."""
        return (y - f).square().mean().item()


class BinomialDeviance:
    """Binary classification on log-odds: started at the log-odds of class 1, Newton steps."""

    def init(self, y: torch.Tensor) -> torch.Tensor:
        p = y.mean(0)
        return torch.log(p / (1 - p))

    def residuals(self, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return y - torch.sigmoid(f)

    def step_size(self, y: torch.Tensor, f: torch.Tensor, h: torch.Tensor) -> float:
        """One Newton step on rho for the loss of ``f + rho h``."""
        p = torch.sigmoid(f)
        return _ratio(((y - p) * h).sum(), (p * (1 - p) * h * h).sum())

    def value(self, y: torch.Tensor, f: torch.Tensor) -> float:
        """Mean binary cross-entropy (deviance / 2)."""
        return F.binary_cross_entropy_with_logits(f, y).item()


class MultinomialDeviance:
    """K classes on logits: started at the log class priors, one K-output step, Newton steps."""

    def init(self, y: torch.Tensor) -> torch.Tensor:
        return torch.log(y.mean(0).clamp_min(MIN_PRIOR))

    def residuals(self, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return y - torch.softmax(f, 1)

    def step_size(self, y: torch.Tensor, f: torch.Tensor, h: torch.Tensor) -> float:
        """One Newton step on rho; the curvature is h^T (diag(p) - p p^T) h summed over rows."""
        p = torch.softmax(f, 1)
        curvature = (p * h * h).sum() - (p * h).sum(1).square().sum()
        return _ratio(((y - p) * h).sum(), curvature)

    def value(self, y: torch.Tensor, f: torch.Tensor) -> float:
        """Mean cross-entropy."""
        return -(y * torch.log_softmax(f, 1)).sum(1).mean().item()


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    """``numerator / denominator``, or 0 (no step) when the direction is flat."""
    den = denominator.item()
    return numerator.item() / den if den > 1e-12 else 0.0
