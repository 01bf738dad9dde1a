"""A mapped model's identity: what a state dict or checkpoint must match to mean the same weights.

    config         the MappingConfig, field by field
    layout         every target parameter: names, shape, dtype, and whether it is generated,
                   trained directly or frozen
    groups         latent groups: name, size, the parameters they generate, per-tensor gains
    projection     the projection algorithm's identifier (bumped whenever W for a seed changes)
    bases          sha256 of every base tensor (θ₀ or the pretrained weights) in a canonical byte
                   form: the tensor's dtype, shape and little-endian bytes
    stored         the bases that travel with the state (not regenerable where it is loaded)

Identity travels inside `state_dict()` as the extra state `_extra_state` (a uint8 tensor of this
JSON, so safetensors can hold it) and is compared in full before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import numpy as np
import torch

IDENTITY_FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint or state dict that is missing, corrupt, edited, or made for another model or
    mapping."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of the dtype, the shape and the little-endian bytes of `tensor`."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy()
    if sys.byteorder != "little" and flat.element_size() > 1:
        data = data.reshape(-1, flat.element_size())[:, ::-1]
    digest = hashlib.sha256(
        f"{str(flat.dtype).removeprefix('torch.')}{list(tensor.shape)}".encode()
    )
    digest.update(memoryview(np.ascontiguousarray(data)))  # no copy of the tensor's bytes
    return digest.hexdigest()


def encode(identity: dict[str, Any]) -> torch.Tensor:
    """The identity as a uint8 tensor (safetensors-friendly extra state)."""
    return torch.frombuffer(bytearray(json.dumps(identity).encode()), dtype=torch.uint8)


def decode(value: object, where: str) -> dict[str, Any]:
    if isinstance(value, dict):  # a state dict that kept the decoded form
        return value
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise CheckpointError(f"{where}: mapnet's identity is not a uint8 vector")
    try:
        identity = json.loads(bytes(value.cpu().numpy().tobytes()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{where}: mapnet's identity is unreadable: {error}") from None
    if not isinstance(identity, dict):
        raise CheckpointError(f"{where}: mapnet's identity is not a JSON object")
    return identity


def compare(saved: dict[str, Any], own: dict[str, Any], where: str) -> list[str]:
    """Check a saved identity against this module's; returns the bases the saved state carries
    (`stored`) that differ from this module's. Raises CheckpointError naming what differs."""
    version = saved.get("format")
    if version != IDENTITY_FORMAT:
        raise CheckpointError(
            f"{where} has identity format {version!r}; this mapnet reads format "
            f"{IDENTITY_FORMAT} (format 1 checkpoints load through mapnet.load)"
        )
    saved_config, own_config = saved.get("config", {}), own["config"]
    if saved_config != own_config:
        fields = sorted(
            k
            for k in set(saved_config) | set(own_config)
            if saved_config.get(k) != own_config.get(k)
        )
        detail = ", ".join(
            f"{k}: saved {saved_config.get(k)!r}, here {own_config.get(k)!r}" for k in fields
        )
        raise CheckpointError(f"{where} was saved with another MappingConfig ({detail})")
    if saved.get("layout") != own["layout"]:
        saved_layout = {entry[0]: entry for entry in saved.get("layout", [])}
        own_layout = {entry[0]: entry for entry in own["layout"]}
        names = sorted(
            n
            for n in set(saved_layout) | set(own_layout)
            if saved_layout.get(n) != own_layout.get(n)
        )
        raise CheckpointError(
            f"{where} was saved for another architecture: parameters that differ (names, shapes, "
            f"dtypes or role): {names[:10]}"
        )
    saved_groups = [{k: v for k, v in g.items() if k != "gains"} for g in saved.get("groups", [])]
    own_groups = [{k: v for k, v in g.items() if k != "gains"} for g in own["groups"]]
    if saved_groups != own_groups:
        raise CheckpointError(f"{where} was saved with other latent groups or sizes")
    if saved.get("projection") != own["projection"]:
        raise CheckpointError(
            f"{where} was saved with projection algorithm {saved.get('projection')!r}, this "
            f"mapnet builds {own['projection']!r}: the latents would generate other weights"
        )
    stored = set(saved.get("stored", []))
    differing = []
    for name, digest in own["bases"].items():
        theirs = saved.get("bases", {}).get(name)
        if theirs == digest:
            continue
        if name in stored:
            differing.append(name)
            continue
        raise CheckpointError(
            f"{where}: the base (θ₀) of {name!r} differs from the one the state was saved with "
            f"(sha256 {str(theirs)[:12]}… there, {digest[:12]}… here). For base='model', load onto "
            "the same pretrained weights; for base='init', build the model the same way (the same "
            "factory or class, the same seed); or save with store_base=True"
        )
    return differing
