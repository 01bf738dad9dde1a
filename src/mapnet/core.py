"""Mapping Networks core: generate every parameter of a target module from a small latent vector.

    u = z + α z⊙z                     modulation W_i(1+αz_i), without building the modulated W
    θ = σ(b + g ⊙ (W u))               W fixed, orthonormal, regenerated from the seed
    y = functional_call(target, θ, x)  the target itself is never rewritten

z (d numbers) is the only trainable tensor. With the "single" strategy one (z, W) generates all P
parameters; with "layerwise" every layer (a module that owns parameters) has its own pair.
See SPEC §2–3 and docs/method.md for what each setting means and which were measured.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mapnet.checks import from_dict, positive_int
from mapnet.projections.dense import DenseProjection, concat_pieces, derive_seed
from mapnet.projections.structured import StructuredProjection

STRATEGIES = ("single", "layerwise")
SCALINGS = ("init_std", "none")
BASES = ("init", "zero", "model")
LAYER_SPLITS = ("per_layer", "equal", "proportional")
PROJECTIONS = ("dense", "structured")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "leaky_relu": nn.functional.leaky_relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
}
# (ours) Gain for tensors whose reference values are constant (norm scales and shifts, zero
# biases): their spread gives no scale, so they move by a tenth of a unit per unit of u.
CONSTANT_TENSOR_GAIN = 0.1
# Name of the single strategy's one latent group.
ALL = "*"


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass
class MappingConfig:
    """How a target's parameters are generated. Validates itself; serialises to JSON.

    latent_dim: the trainable size. "single": one int, d. "layerwise": an int, read according to
        `layer_split`, or a dict {layer name: size} naming every layer.
    strategy: "single" (paper: SLVT, "Ours*") or "layerwise" (paper: LWT, "Ours†").
    seed: regenerates the fixed projection(s) and, with base="init", the initial weights θ₀.
    alpha: modulation scale α in W_i(1 + α z_i); 0 switches modulation off (ablation "WM").
    activation: σ applied to the generated vector (the paper does not name it).
    scaling: "init_std" gives each generated tensor the spread of its standard initialisation per
        unit of u; "none" is the paper-literal plain orthonormal projection.
    base: b in σ(b + W u). "init": θ₀, the target's standard initialisation regenerated from the
        seed; "zero": none (paper-literal); "model": the parameters of the model being wrapped
        (fine-tuning a pretrained model; pass the same model to `load`).
    layer_split: with strategy="layerwise" and an int latent_dim: "per_layer" gives every layer
        latent_dim numbers (the paper's 4×468 = 1872); "equal" and "proportional" split a total
        of latent_dim across layers evenly or in proportion to their parameter counts.
    latent_init_std: z starts at N(0, std²) (seeded); 0 starts at z = 0, i.e. θ = σ(b).
    projection: kind of fixed projection. "dense": W in memory (P·d floats, orthonormal columns
        by Cholesky-QR). "structured": signed, permuted Walsh–Hadamard blocks (see structured.py):
        O(P) memory, O(P log d) time, unit-norm columns, bit-identical on every machine.
    """

    latent_dim: int | dict[str, int] = 2048
    strategy: str = "single"
    seed: int = 0
    alpha: float = 0.1
    activation: str = "identity"
    scaling: str = "init_std"
    base: str = "init"
    layer_split: str = "per_layer"
    latent_init_std: float = 0.0
    projection: str = "dense"

    def __post_init__(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("activation", self.activation, tuple(ACTIVATIONS))
        _choice("scaling", self.scaling, SCALINGS)
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
        for name in ("alpha", "latent_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.latent_init_std < 0:
            raise ValueError(f"latent_init_std must be >= 0, got {self.latent_init_std}")
        if self.base == "zero" and self.latent_init_std == 0 and self.activation == "identity":
            raise ValueError(
                "base='zero' with latent_init_std=0 generates all-zero weights whose gradient "
                "is zero for most networks; set latent_init_std > 0 (paper-literal: 1.0)"
            )

    @classmethod
    def paper_literal(cls, **overrides: Any) -> MappingConfig:
        """The paper as written: plain orthonormal W, no base, no gains, random z (ablations)."""
        settings: dict[str, Any] = {"scaling": "none", "base": "zero", "latent_init_std": 1.0}
        return cls(**(settings | overrides))

    @classmethod
    def intrinsic_dimension(cls, **overrides: Any) -> MappingConfig:
        """Prior art at the same budget (Li et al. 2018): θ = θ₀ + W z, unit-norm random columns,
        no modulation, no per-tensor gains. projection="dense" or "structured" (their Fastfood)."""
        settings: dict[str, Any] = {"alpha": 0.0, "scaling": "none", "base": "init"}
        return cls(**(settings | overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MappingConfig:
        return from_dict(cls, data)


@dataclass
class ParamSpec:
    """One distinct target parameter: where it lives (all its tied names) and its shape."""

    names: list[str]  # the first is the canonical name; the rest are tied aliases
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def layer(self) -> str:
        return self.name.rpartition(".")[0]


@dataclass
class LatentGroup:
    """A latent vector and the parameters it generates (all of them, or one layer's)."""

    name: str
    latent_dim: int
    specs: list[ParamSpec] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)


def parameter_specs(model: nn.Module) -> list[ParamSpec]:
    """The model's distinct parameters in named_parameters() order, tied names grouped."""
    by_identity: dict[int, ParamSpec] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        spec = by_identity.get(id(param))
        if spec is None:
            by_identity[id(param)] = ParamSpec([name], tuple(param.shape), param.dtype)
        else:
            spec.names.append(name)
    return list(by_identity.values())


def _split_budget(total: int, sizes: list[int], how: str) -> list[int]:
    """Split `total` latent numbers over layers: evenly, or in proportion to `sizes`."""
    count = len(sizes)
    if total < count:
        raise ValueError(f"latent_dim={total} cannot give each of the {count} layers one number")
    if how == "equal":
        return [total // count + (i < total % count) for i in range(count)]
    # Largest remainder over (total - count), on top of one number per layer.
    spare = total - count
    exact = [spare * s / sum(sizes) for s in sizes]
    shares = [math.floor(e) for e in exact]
    by_remainder = sorted(range(count), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: spare - sum(shares)]:
        shares[i] += 1
    return [1 + s for s in shares]


def latent_groups(specs: list[ParamSpec], config: MappingConfig) -> list[LatentGroup]:
    """The latent groups the config asks for, validated against the model's parameters."""
    total = sum(s.numel for s in specs)
    if config.strategy == "single":
        d = config.latent_dim
        assert isinstance(d, int)
        if d >= total:
            raise ValueError(
                f"latent_dim={d} is not smaller than the target's {total} parameters: the "
                "single strategy would not compress anything (use a smaller latent_dim, or "
                "strategy='layerwise')"
            )
        return [LatentGroup(ALL, d, list(specs))]

    layers: dict[str, LatentGroup] = {}
    for spec in specs:
        layers.setdefault(spec.layer, LatentGroup(spec.layer, 0)).specs.append(spec)
    groups = list(layers.values())
    if isinstance(config.latent_dim, dict):
        unknown = sorted(set(config.latent_dim) - set(layers))
        missing = [g.name for g in groups if g.name not in config.latent_dim]
        if unknown or missing:
            raise ValueError(
                f"latent_dim dict must name every layer of the model exactly; "
                f"unknown: {unknown}, missing: {missing}; the layers are: {list(layers)}"
            )
        dims = [config.latent_dim[g.name] for g in groups]
    elif config.layer_split == "per_layer":
        dims = [config.latent_dim] * len(groups)
    else:
        dims = _split_budget(config.latent_dim, [g.numel for g in groups], config.layer_split)
    for group, dim in zip(groups, dims):
        group.latent_dim = dim
    wide = [
        f"{g.name or '<root>'} ({g.latent_dim} > {g.numel})"
        for g in groups
        if g.latent_dim > g.numel
    ]
    if wide:
        warnings.warn(
            "latent larger than the layer it generates (the surplus latent numbers add no "
            f"freedom to that layer): {', '.join(wide)}",
            stacklevel=3,
        )
    return groups


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        yield from _post_order(child)
    yield module


def seeded_initialisation(model: nn.Module, seed: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model's standard initialisation, regenerated from `seed` without touching `model`.

    Calls every module's reset_parameters() children first, as construction does (so that e.g.
    MultiheadAttention's zeroed out_proj.bias wins over Linear's default). Returns the values by
    canonical name and the names no reset method covers (they keep the model's current values).
    """
    clone = copy.deepcopy(model)
    covered: set[int] = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in _post_order(clone):
            reset = getattr(module, "reset_parameters", None) or getattr(
                module, "_reset_parameters", None
            )
            if callable(reset):
                reset()
                covered.update(id(p) for p in module.parameters(recurse=False))
    values, uncovered = {}, set()
    for name, param in clone.named_parameters():
        values[name] = param.detach().clone()
        if id(param) not in covered:
            uncovered.add(name)
    return values, uncovered


class _GeneratedTensors(torch.autograd.Function):
    """(z (d,), projection, θ₀ (P,) or None, α, shapes) -> the group's tensors, θ₀ + W(z + αz⊙z)
    split into `shapes`: the hot path of every training step, as one autograd node.

    The composed path (`MappedModule.pre_activation`, then split and view) builds ~15 nodes:
    modulation, projection, split and one view per tensor, and its backward concatenates the
    tensors' gradients before the transposed pass. Here the backward writes each tensor's
    gradient straight into the pass's buffer (`_rmatvec_pieces`) and applies the modulation's
    derivative 1 + 2αz in closed form. With the structured projection's gather table, the
    generation + latent-gradient phases of a training step fell from 2.7 to 2.1 ms on CNN2 and
    from 8.6 to 5.0 ms on CNN1 (`mapnet bench step --malloc-tuned`, one thread, breakdown).
    Values equal the composed path's; double backward, forward-mode AD and vmap are supported
    (they use differentiable composed operations).
    """

    @staticmethod
    def forward(
        z: torch.Tensor,
        projection: nn.Module,
        offset: torch.Tensor | None,
        alpha: float,
        shapes: tuple[tuple[int, ...], ...],
    ) -> tuple[torch.Tensor, ...]:
        u = z + alpha * z * z  # (d,)
        return _split_detached(projection._matvec(u, offset), shapes)  # θ₀ + W u, split

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        z, projection, _, alpha, shapes = inputs
        ctx.save_for_backward(z)
        ctx.save_for_forward(z)
        ctx.projection, ctx.alpha, ctx.shapes = projection, alpha, shapes
        ctx.sizes = [math.prod(shape) for shape in shapes]
        ctx.set_materialize_grads(False)  # an unused tensor's gradient stays None: no zeros made

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        (z,) = ctx.saved_tensors
        if all(g is None for g in grads):
            return None, None, None, None, None
        pieces = [None if g is None else g.reshape(1, -1) for g in grads]  # (1, k) each
        if torch.is_grad_enabled():  # create_graph=True: stay differentiable for double backward
            flat = concat_pieces(pieces, ctx.sizes)[0]  # (P,)
            v = ctx.projection.adjoint(flat)  # (d,)
        else:
            flat = None
            v = ctx.projection._rmatvec_pieces(pieces, ctx.sizes)[0]  # (d,) = Wᵀ g
        grad_z = v * (1 + 2 * ctx.alpha * z) if ctx.needs_input_grad[0] else None
        grad_offset = None
        if ctx.needs_input_grad[2]:
            grad_offset = flat if flat is not None else concat_pieces(pieces, ctx.sizes)[0]
        return grad_z, None, grad_offset, None, None

    @staticmethod
    def jvp(ctx: Any, z_tangent: Any, _: None, offset_tangent: Any, *__: None) -> tuple:
        (z,) = ctx.saved_tensors
        u_tangent = z_tangent * (1 + 2 * ctx.alpha * z) if z_tangent is not None else None
        if u_tangent is None:
            flat = offset_tangent.clone()
        else:
            flat = ctx.projection._matvec(u_tangent, offset_tangent)
        return _split_detached(flat, ctx.shapes)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple,
        z: torch.Tensor,
        projection: nn.Module,
        offset: torch.Tensor | None,
        alpha: float,
        shapes: tuple[tuple[int, ...], ...],
    ) -> tuple:
        # Batched: the composed operations (the projections take leading batch axes).
        z_dim, _, offset_dim = in_dims[:3]
        z = z.movedim(z_dim, 0) if z_dim is not None else z.expand(info.batch_size, -1)
        if offset_dim is not None:
            offset = offset.movedim(offset_dim, 0)
        u = z + alpha * z * z  # (N, d)
        flat = projection(u)  # (N, P)
        if offset is not None:
            flat = flat + offset
        sizes = [math.prod(shape) for shape in shapes]
        tensors = tuple(
            p.reshape(info.batch_size, *shape) for p, shape in zip(flat.split(sizes, -1), shapes)
        )
        return tensors, (0,) * len(tensors)


def _split_detached(flat: torch.Tensor, shapes: tuple[tuple[int, ...], ...]) -> tuple:
    """(P,) -> one tensor per shape on flat's storage. detach(): for autograd they are plain
    tensors, not views of one another (a custom Function's outputs must not be)."""
    sizes = [math.prod(shape) for shape in shapes]
    return tuple(p.view(shape).detach() for p, shape in zip(flat.split(sizes), shapes))


def _resolve(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


class MappedModule(nn.Module):
    """A target module whose parameters are all generated from trainable latent vector(s).

    Build it with `mapnet.wrap(model, config)`. It holds a private copy of the target in which
    every parameter became a (non-persistent) buffer, so `parameters()` yields only the latents,
    while buffers such as BatchNorm running statistics keep updating and are saved.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MappingConfig,
        stored_base: dict[str, torch.Tensor] | None = None,
    ):
        """`stored_base`: θ₀ of the parameters no seed regenerates, as read from a checkpoint."""
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"wrap() needs a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, MappingConfig):
            raise TypeError(f"config must be a MappingConfig, got {type(config).__name__}")
        specs = parameter_specs(model)
        if not specs:
            raise ValueError(f"{type(model).__name__} has no parameters to generate")
        non_float = [s.name for s in specs if not s.dtype.is_floating_point]
        if non_float:
            raise TypeError(f"only floating-point parameters can be generated: {non_float}")
        self.config = config
        self.groups = latent_groups(specs, config)
        self.target_class = f"{type(model).__module__}.{type(model).__qualname__}"

        reference, self.stored_base_names = self._reference_parameters(model, stored_base or {})
        device = next(model.parameters()).device
        target = copy.deepcopy(model)
        for spec in specs:
            value = reference[spec.name]
            for alias in spec.names:
                owner, attr = _resolve(target, alias)
                delattr(owner, attr)
                owner.register_buffer(attr, value, persistent=False)
        self.target = target

        generator = torch.Generator().manual_seed(derive_seed(config.seed, "latent"))
        self.latents = nn.ParameterList()
        self.projections = nn.ModuleList()
        for index, group in enumerate(self.groups):
            z = torch.randn(group.latent_dim, generator=generator) * config.latent_init_std
            self.latents.append(nn.Parameter(z.to(device)))
            ref = [reference[s.name].float().flatten() for s in group.specs]
            gains = [g * self._unit_scale(group) for g in self._gains(ref)]
            row_scale = torch.cat([torch.full_like(r, g) for r, g in zip(ref, gains)])
            seed = derive_seed(config.seed, f"projection/{group.name}")
            kind = DenseProjection if config.projection == "dense" else StructuredProjection
            projection = kind(group.numel, group.latent_dim, seed, row_scale)
            self.projections.append(projection.to(device))
            base = torch.cat(ref) if config.base != "zero" else torch.zeros(0)
            self.register_buffer(f"base_{index}", base.to(device), persistent=False)
            if base.numel():
                # The target's placeholders are never read by forward (functional_call swaps in
                # the generated tensors): make them views of θ₀ instead of a second copy.
                start = 0
                for spec in group.specs:
                    if spec.dtype == torch.float32:
                        view = self._base(index)[start : start + spec.numel].view(spec.shape)
                        for alias in spec.names:
                            owner, attr = _resolve(self.target, alias)
                            setattr(owner, attr, view)
                    start += spec.numel

    def _reference_parameters(
        self, model: nn.Module, stored: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """θ₀ by canonical name, and the names whose θ₀ must be saved (not regenerable)."""
        current = {n: p.detach().clone() for n, p in model.named_parameters()}
        if self.config.base == "model":
            return current, []
        values, uncovered = seeded_initialisation(model, self.config.seed)
        for name in uncovered:
            value = stored.get(name, current[name])
            if value.shape != current[name].shape:
                raise ValueError(
                    f"stored θ₀ of {name!r} has shape {tuple(value.shape)}, "
                    f"the model's parameter {tuple(current[name].shape)}"
                )
            values[name] = value.to(current[name].dtype)
        return values, sorted(uncovered)

    def _gains(self, reference: list[torch.Tensor]) -> list[float]:
        """Per-tensor factor g making one unit of u worth one init-std of that tensor."""
        if self.config.scaling == "none":
            return [1.0] * len(reference)
        gains = []
        for ref in reference:
            spread = ref.std().item() if ref.numel() > 1 else 0.0
            gains.append(spread if spread > 0 else CONSTANT_TENSOR_GAIN)
        return gains

    # ---------------------------------------------------------------- generation

    @property
    def latent(self) -> torch.Tensor:
        """The single strategy's latent vector z."""
        if len(self.latents) != 1:
            raise AttributeError("a layerwise mapping has one latent per layer: use .latents")
        return self.latents[0]

    def _base(self, index: int) -> torch.Tensor:
        return getattr(self, f"base_{index}")

    def base_view(self, name: str) -> torch.Tensor | None:
        """θ₀ of one parameter (canonical name) as a view into the base vector; None if no base."""
        for index, group in enumerate(self.groups):
            base, start = self._base(index), 0
            for spec in group.specs:
                if spec.name == name:
                    return (
                        base[start : start + spec.numel].view(spec.shape) if base.numel() else None
                    )
                start += spec.numel
        raise KeyError(f"{name!r} is not a parameter of the target")

    def _unit_scale(self, group: LatentGroup) -> float:
        # Orthonormal columns put ‖u‖·√(d/P) in each output; √(P/min(P,d)) makes it rms(u).
        if self.config.scaling == "none":
            return 1.0
        return math.sqrt(group.numel / min(group.numel, group.latent_dim))

    def pre_activation(self, index: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """a = b + W u for one latent group (P_g,), θ before σ; `z` overrides the trained latent.

        The mapping loss needs it for the exact Jacobian norm (σ'(a)) of a non-identity σ.
        """
        z = self.latents[index] if z is None else z  # (d,)
        u = z + self.config.alpha * z * z  # (d,)  = W̃z / W with W̃_i = W_i(1 + αz_i)
        base = self._base(index)
        return self.projections[index](u, base if base.numel() else None)  # (P_g,) = b + W u

    def generate_flat(self, index: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """θ for one latent group as a flat vector (P_g,); `z` overrides the trained latent."""
        return ACTIVATIONS[self.config.activation](self.pre_activation(index, z))

    def generate(self, latents: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every target parameter, by name (tied aliases map to the same tensor).

        `latents` (one per group, in `groups` order) override the trained ones, e.g. z + ε for the
        mapping loss's stability term: `functional_call(mapped.target, mapped.generate(zs), x)`.
        """
        if latents is not None and len(latents) != len(self.groups):
            raise ValueError(f"need one latent per group ({len(self.groups)}), got {len(latents)}")
        params: dict[str, torch.Tensor] = {}
        for index, group in enumerate(self.groups):
            z = self.latents[index] if latents is None else latents[index]
            if not torch.isfinite(z).all():
                bad = (~torch.isfinite(z)).sum().item()
                raise ValueError(
                    f"latent {group.name!r} holds {bad} non-finite value(s) (NaN/inf): training "
                    "diverged or the latent was set by hand; lower the learning rate or reload a "
                    "checkpoint"
                )
            base = self._base(index)
            pieces = _GeneratedTensors.apply(
                z,
                self.projections[index],
                base if base.numel() else None,
                self.config.alpha,
                tuple(spec.shape for spec in group.specs),
            )
            activation = ACTIVATIONS[self.config.activation]  # elementwise: per piece = on θ
            for spec, piece in zip(group.specs, pieces):
                tensor = activation(piece).to(spec.dtype)
                for alias in spec.names:
                    params[alias] = tensor
        return params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # generate() names every tied alias itself, so functional_call need not search for ties.
        return functional_call(self.target, self.generate(), args, kwargs, tie_weights=False)

    # ---------------------------------------------------------------- inspection

    @property
    def specs(self) -> list[ParamSpec]:
        return [spec for group in self.groups for spec in group.specs]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_target_parameters(self) -> int:
        return sum(spec.numel for spec in self.specs)

    def projection_bytes(self) -> int:
        """Memory held by the fixed projection(s)."""
        return sum(b.numel() * b.element_size() for b in self.projections.buffers())

    def materialize(self) -> nn.Module:
        """An ordinary module of the target's class holding the generated weights (a copy)."""
        plain = copy.deepcopy(self.target)
        with torch.no_grad():
            generated = self.generate()
        for spec in self.specs:
            param = nn.Parameter(generated[spec.name].detach().clone())
            for alias in spec.names:
                owner, attr = _resolve(plain, alias)
                delattr(owner, attr)
                owner.register_parameter(attr, param)
        return plain

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match: architecture (exact) and a probe of the generator.

        The probe is θ at a fixed latent, sampled at 32 positions per group: it changes with
        the seed, the projection, θ₀ and every generation setting, but not with the
        last-bit differences a different BLAS thread count may cause (compared with tolerance).
        """
        layout = [[s.names, list(s.shape), str(s.dtype)] for s in self.specs]
        architecture = hashlib.sha256(json.dumps(layout).encode()).hexdigest()
        probe = []
        with torch.no_grad():
            for index, group in enumerate(self.groups):
                z = torch.linspace(-1.0, 1.0, group.latent_dim, device=self.latents[index].device)
                flat = self.generate_flat(index, z)
                positions = torch.linspace(0, flat.numel() - 1, min(32, flat.numel())).long()
                probe.append([round(v, 7) for v in flat[positions].double().cpu().tolist()])
        return {"architecture": architecture, "probe": probe}

    def extra_repr(self) -> str:
        return (
            f"strategy={self.config.strategy}, groups={len(self.groups)}, "
            f"trainable={self.num_trainable_parameters()}, target={self.num_target_parameters()}"
        )


def wrap(model: nn.Module, config: MappingConfig | None = None, **overrides: Any) -> MappedModule:
    """Generate all of `model`'s parameters from a trainable latent; `model` is left untouched.

    >>> mapped = wrap(model, MappingConfig(latent_dim=2048))   # or wrap(model, latent_dim=2048)
    """
    if config is None:
        config = MappingConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return MappedModule(model, config)
