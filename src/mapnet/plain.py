"""`MappedModule.materialize()`: the plain module of the target's class holding the generated
weights, with nothing of the mapping left (no placeholders, hooks or factor buffers)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mapnet import rows


def resolve(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module owning the dotted `name`, and the attribute's name in it."""
    owner, _, attr = name.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


def distinct_slots(module: nn.Module, names: list[str]) -> list[str]:
    """`names` less those naming an attribute of a module already named (a module reused
    under two names)."""
    seen: set[tuple[int, str]] = set()
    kept = []
    for name in names:
        owner, attr = resolve(module, name)
        if (id(owner), attr) not in seen:
            seen.add((id(owner), attr))
            kept.append(name)
    return kept


def materialized(mapped: nn.Module, weights: dict[str, torch.Tensor] | None) -> nn.Module:
    """See MappedModule.materialize."""
    with torch.no_grad():
        generated = mapped.generate() if weights is None else weights
    missing = sorted(spec.name for spec in mapped.specs if spec.name not in generated)
    if missing:
        raise ValueError(f"materialize(weights) lacks generated parameter(s) {missing[:5]}")
    for spec in mapped.specs:
        if tuple(generated[spec.name].shape) != spec.shape:
            raise ValueError(
                f"materialize(weights): {spec.name!r} has shape "
                f"{tuple(generated[spec.name].shape)}, the parameter {spec.shape}"
            )
    memo: dict[int, Any] = {}
    for spec in mapped.specs:
        param = nn.Parameter(generated[spec.name].detach().clone())
        owner, attr = resolve(mapped.target, spec.name)
        memo[id(owner._buffers[attr])] = param  # placeholders become the generated weights
    plain = copy.deepcopy(mapped.target, memo)
    rows.uninstall(plain)  # the activation path's hooks and factor buffers
    for spec in mapped.specs:
        for alias in spec.names:
            owner, attr = resolve(plain, alias)
            if attr in owner._buffers:  # not yet moved (a module reused under two names)
                param = owner._buffers.pop(attr)
                owner._non_persistent_buffers_set.discard(attr)
                owner.register_parameter(attr, param)
    for name, module in plain.named_modules():  # the target's own parameter order
        order = mapped._parameter_order.get(name, [])
        rank = {attr: i for i, attr in enumerate(order)}
        items = sorted(module._parameters.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        module._parameters = dict(items)
    for name in mapped._excluded:  # frozen by the mapping, not by the model
        plain.get_parameter(name).requires_grad_(True)
    return plain
