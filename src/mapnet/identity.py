"""A mapped model's identity: what a state dict or checkpoint must match to mean the same weights.

    config         the MappingConfig, field by field
    layout         every target parameter: names, shape, dtype, and whether it is generated,
                   trained directly or frozen
    groups         latent groups: name, size, the parameters they generate, per-tensor gains
    projection     the projection algorithm's identifier (bumped whenever W for a seed changes)
    bases          sha256 of every base tensor (θ₀ or the pretrained weights) in a canonical byte
                   form: the tensor's dtype, shape and little-endian bytes
    frozen         (fine-tuning) sha256 of every frozen pretrained weight
    buffers        (fine-tuning) sha256 of every pretrained buffer
    sketches       per base tensor (float64): mean, rms, two fixed ±1-weighted sums over every
                   entry, and 8 entries at hashed positions (not written: see below). When a
                   digest differs only because another CPU or thread count regenerated θ₀ in
                   its last bits (vectorised normal_, LAPACK), the sketch agrees within
                   SKETCH_TOLERANCE of the rms per entry and the state loads with one warning; a
                   real difference (another seed, a re-initialised head, one entry changed, rows
                   moved) fails, naming the tensor
    stored         the bases that travel with the state (not regenerable where it is loaded)

Identity travels inside `state_dict()` as the extra state `_extra_state` (a uint8 tensor of this
JSON, so safetensors can hold it) and is compared in full before anything is loaded. What is
written (format 3, `encode`) is compact: per tensor the first SHORT_DIGEST hex digits of its
sha256, enough to name a tensor that differs, and one sha256 over all full digests of a kind
(`<kind>_sha256`), which catches a difference hidden by a short digest; sketches without their
hashed entries, rounded to 8 significant digits. Format 2 identities still read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import warnings
import zlib
from typing import Any

import numpy as np
import torch
from torch import nn

from mapnet.config import MappingConfig
from mapnet.errors import CheckpointError
from mapnet.projections import ALGORITHMS
from mapnet.projections.seeding import hash_signs, stream_key

IDENTITY_FORMAT = 3
READABLE_FORMATS = (2, 3)
DIGEST_KINDS = ("bases", "frozen", "buffers")
SHORT_DIGEST = 12  # hex digits kept per tensor in a written identity (48 bits)
SKETCH_DIGITS = 8  # significant digits of a written sketch: far below SKETCH_TOLERANCE
SKETCH_POSITIONS = 8
SKETCH_DOTS = 2
SKETCH_PERIOD = 4099  # a prime: a tensor's rows rarely line up with it
# Relative to the tensor's rms: last-bit differences are ~1e-7, a re-initialisation ~1.
SKETCH_TOLERANCE = 1e-5
_SKETCH_CHUNK = 1 << 18
# A written sketch: mean, rms and the signed sums (they see every entry); the hashed entries
# add little and are left out.
WRITTEN_SKETCH = 2 + SKETCH_DOTS


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


@functools.cache
def _sketch_weights() -> torch.Tensor:
    """(SKETCH_PERIOD, SKETCH_DOTS) fixed ±1 weights from the counter hash (the same everywhere),
    hashed once per process."""
    bits = [hash_signs(stream_key(k, "sketch"), 0, SKETCH_PERIOD) for k in range(SKETCH_DOTS)]
    return torch.stack(bits, 1).to(torch.float64)


def tensor_sketch(name: str, tensor: torch.Tensor) -> list[float]:
    """[mean, rms, SKETCH_DOTS signed sums, 8 entries] of `tensor`, in float64.

    The signed sums Σ_p w(p mod SKETCH_PERIOD)·x_p see every entry, so changing one entry by
    more than ~SKETCH_TOLERANCE·rms·√N, or moving entries around, changes them; regenerating
    the tensor elsewhere with last-bit differences does not. Positions of the 8 entries are
    hashed from `name`. Computed a chunk at a time: no float64 copy of the tensor.
    """
    flat = tensor.detach().reshape(-1)
    count = flat.numel()
    if count == 0:
        return [0.0, 0.0]
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    positions = [(seed + k * 0x9E3779B97F4A7C15) % count for k in range(SKETCH_POSITIONS)]
    picks = flat[torch.tensor(positions, device=flat.device)].to(torch.float64).cpu().tolist()
    weights = _sketch_weights().to(flat.device)
    total = squares = 0.0
    dots = torch.zeros(SKETCH_DOTS, dtype=torch.float64, device=flat.device)
    rows = max(1, _SKETCH_CHUNK // SKETCH_PERIOD)
    for start in range(0, count, rows * SKETCH_PERIOD):
        chunk = flat[start : start + rows * SKETCH_PERIOD].to(torch.float64)
        total += chunk.sum().item()
        squares += chunk.square().sum().item()
        full = chunk.numel() // SKETCH_PERIOD * SKETCH_PERIOD
        if full:
            dots += (chunk[:full].view(-1, SKETCH_PERIOD) @ weights).sum(0)
        if full < chunk.numel():  # the tail of the last chunk
            dots += chunk[full:] @ weights[: chunk.numel() - full]
    return [total / count, math.sqrt(squares / count), *dots.cpu().tolist(), *picks]


def _sketches_agree(a: list[float], b: list[float], count: int) -> bool:
    """Within SKETCH_TOLERANCE of the rms per entry: the mean, rms and entries within
    tolerance·rms, the signed sums within tolerance·rms·√count."""
    if len(a) != len(b):  # a written sketch is the first WRITTEN_SKETCH values
        a, b = a[:WRITTEN_SKETCH], b[:WRITTEN_SKETCH]
    if len(a) != len(b) or len(a) < 2:
        return False
    scale = max(abs(a[1]), abs(b[1]), 1e-30)
    tolerances = [SKETCH_TOLERANCE * scale] * len(a)
    for k in range(2, 2 + SKETCH_DOTS):
        if k < len(a):
            tolerances[k] = SKETCH_TOLERANCE * scale * math.sqrt(count)
    return all(abs(x - y) <= t for x, y, t in zip(a, b, tolerances))


def combined_digest(digests: dict[str, str]) -> str:
    """One sha256 over a kind's (name, full digest) pairs."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def compact(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity as written (format 3): short per-tensor digests plus one combined digest
    per kind, rounded sketches. Already compact kinds (a `<kind>_sha256` present) stay."""
    out = dict(identity, format=IDENTITY_FORMAT)
    for kind in DIGEST_KINDS:
        digests = identity.get(kind)
        if digests is None or f"{kind}_sha256" in identity:
            continue
        out[kind] = {name: digest[:SHORT_DIGEST] for name, digest in digests.items()}
        out[f"{kind}_sha256"] = combined_digest(digests)
    out["sketches"] = {
        name: [float(f"{value:.{SKETCH_DIGITS}g}") for value in sketch[:WRITTEN_SKETCH]]
        for name, sketch in identity.get("sketches", {}).items()
    }
    return out


def same_digest(saved: object, own: str) -> bool:
    """A saved digest (full, or its first SHORT_DIGEST digits) names the same tensor as `own`."""
    if not isinstance(saved, str):
        return False
    return saved == own or (len(saved) == SHORT_DIGEST and own.startswith(saved))


def encode(identity: dict[str, Any]) -> torch.Tensor:
    """The identity as a uint8 tensor (safetensors-friendly extra state): the compact form as
    zlib-compressed JSON (a fine-tune checkpoint is mostly this)."""
    data = zlib.compress(json.dumps(compact(identity), separators=(",", ":")).encode(), 9)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode(value: object, where: str) -> dict[str, Any]:
    if isinstance(value, dict):  # a state dict that kept the decoded form
        return value
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise CheckpointError(f"{where}: mapnet's identity is not a uint8 vector")
    data = bytes(value.cpu().numpy().tobytes())
    try:
        if not data.startswith(b"{"):  # plain JSON: mapnet 0.2.0
            data = zlib.decompress(data)
        identity = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, zlib.error) as error:
        raise CheckpointError(f"{where}: mapnet's identity is unreadable: {error}") from None
    if not isinstance(identity, dict):
        raise CheckpointError(f"{where}: mapnet's identity is not a JSON object")
    return identity


def summary(identity: dict[str, Any]) -> dict[str, Any]:
    """What a reader of a checkpoint's JSON wants to see; the full identity (per-tensor digests
    and sketches) travels in the tensor file, and only that one is checked."""
    shown = {k: identity[k] for k in ("format", "projection", "stored")}
    shown["groups"] = [
        {"name": g["name"], "latent_dim": g["latent_dim"], "parameters": len(g["parameters"])}
        for g in identity["groups"]
    ]
    shown["digests"] = {
        kind: len(identity.get(kind, {})) for kind in ("bases", "frozen", "buffers")
    }
    return shown


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with the fields added since it was written at their defaults."""
    try:
        return MappingConfig.from_dict(config).to_dict()
    except (TypeError, ValueError):
        return config  # compared as is: the mismatch is then named field by field


