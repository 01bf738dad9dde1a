"""The paper's target networks (SPEC §7), written out because torchvision is not a dependency."""

from __future__ import annotations

import torch
from torch import nn


class CNN1(nn.Module):
    """AlexNet-inspired, 537,994 parameters, 28×28×1 input."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 128, 3, 3)
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, classes)
        return self.classifier(self.features(x))


class CNN2(nn.Module):
    """LeNet-inspired, 108,618 parameters, 28×28×1 input."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 13, 13)
            nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 5, 5)
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, classes)
        return self.classifier(self.features(x))


MODELS: dict[str, type[nn.Module]] = {"cnn1": CNN1, "cnn2": CNN2}
