"""Trees of modules holding MappedModules: DDP's exclusion list and a load that checks every
MappedModule inside before torch writes anything."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mapnet.errors import CheckpointError
from mapnet.module import MappedModule
from mapnet.state import check_state


def exclude_fixed_from_ddp(root: nn.Module) -> list[str]:
    """Tell DistributedDataParallel(root) to skip every fixed tensor of the MappedModules inside
    `root` (DDP reads the list from the module it wraps only, so a MappedModule's own list
    covers only DDP(mapped) itself). Call before wrapping: `exclude_fixed_from_ddp(net);
    DDP(net)`. Returns the names, relative to `root`."""
    names = set(getattr(root, "_ddp_params_and_buffers_to_ignore", ()))
    for prefix, module in root.named_modules():
        if isinstance(module, MappedModule):
            names.update(f"{prefix}.{n}" if prefix else n for n in module.fixed_tensor_names())
    root._ddp_params_and_buffers_to_ignore = sorted(names)
    return root._ddp_params_and_buffers_to_ignore


def load_state_dict(
    root: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
) -> Any:
    """`root.load_state_dict(state_dict, strict, assign)` with every check made before torch
    writes anything: each MappedModule inside `root` checks its part in full (as its own
    load_state_dict does), and the other modules their names and shapes. Without it, a
    MappedModule deep in a tree that refuses its part leaves the modules loaded before it
    changed. Raises CheckpointError naming every problem; returns torch's result."""
    mapped: list[tuple[str, MappedModule]] = []
    plain: dict[str, torch.Tensor | None] = {}
    _collect_state(root, "", mapped, plain)
    problems = []
    for prefix, module in mapped:
        try:
            check_state(module, state_dict, prefix, strict)
        except CheckpointError as error:
            problems.append(str(error))
    for key, own in plain.items():
        if key not in state_dict:
            problems += [f"missing {key!r}"] if strict else []
            continue
        value = state_dict[key]
        tensors = isinstance(own, torch.Tensor) and isinstance(value, torch.Tensor)
        if tensors and value.shape != own.shape:
            problems.append(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(own.shape)}")
    if strict:
        inside = tuple(prefix for prefix, _ in mapped)
        unexpected = [k for k in state_dict if k not in plain and not k.startswith(inside)]
        problems += [f"unexpected {key!r}" for key in sorted(unexpected)]
    if problems:
        raise CheckpointError(
            f"state dict for {type(root).__name__} does not fit (nothing was loaded): "
            + "; ".join(problems)
        )
    for _, module in mapped:  # the checks just made, again in each module's pre-hook
        module.__dict__["_strict_load"] = strict
    try:
        return root.load_state_dict(state_dict, strict=strict, assign=assign)
    finally:
        for _, module in mapped:
            module.__dict__["_strict_load"] = False


def _collect_state(
    module: nn.Module,
    prefix: str,
    mapped: list[tuple[str, MappedModule]],
    plain: dict[str, torch.Tensor | None],
) -> None:
    """The MappedModules of a tree by state-dict prefix, and every other module's own state
    entries (torch's names: parameters, persistent buffers, extra state as None)."""
    if isinstance(module, MappedModule):
        mapped.append((prefix, module))
        return
    for name, param in module._parameters.items():
        if param is not None:
            plain[prefix + name] = param
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            plain[prefix + name] = buffer
    if type(module).get_extra_state is not nn.Module.get_extra_state:
        plain[prefix + "_extra_state"] = None
    for name, child in module._modules.items():
        if child is not None:
            _collect_state(child, f"{prefix}{name}.", mapped, plain)