def _hidden_difference(saved: dict[str, Any], own: dict[str, Any], kind: str) -> bool:
    """Every short digest of `kind` agreed, but the combined digest does not."""
    combined = saved.get(f"{kind}_sha256")
    return combined is not None and combined != combined_digest(own.get(kind, {}))


def compare(saved: dict[str, Any], own: dict[str, Any], where: str) -> list[str]:
    """Check a saved identity against this module's; returns the bases the saved state carries
    (`stored`) that differ from this module's. Raises CheckpointError naming what differs."""
    version = saved.get("format")
    if version not in READABLE_FORMATS:
        raise CheckpointError(
            f"{where} has identity format {version!r}; this mapnet reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))} (format 1 checkpoints load through "
            "mapnet.load)"
        )
    saved_config, own_config = _with_defaults(saved.get("config", {})), own["config"]
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
    shapes = {entry[0]: entry[2] for entry in own["layout"]}
    differing, nearly_equal = [], []
    # Identities of mapnet 0.2.0 have neither "buffers" nor "frozen": their states hold both.
    for name, digest in own.get("buffers", {}).items() if "buffers" in saved else ():
        if not same_digest(saved["buffers"].get(name), digest):
            raise CheckpointError(
                f"{where}: the pretrained buffer {name!r} differs from the one the state was "
                "saved with: a fine-tune state loads only onto the pretrained model it was "
                "trained from"
            )
    for name, digest in own.get("frozen", {}).items() if "frozen" in saved else ():
        theirs = saved["frozen"].get(name)
        if same_digest(theirs, digest):
            continue
        raise CheckpointError(
            f"{where}: the frozen pretrained weight {name!r} differs from the one the state was "
            f"saved with (sha256 {str(theirs)[:12]}… there, {digest[:12]}… here): a fine-tune "
            "state loads only onto the pretrained model it was trained from"
        )
    for name, digest in own["bases"].items():
        theirs = saved.get("bases", {}).get(name)
        if same_digest(theirs, digest):
            continue
        if name in stored:
            differing.append(name)
            continue
        sketch, mine = saved.get("sketches", {}).get(name), own["sketches"].get(name)
        size = math.prod(shapes[name])
        if sketch is not None and mine is not None and _sketches_agree(sketch, mine, size):
            nearly_equal.append(name)
            continue
        raise CheckpointError(
            f"{where}: the base (θ₀) of {name!r} differs from the one the state was saved with "
            f"(sha256 {str(theirs)[:12]}… there, {digest[:12]}… here). For base='model', load onto "
            "the same pretrained weights; for base='init', build the model the same way (the same "
            "factory or class, the same seed); or save with store_base=True"
        )
    # A base differing per tensor (stored, or nearly equal) changes the combined digest too.
    checked = ("frozen", "buffers") if differing or nearly_equal else DIGEST_KINDS
    hidden = [kind for kind in checked if kind in saved and _hidden_difference(saved, own, kind)]
    if hidden:
        raise CheckpointError(
            f"{where}: a tensor among the {', '.join(hidden)} differs from the one the state was "
            "saved with (every short digest agrees, the combined sha256 does not): a state loads "
            "only onto the weights it was saved with"
        )
    # Gains derive from θ₀ (or, for base='zero', from an init used only as their reference):
    # they must agree too, except in groups whose stored bases are about to replace θ₀.
    for saved_group, own_group in zip(saved.get("groups", []), own["groups"]):
        if any(p in differing for p in own_group["parameters"]):
            continue
        saved_gains, own_gains = saved_group.get("gains", []), own_group["gains"]
        close = len(saved_gains) == len(own_gains) and all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(saved_gains, own_gains)
        )
        if not close:
            names = [
                p
                for p, a, b in zip(own_group["parameters"], saved_gains, own_gains)
                if not math.isclose(a, b, rel_tol=1e-6)
            ]
            raise CheckpointError(
                f"{where}: the per-tensor gains of {names[:5] or own_group['name']!r} differ from "
                "the saved ones (they follow the spread of the reference initialisation): build "
                "the model the same way"
            )
    if nearly_equal:
        warnings.warn(
            f"{where}: the base (θ₀) of {len(nearly_equal)} tensor(s) "
            f"({', '.join(nearly_equal[:4])}{', …' if len(nearly_equal) > 4 else ''}) differs "
            "from the saved one only within "
            f"{SKETCH_TOLERANCE:g} of its rms per entry, as when another CPU or thread count "
            "regenerates it; loaded. Save with store_base=True to carry θ₀ exactly",
            stacklevel=2,
        )
    return differing


