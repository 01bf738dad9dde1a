"""Checkpoints: a JSON description plus a safetensors file of the latents and buffers. No pickle.

    <dir>/mapnet.json          config, target layout, fingerprint, sha256 of the tensor file
    <dir>/tensors.safetensors  latent.<group>, buffer.<name> (e.g. BatchNorm running stats),
                               base.<name> (θ₀ entries that no seed can regenerate)

The projection is never stored: the seed in the config regenerates it, and the fingerprint makes
loading against a different seed, architecture or projection fail loudly instead of silently.
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
from torch import nn

from mapnet.core import MappedModule, MappingConfig

FORMAT = "mapnet-checkpoint"
VERSION = 1
CONFIG_FILE = "mapnet.json"
TENSOR_FILE = "tensors.safetensors"
# Probe values are rounded to 7 digits; this absorbs thread-count-dependent last bits only.
PROBE_TOLERANCE = 1e-4


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, edited, or made for another model or mapping."""


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


def _tensors(mapped: MappedModule) -> dict[str, torch.Tensor]:
    tensors = {f"latent.{g.name}": z.detach() for g, z in zip(mapped.groups, mapped.latents)}
    for name, buffer in mapped.target.state_dict().items():
        tensors[f"buffer.{name}"] = buffer.detach()
    for name in mapped.stored_base_names:
        base = mapped.base_view(name)
        if base is not None:
            tensors[f"base.{name}"] = base
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


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
    blob = save_safetensors(_tensors(mapped))
    description = {
        "format": FORMAT,
        "version": VERSION,
        "config": mapped.config.to_dict(),
        "target_class": mapped.target_class,
        "groups": [
            {"name": g.name, "latent_dim": g.latent_dim, "parameters": [s.name for s in g.specs]}
            for g in mapped.groups
        ],
        "fingerprint": mapped.fingerprint(),
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "torch_version": torch.__version__,
        "metadata": metadata or {},
    }
    atomic_write_bytes(folder / TENSOR_FILE, blob)
    atomic_write_bytes(folder / CONFIG_FILE, json.dumps(description, indent=2).encode())
    return folder


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
    if description.get("version") != VERSION:
        raise CheckpointError(
            f"{file} has format version {description.get('version')}; this mapnet reads {VERSION}"
        )
    return description


def _compare_fingerprints(expected: dict[str, Any], actual: dict[str, Any], where: Path) -> None:
    if expected.get("architecture") != actual["architecture"]:
        raise CheckpointError(
            f"{where} was saved for a different architecture (parameter names, shapes or dtypes "
            "differ from the model passed to load)"
        )
    probes = expected.get("probe")
    same_shape = isinstance(probes, list) and [len(p) for p in probes] == [
        len(p) for p in actual["probe"]
    ]
    close = same_shape and all(
        math.isclose(a, b, rel_tol=PROBE_TOLERANCE, abs_tol=PROBE_TOLERANCE)
        for pa, pb in zip(probes, actual["probe"])
        for a, b in zip(pa, pb)
    )
    if not close:
        raise CheckpointError(
            f"{where}: the regenerated mapping does not match the one it was saved with (a "
            "different seed, projection implementation, θ₀ — for base='model', the pretrained "
            "weights — or generation setting); its latents would produce different weights"
        )


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


def load(path: str | os.PathLike[str], model: nn.Module) -> MappedModule:
    """Rebuild the MappedModule saved at `path` around `model` (a fresh instance of the target).

    `model` supplies the architecture (and, for base='model', θ₀); it is left untouched.
    """
    folder = Path(path)
    description = read_description(folder)
    tensors = _read_tensors(folder, description)
    config = MappingConfig.from_dict(description["config"])
    # θ₀ entries no seed regenerates come from the file; they also set their tensors' gains.
    stored_base = {k[len("base.") :]: v for k, v in tensors.items() if k.startswith("base.")}
    try:
        mapped = MappedModule(model, config, stored_base=stored_base)
    except ValueError as error:
        raise CheckpointError(f"{folder} does not fit the model passed to load: {error}") from None
    _restore(mapped, folder, description, tensors)
    return mapped


def load_into(path: str | os.PathLike[str], mapped: MappedModule) -> None:
    """Load the latents and buffers saved at `path` into an existing, matching `mapped`, in place
    (no projection is rebuilt: resuming a run costs a file read, not a QR)."""
    folder = Path(path)
    description = read_description(folder)
    if MappingConfig.from_dict(description["config"]) != mapped.config:
        raise CheckpointError(f"{folder} was saved with a different MappingConfig")
    _restore(mapped, folder, description, _read_tensors(folder, description))


def _restore(
    mapped: MappedModule,
    folder: Path,
    description: dict[str, Any],
    tensors: dict[str, torch.Tensor],
) -> None:
    """Check that the file fits `mapped`, then copy its latents and buffers in."""
    tensor_file = folder / TENSOR_FILE
    layout = [
        {"name": g.name, "latent_dim": g.latent_dim, "parameters": [s.name for s in g.specs]}
        for g in mapped.groups
    ]
    if layout != description.get("groups"):
        raise CheckpointError(
            f"{folder} was saved for a model whose layers or latent sizes differ from the one "
            "passed to load"
        )
    stored = {k[len("base.") :] for k in tensors if k.startswith("base.")}
    missing = sorted(set(mapped.stored_base_names) - stored)
    if missing:
        raise CheckpointError(f"{tensor_file} lacks the stored θ₀ of {missing}")
    _compare_fingerprints(description.get("fingerprint", {}), mapped.fingerprint(), folder)

    buffers = {k[len("buffer.") :]: v for k, v in tensors.items() if k.startswith("buffer.")}
    expected = set(mapped.target.state_dict())
    if set(buffers) != expected:
        raise CheckpointError(
            f"{tensor_file} holds buffers {sorted(buffers)}, the model has {sorted(expected)}"
        )
    latents = [
        _take(tensors, f"latent.{g.name}", z.shape, tensor_file)
        for g, z in zip(mapped.groups, mapped.latents)
    ]
    if not all(torch.isfinite(z).all() for z in latents):
        raise CheckpointError(f"{tensor_file} holds non-finite latent values")
    with torch.no_grad():
        for z, value in zip(mapped.latents, latents):
            z.copy_(value)
        mapped.target.load_state_dict(buffers)


def _take(
    tensors: dict[str, torch.Tensor], key: str, shape: torch.Size, where: Path
) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{where} lacks tensor {key!r}")
    value = tensors[key]
    if value.shape != shape:
        raise CheckpointError(
            f"{where}: {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        )
    return value
