"""Checkpoint folders: a JSON description plus a safetensors file of the state dict. No pickle.

    <dir>/mapnet.json          format version, config, target class, a summary of the identity,
                               sha256 of the tensor file, free-form metadata
    <dir>/tensors.safetensors  `mapped.state_dict()`: latents, persistent target buffers (e.g.
                               BatchNorm statistics), directly trained and frozen parameters,
                               stored bases `base.<name>`, the identity `_extra_state`

The projection is never stored: the seed regenerates it, and the identity makes loading against
a different seed, architecture, base or projection fail, naming what differs. Format 1 folders
(mapnet 0.1) load through an upgrade that checks their own fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mapnet.bases import ModelSource
from mapnet.checkpoint import fingerprint
from mapnet.checkpoint.fingerprint import CheckpointError
from mapnet.config import MappingConfig
from mapnet.module import EXTRA_STATE, STORED_BASE, MappedModule

FORMAT = "mapnet-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "mapnet.json"
TENSOR_FILE = "tensors.safetensors"
# Format 1 probes were rounded to 7 digits; this absorbs thread-count-dependent last bits only.
V1_PROBE_TOLERANCE = 1e-4


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    mapped: MappedModule, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> Path:
    """Write `mapped` to the folder `path` (created if needed); returns the folder.

    The tensor file is written first and the JSON, which holds its checksum, last, each
    atomically: an interrupted save leaves the previous checkpoint readable or a clear error.
    """
    if not isinstance(mapped, MappedModule):
        raise TypeError(
            f"save() takes a MappedModule from mapnet.wrap(), got {type(mapped).__name__}"
        )
    folder = Path(path)
    blob = save_safetensors(unshared_tensors(mapped.state_dict()))
    description = {
        "format": FORMAT,
        "version": VERSION,
        "config": mapped.mapping_config.to_dict(),
        "target_class": mapped.target_class,
        "identity": readable_identity(mapped.fingerprint()),
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "torch_version": torch.__version__,
        "metadata": metadata or {},
    }
    atomic_write_bytes(folder / TENSOR_FILE, blob)
    atomic_write_bytes(folder / CONFIG_FILE, json.dumps(description, indent=2).encode())
    return folder


def readable_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """What a reader of mapnet.json wants to see; the full identity (per-tensor digests and
    sketches) is in the tensor file's `_extra_state`, and only that one is checked."""
    summary = {k: identity[k] for k in ("format", "projection", "stored")}
    summary["groups"] = [
        {"name": g["name"], "latent_dim": g["latent_dim"], "parameters": len(g["parameters"])}
        for g in identity["groups"]
    ]
    summary["digests"] = {
        kind: len(identity.get(kind, {})) for kind in ("bases", "frozen", "buffers")
    }
    return summary


def read_description(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON half of a checkpoint, checked for format and version."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: {path} is not a mapnet checkpoint folder")
    try:
        description = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON (truncated or edited?): {error}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} description")
    if description.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{file} has format version {description.get('version')!r}; this mapnet reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return description


def _read_tensors(folder: Path, description: dict[str, Any]) -> dict[str, torch.Tensor]:
    tensor_file = folder / TENSOR_FILE
    if not tensor_file.is_file():
        raise CheckpointError(f"{tensor_file} not found: the checkpoint is incomplete")
    blob = tensor_file.read_bytes()
    if hashlib.sha256(blob).hexdigest() != description.get("tensors_sha256"):
        raise CheckpointError(
            f"{tensor_file} does not match the checksum in {CONFIG_FILE}: it was truncated, "
            "edited or belongs to another save"
        )
    try:
        return load_safetensors(blob)
    except SafetensorError as error:
        raise CheckpointError(
            f"{tensor_file} is not a readable safetensors file: {error}"
        ) from None


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
    description = read_description(folder)
    tensors = _read_tensors(folder, description)
    config = _config(description, folder)
    # Format 1 names them the same way (base.<name>).
    stored = {k[len(STORED_BASE) :]: v for k, v in tensors.items() if k.startswith(STORED_BASE)}
    try:
        # Stored bases go in at construction: they also set their tensors' gains.
        mapped = MappedModule(model, config, stored_bases=stored)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{folder} does not fit the model passed to load: {error}") from None
    if description["version"] == 1:
        tensors = _upgrade_v1(mapped, description, tensors, folder)
    _load_state(mapped, tensors, folder)
    return mapped


def load_into(path: str | os.PathLike[str], mapped: MappedModule) -> None:
    """Load the state saved at `path` into an existing, matching `mapped`, in place (no
    projection is rebuilt: resuming a run costs a file read). Nothing changes if it fails."""
    folder = Path(path)
    description = read_description(folder)
    tensors = _read_tensors(folder, description)
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
    state: dict[str, torch.Tensor] = {EXTRA_STATE: fingerprint.encode(mapped.fingerprint())}
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
