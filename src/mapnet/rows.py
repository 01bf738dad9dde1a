"""Row- and column-aligned modulation (§2.2.6, eq. 25 with one element per row or column) and
its activation path.

θ = θ_pre ⊙ (1 + m_⌈j/L⌉) with the groups aligned to a weight's rows: when one element m_r scales
a whole output row r of a Linear (an output channel of a conv),

    y = θ x + b = (1 + m) ⊙ (θ_pre x + b)          (the bias shares its row's element)

is the same function computed on activations: the target runs with θ_pre untouched and a
forward hook scales the output, so ∂L/∂m = Σ_batch dy ⊙ (θ_pre x + b). No θ is formed and no
dθ = Σ dyᵀx: a step costs the frozen network's forward and backward plus one elementwise
product per layer. Columns scale the input instead, y = θ_pre (x ⊙ (1 + m)) + b. An Embedding's
row is one token's vector, scaled through the input ids; its columns are the embedding
dimensions. transformers' Conv1D (GPT-2's projections, y = x θ + b with θ stored (in, out)) is a
Linear stored transposed: its rows are θ's columns, and its columns θ's rows.

A layout lists, per latent group and in generation order, units: a run of elements and the
tensors they scale (`Piece`), either on the activation path (`Unit.modules`, the modules whose
output or input is scaled, by a hook reading the non-persistent buffer `SCALE` that the forward
fills through functional_call) or on the weight path (θ = θ_pre ⊙ (1 + m) expanded along the
piece's axis and handed to the module). Numeric L groups kept inside each tensor
(`groups_within_tensors`) are weight-path units too.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from mapnet.config import ACTIVATIONS, MappingConfig
from mapnet.generator import pre_activation, scale_by_groups
from mapnet.projections import Projection
from mapnet.targets import LatentGroup, ParamSpec, Selection, select

# The buffer each activation-path module reads its factors 1 + m from (ones when no forward has
# filled it: the module then computes with whatever weight it is given, e.g. generate()'s).
SCALE = "_mapnet_scale"
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Piece:
    """One tensor a unit scales: along dim 0 ("rows"), dim 1 ("columns"; `size` = a grouped
    conv's groups) or by runs of L consecutive entries ("blocks"; `size` = L)."""

    name: str  # canonical parameter name
    axis: str
    size: int = 1


@dataclass(frozen=True)
class Unit:
    """A run of modulation elements and what they scale. `modules` (the owners of a weight, two
    or more when it is tied) run on the activation path; none: the pieces' weights are
    generated (the weight path)."""

    elements: int
    pieces: tuple[Piece, ...]
    modules: tuple[str, ...] = ()
    bias_shared: bool = False  # "row": the module's bias is the second piece


Layout = list[Unit]


def has_layout(config: MappingConfig) -> bool:
    """Whether the config's groups follow a layout (row/column, or L inside each tensor)."""
    if config.update != "multiplicative":
        return False
    # L = 1 groups one weight: inside its tensor already (the fused generator serves it).
    return isinstance(config.group_size, str) or (
        config.groups_within_tensors and config.group_size > 1
    )


def _transposed_linear_class() -> type | None:
    """transformers' Conv1D, if transformers is imported (a model holding one has imported it;
    mapnet never imports transformers itself)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def activation_family(module: nn.Module) -> str | None:
    """ "linear", "conv", "embedding" or "transposed-linear" (transformers' Conv1D) when
    `module` computes exactly what that class does, so that scaling its output or input is
    exact; None otherwise (the weight path)."""
    kind = type(module)
    if isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward:
        return "linear"
    transposed = _transposed_linear_class()
    if transposed is not None and kind is transposed:
        return "transposed-linear"
    for base in CONVS:
        if (
            isinstance(module, base)
            and kind.forward is base.forward
            and kind._conv_forward is base._conv_forward
        ):
            return "conv"
    if (
        isinstance(module, nn.Embedding)
        and kind.forward is nn.Embedding.forward
        and module.max_norm is None  # max_norm renormalises θ itself, in place
    ):
        return "embedding"
    return None


def _elements(module: nn.Module, family: str, mode: str) -> int:
    if family == "linear":
        return module.out_features if mode == "row" else module.in_features
    if family == "transposed-linear":  # θ (in, out)
        return module.weight.shape[1] if mode == "row" else module.weight.shape[0]
    if family == "conv":
        return module.out_channels if mode == "row" else module.in_channels
    return module.num_embeddings if mode == "row" else module.embedding_dim


def _split(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def _reads_children_directly(model: nn.Module, owner: str) -> bool:
    """nn.MultiheadAttention passes out_proj.weight to its functional form: out_proj's own
    forward (and a hook on it) never runs."""
    if not owner:
        return False
    parent = model.get_submodule(_split(owner)[0])
    return isinstance(parent, nn.MultiheadAttention)


def _activation_unit(
    model: nn.Module, spec: ParamSpec, mode: str, by_name: Mapping[str, ParamSpec]
) -> Unit | None:
    owners: list[tuple[str, nn.Module, str]] = []
    for alias in spec.names:
        owner, attr = _split(alias)
        module = model.get_submodule(owner)
        family = activation_family(module)
        if attr != "weight" or family is None or _reads_children_directly(model, owner):
            return None
        owners.append((owner, module, family))
    counts = {_elements(module, family, mode) for _, module, family in owners}
    groups = {getattr(module, "groups", 1) for _, module, _ in owners}
    if len(counts) != 1 or (mode == "column" and len(owners) > 1 and groups != {1}):
        return None
    (count,) = counts
    transposed = {family == "transposed-linear" for _, _, family in owners}
    if len(transposed) != 1:  # tied to a module stored the other way round
        return None
    if mode == "column":
        axis = "rows" if transposed == {True} else "columns"
        pieces = [Piece(spec.name, axis, groups.pop() if len(owners) == 1 else 1)]
    else:
        pieces = [Piece(spec.name, "columns" if transposed == {True} else "rows")]
    bias_shared = False
    if mode == "row" and len(owners) == 1:
        owner = owners[0][0]
        bias = by_name.get(f"{owner}.bias" if owner else "bias")
        if bias is not None and len(bias.names) == 1:
            pieces.append(Piece(bias.name, "rows"))
            bias_shared = True
    # A module reused under two names is one module: one name, else functional_call would
    # restore its factors buffer to the other name's swapped-in tensor.
    distinct: dict[int, str] = {}
    for owner, module, _ in owners:
        distinct.setdefault(id(module), owner)
    return Unit(count, tuple(pieces), tuple(distinct.values()), bias_shared)


def _weight_path_unit(spec: ParamSpec, mode: str) -> Unit:
    """One element per slice along dim 0 ("row") or dim 1 ("column", ≥ 2-d tensors); per entry
    for 1-d tensors, one for a scalar."""
    shape = spec.shape
    if mode == "column" and len(shape) >= 2:
        return Unit(shape[1], (Piece(spec.name, "columns"),))
    return Unit(shape[0] if shape else 1, (Piece(spec.name, "rows"),))


def build_layout(model: nn.Module, group: LatentGroup, config: MappingConfig) -> Layout:
    """The group's units in generation order (its specs' order; a shared bias goes with its
    weight's unit)."""
    mode = config.group_size
    if isinstance(mode, int):  # groups_within_tensors: ⌈P_t/L⌉ elements per tensor
        return [Unit(-(-s.numel // mode), (Piece(s.name, "blocks", mode),)) for s in group.specs]
    by_name = {s.name: s for s in group.specs}
    activation = {}
    for spec in group.specs:
        unit = _activation_unit(model, spec, mode, by_name)
        if unit is not None:
            activation[spec.name] = unit
    shared = {piece.name for unit in activation.values() for piece in unit.pieces[1:]}
    units = []
    for spec in group.specs:
        if spec.name in activation:
            units.append(activation[spec.name])
        elif spec.name not in shared:
            units.append(_weight_path_unit(spec, mode))
    return units


def count_elements(model: nn.Module, config: MappingConfig, group: LatentGroup) -> int:
    return sum(unit.elements for unit in build_layout(model, group, config))


def column_biases(model: nn.Module, generated: Sequence[ParamSpec]) -> list[ParamSpec]:
    """With "column", the biases of the activation-path modules: not modulated (a column scales
    the input, which a bias never sees), so they stay frozen."""
    out = []
    for spec in generated:
        owner, attr = _split(spec.name)
        if attr == "bias" and len(spec.names) == 1:
            module = model.get_submodule(owner)
            if activation_family(module) in ("linear", "conv", "transposed-linear"):
                out.append(spec)
    return out


def selection(model: nn.Module, config: MappingConfig) -> Selection:
    """`targets.select`, and with "column" the activation-path biases moved to the frozen."""
    chosen = select(model, config)
    if config.group_size != "column" or config.update != "multiplicative":
        return chosen
    biases = column_biases(model, chosen.generated)
    generated = [spec for spec in chosen.generated if spec not in biases]
    if not generated:
        raise ValueError(
            f"group_size='column' leaves biases unmodulated, and {type(model).__name__} has no "
            "other selected parameter to generate"
        )
    return Selection(generated, chosen.direct, chosen.frozen + biases)


def held_names(layouts: Sequence[Layout]) -> set[str]:
    """The tensors on the activation path: θ_pre stays in the target as it is."""
    return {p.name for layout in layouts for unit in layout if unit.modules for p in unit.pieces}


# ------------------------------------------------------------------------------------ the math


def factors(z: torch.Tensor, projection: Projection, alpha: float, activation: str) -> torch.Tensor:
    """1 + m (M,), m = σ(W(z + α z⊙z)) (eq. 25), of ordinary differentiable operations (M, the
    number of rows or columns, is small: the projection's fused pass is not needed)."""
    return 1 + ACTIVATIONS[activation](pre_activation(z, projection, None, alpha))


def expand(theta0: torch.Tensor, factors: torch.Tensor, piece: Piece) -> torch.Tensor:
    """θ = θ_pre ⊙ factors spread over the piece's axis (the weight path)."""
    if piece.axis == "blocks":
        return scale_by_groups(theta0.reshape(-1), factors, piece.size).view(theta0.shape)
    if theta0.dim() == 0:
        return theta0 * factors.reshape(())
    trailing = (1,) * (theta0.dim() - 2)
    if piece.axis == "rows":
        return theta0 * factors.view(-1, *(1,) * (theta0.dim() - 1))
    if piece.size > 1:  # grouped conv: input channel c feeds only its group's outputs
        out, per_group = theta0.shape[:2]
        groups = piece.size
        spread = factors.view(groups, 1, per_group).expand(groups, out // groups, per_group)
        return theta0 * spread.reshape(out, per_group, *trailing)
    return theta0 * factors.view(1, -1, *trailing)


def _units(layout: Layout, factors: torch.Tensor) -> Iterator[tuple[Unit, torch.Tensor]]:
    return zip(layout, factors.split([unit.elements for unit in layout]))


def weights(
    layout: Layout, factors: torch.Tensor, theta0: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every tensor of the layout on the weight path, θ_pre ⊙ (1 + m), by canonical name."""
    return {
        piece.name: expand(theta0[piece.name], part, piece)
        for unit, part in _units(layout, factors)
        for piece in unit.pieces
    }


def forward_tensors(
    layout: Layout,
    factors: torch.Tensor,
    theta0: Mapping[str, torch.Tensor],
    specs: Mapping[str, tuple[list[str], torch.dtype]],
) -> dict[str, torch.Tensor]:
    """What the target's forward takes (names for functional_call): the factors of every
    activation-path module (in its weight's dtype), θ_pre of those whose θ₀ is kept flat
    (`theta0` holds them: their slot in the target is only a placeholder), and the generated
    weight-path tensors."""
    out = {}
    for unit, part in _units(layout, factors):
        if unit.modules:
            dtype = specs[unit.pieces[0].name][1]
            for module in unit.modules:
                out[f"{module}.{SCALE}" if module else SCALE] = part.to(dtype)
            for piece in unit.pieces:
                if piece.name in theta0:
                    names, dtype = specs[piece.name]
                    out.update(dict.fromkeys(names, theta0[piece.name].to(dtype)))
            continue
        for piece in unit.pieces:
            names, dtype = specs[piece.name]
            tensor = expand(theta0[piece.name], part, piece).to(dtype)
            out.update(dict.fromkeys(names, tensor))
    return out


# ------------------------------------------------------------------------------------ hooks


def _spatial(module: nn.Module) -> int:
    return len(module.kernel_size) if isinstance(module, CONVS) else 0


def _scale_output(
    module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, *, bias_shared: bool
) -> torch.Tensor:
    trailing = (1,) * _spatial(module)
    scale = getattr(module, SCALE).view(-1, *trailing)  # (C, 1, …) against (N, C, …) or (…, C)
    if bias_shared or module.bias is None:
        return output * scale
    # The bias is not this row's to scale: (θ_pre x + b)(1 + m) + b(1 - (1 + m)).
    return output * scale + module.bias.view(-1, *trailing) * (1 - scale)


def _scale_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    scale = getattr(module, SCALE).view(-1, *(1,) * _spatial(module))
    if args:
        return (args[0] * scale, *args[1:]), kwargs
    return args, {**kwargs, "input": kwargs["input"] * scale}


def _scale_embedding(
    module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, *, per_token: bool
) -> torch.Tensor:
    ids = args[0] if args else kwargs["input"]
    scale = getattr(module, SCALE)
    scale = scale[ids].unsqueeze(-1) if per_token else scale  # (…, 1) or (D,)
    scaled = output * scale
    if module.padding_idx is None:
        return scaled
    # The padding row gets no gradient (F.embedding's rule for θ): neither does its factor.
    padding = (ids == module.padding_idx).unsqueeze(-1)
    return torch.where(padding, output * scale.detach(), scaled)


HOOKS = (_scale_output, _scale_input, _scale_embedding)


def install(target: nn.Module, layouts: Sequence[Layout], mode: str) -> None:
    """Give every activation-path module its factors buffer (ones) and its hook."""
    done: set[int] = set()
    for unit in (unit for layout in layouts for unit in layout if unit.modules):
        for name in unit.modules:
            module = target.get_submodule(name)
            if id(module) in done:
                continue
            done.add(id(module))
            ones = torch.ones((), dtype=module.weight.dtype, device=module.weight.device)
            module.register_buffer(SCALE, ones.expand(unit.elements), persistent=False)
            family = activation_family(module)
            if family == "embedding":
                hook = functools.partial(_scale_embedding, per_token=mode == "row")
                module.register_forward_hook(hook, with_kwargs=True)
            elif mode == "row":
                hook = functools.partial(_scale_output, bias_shared=unit.bias_shared)
                module.register_forward_hook(hook, with_kwargs=True)
            else:
                module.register_forward_pre_hook(_scale_input, with_kwargs=True)


def _func(hook: Callable[..., Any]) -> Callable[..., Any]:
    return hook.func if isinstance(hook, functools.partial) else hook


def _remove_hooks(
    model: nn.Module, chosen: Callable[[Callable[..., Any]], bool], recurse: bool = True
) -> None:
    for module in model.modules() if recurse else (model,):
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [key for key, hook in hooks.items() if chosen(hook)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)


def uninstall(model: nn.Module) -> None:
    """Remove the hooks and factor buffers `install` added (from a copy of the target)."""
    _remove_hooks(model, lambda hook: _func(hook) in (*HOOKS, _record))
    for module in model.modules():
        if SCALE in module._buffers:
            del module._buffers[SCALE]
            module._non_persistent_buffers_set.discard(SCALE)


def scale_buffer_names(layouts: Sequence[Layout]) -> list[str]:
    """The factors buffers, relative to the target."""
    names = {m for layout in layouts for unit in layout for m in unit.modules}
    return sorted(f"{m}.{SCALE}" if m else SCALE for m in names)


# ------------------------------------------------------------------------------------ notices


def _listed(items: Sequence[str], limit: int = 10) -> str:
    more = f", … ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def warn_fallbacks(model: nn.Module, layouts: Sequence[Layout], mode: str) -> None:
    """One warning naming the modules whose selected tensors take the weight path."""
    owners: dict[str, str] = {}
    for unit in (u for layout in layouts for u in layout if not u.modules):
        for piece in unit.pieces:
            owner = _split(piece.name)[0]
            owners.setdefault(owner, type(model.get_submodule(owner)).__name__)
    if owners:
        named = [f"{name or '<root>'} ({kind})" for name, kind in owners.items()]
        warnings.warn(
            f"mapnet: group_size={mode!r}: {len(named)} module(s) fall back to the weight path "
            f"(their weights are generated every step): {_listed(named)}",
            stacklevel=4,
        )


def warn_normalised_rows(model: nn.Module, layouts: Sequence[Layout]) -> None:
    """A row-scaled Linear or conv whose next sibling is a BatchNorm or InstanceNorm of its
    width: in training mode the norm divides each channel's scale out, so its gradient is ~0."""
    pairs = []
    for unit in (u for layout in layouts for u in layout if u.modules):
        for name in unit.modules:
            module = model.get_submodule(name)
            if not name or activation_family(module) not in ("linear", "conv"):
                continue
            parent_name, attr = _split(name)
            siblings = list(model.get_submodule(parent_name)._modules.items())
            after = [m for key, m in siblings[[k for k, _ in siblings].index(attr) + 1 :]]
            following = next((m for m in after if m is not None), None)
            if (
                isinstance(following, (_BatchNorm, _InstanceNorm))
                and following.num_features == unit.elements
            ):
                norm = next(k for k, m in siblings if m is following)
                pairs.append(f"{name} -> {f'{parent_name}.' if parent_name else ''}{norm}")
    if pairs:
        warnings.warn(
            "mapnet: group_size='row' scales whole output channels that a BatchNorm/InstanceNorm "
            "right after normalises away: in training mode (batch statistics) their gradient is "
            f"~0: {_listed(pairs)}; use group_size='column' or exclude these layers",
            stacklevel=4,
        )


# ------------------------------------------------------------------------------ first forward


def attach(mapped: nn.Module) -> None:
    """Set up a row/column mapping's target: factor buffers and hooks, the fallback and
    BatchNorm warnings, and the first forward's check."""
    layouts, mode = mapped._layouts, mapped.mapping_config.group_size
    install(mapped.target, layouts, mode)
    warn_fallbacks(mapped.target, layouts, mode)
    if mode == "row":
        warn_normalised_rows(mapped.target, layouts)
    FirstForwardCheck([m for layout in layouts for unit in layout for m in unit.modules]).attach(
        mapped
    )


class FirstForwardCheck:
    """On the first eager forward, warn about activation-path modules that did not run: a
    parent that reads their weight directly (F.linear(x, self.fc.weight)) bypasses the hook, and
    their modulation would be lost silently. Hooks on the MappedModule, removed once checked."""

    def __init__(self, modules: Sequence[str]):
        self.modules = tuple(modules)
        self.ran: set[str] = set()

    def attach(self, mapped: nn.Module) -> None:
        if self.modules:
            mapped.register_forward_pre_hook(self.before)
            mapped.register_forward_hook(self.after)

    def before(self, mapped: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return
        for name in self.modules:
            recorder = functools.partial(_record, self.ran, name)
            mapped.target.get_submodule(name).register_forward_pre_hook(recorder)

    def after(self, mapped: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        _remove_hooks(mapped.target, lambda hook: _func(hook) is _record)
        _remove_hooks(mapped, lambda hook: getattr(hook, "__self__", None) is self, recurse=False)
        silent = [name for name in self.modules if name not in self.ran]
        if silent:
            warnings.warn(
                f"mapnet: {len(silent)} module(s) scaled on the activation path did not run in "
                f"the first forward: {_listed(silent)}. If a parent reads their weight directly "
                "(bypassing their forward), their modulation is lost: exclude them",
                stacklevel=2,
            )


def _record(ran: set[str], name: str, module: nn.Module, args: tuple) -> None:
    ran.add(name)
