"""A MappedModule's state dict: what `state_dict()` holds and what `load_state_dict` takes.

    finish_state                     state_dict post-hook: a fine-tune state leaves out the
                                     frozen pretrained weights and the buffers still pretrained
                                     (the identity's digests stand for them), a tied tensor
                                     appears once, stored bases `base.<name>` are added
    check_state                      every name, shape, dtype, the identity and finiteness,
                                     checked before anything changes (mapnet.load_state_dict
                                     runs it for every MappedModule of a tree first)
    check_and_take_state             load pre-hook: check_state, then the stored bases are
                                     taken (MappedModule._replace_bases)
    frozen_weights_are_not_missing   load post-hook: torch's missing keys, less the frozen
                                     weights a fine-tune state checks by digest

MappedModule registers these hooks on itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mapnet import identity
from mapnet.errors import CheckpointError

EXTRA_STATE = "_extra_state"
STORED_BASE = "base."
# In a fine-tune state's identity: the pretrained buffers it holds (those that moved in training).
BUFFERS_HELD = "buffers_held"


def frozen_aliases(module: nn.Module) -> list[str]:
    """State keys of the frozen parameters a fine-tune state checks by digest instead of holding."""
    if not module.frozen_by_digest:
        return []
    return [f"target.{alias}" for s in module.selection.frozen for alias in s.names]


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """State keys of the second and later names of each tied parameter the target keeps (trained
    directly or frozen), each to the key of its first name."""
    sel = module.selection
    return {
        f"target.{alias}": f"target.{spec.name}"
        for spec in sel.direct + sel.frozen
        for alias in spec.names[1:]
    }


def expected_state(module: nn.Module) -> dict[str, torch.Tensor]:
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
    module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """state_dict post-hook. A fine-tune state holds neither the frozen pretrained weights nor
    the buffers still at their pretrained values (the identity's digests stand for them);
    stored bases are added, and its identity lists the pretrained buffers it holds (BUFFERS_HELD).
    A tied parameter appears once, under its first name: safetensors
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
    if module._pretrained_buffers:  # so that loading tells a left-out buffer from a lost one
        held = [n for n in module._pretrained_buffers if prefix + "target." + n in state]
        state[prefix + EXTRA_STATE] = identity.encode(module._identity | {BUFFERS_HELD: held})
    views = module._theta0_views()
    for name in module.stored_base_names:
        state[prefix + STORED_BASE + name] = views[name].detach().clone()


@dataclass(frozen=True)
class CheckedState:
    """What loading a checked state adds to it (`fill`: the pretrained buffers a fine-tune
    state left out, the second names of tied tensors) and the stored bases it takes, with the
    saved digests of those that differ from the module's (`digests`)."""

    fill: dict[str, torch.Tensor] = field(default_factory=dict)
    stored: dict[str, torch.Tensor] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


def finite_keys(module: nn.Module) -> list[str]:
    """State keys whose values must be finite: the latents, the parameters trained directly,
    and the target's floating buffers that were finite when it was wrapped (a buffer holding
    inf by design, such as an attention mask, may keep it)."""
    keys = [f"latents.{i}" for i in range(len(module.latents))]
    keys += [f"target.{alias}" for spec in module.selection.direct for alias in spec.names]
    return keys + [f"target.{name}" for name in module._finite_buffers]


def nonfinite_keys(module: nn.Module, state: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The keys of `state` among `finite_keys(module)` whose tensors hold NaN or inf."""
    bad = []
    for key in finite_keys(module):
        value = state.get(prefix + key)
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not torch.isfinite(value).all()
        ):
            bad.append(prefix + key)
    return bad


def _buffers_held(saved: dict[str, Any], where: str) -> set[str] | None:
    """The buffers a fine-tune state was saved holding (None: saved before states said so)."""
    held = saved.get(BUFFERS_HELD)
    if held is None:
        return None
    if not isinstance(held, list) or not all(isinstance(name, str) for name in held):
        raise CheckpointError(f"{where}: the identity's {BUFFERS_HELD!r} is not a list of names")
    return set(held)


def check_state(
    module: nn.Module, state: Mapping[str, Any], prefix: str = "", strict: bool = True
) -> CheckedState:
    """Check `state` (keys under `prefix`) against `module` in full and change nothing: the
    identity, every name, shape and dtype, finiteness (`finite_keys`), and, with `strict`,
    every missing and unexpected key. Raises CheckpointError naming every problem."""
    where = f"state dict for MappedModule{f' at {prefix!r}' if prefix else ''}"
    key = prefix + EXTRA_STATE
    if key not in state:
        raise CheckpointError(
            f"{where} lacks {key!r}, mapnet's identity: it was not saved from a MappedModule "
            "(mapnet ≥ 0.2); format 1 checkpoint folders load through mapnet.load"
        )
    saved = identity.decode(state[key], where)
    differing = identity.compare(saved, module._identity, where)
    fill: dict[str, torch.Tensor] = {}
    held_but_absent = set()
    if "buffers" in saved:  # a fine-tune state omits the buffers still pretrained: restore them
        held = _buffers_held(saved, where)
        for name, pretrained in module._pretrained_buffers.items():
            if prefix + "target." + name in state:
                continue
            if held is not None and name in held:  # it had moved: the pretrained value is wrong
                held_but_absent.add("target." + name)
            else:
                fill[prefix + "target." + name] = pretrained
    for alias, name in tied_aliases(module).items():  # a state holds a tied tensor once
        if prefix + name in state and prefix + alias not in state:
            fill[prefix + alias] = state[prefix + name]
    expected = expected_state(module)
    given = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    given |= {k[len(prefix) :]: v for k, v in fill.items()}
    problems = []
    for name, own in expected.items():
        if name == EXTRA_STATE:
            continue
        value = given.get(name)
        if value is None:
            needed = name.startswith(STORED_BASE) and name[len(STORED_BASE) :] in differing
            if strict or needed:
                why = " (the state was saved holding it)" if name in held_but_absent else ""
                problems.append(f"missing {prefix + name!r}{why}")
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
    nonfinite = nonfinite_keys(module, given)
    if nonfinite:
        problems.append(f"non-finite values (NaN/inf) in {[prefix + k for k in nonfinite[:5]]}")
    if problems:
        raise CheckpointError(f"{where} does not fit (nothing was loaded): " + "; ".join(problems))
    stored = {
        n: given[STORED_BASE + n] for n in module.stored_base_names if STORED_BASE + n in given
    }
    return CheckedState(fill, stored, {n: saved["bases"][n] for n in differing})


def check_and_take_state(
    module: nn.Module,
    state: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """load_state_dict pre-hook: `check_state`, then fill in what the state leaves out and take
    the stored bases out of it (the rest is loaded by torch as usual).

    torch hands every pre-hook strict=True and applies `strict` itself after loading, so the
    real setting comes from MappedModule.load_state_dict (or mapnet.load_state_dict); loaded
    as part of a parent module otherwise, only the keys present are checked here and torch
    reports missing ones as for any module."""
    strict = module.__dict__.get("_strict_load", False)
    module.__dict__["_load_prefix"] = prefix
    checked = check_state(module, state, prefix, strict)
    for key, value in checked.fill.items():
        state.setdefault(key, value)
    module._replace_bases(checked.stored, checked.digests)
    for name in checked.stored:
        state.pop(prefix + STORED_BASE + name)


def frozen_weights_are_not_missing(module: nn.Module, incompatible: Any) -> None:
    """torch reports every parameter absent from a state as missing; the frozen pretrained
    weights of a fine-tune state were checked by digest in `check_and_take_state`."""
    prefix = module.__dict__.get("_load_prefix", "")
    frozen = {prefix + key for key in frozen_aliases(module)}
    if frozen:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]
