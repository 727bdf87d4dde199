"""Small built-in models for the scikit-learn digits data set (8x8 grey images, 10 classes).

They need no download and no torchvision: ``qcd-fx transform --example`` runs on
:func:`digits_cnn`, and the tests and benchmarks train both models on digits.
"""

from __future__ import annotations

import torch
from torch import nn

DIGITS_INPUT_SHAPE = (1, 1, 8, 8)
"""Example input shape of :func:`digits_cnn` (batch 1); :func:`digits_mlp` takes ``(1, 64)``."""


def digits_mlp(hidden: int = 256, classes: int = 10) -> nn.Module:
    """MLP 64-256-256-10, the seeds' README reference model."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


class DigitsCNN(nn.Module):
    """Conv(1->32)-BN-ReLU, Conv(32->64)-BN-ReLU, max-pool, Conv(64->64)-BN-ReLU, global pool, Linear."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def digits_cnn(width: int = 32, classes: int = 10) -> nn.Module:
    return DigitsCNN(width, classes)