def build(module: nn.Module, theta0: dict[str, torch.Tensor], model: nn.Module) -> dict[str, Any]:
    """A MappedModule's identity, from θ₀ by canonical name and the wrapped `model` (the frozen
    weights and buffers of a fine-tune state are held by digest)."""
    sel = module.selection
    roles = [(s, "generated") for s in sel.generated] + [(s, "direct") for s in sel.direct]
    roles += [(s, "frozen") for s in sel.frozen]
    layout = [[s.name, s.names[1:], list(s.shape), str(s.dtype), role] for s, role in roles]
    digests, sketches = {}, {}
    base = module.mapping_config.resolved_base
    for spec in module.specs if base != "zero" else ():
        digests[spec.name] = tensor_digest(theta0[spec.name])
        sketches[spec.name] = tensor_sketch(spec.name, theta0[spec.name])
    frozen: dict[str, str] = {}
    buffers: dict[str, str] = {}
    if module.frozen_by_digest:
        for spec in sel.frozen:  # a digest only: frozen weights are read, never regenerated
            frozen[spec.name] = tensor_digest(model.get_parameter(spec.name))
        for name, value in module._pretrained_buffers.items():
            buffers[name] = tensor_digest(value)
    return {
        "format": IDENTITY_FORMAT,
        "config": module.mapping_config.to_dict(),
        "layout": sorted(layout),
        "groups": [
            {
                "name": g.name,
                "latent_dim": g.latent_dim,
                "parameters": [s.name for s in g.specs],
                "gains": gains,
            }
            | ({"elements": g.rows} if module._layouts else {})
            for g, gains in zip(module.groups, module.gains)
        ],
        "projection": ALGORITHMS[module.mapping_config.projection],
        "bases": digests,
        "frozen": frozen,
        "buffers": buffers,
        "sketches": sketches,
        "stored": module.stored_base_names,
    }
