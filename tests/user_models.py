"""Models as users bring them: defined in their own module, registered nowhere, built by
plain factory functions (what ``kompakt.save(..., factory=...)`` names)."""

from __future__ import annotations

import torch
from torch import nn


class UserCNN(nn.Module):
    def __init__(self, channels: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class UserMLP(nn.Module):
    def __init__(self, inputs: int = 12, hidden: list[int] | None = None, classes: int = 4):
        super().__init__()
        widths = [inputs, *(hidden or [24, 16])]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return self.head(x)


class GRUClassifier(nn.Module):
    def __init__(self, features: int = 6, hidden: int = 10, classes: int = 3) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


def user_cnn(channels: int = 6) -> nn.Module:
    return UserCNN(channels)


def user_mlp(hidden: list[int] | None = None) -> nn.Module:
    return UserMLP(hidden=hidden)


def sequential(width: int = 20) -> nn.Module:
    return nn.Sequential(nn.Linear(12, width), nn.Tanh(), nn.Linear(width, 4))


def gru_classifier() -> nn.Module:
    return GRUClassifier()


# each factory's example inputs for a batch of ``b``
INPUTS = {
    "user_cnn": lambda b: torch.randn(b, 3, 8, 8),
    "user_mlp": lambda b: torch.randn(b, 12),
    "sequential": lambda b: torch.randn(b, 12),
    "gru_classifier": lambda b: torch.randn(b, 5, 6),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, callable]:
    """Factory ``name``'s model with seeded weights (BatchNorm statistics warmed up), and its
    input maker."""
    torch.manual_seed(seed)
    model = globals()[name]()
    make = INPUTS[name]
    model.train()
    with torch.no_grad():
        model(make(8))
    return model.eval(), make
