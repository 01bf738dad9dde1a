"""`MappingConfig`: how a target's parameters are generated. Validates itself; serialises to JSON.

The method (Sen & Mukherjee 2026, §2.2, eq. 20–21): θ = σ(b + g ⊙ W(z + α z⊙z)), z trainable,
W fixed. Fine-tuning (§2.2.6, eq. 25): θ = θ_pre ⊙ (1 + m_⌈j/L⌉), m = σ(g W(z + α z⊙z)).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mapnet.checks import from_dict, positive_int

STRATEGIES = ("single", "layerwise")
SCALINGS = ("init_std", "none")
BASES = ("init", "zero", "model")
LAYER_SPLITS = ("per_layer", "equal", "proportional")
PROJECTIONS = ("structured", "dense")
UPDATES = ("additive", "multiplicative")
# group_size values that align one modulation element with a whole row or column (mapnet/rows.py).
ALIGNED_GROUPS = ("row", "column")
FLOAT_OPTIONS = ("alpha", "latent_init_std", "target_fraction")
SELECTORS = ("target_types", "parameter_names")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "leaky_relu": nn.functional.leaky_relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
}


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _patterns(name: str, value: object) -> tuple[str, ...]:
    """A tuple of module/parameter name patterns from a string, list or tuple of strings."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{name} must be a list of non-empty name patterns, got {value!r}")
    return tuple(value)


