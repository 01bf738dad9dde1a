"""The paper's target networks (its supplementary material), written out because torchvision is
not a dependency."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from mapnet.compress import LowRankLinear


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


class CNN2LowRank(CNN2):
    """CNN2 with FC1 (800→128) as the rank-32 product U V (paper Table 8, "CNN2 + LRD"):
    35,914 parameters, the paper's count. The paper's text says rank 16, but 35,914 is what
    rank 32 on FC1 alone gives (6,218 + 928·32); rank 16 on both FC layers would give 21,994."""

    RANK = 32

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__(num_classes, in_channels)
        self.classifier[1] = LowRankLinear(32 * 5 * 5, 128, self.RANK)


class SmallCNN(nn.Module):
    """What a user would train directly instead of a mapping: three conv3×3 + BatchNorm + ReLU
    blocks (max-pooling after the first two), global average pooling and a linear classifier.
    `widths` (a, b, c) set the size: 11a + 9ab + 2b + 9bc + 12c + 10 parameters at 10 classes."""

    def __init__(self, widths: tuple[int, int, int], num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        a, b, c = widths
        self.widths = widths

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, a), nn.MaxPool2d(2),  # (B, a, 14, 14)
            *block(a, b), nn.MaxPool2d(2),  # (B, b, 7, 7)
            *block(b, c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, c)
        )  # fmt: skip
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, classes)
        return self.classifier(self.features(x))


def small_cnn_parameters(widths: tuple[int, int, int], num_classes: int = 10) -> int:
    a, b, c = widths
    return 9 * a + 2 * a + 9 * a * b + 2 * b + 9 * b * c + 2 * c + c * num_classes + num_classes


def small_cnn_widths(budget: int, shape: str) -> tuple[int, int, int]:
    """The widths of `shape` whose parameter count is closest to `budget`: "flat" (w, w, w)
    or "growing" (w, 2w, 4w), both with integer w ≥ 1."""
    ratios = {"flat": (1, 1, 1), "growing": (1, 2, 4)}
    if shape not in ratios:
        raise ValueError(f"shape {shape!r} is not one of {sorted(ratios)}")
    candidates = [tuple(w * r for r in ratios[shape]) for w in range(1, 257)]
    return min(candidates, key=lambda widths: abs(small_cnn_parameters(widths) - budget))


class LSTMForecaster(nn.Module):
    """The paper's air-quality forecaster (supplementary material): LSTM(F → 32, one layer,
    PyTorch's two bias vectors) + Linear(32 → 1) on the last hidden state; 12,961 parameters
    at F = 67. Input (B, T, F) windows, output (B,) the next step's scaled target."""

    def __init__(self, num_features: int = 67, hidden: int = 32):
        super().__init__()
        self.lstm = nn.LSTM(num_features, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> (B,)
        out, _ = self.lstm(x)  # (B, T, H)
        return self.head(out[:, -1]).squeeze(-1)


class UNet(nn.Module):
    """CNN3, the paper's U-Net segmenter (supplementary material): encoder blocks of two
    conv3×3 + BatchNorm + ReLU at 32, 64, 128 channels, each followed by 2×2 max-pooling; a
    bottleneck of two at 256; a decoder of ConvTranspose2d 2×2/2 (256→128, 128→64, 64→32),
    concatenation with the encoder's skip and one conv3×3 + BatchNorm + ReLU; a 1×1 conv to the
    classes. 1,734,803 parameters at 3 input channels and 19 classes. H and W must be
    multiples of 8."""

    def __init__(self, num_classes: int = 19, in_channels: int = 3):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.enc1 = nn.Sequential(*conv(in_channels, 32), *conv(32, 32))  # (B, 32, H, W)
        self.enc2 = nn.Sequential(*conv(32, 64), *conv(64, 64))  # (B, 64, H/2, W/2)
        self.enc3 = nn.Sequential(*conv(64, 128), *conv(128, 128))  # (B, 128, H/4, W/4)
        self.bottleneck = nn.Sequential(*conv(128, 256), *conv(256, 256))  # (B, 256, H/8, W/8)
        self.pool = nn.MaxPool2d(2)
        self.up3 = nn.ConvTranspose2d(256, 128, 2, stride=2)
        self.dec3 = nn.Sequential(*conv(256, 128))
        self.up2 = nn.ConvTranspose2d(128, 64, 2, stride=2)
        self.dec2 = nn.Sequential(*conv(128, 64))
        self.up1 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec1 = nn.Sequential(*conv(64, 32))
        self.classifier = nn.Conv2d(32, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes, H, W)
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"UNet needs H and W divisible by 8, got {tuple(x.shape[-2:])}")
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottleneck(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))  # (B, 128, H/4, W/4)
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))  # (B, 64, H/2, W/2)
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))  # (B, 32, H, W)
        return self.classifier(d1)


