"""The run state: what a killed run needs to continue as if it had never stopped, in one format
for every training mode of the experiments (`recipe.loop.Loop` writes and reads it).

    <run>/state/                committed whole by mapnet.files (a staging folder, one rename,
                                a lock), so a kill at any instant leaves the old or the new one
        state.json              the manifest: format and version, the run's config, the epoch
                                reached, the history so far, the optimiser's scalars, and the
                                size and sha256 of every other file
        tensors.safetensors     optimiser moments, RNG states, the mode's own tensors
        model/                  the model: a mapnet checkpoint, model.safetensors for any other
                                module, or whatever the mode writes there (a ModelSpace)

Reading checks before it parses: every file against its sha256, the format and version, the
config against the run's own, the epoch against the history and the run's length, and the
tensors for finiteness (a non-finite Adam moment is damage or divergence; resuming from it would
give a NaN model). Every failure is a CheckpointError naming the file and what is wrong.

Format 1 (mapnet 0.2: trainer.json and trainer.safetensors, no checksums) still reads, with
every check but the checksums.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import mapnet
from mapnet import CheckpointError, MappedModule, files
from mapnet_experiments.recipe.config import differing, stored_config

FORMAT = "mapnet-run-state"
VERSION = 2
MANIFEST = "state.json"
TENSORS = "tensors.safetensors"
MODEL = "model"
# Format 1: what mapnet 0.2 wrote (its `format` field was this number).
V1_DESCRIPTION = "trainer.json"
V1_TENSORS = "trainer.safetensors"
STATE = "state"
# What earlier versions left beside state/ while swapping it in (two renames, no manifest).
V1_LEFTOVERS = ("state.tmp", "state.old")


@dataclass
class Saved:
    """A run state as read back: the epoch reached and the figures of every epoch so far, the
    optimiser's state dict, the mode's tensors by name, and the folder holding the model."""

    epoch: int
    history: list[dict[str, Any]]
    optimizer: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    model: Path


def save_state(
    folder: Path,
    *,
    config: dict[str, Any],
    epoch: int,
    history: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    write_model: Callable[[Path], None],
) -> None:
    """Commit the state after `epoch` to `folder` (replacing the previous one in one step).
    `write_model(path)` writes the model into the folder `path`."""
    optimizer_tensors, optimizer_scalars = flatten_optimizer(optimizer.state_dict())
    own = {f"optimizer.{key}": value for key, value in optimizer_tensors.items()}
    clashing = sorted(set(own) & set(tensors))
    if clashing:
        raise ValueError(
            f"a mode's state tensors may not be named like the optimiser's: {clashing}"
        )
    fields = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": epoch,
        "history": history,
        "optimizer": optimizer_scalars,
        "config": config,
    }
    blob = save_safetensors({k: v.detach().contiguous() for k, v in (own | tensors).items()})
    with files.commit(folder, MANIFEST, fields) as staging:
        (staging / TENSORS).write_bytes(blob)
        write_model(staging / MODEL)


def load_state(folder: Path, *, config: dict[str, Any], epochs: int) -> Saved:
    """The state committed in `folder`, checked against the run's `config` (JSON form) and
    length in `epochs`."""
    if (folder / V1_DESCRIPTION).is_file() and not (folder / MANIFEST).exists():
        description, tensors = _read_v1(folder)
    else:
        verified = files.read_verified(folder, MANIFEST, what="a run state")
        description = verified.manifest
        if description.get("format") != FORMAT or description.get("version") != VERSION:
            raise CheckpointError(
                f"{folder / MANIFEST} is not a {FORMAT} of version {VERSION} (format "
                f"{description.get('format')!r}, version {description.get('version')!r})"
            )
        tensors = _tensors(folder / TENSORS, verified.contents[TENSORS])
    where = folder / (MANIFEST if (folder / MANIFEST).exists() else V1_DESCRIPTION)
    recorded = description.get("config")
    if description.get("version") is None and isinstance(recorded, dict):
        recorded = stored_config(recorded)  # format 1: a config from before fields were added
    _check_config(where, recorded, config)
    epoch, history = _position(where, description, epochs)
    _check_finite(folder, tensors)
    scalars = description.get("optimizer")
    if not isinstance(scalars, dict) or not isinstance(scalars.get("param_groups"), list):
        raise CheckpointError(f"{where}: the optimiser's settings are missing or malformed")
    optimizer_tensors = {
        key.removeprefix("optimizer."): value
        for key, value in tensors.items()
        if key.startswith("optimizer.")
    }
    own = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    try:
        optimizer = unflatten_optimizer(optimizer_tensors, scalars)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: the optimiser's state is malformed ({error})") from None
    return Saved(epoch, history, optimizer, own, folder / MODEL)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], where: Path) -> None:
    """Load a saved optimiser state, naming the state folder when it does not fit."""
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{where}: the optimiser's state does not fit ({error})") from None


def take(tensors: dict[str, torch.Tensor], key: str, where: Path) -> torch.Tensor:
    """One of a state's tensors, or a CheckpointError naming it."""
    if key not in tensors:
        raise CheckpointError(f"{where}: the run state lacks the tensor {key!r}")
    return tensors[key]


