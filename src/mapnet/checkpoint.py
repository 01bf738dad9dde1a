"""Checkpoint folders: a JSON description plus a safetensors file of the state dict. No pickle.

    <dir>/mapnet.json          format version, config, target class, a summary of the identity,
                               free-form metadata, and (format 3) the size and sha256 of every
                               other file: the manifest of a `mapnet.files.commit`
    <dir>/tensors.safetensors  `mapped.state_dict()`: latents, persistent target buffers (e.g.
                               BatchNorm statistics), directly trained and frozen parameters,
                               stored bases `base.<name>`, the identity `_extra_state`

A save is one `mapnet.files.commit`: the folder is written beside the old one and swapped in
whole under a lock, so a writer killed at any instant leaves the previous or the new checkpoint,
and a second writer waits, then fails naming the first one's pid. A load checks every file
against the manifest before it parses any. The projection is never stored: the seed
regenerates it, and the identity makes loading against a different seed, architecture, base or
projection fail, naming what differs. Format 2 folders (the tensor file's sha256 in mapnet.json)
still load; format 1 folders (mapnet 0.1) through an upgrade that checks their own fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mapnet import files, identity
from mapnet.bases import ModelSource
from mapnet.config import MappingConfig
from mapnet.errors import CheckpointError
from mapnet.module import MappedModule
from mapnet.state import EXTRA_STATE, STORED_BASE, nonfinite_keys

FORMAT = "mapnet-checkpoint"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CONFIG_FILE = "mapnet.json"
TENSOR_FILE = "tensors.safetensors"
# Format 1 probes were rounded to 7 digits; this absorbs thread-count-dependent last bits only.
V1_PROBE_TOLERANCE = 1e-4


def unshared_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` on the CPU, contiguous, with no two tensors sharing storage: safetensors refuses
    shared storage (a tied weight under two names, buffers that view one another), so each
    further tensor on a storage gets its own copy."""
    tensors, storages = {}, set()
    for key, value in state.items():
        value = value.detach().contiguous().cpu()
        storage = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if storage in storages else value
        storages.add(storage)
    return tensors


def save(
    mapped: MappedModule,
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    *,
    allow_nonfinite: bool = False,
) -> Path:
    """Write `mapped` to the folder `path` (created if needed, replaced whole if it holds a
    checkpoint); returns the folder. One `mapnet.files.commit`: see the module docstring.

    NaN or inf in a latent, a directly trained weight or a buffer (what `load` refuses) is a
    ValueError naming it; `allow_nonfinite=True` writes them anyway, for inspecting a diverged
    run with safetensors (`load` still refuses the folder)."""
    if not isinstance(mapped, MappedModule):
        raise TypeError(
            f"save() takes a MappedModule from mapnet.wrap(), got {type(mapped).__name__}"
        )
    folder = Path(path)
    state = mapped.state_dict()
    nonfinite = nonfinite_keys(mapped, state)
    if nonfinite and not allow_nonfinite:
        raise ValueError(
            f"{nonfinite[:5]} hold NaN/inf (training diverged?): mapnet.load would refuse the "
            "checkpoint, so it is not written; allow_nonfinite=True writes it anyway"
        )
    blob = save_safetensors(unshared_tensors(state))
    description = {
        "format": FORMAT,
        "version": VERSION,
        "config": mapped.mapping_config.to_dict(),
        "target_class": mapped.target_class,
        "identity": identity.summary(mapped.fingerprint()),
        "torch_version": torch.__version__,
        "metadata": metadata or {},
    }
    with files.commit(folder, CONFIG_FILE, description) as staging:
        (staging / TENSOR_FILE).write_bytes(blob)
    return folder


WHAT = "a mapnet checkpoint"


