"""`MappedModule`: a target module whose weights are generated from trainable latent vector(s).

    u = z + α z⊙z                       modulation W_i(1+αz_i), without building the modulated W
    θ = σ(θ₀ + g ⊙ (W u))               W fixed, regenerated from the seed (paper §2.2, eq. 20–24)
    θ = θ₀ ⊙ (1 + σ(g W u)_⌈j/L⌉)       or, update="multiplicative": fine-tuning (eq. 25)
    y = (1 + m) ⊙ (θ₀ x + b)            group_size="row": the same θ, applied to activations
                                        (mapnet/rows.py; "column" scales the input)
    y = functional_call(target, θ, x)   the target itself is never rewritten

It behaves like the module it wraps: attribute access reaches the target, `forward` has the
target's signature, `.to()` moves and casts everything (generated tensors follow), `state_dict()`
is a complete checkpoint (latents, buffers, stored bases, identity) and `load_state_dict` checks
all of it before changing anything. Fixed tensors are excluded from DDP's broadcasts. In eval
mode without grad the generated weights are cached until a latent changes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

from mapnet import identity, rows
from mapnet.bases import ModelSource, build_from_factory, fill_bases, group_views
from mapnet.config import ACTIVATIONS, MappingConfig
from mapnet.generator import generate_group, modulate_group, pre_activation, scale_by_groups
from mapnet.plain import distinct_slots, materialized
from mapnet.plain import resolve as _resolve
from mapnet.projections import PiecewiseScale, make_projection
from mapnet.projections.seeding import derive_seed
from mapnet.recompute import recomputed_when_saved
from mapnet.state import (
    check_and_take_state,
    finish_state,
    frozen_weights_are_not_missing,
)
from mapnet.targets import LatentGroup, ParamSpec, latent_groups

# (ours) Gain for tensors whose reference values are constant (norm scales and shifts, zero
# biases): their spread gives no scale, so they move by a tenth of a unit per unit of u.
CONSTANT_TENSOR_GAIN = 0.1


def _base_dtype(specs: Sequence[ParamSpec]) -> torch.dtype:
    """θ₀ and the latents are float64 for a float64 target, float32 otherwise."""
    dtypes = {s.dtype for s in specs}
    return torch.float64 if dtypes == {torch.float64} else torch.float32


class _ForwardWithTargetSignature:
    """`mapped.forward`: the mapped forward, carrying the target's signature, so tools that read
    `inspect.signature(model.forward)` (HF Trainer's column filter) see the target's inputs.
    Only on the instance: HF Trainer finds label names on the class (`type(model).forward`),
    so it needs them given, `TrainingArguments(label_names=["labels"])`."""

    def __get__(self, instance: MappedModule | None, owner: type) -> Callable[..., Any]:
        if instance is None:
            return MappedModule.mapped_forward
        bound = functools.partial(MappedModule.mapped_forward, instance)
        if torch.compiler.is_compiling():  # dynamo cannot set attributes on a partial
            return bound
        bound.__signature__ = instance._target_signature  # type: ignore[attr-defined]
        return bound


class MappedModule(nn.Module):
    """Build it with `mapnet.wrap(model_or_factory, config)`.

    It holds the target (a private copy of the instance, or the factory's model) in which every
    generated parameter became a non-persistent buffer, a view of θ₀ (so no second copy), so
    `parameters()` yields the latents, plus any parameters trained directly or left frozen.
    """

    forward = _ForwardWithTargetSignature()

    def __init__(
        self,
        source: ModelSource,
        config: MappingConfig,
    ):
        super().__init__()
        if not isinstance(config, MappingConfig):
            raise TypeError(f"config must be a MappingConfig, got {type(config).__name__}")
        from_factory = not isinstance(source, nn.Module)
        if from_factory and not callable(source):
            raise TypeError(
                f"wrap() needs a torch.nn.Module or a factory returning one, got "
                f"{type(source).__name__}"
            )
        model = build_from_factory(source, config.seed) if from_factory else source
        # From here `model` is the source of θ₀; it becomes (a copy of it becomes) the target.
        selection = rows.selection(model, config)
        laid_out = rows.has_layout(config)
        count = functools.partial(rows.count_elements, model, config) if laid_out else None
        groups = latent_groups(selection.generated, config, count)
        # Row/column groups and groups inside tensors: each group's units (mapnet/rows.py).
        self._layouts = [rows.build_layout(model, g, config) for g in groups] if laid_out else None
        # The names generate() gives each tensor: one per distinct module attribute (a module
        # reused under two names is one slot; functional_call would restore the second name's
        # swapped-in tensor into it after the forward).
        self._slots = {s.name: distinct_slots(model, s.names) for s in selection.generated}
        # Activation-path tensors whose θ₀ is the model's own weight stay in the target as they
        # are (non-persistent buffers): no copy into θ₀, no placeholder. Not those of a reused
        # module: torch's functional_call(tie_weights=True) leaves a swapped-in tensor in its slot.
        regenerated = config.resolved_base == "init" and not from_factory
        held = set() if regenerated or not self._layouts else rows.held_names(self._layouts)
        held = {
            s.name for s in selection.generated if s.name in held and s.names == self._slots[s.name]
        }
        self._held = sorted(held)
        self._flat_groups = [
            dataclasses.replace(g, specs=[s for s in g.specs if s.name not in held]) for g in groups
        ]
        device = next(iter(model.parameters())).device
        dtype = _base_dtype(selection.generated)
        # base="zero" still needs θ₀ as the reference for the per-tensor gains of "init_std".
        reference = (
            "init"
            if config.resolved_base == "zero" and config.scaling == "init_std"
            else config.resolved_base
        )
        bases, uncovered = fill_bases(
            self._flat_groups,
            model,
            base=reference,
            seed=config.seed,
            from_factory=from_factory,
            dtype=dtype,
        )
        if config.resolved_base == "zero":
            uncovered = []
        generated = {s.name for s in selection.generated}
        self.mapping_config = config
        self.groups = groups
        self.selection = selection
        self.target_class = f"{type(model).__module__}.{type(model).__qualname__}"
        self._target_signature = inspect.signature(model.forward)
        stored = (
            sorted(generated) if config.store_base and config.resolved_base != "zero" else uncovered
        )
        self.stored_base_names: list[str] = stored

        self.gains: list[list[float]] = [self._gains(g, b) for g, b in zip(groups, bases)]
        # Fine-tuning checkpoints stay small: frozen pretrained weights are checked by digest,
        # not stored, so a state loads only onto the same pretrained model.
        self.frozen_by_digest = config.resolved_base == "model" and not config.store_base
        # The pretrained buffers (BatchNorm statistics, a few numbers per channel): a state omits
        # those still at these values, and loading such a state puts these values back.
        self._pretrained_buffers: dict[str, torch.Tensor] = {}
        if self.frozen_by_digest:
            self._pretrained_buffers = {
                name: value.detach().clone()
                for name, value in model.state_dict(keep_vars=True).items()
                if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
            }
        # Floating buffers finite now must stay finite in any state loaded or saved (NaN
        # statistics are damage); one holding inf by design (a mask) may keep it.
        self._finite_buffers = [
            name
            for name, value in model.state_dict(keep_vars=True).items()
            if isinstance(value, torch.Tensor)
            and not isinstance(value, nn.Parameter)
            and value.is_floating_point()
            and bool(torch.isfinite(value).all())
        ]
        theta0 = {name: model.get_parameter(name) for name in held}
        if config.resolved_base != "zero":
            theta0 |= {spec.name: view for spec, view in group_views(self._flat_groups, bases)}
        self._identity = identity.build(self, theta0, model)
        del theta0
        for index, base in enumerate(bases):
            empty = torch.zeros(0, dtype=dtype)  # base="zero": θ₀ was only the gains' reference
            self.register_buffer(
                f"base_{index}", empty if config.resolved_base == "zero" else base, False
            )
        del bases
        self._dtypes = [tuple(s.dtype for s in g.specs) for g in groups]  # follow .to()
        self._shapes = [tuple(s.shape for s in g.specs) for g in groups]
        self._cache: tuple[tuple, dict[str, torch.Tensor]] | None = None

        # The target: the factory's own model, or a copy of the instance in which the generated
        # parameters are their placeholders from the start (the weights are never copied, and
        # references such as nn.LSTM's flat-weight list point at the placeholders). Done before
        # the projections are built, so a factory's weights are gone by then: wrap() peaks at
        # weights + θ₀, or θ₀ + projection, whichever is larger.
        # Each module's parameter names in their order, for materialize().
        self._parameter_order = {n: list(m._parameters) for n, m in model.named_modules()}
        placeholders = self._placeholders()
        if not from_factory:
            params = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
            memo = {id(params[spec.name]): view for spec, view in placeholders}
            model = copy.deepcopy(model, memo)
        held_specs = [
            (s, model.get_parameter(s.name).detach()) for s in selection.generated if s.name in held
        ]
        for spec, view in placeholders + held_specs:
            for alias in spec.names:
                owner, attr = _resolve(model, alias)
                owner._parameters.pop(attr, None)
                owner.register_buffer(attr, view, persistent=False)
                setattr(owner, attr, view)  # modules such as nn.LSTM refresh caches on setattr
        originally_frozen = {
            s.name for s in selection.frozen if not model.get_parameter(s.name).requires_grad
        }
        self._excluded = [s.name for s in selection.frozen if s.name not in originally_frozen]
        for spec in selection.frozen:
            model.get_parameter(spec.name).requires_grad_(False)
        self.target = model
        del model, placeholders, held_specs
        if isinstance(config.group_size, str):
            rows.attach(self)  # the activation path's hooks, and its warnings

        generator = torch.Generator().manual_seed(derive_seed(config.seed, "latent"))
        self.latents = nn.ParameterList()
        self.projections = nn.ModuleList()
        for group, gains in zip(groups, self.gains):
            z = torch.randn(group.latent_dim, generator=generator) * config.latent_init_std
            self.latents.append(nn.Parameter(z.to(dtype)))
            seed = derive_seed(config.seed, f"projection/{group.name}")
            row_scale = _row_scale(group, gains, config)
            self.projections.append(
                make_projection(config.projection, group.rows, group.latent_dim, seed, row_scale)
            )
        # DDP: broadcast and all-reduce only what trains or tracks statistics.
        self._ddp_params_and_buffers_to_ignore = self.fixed_tensor_names()
        # mapnet/state.py: what a state holds, and every check before one is loaded.
        self.register_state_dict_post_hook(finish_state)
        self.register_load_state_dict_pre_hook(check_and_take_state)
        self.register_load_state_dict_post_hook(frozen_weights_are_not_missing)
        if device.type != "cpu":
            self.to(device)

    # ---------------------------------------------------------------- construction helpers

    def _gains(self, group: LatentGroup, base: torch.Tensor) -> list[float]:
        """Per-tensor factor g making one unit of u worth one init-std of that tensor (a
        multiplicative update is relative to each weight already: 1)."""
        if self.mapping_config.scaling == "none" or self.mapping_config.update == "multiplicative":
            return [1.0] * len(group.specs)
        gains = []
        for _, ref in group_views([group], [base]):
            spread = ref.float().std().item() if ref.numel() > 1 else 0.0
            gains.append(spread if spread > 0 else CONSTANT_TENSOR_GAIN)
        return gains

    # ---------------------------------------------------------------- placeholders, .to()

    def _theta0_views(self, held: bool = True) -> dict[str, torch.Tensor]:
        """θ₀ of each generated parameter (canonical name) as a view into its group's vector, or
        the target's own tensor where the activation path holds it (`held`); empty for
        base='zero'."""
        if self.mapping_config.resolved_base == "zero":
            return {}
        bases = [self._base(i) for i in range(len(self.groups))]
        views = {spec.name: view for spec, view in group_views(self._flat_groups, bases)}
        return views | {name: self.target.get_buffer(name) for name in self._held if held}

    def _placeholders(self) -> list[tuple[ParamSpec, torch.Tensor]]:
        """Each generated parameter and the tensor its placeholder shows: its θ₀ view (a
        zero-stride zero for base='zero'), in the parameter's current dtype (a copy only when
        that differs from θ₀'s, e.g. a bfloat16 target's)."""
        views, out = self._theta0_views(held=False), []
        for index, group in enumerate(self.groups):
            for spec, dtype in zip(group.specs, self._dtypes[index]):
                if spec.name in self._held:  # the target's own tensor, converted as a buffer
                    continue
                view = views.get(spec.name)
                if view is None:
                    base = self._base(index)
                    view = torch.zeros((), dtype=dtype, device=base.device).expand(spec.shape)
                out.append((spec, view if view.dtype == dtype else view.to(dtype)))
        return out

    def _alias_placeholders(self, clear: bool = False) -> None:
        for spec, view in self._placeholders():
            for alias in spec.names:
                owner, attr = _resolve(self.target, alias)
                # setattr, not _buffers[...]: modules such as nn.LSTM refresh caches on it.
                setattr(owner, attr, None if clear else view)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # Placeholders are dropped first and re-made as views afterwards: the conversion never
        # copies them, and θ₀ stays one tensor.
        device = self.latents[0].device
        self._alias_placeholders(clear=True)
        self._cache = None
        try:
            result = super()._apply(fn, recurse)
            self._dtypes = [
                tuple(fn(torch.empty(0, dtype=dt, device=device)).dtype for dt in group)
                for group in self._dtypes
            ]
        finally:
            self._alias_placeholders()
        return result

    def train(self, mode: bool = True) -> MappedModule:
        if mode:  # training never reads the cache: free the weights it holds
            self._cache = None
        return super().train(mode)

    def __getattr__(self, name: str) -> Any:
        """Attributes the mapped module lacks come from the target (`mapped.features`, a HF
        model's `mapped.config`). The target's own methods and submodules hold θ₀, not the
        generated weights, when called directly: run them inside `with mapped.applied():`."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            target = modules.get("target") if modules else None
            own = inspect.getattr_static(type(self), name, None)
            if isinstance(own, property):  # ours raised (`latent` of a layerwise mapping):
                return own.__get__(self)  # let it raise its own message again
            if target is None or name.startswith("__") or own is not None:
                raise
            return getattr(target, name)

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """The target with the generated weights in place of θ₀, for calling its methods or
        submodules directly: `with mapped.applied() as net: net.encode(x)`."""
        with _reparametrize_module(self.target, self._generated_for_forward(), tie_weights=False):
            yield self.target

    # ---------------------------------------------------------------- generation

    @property
    def latent(self) -> nn.Parameter:
        """The single strategy's latent vector z."""
        if len(self.latents) != 1:
            raise AttributeError("a layerwise mapping has one latent per layer: use .latents")
        return self.latents[0]

    @property
    def specs(self) -> list[ParamSpec]:
        """The generated parameters, in generation order."""
        return [spec for group in self.groups for spec in group.specs]

    def _base(self, index: int) -> torch.Tensor:
        return getattr(self, f"base_{index}")

    def base_tensor(self, name: str) -> torch.Tensor | None:
        """θ₀ of one generated parameter as a view into its group's base vector; None if none."""
        if name not in {spec.name for spec in self.specs}:
            raise KeyError(f"{name!r} is not a generated parameter of the target")
        return self._theta0_views().get(name)

    def pre_activation(self, index: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """a = θ₀ + W u for one latent group (P_g,), θ before σ; `z` overrides the trained latent.
        Composed of ordinary differentiable operations (the mapping loss, tests). Additive
        updates only: a multiplicative one has no such a (see `generate_flat`)."""
        if self.mapping_config.update != "additive":
            raise ValueError(
                "pre_activation() is θ₀ + W u, defined for update='additive'; a multiplicative "
                "update generates θ₀ ⊙ (1 + m): use generate_flat()"
            )
        z = self.latents[index] if z is None else z
        base = self._base(index)
        return pre_activation(
            z, self.projections[index], base if base.numel() else None, self.mapping_config.alpha
        )

    def generate_flat(self, index: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """θ for one latent group as a flat vector (P_g,); `z` overrides the trained latent.
        Composed of ordinary differentiable operations, like `pre_activation`."""
        config = self.mapping_config
        sigma = ACTIVATIONS[config.activation]
        if config.update == "additive":
            return sigma(self.pre_activation(index, z))
        z = self.latents[index] if z is None else z
        if self._layouts is not None:
            tensors = self._layout_weights(index, z, self._base(index))
            return torch.cat([tensors[s.name].reshape(-1) for s in self.groups[index].specs])
        m = sigma(pre_activation(z, self.projections[index], None, config.alpha))  # (M_g,)
        return scale_by_groups(self._base(index), 1 + m, config.group_size)  # (P_g,)

    def _layout_weights(
        self, index: int, z: torch.Tensor, base: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """θ = θ_pre ⊙ (1 + m) of a layout's group, every tensor on the weight path (by name,
        in θ₀'s dtype): what the activation path computes, formed."""
        config = self.mapping_config
        factors = rows.factors(z, self.projections[index], config.alpha, config.activation)
        theta0 = {s.name: v for s, v in group_views([self._flat_groups[index]], [base])}
        theta0 |= {name: self.target.get_buffer(name) for name in self._held}
        return rows.weights(self._layouts[index], factors, theta0)

    def _check_finite(self, index: int, z: torch.Tensor) -> None:
        if not torch.isfinite(z).all():
            bad = (~torch.isfinite(z)).sum().item()
            raise ValueError(
                f"latent {self.groups[index].name!r} holds {bad} non-finite value(s) (NaN/inf): "
                "training diverged or the latent was set by hand; lower the learning rate or "
                "reload a checkpoint"
            )

    def _forward_tensors(self) -> dict[str, torch.Tensor]:
        """What the target's forward runs with: generate(), or for row/column groups the
        factors of the activation-path modules and the weight-path tensors (mapnet/rows.py)."""
        if self._layouts is None or not isinstance(self.mapping_config.group_size, str):
            return self.generate()
        config = self.mapping_config
        # θ₀ kept flat: the weight path's, and activation-path weights not held by the target.
        flat = any(group.specs for group in self._flat_groups)
        theta0 = self._theta0_views(held=False) if flat else {}
        tensors: dict[str, torch.Tensor] = {}
        for index, group in enumerate(self.groups):
            z = self.latents[index]
            if config.check_finite:
                self._check_finite(index, z)
            factors = rows.factors(z, self.projections[index], config.alpha, config.activation)
            specs = {
                s.name: (self._slots[s.name], t) for s, t in zip(group.specs, self._dtypes[index])
            }
            tensors |= rows.forward_tensors(self._layouts[index], factors, theta0, specs)
        return tensors

    def generate(
        self,
        latents: Sequence[torch.Tensor] | None = None,
        check_finite: bool | None = None,
        bases: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every generated parameter, by name (tied aliases map to the same tensor).

        `latents` (one per group, in `groups` order) override the trained ones, e.g. z + ε for the
        mapping loss's stability term: `functional_call(mapped.target, mapped.generate(zs), x)`.
        `check_finite` overrides the config's (False under torch.func.vmap, whose batched
        tensors cannot decide an `if`: check the latents before, as ModelSpace does).
        `bases` (one flat θ₀ per group) override θ₀: a learned shared base (ModelSpace).
        """
        if latents is not None and len(latents) != len(self.groups):
            raise ValueError(f"need one latent per group ({len(self.groups)}), got {len(latents)}")
        if bases is not None and len(bases) != len(self.groups):
            raise ValueError(f"need one base per group ({len(self.groups)}), got {len(bases)}")
        config = self.mapping_config
        check = config.check_finite if check_finite is None else check_finite
        params: dict[str, torch.Tensor] = {}
        for index, group in enumerate(self.groups):
            z = self.latents[index] if latents is None else latents[index]
            if check:
                self._check_finite(index, z)
            base = self._base(index) if bases is None else bases[index]
            if self._layouts is not None:
                weights = self._layout_weights(index, z, base)
                tensors = tuple(
                    weights[s.name].to(dtype) for s, dtype in zip(group.specs, self._dtypes[index])
                )
            elif config.update == "multiplicative":
                tensors = modulate_group(
                    z,
                    self.projections[index],
                    base,
                    config.alpha,
                    config.activation,
                    config.group_size,
                    self._shapes[index],
                    self._dtypes[index],
                )
            else:
                tensors = generate_group(
                    z,
                    self.projections[index],
                    base if base.numel() else None,
                    config.alpha,
                    config.activation,
                    self._shapes[index],
                    self._dtypes[index],
                )
            for spec, tensor in zip(group.specs, tensors):
                for alias in self._slots[spec.name]:
                    params[alias] = tensor
        return params

    def _generated_for_forward(self) -> dict[str, torch.Tensor]:
        """generate(), cached in eval mode without grad until a latent or θ₀ changes in place.

        The key is each latent's identity and version counter and each θ₀'s version: in-place
        updates (optimiser steps, copy_, load_state_dict) invalidate it. Writes that bypass
        autograd's version counter (through `.data` or NumPy) do not: `mapped.train()` drops the
        cache after such writes. Latents swapped in by functional_call are plain
        tensors, not the module's Parameters, and are never cached.
        """
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._cache = None
            return self._forward_tensors()
        if not all(isinstance(z, nn.Parameter) for z in self.latents):
            return self._forward_tensors()
        key = tuple((id(z), z._version, z.data_ptr()) for z in self.latents) + tuple(
            self._base(i)._version for i in range(len(self.groups))
        )
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._forward_tensors())
        return self._cache[1]

    def mapped_forward(self, *args: Any, **kwargs: Any) -> Any:
        # generate() names every tied alias itself, so functional_call need not search for ties;
        # tensors cheap to make again are not kept for backward, their recipes are (recompute).
        params = self._generated_for_forward()
        with recomputed_when_saved(params.values()):
            return functional_call(self.target, params, args, kwargs, tie_weights=False)

    # ---------------------------------------------------------------- inspection

    def num_trainable_parameters(self) -> int:
        """Latents plus parameters trained directly."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_generated_parameters(self) -> int:
        return sum(spec.numel for spec in self.specs)

    def num_target_parameters(self) -> int:
        """Every parameter of the target: generated, trained directly and frozen."""
        sel = self.selection
        return sum(s.numel for s in sel.generated + sel.direct + sel.frozen)

    def projection_bytes(self) -> int:
        """Memory held by the fixed projection(s)."""
        return sum(b.numel() * b.element_size() for b in self.projections.buffers())

    def fixed_tensor_names(self) -> list[str]:
        """Names of the buffers that never change in training (projections, θ₀, placeholders)."""
        names = {f"target.{alias}" for spec in self.specs for alias in spec.names}
        names |= {f"base_{i}" for i in range(len(self.groups))}
        # Every buffer slot, None ones too: DDP re-reads the list, and column_mean fills later.
        names |= {
            f"projections.{i}.{key}" for i, p in enumerate(self.projections) for key in p._buffers
        }
        if isinstance(self.mapping_config.group_size, str):
            names |= {f"target.{name}" for name in rows.scale_buffer_names(self._layouts)}
        return sorted(names)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by kind, for optimizer groups with their own settings:
        "latents" (z, one per latent group) and "direct" (the parameters trained directly,
        e.g. a new head, by their names in `train_directly`). Together: `parameters()`.

        >>> groups = mapped.parameter_groups()
        >>> torch.optim.AdamW([{"params": groups["latents"], "lr": 1e-2},
        ...                    {"params": groups["direct"], "lr": 1e-3}])
        """
        direct = [self.target.get_parameter(spec.name) for spec in self.selection.direct]
        return {"latents": list(self.latents), "direct": direct}

    def fingerprint(self) -> dict[str, Any]:
        """This module's identity (mapnet/identity.py): what a state must match (a copy)."""
        return copy.deepcopy(self._identity)

    def materialize(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """An ordinary module of the target's class holding the generated weights (a copy): for
        row/column groups the merged θ_pre ⊙ (1 + m) in its weights and biases, no hooks.

        `weights` (by parameter name, every generated one) replace them: weights derived from
        the generated ones, e.g. pruned or rounded (`mapnet.compress`)."""
        return materialized(self, weights)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._alias_placeholders()  # unpickled placeholders are copies: views of θ₀ again

    def extra_repr(self) -> str:
        return (
            f"strategy={self.mapping_config.strategy}, groups={len(self.groups)}, "
            f"trainable={self.num_trainable_parameters()}, "
            f"generated={self.num_generated_parameters()}, "
            f"projection={self.mapping_config.projection}"
        )

    # ---------------------------------------------------------------- state dict

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As for any module; every wrong shape or dtype, non-finite latent, directly trained
        weight or buffer, identity mismatch and, with strict=True, missing or unexpected key is
        reported (a CheckpointError) before anything of this module is changed.

        Inside a parent module torch loads one module after another: when this one refuses,
        `parent.load_state_dict(sd)` has already written the modules before it. Use
        `mapnet.load_state_dict(parent, sd)`, which checks every MappedModule in the tree (and
        the other modules' names and shapes) before anything is written."""
        self.__dict__["_strict_load"] = strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self.__dict__["_strict_load"] = False

    def to_empty(self, *, device: Any, recurse: bool = True) -> MappedModule:
        raise TypeError(
            "MappedModule.to_empty() would leave the projection and θ₀ uninitialised: they are "
            "regenerated from the seed, not loaded. Wrap on the meta device is not supported; "
            "build it with mapnet.wrap(...) and move it with .to(device)"
        )

    def get_extra_state(self) -> torch.Tensor:
        return identity.encode(self._identity)

    def set_extra_state(self, state: Any) -> None:
        pass  # checked and applied by state.check_and_take_state before anything is loaded

    def _replace_bases(
        self, values: dict[str, torch.Tensor], saved_digests: dict[str, str] | None = None
    ) -> None:
        """Set stored bases read from a state or checkpoint (into θ₀ itself, then the
        placeholders follow) and re-derive the gains of the groups whose θ₀ changed: the one
        path by which stored bases are applied. The identity takes `saved_digests` (the digests
        the state was saved with), else the digests of the values as stored here."""
        if not values:
            return
        views = self._theta0_views()
        changed = [
            name
            for name, value in values.items()
            if not torch.equal(views[name], value.to(views[name]))
        ]
        with torch.no_grad():
            for name in changed:
                views[name].copy_(values[name])
        self._alias_placeholders()  # copies of θ₀ (another dtype) follow it
        for index, group in enumerate(self.groups):
            if not any(spec.name in changed for spec in group.specs):
                continue
            gains = self._gains(group, self._base(index))
            if gains != self.gains[index]:
                self.gains[index] = gains
                row_scale = _row_scale(group, gains, self.mapping_config)
                self.projections[index].set_row_scale(row_scale)
        views = self._theta0_views()
        if saved_digests is None:
            saved_digests = {name: identity.tensor_digest(views[name]) for name in changed}
        # A format 3 state writes short digests: the full one is that of the values written.
        digests = {
            name: digest if len(digest) > identity.SHORT_DIGEST else identity.tensor_digest(view)
            for name, digest in saved_digests.items()
            for view in (views[name],)
        }
        self._identity["bases"].update(digests)
        for name in digests:
            self._identity["sketches"][name] = identity.tensor_sketch(name, views[name])
        for group_identity, gains in zip(self._identity["groups"], self.gains):
            group_identity["gains"] = gains
        self._cache = None


def _row_scale(group: LatentGroup, gains: list[float], config: MappingConfig) -> PiecewiseScale:
    """The per-row gain, constant per tensor. With "init_std", each tensor's gain times
    √(R/min(R, d)) for R generated rows, which makes one unit of u worth rms(u) in every output
    (orthonormal columns put ‖u‖·√(d/R) in each). A multiplicative update's rows are relative
    changes, one piece: a unit of u is a relative change of rms(u)."""
    rows = group.rows
    unit = 1.0 if config.scaling == "none" else math.sqrt(rows / min(rows, group.latent_dim))
    if config.update == "multiplicative":
        return PiecewiseScale((rows,), (unit,))
    return PiecewiseScale(tuple(s.numel for s in group.specs), tuple(g * unit for g in gains))


def wrap(model: ModelSource, config: MappingConfig | None = None, **overrides: Any) -> MappedModule:
    """Generate `model`'s parameters from a trainable latent.

    `model` is an nn.Module (left untouched) or a zero-argument factory returning one; with a
    factory and base="init", θ₀ is exactly the model's own initialisation under the seed
    (`mapnet.bases`). Settings: `MappingConfig`, or its fields as keywords.

    >>> mapped = wrap(lambda: MyNet(), MappingConfig(latent_dim=2048))  # or latent_dim=2048
    """
    if config is None:
        config = MappingConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return MappedModule(model, config)