MODELS: dict[str, type[nn.Module]] = {"cnn1": CNN1, "cnn2": CNN2, "cnn2-lrd": CNN2LowRank}
SMALL_CNN = "smallcnn"  # model names "smallcnn-a-b-c"


def model_factory(name: str) -> Callable[[], nn.Module]:
    """A zero-argument factory for a model name: a MODELS key or "smallcnn-a-b-c"."""
    if name in MODELS:
        return MODELS[name]
    prefix, _, rest = name.partition("-")
    if prefix == SMALL_CNN:
        try:
            a, b, c = (int(part) for part in rest.split("-"))
        except ValueError:
            raise ValueError(f"model {name!r}: a small CNN is named smallcnn-a-b-c") from None
        if min(a, b, c) < 1:
            raise ValueError(f"model {name!r}: widths must be >= 1")
        return functools.partial(SmallCNN, (a, b, c))
    raise ValueError(f"model={name!r} is not one of {sorted(MODELS)} or smallcnn-a-b-c")


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1×1 reduce, 3×3 (carries the stride), 1×1 expand ×4, BatchNorm."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # A projection shortcut only where the shape changes (first block of each stage).
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, 4w, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 (the paper's fine-tuning target, supplementary material): bottlenecks
    [3, 4, 6, 3], widths 64..512 (outputs 256..2048), BatchNorm; 25,557,032 parameters at 1000
    classes, the same layout and count as torchvision's resnet50 (torchvision is not a
    dependency).

    Any input of at least 32×32 works: the stem divides the resolution by 4, the stages by 8 more,
    and the adaptive pooling takes whatever is left (3×64×64 -> 2×2 before pooling), which is what
    makes a CPU training step affordable in `mapnet bench step`.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),  # (B, 64, H/2, W/2)
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),  # (B, 64, H/4, W/4)
        )
        stages, channels = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for index in range(blocks):
                layers.append(Bottleneck(channels, width, stride if index == 0 else 1))
                channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages  # (B, 2048, H/32, W/32) last
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation (He-normal fan-out convs, BN γ = 1, β = 0).

        A method rather than a loop in __init__, because mapnet regenerates θ₀ by calling every
        module's reset_parameters() children first (mapnet.bases.seeded_initialisation):
        defined here, it runs last and wins over Conv2d's own default, so θ₀ is this initialisation.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


MODELS["resnet50"] = ResNet50


class Siren(nn.Module):
    """A small SIREN (Sitzmann et al. 2020), 2 -> width -> width -> 1: an image as a function of
    its pixel coordinates in [-1, 1]², sin activations at frequency omega, SIREN's
    initialisation (first layer U(±1/2), the others U(±√(6/width)/omega)). 1,185 parameters at
    width 32."""

    def __init__(self, width: int = 32, omega: float = 30.0):
        super().__init__()
        self.omega = omega
        self.first = nn.Linear(2, width)
        self.hidden = nn.Linear(width, width)
        self.last = nn.Linear(width, 1)
        bound = math.sqrt(6 / width) / omega
        with torch.no_grad():
            self.first.weight.uniform_(-1 / 2, 1 / 2)
            self.hidden.weight.uniform_(-bound, bound)
            self.last.weight.uniform_(-bound, bound)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:  # (P, 2) -> (P, 1)
        h = torch.sin(self.omega * self.first(xy))
        return self.last(torch.sin(self.omega * self.hidden(h)))
