"""Compression add-ons that combine with a mapping (paper §2.2.5, Table 8): low-rank Linear
layers, magnitude pruning with a fixed mask, int8 fake quantisation during training, and int8
post-training quantisation of the materialised network, saved without pickle.

    LowRankLinear(m, n, r)          W = U V (U: m×r, V: r×n); the mapping generates U and V
    magnitude_masks(weights, s)     keep the 1 − s largest |θ| of every tensor (unstructured)
    CompressedWeights(module, ...)  runs `module` with θ ⊙ mask and/or int8-rounded θ; gradients
                                    reach the latent (or the weights) straight through both
    quantize_int8(model, batches)   static int8 (x86 kernels) of an ordinary module
    save_quantized / load_quantized safetensors + JSON, no pickle
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.func import functional_call

from mapnet import files
from mapnet.checkpoint import read_safetensors
from mapnet.checks import positive_int
from mapnet.errors import CheckpointError
from mapnet.module import MappedModule

QUANTIZED_FORMAT = "mapnet-int8"
QUANTIZED_VERSION = 2  # 2: quantized.json lists its files with their sha256 (before: no check)
QUANTIZED_JSON = "quantized.json"
QUANTIZED_TENSORS = "quantized.safetensors"
# x86's per-channel symmetric int8 weight grid: scale = max|w| / 127.5, values in [-128, 127]
# (torch.ao's default PerChannelMinMaxObserver). Conversion re-observes the trained weights, so
# their grid can shift by the one clamped extreme: at most half a step per weight.
INT8_MIN, INT8_MAX = -128, 127


# ---------------------------------------------------------------- low-rank decomposition


class LowRankLinear(nn.Module):
    """A Linear layer whose weight is the product U V of rank `rank` (paper §2.2.5, LRD):
    (m·r + r·n + m) parameters instead of m·n + m."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        positive_int("rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank {rank} exceeds min(in_features, out_features) = "
                f"{min(in_features, out_features)}: a factorisation would add parameters"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.empty(out_features, rank))  # (m, r)
        self.v = nn.Parameter(torch.empty(rank, in_features))  # (r, n)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The best rank-r approximation (truncated SVD) of nn.Linear's own initialisation, so
        U V starts with the spread a full layer would have."""
        reference = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        self.set_from(reference.weight.detach(), reference.bias)

    @torch.no_grad()
    def set_from(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """U, V from the truncated SVD of `weight` (m, n); the bias is copied."""
        left, values, right = torch.linalg.svd(weight.float(), full_matrices=False)
        root = values[: self.rank].sqrt()
        self.u.copy_(left[:, : self.rank] * root)
        self.v.copy_(root[:, None] * right[: self.rank])
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., n) -> (..., m)
        return nn.functional.linear(nn.functional.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorize_linear(model: nn.Module, names: Iterable[str], rank: int) -> nn.Module:
    """Replace the named nn.Linear submodules of `model` (in place) by LowRankLinear layers
    holding the truncated SVD of their weights; returns `model`."""
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name!r} is not a submodule of {type(model).__name__}") from None
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name!r} is a {type(layer).__name__}, not an nn.Linear")
        low = LowRankLinear(layer.in_features, layer.out_features, rank, layer.bias is not None)
        low.set_from(layer.weight.detach(), layer.bias)
        owner_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner_name) if owner_name else model, attr, low)
    return model


# ---------------------------------------------------------------- pruning and fake quantisation


def check_sparsity(sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number, got {type(sparsity).__name__}")
    if not 0 <= sparsity < 1:
        raise ValueError(
            f"sparsity must be in [0, 1), got {sparsity} (1 would remove every weight)"
        )
    return float(sparsity)


PRUNE_SCOPES = ("tensor", "global")


@torch.no_grad()
def magnitude_masks(
    weights: dict[str, torch.Tensor], sparsity: float, scope: str = "tensor"
) -> dict[str, torch.Tensor]:
    """Unstructured magnitude pruning: each mask (bool, the tensor's shape) keeps the entries
    of largest |θ|. scope "tensor": the ⌈(1 − sparsity)·n⌉ largest of every tensor; "global":
    the ⌈(1 − sparsity)·N⌉ largest of all N numbers together. Among equal magnitudes at the
    threshold, which are kept is unspecified."""
    sparsity = check_sparsity(sparsity)
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {PRUNE_SCOPES}")
    if scope == "global":
        flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
        keep = math.ceil((1 - sparsity) * flat.numel())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[flat.topk(keep, sorted=False).indices] = True
        pieces = chosen.split([w.numel() for w in weights.values()])
        return {name: p.view(w.shape) for (name, w), p in zip(weights.items(), pieces)}
    masks = {}
    for name, value in weights.items():
        keep = math.ceil((1 - sparsity) * value.numel())
        flat = torch.zeros(value.numel(), dtype=torch.bool, device=value.device)
        flat[value.detach().abs().flatten().topk(keep, sorted=False).indices] = True
        masks[name] = flat.view(value.shape)
    return masks


def fake_quantize_int8(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded to the symmetric per-output-channel int8 grid x86 kernels use (dim 0),
    with the gradient passed straight through to every entry (the clamped positive extreme of
    each channel too: torch's own fake-quantisation would give it none). 0-d and 1-d tensors
    (biases, norm scales) stay in float: int8 kernels keep biases in float too."""
    if weight.dim() < 2:
        return weight
    with torch.no_grad():
        flat = weight.flatten(1).abs().amax(1).float()  # (C,)
        scale = (flat / ((INT8_MAX - INT8_MIN) / 2)).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        rounded = torch.fake_quantize_per_channel_affine(
            weight.float(), scale, zero, 0, INT8_MIN, INT8_MAX
        ).to(weight.dtype)
    return weight + (rounded - weight).detach()


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights `_target(module)` runs with: a mapped model's generated tensors (every tied
    alias named), or a plain module's own parameters."""
    if isinstance(module, MappedModule):
        return module.generate()
    return dict(module.named_parameters(remove_duplicate=False))  # tied aliases: one tensor


