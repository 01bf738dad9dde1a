"""What the benches measure: the target models with their inputs, learning rates and step counts,
the variants of training them (plain, mapped, intrinsic dimension), and the fixed batch they
train on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mapnet import MappingConfig
from mapnet_experiments.models.networks import CNN1, CNN2, ResNet50


class TinyNet(nn.Module):
    """What `--smoke` trains: conv + BatchNorm + linear, 1,498 parameters, 1×8×8 input."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, classes)
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@dataclass(frozen=True)
class StepModel:
    """A target of the benches: how to build it, its input, learning rates and step counts.

    Learning rates only matter for the loss columns (the time of an Adam step does not depend on
    them). Plain: Adam's usual 1e-3. Latents: the project's default 0.1 (docs/method.md) for the
    CNNs; ResNet-50's are in STEP_MODELS, with the probe that chose them.
    """

    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # (C, H, W)
    num_classes: int
    lr_plain: float
    lr_mapped: float
    lr_intrinsic: float
    warmup: int
    steps: int  # measured steps per process
    rounds: int  # processes per variant (dense variants: see step_bench's dense_rounds)


STEP_MODELS: dict[str, StepModel] = {
    # Five rounds: the spread between processes (allocator state, the other core's jobs) is
    # larger than the spread between steps of one process.
    "cnn2": StepModel(CNN2, (1, 28, 28), 10, 1e-3, 0.1, 0.1, warmup=3, steps=20, rounds=5),
    "cnn1": StepModel(CNN1, (1, 28, 28), 10, 1e-3, 0.1, 0.1, warmup=3, steps=10, rounds=5),
    # 3×64×64, not 224×224: a 224² step of ResNet-50 at batch 128 would take minutes on 2 cores.
    # Its latents' learning rates: a 5-step probe on the fixed batch gave loss 7.15 -> 7.13 at
    # 0.1 (no fall), -> 6.82 at 0.01 and -> 6.65 at 1e-3 (mapped), and -> 6.55 at 0.01 for
    # θ₀ + W z.
    "resnet50": StepModel(
        ResNet50, (3, 64, 64), 1000, 1e-3, 1e-3, 0.01, warmup=1, steps=3, rounds=2
    ),
    "tiny": StepModel(TinyNet, (1, 8, 8), 10, 1e-3, 0.1, 0.1, warmup=0, steps=2, rounds=1),
}


@dataclass(frozen=True)
class StepVariant:
    name: str
    label: str
    kind: str  # "plain" | "mapped" | "intrinsic"
    projection: str | None
    fusion: str | None = None  # mapnet.projections.fused's mode (None: the default, "auto")


STEP_VARIANTS: tuple[StepVariant, ...] = (
    StepVariant("plain", "plain training (all P weights)", "plain", None),
    StepVariant("mapped-dense", "mapped, single d, dense W", "mapped", "dense"),
    StepVariant("mapped-structured", "mapped, single d, structured W", "mapped", "structured"),
    StepVariant(
        "mapped-eager",
        "mapped, single d, structured W, eager passes (MAPNET_FUSION=eager)",
        "mapped",
        "structured",
        "eager",
    ),
    StepVariant("id-dense", "intrinsic dim. θ₀ + W z, dense", "intrinsic", "dense"),
    StepVariant(
        "id-structured",
        "intrinsic dim. θ₀ + W z, structured (Fastfood's role)",
        "intrinsic",
        "structured",
    ),
)
VARIANTS_BY_NAME = {v.name: v for v in STEP_VARIANTS}


def variant_config(variant: StepVariant, latent_dim: int) -> MappingConfig:
    assert variant.projection is not None
    if variant.kind == "intrinsic":
        return MappingConfig.intrinsic_dimension(
            latent_dim=latent_dim, projection=variant.projection
        )
    return MappingConfig(latent_dim=latent_dim, projection=variant.projection)


def with_input_size(spec: StepModel, input_size: int | None) -> StepModel:
    """The model's spec with a square input of `input_size` pixels (None: the step bench's)."""
    if input_size is None:
        return spec
    return dataclasses.replace(spec, input_shape=(spec.input_shape[0], input_size, input_size))


def fixed_batch(spec: StepModel, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic, seeded: N(0, 1) images (B, C, H, W) and uniform labels (B,). The same batch
    every step, so a falling loss shows the latent can fit it (timings do not depend on data)."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, *spec.input_shape, generator=generator)
    y = torch.randint(0, spec.num_classes, (batch,), generator=generator)
    return x, y


def target_parameter_count(model: str) -> int:
    """P without allocating it (meta device): ResNet-50's 25.6M would cost 100 MB here."""
    with torch.device("meta"):
        return sum(p.numel() for p in STEP_MODELS[model].factory().parameters())


def tensor_bytes(tensors: Iterable[object]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
