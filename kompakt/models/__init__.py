"""Offline models: registered reference architectures and SmolLM2-135M."""

from kompakt.models import cnn  # noqa: F401  (registers its factories)
from kompakt.models.registry import build, names, register
from kompakt.models.smollm2 import load_smollm2

__all__ = ["build", "load_smollm2", "names", "register"]