def _target(module: nn.Module) -> nn.Module:
    return module.target if isinstance(module, MappedModule) else module


class CompressedWeights(nn.Module):
    """Runs `module` (a MappedModule or an ordinary one) with its weights θ replaced by
    θ ⊙ mask (pruning, the masks fixed) and, with `fake_quant`, rounded to int8
    (quantisation-aware training). Training continues through the latent, or through the
    weights of an ordinary module; pruned entries receive no gradient.

    masks: {parameter name: bool tensor of its shape}; a name the module does not have, or a
        shape that differs, is an error. Names absent from `masks` are not pruned.
    """

    def __init__(
        self,
        module: nn.Module,
        masks: dict[str, torch.Tensor] | None = None,
        fake_quant: bool = False,
    ):
        super().__init__()
        if isinstance(module, CompressedWeights):
            raise TypeError("module is already a CompressedWeights: pass its .module")
        self.module = module
        self.fake_quant = bool(fake_quant)
        weights = _weights(module)
        self.mask_names = sorted(masks or {})
        self.masks = nn.Module()  # buffers named mask_<i>: parameter names hold dots
        for index, name in enumerate(self.mask_names):
            mask = masks[name]  # type: ignore[index]
            if name not in weights:
                raise ValueError(
                    f"mask for {name!r}, which is not a weight of the module; weights: "
                    f"{sorted(weights)[:8]}{' …' if len(weights) > 8 else ''}"
                )
            if tuple(mask.shape) != tuple(weights[name].shape):
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, the weight "
                    f"{tuple(weights[name].shape)}"
                )
            self.masks.register_buffer(f"mask_{index}", mask.detach().to(torch.bool).clone())

    @classmethod
    def pruned(
        cls, module: nn.Module, sparsity: float, fake_quant: bool = False, scope: str = "tensor"
    ) -> CompressedWeights:
        """`module` with every weight it generates (or holds) pruned to `sparsity` by magnitude
        (`magnitude_masks`' scope), the masks taken from its current weights and fixed from then
        on."""
        check_sparsity(sparsity)
        with torch.no_grad():
            weights = _weights(module)
            if isinstance(module, MappedModule):  # one name per tensor, not every tied alias
                weights = {spec.name: weights[spec.name] for spec in module.specs}
            masks = magnitude_masks(weights, sparsity, scope) if sparsity > 0 else {}
        return cls(module, masks, fake_quant)

    def mask(self, name: str) -> torch.Tensor:
        return self.masks.get_buffer(f"mask_{self.mask_names.index(name)}")

    def compressed_weights(self) -> dict[str, torch.Tensor]:
        """Every weight as the forward uses it (tied aliases stay one tensor)."""
        weights = _weights(self.module)
        # Tied aliases are one tensor: masked and rounded once, under every name.
        masks = {id(weights[name]): self.mask(name) for name in self.mask_names}
        out: dict[str, torch.Tensor] = {}
        done: dict[int, torch.Tensor] = {}
        for name, value in weights.items():
            key = id(value)
            if key not in done:
                result = value * masks[key] if key in masks else value
                done[key] = fake_quantize_int8(result) if self.fake_quant else result
            out[name] = done[key]
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weights = self.compressed_weights()
        return functional_call(_target(self.module), weights, args, kwargs, tie_weights=False)

    def nonzero_weights(self) -> int:
        """Nonzero parameters of the network this runs as (`materialize()`)."""
        return sum(int(p.count_nonzero()) for p in self.materialize().parameters())

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """An ordinary module of the target's class holding the compressed weights (a copy)."""
        weights = {k: v.detach() for k, v in self.compressed_weights().items()}
        if isinstance(self.module, MappedModule):
            return self.module.materialize(weights)
        plain = copy.deepcopy(self.module)
        for name, param in plain.named_parameters(remove_duplicate=False):
            param.copy_(weights[name])
        return plain