def _read_v1(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    description = files.read_manifest(folder, V1_DESCRIPTION, "a run state")
    if description.get("format") != 1:
        raise CheckpointError(
            f"{folder / V1_DESCRIPTION}: unknown run-state format {description.get('format')!r}"
        )
    file = folder / V1_TENSORS
    try:
        blob = file.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{file} cannot be read: {error}") from None
    return description, _tensors(file, blob)  # its tensor names are today's


def _tensors(file: Path, blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(blob)
    except SafetensorError as error:
        raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from None


def _check_config(where: Path, saved: Any, wanted: dict[str, Any]) -> None:
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} records no config: it cannot be matched to this run")
    if saved != wanted:
        raise CheckpointError(
            f"{where} was saved by a run with another config (fields "
            f"{differing(saved, wanted)}): it is not this run's state"
        )


def _position(
    where: Path, description: dict[str, Any], epochs: int
) -> tuple[int, list[dict[str, Any]]]:
    epoch, history = description.get("epoch"), description.get("history")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise CheckpointError(f"{where}: epoch is {epoch!r}, not a whole number")
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        raise CheckpointError(f"{where}: history is not a list of epoch records")
    if not 1 <= epoch <= epochs or epoch != len(history):
        raise CheckpointError(
            f"{where}: epoch {epoch} does not fit a run of {epochs} epoch(s) whose state holds "
            f"{len(history)} epoch record(s) (edited?)"
        )
    return epoch, history


def _check_finite(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(
                f"{folder}: the run state's tensor {key!r} holds non-finite values (damaged, or "
                "saved from a diverged run): it cannot be resumed"
            )


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimiser state as safetensors-ready tensors plus JSON-ready scalars (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of flatten_optimizer."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_model(module: nn.Module, folder: Path) -> None:
    """A mapped model as a mapnet checkpoint; any other module (plain, an ablation variant, a
    compressed model: their state dicts hold a mapped model's identity) as
    folder/model.safetensors, committed with its checksum."""
    if isinstance(module, MappedModule):
        mapnet.save(module, folder)
        return
    blob = save_safetensors(module.state_dict())
    with files.commit(folder, PLAIN_MANIFEST, {"format": PLAIN_FORMAT}) as staging:
        (staging / PLAIN_TENSORS).write_bytes(blob)


PLAIN_FORMAT = "mapnet-plain-model"
PLAIN_MANIFEST = "manifest.json"
PLAIN_TENSORS = "model.safetensors"


def load_model(module: nn.Module, folder: Path) -> None:
    """The inverse of save_model: every mismatch is a CheckpointError naming the folder. A plain
    model written before checksums (model.safetensors alone) still loads."""
    if isinstance(module, MappedModule):
        mapnet.load_into(folder, module)
        return
    if (folder / PLAIN_MANIFEST).exists() or not (folder / PLAIN_TENSORS).exists():
        verified = files.read_verified(folder, PLAIN_MANIFEST, what="a model")
        blob = verified.contents[PLAIN_TENSORS]
    else:
        try:
            blob = (folder / PLAIN_TENSORS).read_bytes()
        except OSError as error:
            raise CheckpointError(f"{folder}: model unreadable ({error})") from None
    state = _tensors(folder / PLAIN_TENSORS, blob)
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{folder / PLAIN_TENSORS}: {key!r} holds non-finite values")
    try:
        module.load_state_dict(state)
    except (RuntimeError, CheckpointError) as error:  # names, shapes: the message lists them
        raise CheckpointError(f"{folder} does not fit this model: {error}") from None


def saved_epoch(out: Path) -> int | None:
    """The last epoch an unfinished run in `out` saved (None if none or unreadable)."""
    folder = files.current(out / STATE)
    for name in (MANIFEST, V1_DESCRIPTION):
        try:
            epoch = json.loads((folder / name).read_text())["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            return epoch
    for leftover in V1_LEFTOVERS[1:]:  # a 0.2 swap cut between its renames
        try:
            return int(json.loads((out / leftover / V1_DESCRIPTION).read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def recover_state(out: Path) -> None:
    """Before resuming from out/state: mend a swap that earlier versions cut between renames
    (mapnet.files mends its own when the state is next read or written)."""
    shutil.rmtree(out / "state.tmp", ignore_errors=True)
    old, state = out / "state.old", out / STATE
    if old.exists() and not state.exists():
        old.rename(state)
    files.recover(state)


def remove_state(out: Path) -> None:
    """Drop the resume state of a finished run (and anything an interrupted swap left)."""
    for name in (STATE, *V1_LEFTOVERS):
        shutil.rmtree(out / name, ignore_errors=True)
    for leftover in out.glob(f".{STATE}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
