"""Which of a target's parameters are generated, trained directly or left frozen, and how the
latent budget is split over them (paper §2.4: one latent for all, or one per layer)."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from mapnet.config import MappingConfig

# Name of the single strategy's one latent group.
ALL = "*"


@dataclass
class ParamSpec:
    """One distinct target parameter: where it lives (all its tied names) and its shape."""

    names: list[str]  # the first is the canonical name; the rest are tied aliases
    shape: tuple[int, ...]
    dtype: torch.dtype  # as wrapped; the generated tensor follows the module's later .to()

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
    group_size: int = 1  # weights per generated number (eq. 25's L; 1 for additive updates)
    elements: int | None = None  # set by a mapnet.rows layout: its count of modulation elements

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def rows(self) -> int:
        """How many numbers the projection generates: one per weight, per L weights, or what
        a row/column layout counts."""
        if self.elements is not None:
            return self.elements
        return -(-self.numel // self.group_size)


@dataclass
class Selection:
    """The target's distinct parameters, sorted by what happens to them."""

    generated: list[ParamSpec]
    direct: list[ParamSpec]  # trained as ordinary parameters (config.train_directly)
    frozen: list[ParamSpec]  # requires_grad=False or excluded: left alone


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


def _prefixes(name: str) -> list[str]:
    """'a.b.weight' -> ['a', 'a.b', 'a.b.weight']: the modules that own a parameter, and itself."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _matches(names: Iterable[str], pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(prefix, pattern) for n in names for prefix in _prefixes(n))


def _owner_classes(model: nn.Module, name: str) -> set[str]:
    """The class names (its MRO's) of the module that owns parameter `name` directly."""
    owner = model.get_submodule(name.rpartition(".")[0])
    return {cls.__name__ for cls in type(owner).__mro__}


def _kind_matches(names: Iterable[str], pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(n.rpartition(".")[2], pattern) for n in names)


def _of_wanted_type(model: nn.Module, spec: ParamSpec, types: tuple[str, ...] | None) -> bool:
    if types is None:
        return True
    return any(_owner_classes(model, name) & set(types) for name in spec.names)


def _check_selectors(model: nn.Module, specs: list[ParamSpec], config: MappingConfig) -> None:
    """Every pattern, class name and parameter name pattern must match something."""
    for option in ("target_modules", "exclude_modules", "train_directly"):
        for pattern in getattr(config, option) or ():
            if not any(_matches(s.names, pattern) for s in specs):
                modules = [n for n, _ in model.named_modules() if n][:12]
                raise ValueError(
                    f"{option} pattern {pattern!r} matches no parameter of "
                    f"{type(model).__name__} (module names look like {modules})"
                )
    classes = set().union(*(_owner_classes(model, n) for s in specs for n in s.names))
    unknown = sorted(set(config.target_types or ()) - classes)
    if unknown:
        owners = sorted({type(model.get_submodule(s.layer)).__name__ for s in specs})
        raise ValueError(
            f"target_types {unknown} own no parameter of {type(model).__name__} (its parameters "
            f"belong to {owners[:12]})"
        )
    for pattern in config.parameter_names or ():
        if not any(_kind_matches(s.names, pattern) for s in specs):
            kinds = sorted({n.rpartition(".")[2] for s in specs for n in s.names})
            raise ValueError(
                f"parameter_names pattern {pattern!r} matches no parameter of "
                f"{type(model).__name__} (their names inside their modules: {kinds[:12]})"
            )


def select(model: nn.Module, config: MappingConfig) -> Selection:
    """Sort the model's parameters per the config's selection; a pattern matching none fails."""
    specs = parameter_specs(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    _check_selectors(model, specs, config)
    generated, direct, frozen = [], [], []
    for spec in specs:
        wanted = (
            (
                config.target_modules is None
                or any(_matches(spec.names, p) for p in config.target_modules)
            )
            and _of_wanted_type(model, spec, config.target_types)
            and (
                config.parameter_names is None
                or any(_kind_matches(spec.names, p) for p in config.parameter_names)
            )
        )
        excluded = any(_matches(spec.names, p) for p in config.exclude_modules)
        if not requires_grad[spec.name]:
            frozen.append(spec)
        elif any(_matches(spec.names, p) for p in config.train_directly):
            direct.append(spec)
        elif wanted and not excluded:
            generated.append(spec)
        else:
            frozen.append(spec)
    if not generated:
        raise ValueError(
            f"{type(model).__name__} has no parameters to generate (none selected, or all frozen)"
        )
    if config.target_fraction < 1:
        kept = last_fraction(generated, config.target_fraction)
        frozen += [s for s in generated if s not in kept]
        generated = kept
    non_float = [s.name for s in generated if not s.dtype.is_floating_point]
    if non_float:
        raise TypeError(f"only floating-point parameters can be generated: {non_float}")
    return Selection(generated, direct, frozen)


def last_fraction(specs: list[ParamSpec], fraction: float) -> list[ParamSpec]:
    """The trailing parameters (whole tensors) that hold at least `fraction` of the numbers: the
    layers nearest the output, where fine-tuning changes most (eq. 25's fraction f)."""
    wanted = fraction * sum(s.numel for s in specs)
    kept: list[ParamSpec] = []
    for spec in reversed(specs):
        if sum(s.numel for s in kept) >= wanted:
            break
        kept.insert(0, spec)
    return kept


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


def latent_groups(
    specs: list[ParamSpec],
    config: MappingConfig,
    count_elements: Callable[[LatentGroup], int] | None = None,
) -> list[LatentGroup]:
    """The latent groups the config asks for, validated against the generated parameters.
    `count_elements` gives a group's modulation elements where a layout decides them
    (mapnet.rows: row/column groups, groups within tensors)."""
    total = sum(s.numel for s in specs)
    if isinstance(config.group_size, int) and config.group_size > total:
        raise ValueError(
            f"group_size={config.group_size} is larger than the {total} selected parameters: "
            "one modulation element would scale them all (use a smaller group_size)"
        )
    groups = _groups(specs, config, total)
    for group in groups:
        if isinstance(config.group_size, int):
            group.group_size = config.group_size
        if count_elements is not None:
            group.elements = count_elements(group)
    wide = [
        f"{g.name or '<root>'} ({g.latent_dim} > {g.rows})" for g in groups if g.latent_dim > g.rows
    ]
    if wide:
        warnings.warn(
            "latent larger than the numbers it generates (the surplus latent numbers add no "
            f"freedom): {', '.join(wide)}",
            stacklevel=3,
        )
    return groups


def _groups(specs: list[ParamSpec], config: MappingConfig, total: int) -> list[LatentGroup]:
    if config.strategy == "single":
        d = config.latent_dim
        assert isinstance(d, int)
        if d >= total:
            raise ValueError(
                f"latent_dim={d} is not smaller than the {total} generated parameters: the "
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
                f"latent_dim dict must name every generated layer exactly; "
                f"unknown: {unknown}, missing: {missing}; the layers are: {list(layers)}"
            )
        dims = [config.latent_dim[g.name] for g in groups]
    elif config.layer_split == "per_layer":
        dims = [config.latent_dim] * len(groups)
    else:
        dims = _split_budget(config.latent_dim, [g.numel for g in groups], config.layer_split)
    for group, dim in zip(groups, dims):
        group.latent_dim = dim
    return groups