# ---------------------------------------------------------------- int8 post-training quantisation


@contextlib.contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    """torch.ao's FX quantisation warns on every call that it is deprecated in favour of
    torchao (not a dependency here), and torch 2.13 that quantized tensors will go; both still
    work in the pinned torch, and the saved format (int8 values + scales) outlives them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*torchao")
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quant")
        yield


def quantize_int8(model: nn.Module, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """Static int8 quantisation (weights per output channel, activations per tensor, x86
    kernels) of an ordinary module, calibrated on `calibration` batches. Returns a
    torch.fx.GraphModule; a mapped model must be materialised first."""
    if isinstance(model, (MappedModule, CompressedWeights)):
        raise TypeError(
            "quantize_int8 needs an ordinary module: call .materialize() on the mapped model "
            "first (the int8 network holds the generated weights, not the latent)"
        )
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    # The observers' histograms fail deep inside torch on NaN/inf: name the tensor instead.
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, tensor in named:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{name!r} holds NaN/inf values: int8 quantisation needs finite ones")
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("calibration holds no batch: give at least one input batch")
    model = copy.deepcopy(model).eval()
    with _quiet_torch_ao(), torch.no_grad():
        try:
            prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (first,))
        except Exception as error:  # symbolic tracing fails on data-dependent control flow
            raise TypeError(
                f"{type(model).__name__} cannot be traced by torch.fx for int8 quantisation: "
                f"{error}"
            ) from None
        for index, batch in enumerate(itertools.chain([first], batches)):
            if isinstance(batch, torch.Tensor) and not torch.isfinite(batch).all():
                raise ValueError(f"calibration batch {index} holds NaN/inf values")
            prepared(batch)
        return convert_fx(prepared)


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Write a quantize_int8() result as <path>/quantized.safetensors + quantized.json (int8
    weights with their per-channel scales; no pickle), committed whole under a lock
    (`mapnet.files.commit`, the JSON listing the tensor file's size and sha256); returns the
    bytes written. A NaN/inf float tensor (what load_quantized refuses) is a ValueError."""
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        manifest[key] = _store(key, value, tensors)
    nonfinite = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if nonfinite:
        raise ValueError(f"{nonfinite[:5]} hold NaN/inf: load_quantized would refuse them")
    folder = Path(path)
    data = save_safetensors(tensors)
    description = {"format": QUANTIZED_FORMAT, "version": QUANTIZED_VERSION, "state": manifest}
    with files.commit(folder, QUANTIZED_JSON, description) as staging:
        (staging / QUANTIZED_TENSORS).write_bytes(data)
    return len(data) + (files.current(folder) / QUANTIZED_JSON).stat().st_size