def read_description(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON half of a checkpoint, checked for format and version (not the tensor file)."""
    folder = files.current(path)
    return _checked(files.read_manifest(folder, CONFIG_FILE, WHAT), folder / CONFIG_FILE)


def _checked(description: dict[str, Any], file: Path) -> dict[str, Any]:
    if description.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} description")
    version = description.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{file} has format version {version!r}; this mapnet reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return description


def _legacy_files(file: Path, description: dict[str, Any]) -> Mapping[str, str | None]:
    """Formats 1 and 2 hold the tensor file's sha256 instead of a files table."""
    if _checked(description, file)["version"] >= 3:
        raise CheckpointError(f"{file} has no {files.FILES!r} table of its folder's files")
    return {TENSOR_FILE: description.get("tensors_sha256")}


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The description and the tensors of a checkpoint, every byte checked before parsing."""
    verified = files.read_verified(path, CONFIG_FILE, what=WHAT, legacy=_legacy_files)
    description = _checked(verified.manifest, verified.folder / CONFIG_FILE)
    tensor_file = verified.folder / TENSOR_FILE
    if set(verified.contents) != {TENSOR_FILE}:
        raise CheckpointError(
            f"{verified.folder / CONFIG_FILE} lists {sorted(verified.contents)}, a checkpoint "
            f"holds {TENSOR_FILE} alone"
        )
    return description, read_safetensors(verified.contents[TENSOR_FILE], tensor_file)


def read_safetensors(blob: bytes, file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes; a CheckpointError naming `file` if they are
    not one."""
    try:
        return load_safetensors(blob)
    except SafetensorError as error:
        raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from None


def _config(description: dict[str, Any], where: Path) -> MappingConfig:
    try:
        return MappingConfig.from_dict(description["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: invalid MappingConfig in {CONFIG_FILE}: {error}") from None


def load(path: str | os.PathLike[str], model: ModelSource) -> MappedModule:
    """Rebuild the MappedModule saved at `path` around `model`: a fresh instance of the target
    or a factory (the same kind of source it was wrapped from). `model` supplies the
    architecture and, for base="model", θ₀; an instance is left untouched."""
    folder = Path(path)
    description, tensors = _read(folder)
    config = _config(description, folder)
    try:
        mapped = MappedModule(model, config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{folder} does not fit the model passed to load: {error}") from None
    if description["version"] == 1:
        # Format 1 checks θ at a probe latent, so its stored bases (named base.<name>, as
        # today) go in first; a module no one else holds yet may change before that check.
        _take_v1_stored_bases(mapped, tensors, folder)
        tensors = _upgrade_v1(mapped, description, tensors, folder)
    _load_state(mapped, tensors, folder)  # stored bases are applied by the state's pre-hook
    return mapped


def load_into(path: str | os.PathLike[str], mapped: MappedModule) -> None:
    """Load the state saved at `path` into an existing, matching `mapped`, in place (no
    projection is rebuilt: resuming a run costs a file read). Nothing changes if it fails."""
    folder = Path(path)
    description, tensors = _read(folder)
    if description["version"] == 1:
        if _config(description, folder) != mapped.mapping_config:
            raise CheckpointError(f"{folder} was saved with a different MappingConfig")
        tensors = _upgrade_v1(mapped, description, tensors, folder)
    _load_state(mapped, tensors, folder)


def _load_state(mapped: MappedModule, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    try:
        mapped.load_state_dict(tensors)
    except CheckpointError as error:
        raise CheckpointError(f"{folder}: {error}") from None


# ---------------------------------------------------------------- format 1 (mapnet 0.1)


def _v1_fingerprint(mapped: MappedModule) -> dict[str, Any]:
    """Format 1's identity: a hash of the layout and θ at a fixed latent, 32 positions a group."""
    layout = [[s.names, list(s.shape), str(s.dtype)] for s in mapped.specs]
    architecture = hashlib.sha256(json.dumps(layout).encode()).hexdigest()
    probe = []
    with torch.no_grad():
        for index, group in enumerate(mapped.groups):
            z = torch.linspace(-1.0, 1.0, group.latent_dim, device=mapped.latents[index].device)
            flat = mapped.generate_flat(index, z)
            positions = torch.linspace(0, flat.numel() - 1, min(32, flat.numel())).long()
            probe.append([round(v, 7) for v in flat[positions].double().cpu().tolist()])
    return {"architecture": architecture, "probe": probe}


def _take_v1_stored_bases(
    mapped: MappedModule, tensors: dict[str, torch.Tensor], folder: Path
) -> None:
    views = mapped._theta0_views()
    stored = {k[len(STORED_BASE) :]: v for k, v in tensors.items() if k.startswith(STORED_BASE)}
    unfit = sorted(
        name
        for name, value in stored.items()
        if name not in views or tuple(value.shape) != tuple(views[name].shape)
    )
    if unfit:
        raise CheckpointError(
            f"{folder} (format 1) stores bases of parameters this model does not generate with "
            f"those shapes: {unfit[:5]} (another architecture or selection)"
        )
    mapped._replace_bases(stored)


def _upgrade_v1(
    mapped: MappedModule,
    description: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    folder: Path,
) -> dict[str, torch.Tensor]:
    """A format 1 tensor file as a state dict of `mapped`, after format 1's own checks."""
    layout = [
        {"name": g.name, "latent_dim": g.latent_dim, "parameters": [s.name for s in g.specs]}
        for g in mapped.groups
    ]
    if layout != description.get("groups"):
        raise CheckpointError(
            f"{folder} (format 1) was saved for a model whose layers or latent sizes differ"
        )
    expected, actual = description.get("fingerprint", {}), _v1_fingerprint(mapped)
    if expected.get("architecture") != actual["architecture"]:
        raise CheckpointError(f"{folder} (format 1) was saved for a different architecture")
    probes = expected.get("probe")
    same_shape = isinstance(probes, list) and [len(p) for p in probes] == [
        len(p) for p in actual["probe"]
    ]
    close = same_shape and all(
        math.isclose(a, b, rel_tol=V1_PROBE_TOLERANCE, abs_tol=V1_PROBE_TOLERANCE)
        for pa, pb in zip(probes, actual["probe"])
        for a, b in zip(pa, pb)
    )
    if not close:
        raise CheckpointError(
            f"{folder} (format 1): the regenerated mapping does not match the one it was saved "
            "with (a different seed, projection, θ₀ or generation setting)"
        )
    state: dict[str, torch.Tensor] = {EXTRA_STATE: identity.encode(mapped.fingerprint())}
    for index, group in enumerate(mapped.groups):
        key = f"latent.{group.name}"
        if key not in tensors:
            raise CheckpointError(f"{folder / TENSOR_FILE} lacks tensor {key!r}")
        state[f"latents.{index}"] = tensors[key]
    for key, value in tensors.items():
        if key.startswith("buffer."):
            state["target." + key[len("buffer.") :]] = value
        elif key.startswith("base."):
            state[STORED_BASE + key[len("base.") :]] = value
    return state