@dataclass(frozen=True, eq=False)
class MappingConfig:
    """How a target's parameters are generated.

    latent_dim: the trainable size. "single": one int, d. "layerwise": an int, read according to
        `layer_split`, or a dict {layer name: size} naming every layer.
    strategy: "single" (paper: SLVT, "Ours*") or "layerwise" (paper: LWT, "Ours†").
    seed: regenerates the fixed projection(s) and, with base="init", the initial weights θ₀.
    alpha: modulation scale α in W_i(1 + α z_i); 0 switches modulation off (ablation "WM").
    activation: σ applied to the generated vector (the paper does not name it).
    scaling: "init_std" gives each generated tensor the spread of its initialisation per unit of u;
        "none" is the paper-literal plain projection.
    base: b in σ(b + W u). "init": θ₀, the target's initialisation regenerated from the seed (see
        `mapnet.wrap` for a factory versus an instance); "zero": none (paper-literal); "model":
        the parameters of the model being wrapped (fine-tuning; load onto the same weights).
    layer_split: with strategy="layerwise" and an int latent_dim: "per_layer" gives every layer
        latent_dim numbers (the paper's 4×468 = 1872); "equal" and "proportional" split a total
        of latent_dim across layers evenly or in proportion to their parameter counts.
    latent_init_std: z starts at N(0, std²) (seeded); 0 starts at z = 0, i.e. θ = σ(b).
    projection: "structured" (default): signed, permuted Walsh–Hadamard blocks, O(P) memory and
        O(P log d) time, bit-identical on every machine. "dense": W in memory (P·d floats,
        orthonormal columns), for the paper's ablations; refused above
        `mapnet.projections.DENSE_MAX_BYTES`.
    target_modules: names or fnmatch patterns of the modules whose parameters are generated (with
        their submodules'); None: every module. Names as in `model.named_modules()`.
    exclude_modules: patterns of modules whose parameters are not generated (they stay frozen
        parameters of the target).
    train_directly: patterns of parameter or module names trained as ordinary parameters (e.g.
        "*norm*" for norm scales), counted in `num_trainable_parameters()`.
    store_base: keep every base tensor in the state dict and checkpoints (for θ₀ that cannot be
        regenerated where the checkpoint is loaded). Parameters no seed regenerates are always
        stored.
    check_finite: check in every forward that the latents are finite (a host sync per step).
    target_types: module class names (e.g. ["Linear"]): only parameters owned directly by a
        module of one of these classes (or a subclass) are generated; None: any module. Combined
        with `target_modules` (both must hold).
    parameter_names: fnmatch patterns of a parameter's own name inside its module (the part
        after the last dot): ["weight"] generates weights and leaves biases and every other
        parameter frozen; None: every parameter.
    update: how the generated vector acts on the base. "additive": θ = σ(b + g ⊙ W u), the
        method of §2.2 (with base="model": intrinsic-dimension fine-tuning, θ_pre + W u).
        "multiplicative": θ = b ⊙ (1 + σ(g W u)), the fine-tuning of eq. 25; z = 0 gives θ = b.
    group_size: L of eq. 25, multiplicative only. An int: one modulation element m is shared by
        L consecutive weights of a latent group (in generation order, across tensor boundaries
        unless `groups_within_tensors`); the last element covers the remainder. 1 modulates
        every weight on its own. "row": one element per output row of every generated weight:
        Linear, Conv1d/2d/3d: per output feature or channel, the module's bias sharing its
        row's element, y = (1 + m) ⊙ (W x + b); Embedding: per embedding vector (token); any
        other tensor: per slice along dim 0 (1-d: per entry). "column": one element per input
        column: Linear, Conv: per input feature or channel, y = W (x ⊙ (1 + m)) + b, their
        biases not modulated (they stay frozen); Embedding: per embedding dimension; any other
        tensor: per slice along dim 1 (1-d: per entry). With "row" or "column", Linear, Conv
        and Embedding modules run on the activation path (mapnet/rows.py): θ_pre stays as it
        is and the layer's output (input) is scaled, the same function without forming θ;
        other modules fall back to generating their weights, with a warning naming them.
    groups_within_tensors: with an int group_size, groups restart at every tensor, so no
        element spans two tensors (⌈P_t/L⌉ elements per tensor t). False keeps mapnet 0.2's
        grouping, across tensor boundaries.
    target_fraction: f of eq. 25: generate only the last parameters (in named_parameters()
        order, the layers nearest the output) holding a fraction f of the selected numbers; the
        others stay frozen. 1.0: all selected parameters.

    base=None (the default) means "model" for update="multiplicative" (the pretrained weights
    are θ_pre) and "init" otherwise; `resolved_base` gives the value in force.
    """

    latent_dim: int | dict[str, int] = 2048
    strategy: str = "single"
    seed: int = 0
    alpha: float = 0.1
    activation: str = "identity"
    scaling: str = "init_std"
    base: str | None = None
    layer_split: str = "per_layer"
    latent_init_std: float = 0.0
    projection: str = "structured"
    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()
    train_directly: tuple[str, ...] = ()
    store_base: bool = False
    check_finite: bool = False
    update: str = "additive"
    group_size: int | str = 1
    target_fraction: float = 1.0
    target_types: tuple[str, ...] | None = None
    parameter_names: tuple[str, ...] | None = None
    groups_within_tensors: bool = False

    def __post_init__(self) -> None:
        _choice("update", self.update, UPDATES)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("activation", self.activation, tuple(ACTIVATIONS))
        _choice("scaling", self.scaling, SCALINGS)
        if self.base is not None:  # None stays None: dataclasses.replace(update=...) re-resolves
            _choice("base", self.base, BASES)
        _choice("layer_split", self.layer_split, LAYER_SPLITS)
        _choice("projection", self.projection, PROJECTIONS)
        if isinstance(self.latent_dim, dict):
            if self.strategy != "layerwise":
                raise ValueError("latent_dim as a {layer: size} dict needs strategy='layerwise'")
            if not self.latent_dim:
                raise ValueError("latent_dim dict is empty: name at least one layer")
            for layer, size in self.latent_dim.items():
                positive_int(f"latent_dim[{layer!r}]", size)
        else:
            positive_int("latent_dim", self.latent_dim)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        for name in FLOAT_OPTIONS:  # JSON's 1e999 reads as inf: every one must be finite
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if isinstance(self.group_size, str):
            _choice("group_size", self.group_size, ALIGNED_GROUPS)
            if self.update != "multiplicative":
                raise ValueError(
                    f"group_size={self.group_size!r} needs update='multiplicative' (one "
                    "modulation element scales a whole row or column of θ_pre)"
                )
        else:
            positive_int("group_size", self.group_size)
        if self.group_size != 1 and self.update != "multiplicative":
            raise ValueError(
                f"group_size={self.group_size} needs update='multiplicative' (eq. 25 shares one "
                "modulation element among L weights; an additive update generates every weight)"
            )
        if self.groups_within_tensors and self.update != "multiplicative":
            raise ValueError(
                "groups_within_tensors needs update='multiplicative' (eq. 25's groups)"
            )
        if self.update == "multiplicative" and self.resolved_base == "zero":
            raise ValueError(
                "update='multiplicative' scales the base weights: base='zero' would generate "
                "all-zero weights; use base='model' (θ_pre, the default) or base='init'"
            )
        fraction = self.target_fraction
        if not 0 < fraction <= 1:
            raise ValueError(f"target_fraction must be in (0, 1], got {fraction}")
        if self.latent_init_std < 0:
            raise ValueError(f"latent_init_std must be >= 0, got {self.latent_init_std}")
        if (
            self.resolved_base == "zero"
            and self.latent_init_std == 0
            and self.activation == "identity"
        ):
            raise ValueError(
                "base='zero' with latent_init_std=0 generates all-zero weights whose gradient "
                "is zero for most networks; set latent_init_std > 0 (paper-literal: 1.0)"
            )
        # Frozen: a wrapped module's W, θ₀, identity and cache all derive from it.
        if self.target_modules is not None:
            object.__setattr__(
                self, "target_modules", _patterns("target_modules", self.target_modules)
            )
        object.__setattr__(
            self, "exclude_modules", _patterns("exclude_modules", self.exclude_modules)
        )
        object.__setattr__(self, "train_directly", _patterns("train_directly", self.train_directly))
        for name in ("target_types", "parameter_names"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        dotted = [p for p in self.parameter_names or () if "." in p]
        if dotted:
            raise ValueError(
                f"parameter_names holds names inside one module ('weight', 'bias*'), not paths: "
                f"{dotted}; select modules with target_modules"
            )
        for name in ("store_base", "check_finite", "groups_within_tensors"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def __eq__(self, other: object) -> bool:  # base=None equals the base it resolves to
        if not isinstance(other, MappingConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def resolved_base(self) -> str:
        """`base`, with None resolved: "model" for a multiplicative update, else "init"."""
        if self.base is not None:
            return self.base
        return "model" if self.update == "multiplicative" else "init"

    @classmethod
    def paper_literal(cls, **overrides: Any) -> MappingConfig:
        """The paper as written: plain orthonormal W, no base, no gains, random z (ablations)."""
        settings: dict[str, Any] = {
            "scaling": "none",
            "base": "zero",
            "latent_init_std": 1.0,
            "projection": "dense",
        }
        return cls(**(settings | overrides))

    @classmethod
    def intrinsic_dimension(cls, **overrides: Any) -> MappingConfig:
        """Prior art at the same budget (Li et al. 2018): θ = θ₀ + W z, unit-norm random columns,
        no modulation, no per-tensor gains. projection="dense" or "structured" (their Fastfood)."""
        settings: dict[str, Any] = {"alpha": 0.0, "scaling": "none", "base": "init"}
        return cls(**(settings | overrides))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["base"] = self.resolved_base  # a written config always names its base
        for name in ("target_modules", "exclude_modules", "train_directly", *SELECTORS):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MappingConfig:
        """From `to_dict()`'s output. Fields added since a dict was written (target_modules,
        exclude_modules, train_directly, store_base, check_finite, update, group_size,
        target_fraction, target_types, parameter_names, groups_within_tensors) take their
        defaults, which reproduce what the dict was written for. A dict
        must name `projection`: its default changed (mapnet 0.1: "dense")."""
        if "projection" not in data:
            raise ValueError(
                "a MappingConfig dict must name 'projection' (the default changed from 'dense' "
                "in mapnet 0.1 to 'structured'); add the one the dict was written with"
            )
        return from_dict(cls, data)
