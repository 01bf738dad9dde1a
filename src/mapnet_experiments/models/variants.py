"""The mapping-network variants of the paper's ablation (Table 7, §3.4), as modules to train.

    ours          z trains; W fixed, modulated by z: θ = θ₀ + g ⊙ W(z + α z⊙z)   (a MappedModule;
                  "Ours* − WM" is this with α = 0)
    lv-wmap       z and a separate modulation vector s train, W fixed:
                  θ = θ₀ + g ⊙ W(z ⊙ (1 + α s)), i.e. W̃_i = W_i (1 + α s_i)
    full-dnn      W (P×d, dense) trains, z stays fixed: θ = θ₀ + W(z + α z⊙z)
    lv-full-dnn   z and W both train (the paper's 543,095 = 5·108,618 + 5 at d = 5)

Every variant runs the target through `functional_call` with the tensors it generates, and has
`materialize()` (an ordinary module holding them) for evaluation and export.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mapnet import MappedModule, MappingConfig, wrap
from mapnet.config import ACTIVATIONS
from mapnet.projections.seeding import derive_seed

VARIANTS = {
    "ours": "z trains; W fixed and modulated by z (the method; α = 0 is Ours* − WM)",
    "lv-wmap": "z and a separate modulation vector s train; W fixed",
    "full-dnn": "the mapping's weights W (P×d) train; z fixed",
    "lv-full-dnn": "z and W (P×d) both train",
}


def check_variant(variant: str, mapping: MappingConfig) -> None:
    """Clear errors for a variant the mapping cannot express."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {', '.join(map(repr, VARIANTS))}")
    if variant == "ours":
        return
    if mapping.update != "additive":
        raise ValueError(f"variant {variant!r} needs update='additive' (paper §3.4)")
    if variant in ("full-dnn", "lv-full-dnn"):
        if mapping.strategy != "single":
            raise ValueError(
                f"variant {variant!r} trains one P×d matrix: it needs strategy='single'"
            )
        if mapping.projection != "dense":
            raise ValueError(
                f"variant {variant!r} trains W itself, a dense P×d matrix: set projection='dense' "
                "(the structured projection has no weights to train)"
            )


def build_variant(
    variant: str, factory: Callable[[], nn.Module], mapping: MappingConfig
) -> nn.Module:
    """The module of `variant` for the target `factory` builds (seeded by mapping.seed)."""
    check_variant(variant, mapping)
    if variant == "ours":
        return wrap(factory, mapping)
    if variant == "lv-wmap":
        return SeparateModulation(
            wrap(factory, dataclasses.replace(mapping, alpha=0.0)), mapping.alpha
        )
    return TrainableMapping(wrap(factory, mapping), train_latent=variant == "lv-full-dnn")


def _generated_by_name(mapped: MappedModule, flats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each group's flat θ (P_g,) split into the target's tensors, under every tied alias."""
    params = {}
    for group, flat, dtypes in zip(mapped.groups, flats, mapped._dtypes):
        sizes = [spec.numel for spec in group.specs]
        for spec, piece, dtype in zip(group.specs, flat.split(sizes), dtypes):
            for alias in spec.names:
                params[alias] = piece.view(spec.shape).to(dtype)
    return params


class SeparateModulation(nn.Module):
    """LV + WMAP (paper Table 7): the projection's columns are modulated by their own trainable
    vector s instead of by z: W̃_i = W_i (1 + α s_i), θ = θ₀ + g ⊙ W̃ z = θ₀ + g ⊙ W(z ⊙ (1 + α s)).
    Trainable: z and s, d each (one pair per latent group). `mapped` must have α = 0: it
    computes θ₀ + g ⊙ W u for the u given here."""

    def __init__(self, mapped: MappedModule, alpha: float):
        super().__init__()
        if mapped.mapping_config.alpha != 0:
            raise ValueError("SeparateModulation modulates W itself: wrap the target with alpha=0")
        self.mapped = mapped
        self.alpha = float(alpha)
        self.modulation = nn.ParameterList(
            nn.Parameter(torch.zeros_like(z)) for z in mapped.latents
        )

    def effective_latents(self) -> list[torch.Tensor]:
        return [z * (1 + self.alpha * s) for z, s in zip(self.mapped.latents, self.modulation)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = self.mapped.generate(self.effective_latents())
        return functional_call(self.mapped.target, params, args, kwargs, tie_weights=False)

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        return self.mapped.materialize(self.mapped.generate(self.effective_latents()))


class TrainableMapping(nn.Module):
    """Full DNN and LV + FullDNN (paper Table 7): θ = σ(θ₀ + W(z + α z⊙z)) with the P×d matrix W
    trainable, initialised as the fixed mapping's dense W (orthonormal columns times the
    per-tensor gains). z is drawn once, N(0, 1/d) from the seed (a fixed z = 0 would give W no
    gradient), and trains only with `train_latent`."""

    def __init__(self, mapped: MappedModule, train_latent: bool):
        super().__init__()
        config = mapped.mapping_config
        if len(mapped.groups) != 1 or config.update != "additive":
            raise ValueError("TrainableMapping needs a single-latent, additive mapping")
        self.mapped = mapped
        mapped.latents.requires_grad_(False)  # its own z is not used
        if config.projection != "dense":
            raise ValueError("TrainableMapping trains the dense W: wrap with projection='dense'")
        d = mapped.groups[0].latent_dim
        # (P, d): W with its per-tensor gains. The mapped model keeps its fixed copy (unused
        # here): P·d more floats, 27 MB for CNN2 at d = 62.
        self.weight = nn.Parameter(mapped.projections[0].weight.detach().clone())
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "full-dnn/latent"))
        z = torch.randn(d, generator=generator, dtype=self.weight.dtype) / math.sqrt(d)
        if train_latent:
            self.latent = nn.Parameter(z)
        else:
            self.register_buffer("latent", z)
        self.alpha = config.alpha
        self.activation = config.activation

    def generated(self) -> dict[str, torch.Tensor]:
        z = self.latent
        u = z + self.alpha * z * z  # (d,)
        base = self.mapped._base(0)
        flat = self.weight @ u  # (P,)
        if base.numel():
            flat = flat + base
        return _generated_by_name(self.mapped, [ACTIVATIONS[self.activation](flat)])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(
            self.mapped.target, self.generated(), args, kwargs, tie_weights=False
        )

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        return self.mapped.materialize(self.generated())