def load_quantized(
    path: str | os.PathLike[str], float_model: nn.Module, example: torch.Tensor
) -> nn.Module:
    """The int8 module saved by save_quantized, rebuilt on `float_model`'s architecture (any
    weights: they are replaced) traced with `example` (one input batch).

    Every file is checked against the manifest before anything is parsed (a folder written
    before the manifest listed its files has no checksum to check); then every entry against
    the int8 module `float_model` becomes: kind, dtype, shape, axis, finite and positive
    scales, finite float tensors. Every failure is a CheckpointError naming the file and the
    problem."""
    verified = files.read_verified(
        path, QUANTIZED_JSON, what="an int8 model", legacy=_unversioned_int8
    )
    folder = verified.folder
    json_file, tensor_file = folder / QUANTIZED_JSON, folder / QUANTIZED_TENSORS
    description = verified.manifest
    if description.get("format") != QUANTIZED_FORMAT:
        raise CheckpointError(f"{json_file} is not a {QUANTIZED_FORMAT} file")
    if set(verified.contents) != {QUANTIZED_TENSORS}:
        raise CheckpointError(f"{json_file} lists {sorted(verified.contents)}, not the int8 file")
    manifest = description.get("state")
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{json_file} holds no state description")
    tensors = read_safetensors(verified.contents[QUANTIZED_TENSORS], tensor_file)
    template = quantize_int8(float_model, [example])
    expected = template.state_dict()
    missing, unexpected = (
        sorted(set(expected) - set(manifest)),
        sorted(set(manifest) - set(expected)),
    )
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} was saved from another architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    reader = _Int8Reader(json_file, tensor_file, tensors)
    state = OrderedDict(
        (key, reader.restore(key, manifest[key], expected[key])) for key in expected
    )
    unused = sorted(set(tensors) - reader.used)
    if unused:
        raise CheckpointError(f"{tensor_file} holds tensors no entry names: {unused[:5]}")
    # The modules' state versions: quantized Linear reads a version-less state as its old layout.
    state._metadata = expected._metadata  # type: ignore[attr-defined]
    with _quiet_torch_ao():
        template.load_state_dict(state)
    return template


def _unversioned_int8(file: Path, description: dict[str, Any]) -> dict[str, str | None]:
    """quantized.json before it listed its files (no "version"): the tensor file, unchecked."""
    if "version" in description:
        raise CheckpointError(f"{file} has no {files.FILES!r} table of its folder's files")
    return {QUANTIZED_TENSORS: None}


