"""A MappedModule's state dict: what `state_dict()` holds and what `load_state_dict` takes.

    finish_state                     state_dict post-hook: a fine-tune state leaves out the
                                     frozen pretrained weights and the buffers still pretrained
                                     (the identity's digests stand for them), a tied tensor
                                     appears once, stored bases `base.<name>` are added
    check_and_take_state             load pre-hook: every name, shape and dtype and the identity
                                     are checked before anything changes; stored bases are
                                     taken (MappedModule._replace_bases)
    frozen_weights_are_not_missing   load post-hook: torch's missing keys, less the frozen
                                     weights a fine-tune state checks by digest

MappedModule registers these hooks on itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mapnet import identity
from mapnet.errors import CheckpointError

if TYPE_CHECKING:
    from mapnet.module import MappedModule

EXTRA_STATE = "_extra_state"
STORED_BASE = "base."


def frozen_aliases(module: MappedModule) -> list[str]:
    """State keys of the frozen parameters a fine-tune state checks by digest instead of holding."""
    if not module.frozen_by_digest:
        return []
    return [f"target.{alias}" for s in module.selection.frozen for alias in s.names]


def tied_aliases(module: MappedModule) -> dict[str, str]:
    """State keys of the second and later names of each tied parameter the target keeps (trained
    directly or frozen), each to the key of its first name."""
    sel = module.selection
    return {
        f"target.{alias}": f"target.{spec.name}"
        for spec in sel.direct + sel.frozen
        for alias in spec.names[1:]
    }


def expected_state(module: MappedModule) -> dict[str, torch.Tensor]:
    """What a state for `module` may hold (names to tensors), every buffer included, without
    copying anything."""
    module.__dict__["_expected_only"] = True
    try:
        state = dict(module.state_dict(keep_vars=True))
    finally:
        module.__dict__["_expected_only"] = False
    views = module._theta0_views()
    for name in module.stored_base_names:
        state[STORED_BASE + name] = views[name]
    return state


def finish_state(
    module: MappedModule, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """state_dict post-hook. A fine-tune state holds neither the frozen pretrained weights nor
    the buffers still at their pretrained values (the identity's digests stand for them);
    stored bases are added. A tied parameter appears once, under its first name: safetensors
    refuses tensors that share storage, and tools write `state_dict()` to it as it is (HF
    Trainer's save of a model that is not a PreTrainedModel); loading fills the other names."""
    for key in frozen_aliases(module):
        state.pop(prefix + key, None)
    if module.__dict__.get("_expected_only"):  # validation: every buffer, no stored bases
        return
    for key in tied_aliases(module):
        state.pop(prefix + key, None)
    for name, pretrained in module._pretrained_buffers.items():
        key = prefix + "target." + name
        value = state.get(key)
        if (
            isinstance(value, torch.Tensor)
            and value.shape == pretrained.shape
            and torch.equal(value.detach(), pretrained.to(value))  # any dtype the module has now
        ):
            del state[key]
    views = module._theta0_views()
    for name in module.stored_base_names:
        state[prefix + STORED_BASE + name] = views[name].detach().clone()


def check_and_take_state(
    module: MappedModule,
    state: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Validate every name, shape and dtype and the identity before anything is changed, then
    take the stored bases out of the state (the rest is loaded by torch as usual).

    torch hands every pre-hook strict=True and applies `strict` itself after loading, so the
    real setting comes from MappedModule.load_state_dict; loaded as part of a parent module, only
    the keys present are checked here and torch reports missing ones as for any module."""
    strict = module.__dict__.get("_strict_load", False)
    module.__dict__["_load_prefix"] = prefix
    where = f"state dict for MappedModule{f' at {prefix!r}' if prefix else ''}"
    key = prefix + EXTRA_STATE
    if key not in state:
        raise CheckpointError(
            f"{where} lacks {key!r}, mapnet's identity: it was not saved from a MappedModule "
            "(mapnet ≥ 0.2); format 1 checkpoint folders load through mapnet.load"
        )
    saved = identity.decode(state[key], where)
    differing = identity.compare(saved, module._identity, where)
    if "buffers" in saved:  # a fine-tune state omitted the buffers still pretrained: restore
        for name, pretrained in module._pretrained_buffers.items():
            state.setdefault(prefix + "target." + name, pretrained)
    for alias, name in tied_aliases(module).items():  # a state holds a tied tensor once
        if prefix + name in state:
            state.setdefault(prefix + alias, state[prefix + name])
    expected = expected_state(module)
    given = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    problems = []
    for name, own in expected.items():
        if name == EXTRA_STATE:
            continue
        value = given.get(name)
        if value is None:
            needed = name.startswith(STORED_BASE) and name[len(STORED_BASE) :] in differing
            if strict or needed:
                problems.append(f"missing {prefix + name!r}")
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{prefix + name!r} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != tuple(own.shape):
            problems.append(
                f"{prefix + name!r} has shape {tuple(value.shape)}, expected {tuple(own.shape)}"
            )
        elif value.dtype != own.dtype and not (
            value.dtype.is_floating_point and own.dtype.is_floating_point
        ):
            problems.append(f"{prefix + name!r} has dtype {value.dtype}, expected {own.dtype}")
    if strict:  # a fine-tune state of mapnet 0.2.0 still holds the frozen weights: allowed
        optional = set(frozen_aliases(module)) if "frozen" not in saved else set()
        unexpected = sorted(set(given) - set(expected) - optional)
        problems += [f"unexpected {prefix + n!r}" for n in unexpected]
    if differing:  # θ₀ is about to be replaced: only together with everything else of ours
        absent = [
            prefix + n
            for n in expected
            if n != EXTRA_STATE and not n.startswith(STORED_BASE) and n not in given
        ]
        if absent:
            problems.append(
                f"it replaces the base (θ₀) of {differing[:3]} but lacks {absent[:5]}: a partial "
                "state for other base weights cannot be loaded consistently"
            )
    if problems:
        raise CheckpointError(f"{where} does not fit (nothing was loaded): " + "; ".join(problems))
    stored = {
        n: given[STORED_BASE + n] for n in module.stored_base_names if STORED_BASE + n in given
    }
    latents = [given.get(f"latents.{i}") for i in range(len(module.latents))]
    if any(z is not None and not torch.isfinite(z).all() for z in latents):
        raise CheckpointError(f"{where} holds non-finite latent values (nothing was loaded)")
    module._replace_bases(stored, {n: saved["bases"][n] for n in differing})
    for name in stored:
        state.pop(prefix + STORED_BASE + name)


def frozen_weights_are_not_missing(module: MappedModule, incompatible: Any) -> None:
    """torch reports every parameter absent from a state as missing; the frozen pretrained
    weights of a fine-tune state were checked by digest in `check_and_take_state`."""
    prefix = module.__dict__.get("_load_prefix", "")
    frozen = {prefix + key for key in frozen_aliases(module)}
    if frozen:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]