class _Int8Reader:
    """Rebuilds state-dict values from quantized.json's entries and the tensor file, each
    checked against the value the template module holds under the same key."""

    def __init__(self, json_file: Path, tensor_file: Path, tensors: dict[str, torch.Tensor]):
        self.json_file, self.tensor_file, self.tensors = json_file, tensor_file, tensors
        self.used: set[str] = set()

    def fail(self, key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.json_file}: {key!r} {problem}")

    def restore(self, key: str, entry: object, expected: Any) -> Any:
        if not isinstance(entry, dict):
            raise self.fail(key, f"is described by a {type(entry).__name__}, not an object")
        if isinstance(expected, tuple):
            items = entry.get("tuple")
            if set(entry) != {"tuple"} or not isinstance(items, list):
                raise self.fail(key, "should be a tuple of entries")
            if len(items) != len(expected):
                raise self.fail(key, f"holds {len(items)} items, this model's {len(expected)}")
            return tuple(
                self.restore(f"{key}.{i}", e, x) for i, (e, x) in enumerate(zip(items, expected))
            )
        if expected is None:
            if entry != {"none": True}:
                raise self.fail(key, "should be None")
            return None
        if isinstance(expected, torch.dtype):
            if set(entry) != {"dtype"} or self.dtype(key, entry) != expected:
                raise self.fail(key, f"should be the dtype {expected}, got {entry}")
            return expected
        if not isinstance(expected, torch.Tensor):
            raise self.fail(key, f"is a {type(expected).__name__} this reader does not know")
        if not expected.is_quantized:
            if set(entry) != {"tensor"}:
                raise self.fail(key, f"should be a plain tensor, got {sorted(entry)}")
            return self.tensor(key, entry["tensor"], expected.dtype, tuple(expected.shape))
        return self.quantized(key, entry, expected)

    def dtype(self, key: str, entry: dict[str, Any]) -> torch.dtype:
        name = entry.get("dtype")
        value = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(value, torch.dtype):
            raise self.fail(key, f"names the dtype {name!r}, which is not one")
        return value

    def tensor(
        self, key: str, name: object, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        if not isinstance(name, str) or name not in self.tensors:
            raise CheckpointError(f"{self.tensor_file} lacks the tensor {name!r} of {key!r}")
        value = self.tensors[name]
        self.used.add(name)
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"{self.tensor_file} was saved from another architecture: {name!r} is "
                f"{tuple(value.shape)}, this model's {shape}"
            )
        if value.dtype != dtype:
            raise CheckpointError(
                f"{self.tensor_file}: {name!r} has dtype {value.dtype}, this model's {dtype}"
            )
        if value.is_floating_point() and not value.isfinite().all():
            raise CheckpointError(f"{self.tensor_file}: {name!r} holds NaN/inf values")
        return value

    def quantized(self, key: str, entry: dict[str, Any], expected: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype(key, entry)
        if dtype != expected.dtype:
            raise self.fail(key, f"is {dtype}, this model's {expected.dtype}")
        values_dtype, shape = expected.int_repr().dtype, tuple(expected.shape)
        per_channel = expected.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        if per_channel:
            axis = expected.q_per_channel_axis()
            if set(entry) != {"per_channel", "dtype", "axis"} or entry["axis"] != axis:
                raise self.fail(key, f"should be int8 per channel along axis {axis}, got {entry}")
            name = entry["per_channel"]
            values = self.tensor(key, name, values_dtype, shape)
            channels = (shape[axis],)
            scales = self.tensor(
                key, f"{name}.scales", expected.q_per_channel_scales().dtype, channels
            )
            zero_points = self.tensor(
                key, f"{name}.zero_points", expected.q_per_channel_zero_points().dtype, channels
            )
            if not (scales > 0).all():
                raise CheckpointError(f"{self.tensor_file}: {name}.scales are not all positive")
            return torch._make_per_channel_quantized_tensor(values, scales, zero_points, axis)
        scale, zero_point = entry.get("scale"), entry.get("zero_point")
        if (
            set(entry) != {"per_tensor", "dtype", "scale", "zero_point"}
            or not isinstance(scale, float)
            or not math.isfinite(scale)
            or scale <= 0
            or isinstance(zero_point, bool)
            or not isinstance(zero_point, int)
        ):
            raise self.fail(key, f"should be int8 per tensor with a positive scale, got {entry}")
        values = self.tensor(key, entry["per_tensor"], values_dtype, shape)
        return torch._make_per_tensor_quantized_tensor(values, scale, zero_point)


def _store(key: str, value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """One state-dict value into safetensors-ready tensors; returns its JSON description."""
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"tuple": [_store(f"{key}.{i}", item, tensors) for i, item in enumerate(value)]}
    if value is None:
        return {"none": True}
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"cannot store {key!r}: a {type(value).__name__}")
    if not value.is_quantized:
        tensors[key] = value.detach().contiguous()
        return {"tensor": key}
    if value.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric):
        tensors[key] = value.int_repr().contiguous()
        return {
            "per_tensor": key,
            "dtype": str(value.dtype).removeprefix("torch."),
            "scale": value.q_scale(),
            "zero_point": value.q_zero_point(),
        }
    tensors[key] = value.int_repr().contiguous()
    tensors[key + ".scales"] = value.q_per_channel_scales().contiguous()
    tensors[key + ".zero_points"] = value.q_per_channel_zero_points().contiguous()
    return {
        "per_channel": key,
        "dtype": str(value.dtype).removeprefix("torch."),
        "axis": value.q_per_channel_axis(),
    }
