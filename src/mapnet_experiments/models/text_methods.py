"""Every way to fine-tune a SentenceClassifier (all-MiniLM-L6-v2 + a new head) at a budget of
trainable numbers besides the head: what a user would pick instead of mapnet, and mapnet
itself. The text study trains them; `mapnet bench finetune` times the same builds.

    head      the encoder frozen; only the head trains (0 besides the head)
    bitfit    the encoder's biases and LayerNorm shifts (BitFit, Ben Zaken et al. 2022; its
              natural count, 25,728)
    full      everything
    lora      peft LoRA on query and value, the rank and the layers closest to the budget
    vera      peft VeRA on query and value (the shared A, B regenerated from a key, as mapnet
              regenerates W), the rank and the layers closest to the budget
    ia3       peft IA3 with its BERT defaults (key, value, output.dense; its natural count)
    mapnet    θ = θ_pre ⊙ (1 + m), eq. 25, over the encoder: a group size L, or "row" (one
              element per output row of every Linear weight: the activation path); or over
              its last k layers only
    additive  θ = θ_pre + W z (intrinsic-dimension style, base="model", α = 0)

The head trains directly in every row. `build` returns the model and what it is; `save` writes
what a user of that library would keep to reload the result (mapnet.save; peft's
save_pretrained; the trained tensors), `checkpoint_bytes` measures it.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import mapnet
from mapnet import MappingConfig
from mapnet_experiments.models.peft_adapters import quiet_peft

HEAD = "head"
METHODS = ("head", "bitfit", "full", "lora", "vera", "ia3", "mapnet", "additive")
PEFT_METHODS = ("lora", "vera", "ia3")
QUERY_VALUE = ("query", "value")


@dataclass(frozen=True)
class Method:
    """One row's method and its size: `budget` (trainable numbers besides the head to aim at;
    None for methods with a natural count) and, for mapnet, the group size and the selection."""

    name: str
    budget: int | None = None
    group_size: int | str = 1
    selection: str = "linear-weights"  # mapnet: "linear-weights" or "encoder" (every tensor)
    within_tensors: bool = False  # mapnet, numeric L: groups restart at every tensor
    last_layers: int | None = None  # mapnet: the encoder's last k layers only (None: all)

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; methods: {', '.join(METHODS)}")
        if self.name in ("lora", "vera", "mapnet", "additive") and self.budget is None:
            raise ValueError(f"method {self.name!r} needs a budget")
        if self.selection not in ("linear-weights", "encoder"):
            raise ValueError(f"unknown selection {self.selection!r}")
        if self.last_layers is not None and (self.name != "mapnet" or self.last_layers < 1):
            raise ValueError(f"last_layers={self.last_layers} needs a mapnet row and k >= 1")


@dataclass
class Built:
    """The model to train and the figures every row reports."""

    model: nn.Module
    method: Method
    details: dict[str, Any]

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the head's trainable parameters, the method's), for their own learning rates."""
        head, rest = [], []
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                (head if _is_head(name) else rest).append(parameter)
        return head, rest

    def trainable_counts(self) -> tuple[int, int]:
        """(numbers besides the head, the head's own)."""
        head, rest = self.parameter_groups()
        return sum(p.numel() for p in rest), sum(p.numel() for p in head)


def _is_head(name: str) -> bool:
    """A parameter of the new head, under any wrapper's prefix (mapnet: target.head.*; peft:
    base_model.model.head.modules_to_save.default.*)."""
    parts = name.split(".")
    return HEAD in parts and "encoder" not in parts


def build(classifier: nn.Module, method: Method, seed: int = 0) -> Built:
    """`classifier` (a SentenceClassifier, modified or wrapped) prepared for `method`."""
    name = method.name
    if name in ("head", "bitfit", "full"):
        for parameter_name, parameter in classifier.named_parameters():
            parameter.requires_grad_(
                name == "full"
                or _is_head(parameter_name)
                or (name == "bitfit" and parameter_name.endswith(".bias"))
            )
        return Built(classifier, method, {})
    if name in PEFT_METHODS:
        return _peft(classifier, method, seed)
    return _mapnet(classifier, method, seed)


# ---------------------------------------------------------------------------------- mapnet


def mapping_config(
    method: Method, seed: int = 0, modules: list[str] | None = None
) -> MappingConfig:
    """The MappingConfig of a mapnet or additive row, over `modules` (default: the encoder)."""
    scope: dict[str, Any] = {"target_modules": modules or ["encoder"]}
    if method.selection == "linear-weights":
        scope |= {"target_types": ["Linear"], "parameter_names": ["weight"]}
    assert method.budget is not None
    if method.name == "additive":
        return MappingConfig(latent_dim=method.budget, base="model", alpha=0.0,
                             train_directly=[HEAD], seed=seed, **scope)  # fmt: skip
    return MappingConfig(latent_dim=method.budget, update="multiplicative",
                         group_size=method.group_size, train_directly=[HEAD], seed=seed,
                         groups_within_tensors=method.within_tensors, **scope)  # fmt: skip


def _last_blocks(classifier: nn.Module, count: int) -> list[str]:
    """The names of the last `count` blocks of the encoder's layer list (its first ModuleList)."""
    layers = next((n for n, m in classifier.named_modules() if isinstance(m, nn.ModuleList)), None)
    size = 0 if layers is None else len(classifier.get_submodule(layers))
    if not 1 <= count <= size:
        raise ValueError(f"last_layers={count}: the encoder has {size} layers")
    return [f"{layers}.{i}" for i in range(size - count, size)]


def _mapnet(classifier: nn.Module, method: Method, seed: int) -> Built:
    modules = None  # LoRA's ~2k placement (the last layer): its backward stops there too
    if method.last_layers is not None:
        modules = _last_blocks(classifier, method.last_layers)
    config = mapping_config(method, seed, modules)  # the seed draws W: the method's random part
    with warnings.catch_warnings():  # a group size leaving fewer elements than latent numbers
        warnings.filterwarnings("ignore", "latent larger than")
        mapped = mapnet.wrap(lambda: classifier, config)  # a factory: no second copy of θ_pre
    details = {
        "mapping": config.to_dict(),
        "modulated_parameters": mapped.num_generated_parameters(),
        "generated_rows": [p.out_features for p in mapped.projections],
    }
    return Built(mapped, method, details)


# ---------------------------------------------------------------------------------- peft


def _linear_names(model: nn.Module, leaves: tuple[str, ...] | None) -> list[str]:
    """The encoder's nn.Linear names in registration order, those ending in `leaves` if given."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith("encoder.")
        and (leaves is None or name.rsplit(".", 1)[-1] in leaves)
    ]


def _adapter_count(model: nn.Module, name: str, targets: list[str], rank: int) -> int:
    """Trainable numbers peft adds (the head aside): LoRA r·(in + out) per module; VeRA
    out + r per module (λ_b, λ_d)."""
    total = 0
    for target in targets:
        layer = model.get_submodule(target)
        assert isinstance(layer, nn.Linear)
        if name == "lora":
            total += rank * (layer.in_features + layer.out_features)
        else:
            total += layer.out_features + rank
    return total


def plan(model: nn.Module, name: str, budget: int) -> tuple[list[str], int]:
    """Targets and rank of LoRA or VeRA closest to `budget`: query and value of the last k
    layers (k = 1..all) at rank 1, or every query and value, or every Linear of the encoder, at
    any rank up to a cap (LoRA 64; VeRA 4× the hidden size); ties go to fewer numbers."""
    query_value = _linear_names(model, QUERY_VALUE)
    every_linear = _linear_names(model, None)
    candidates: list[tuple[int, list[str], int]] = []
    for count in range(2, len(query_value) + 1, 2):  # whole layers: a query and its value
        targets = query_value[-count:]
        candidates.append((_adapter_count(model, name, targets, 1), targets, 1))
    hidden = model.get_submodule(query_value[0]).in_features
    top = 4 * hidden if name == "vera" else 64
    for targets in (query_value, every_linear):
        for rank in range(2, top + 1):
            candidates.append((_adapter_count(model, name, targets, rank), targets, rank))
    count, targets, rank = min(candidates, key=lambda c: (abs(c[0] - budget), c[0]))
    return targets, rank


def _peft(classifier: nn.Module, method: Method, seed: int) -> Built:
    from peft import IA3Config, LoraConfig, VeraConfig, get_peft_model

    details: dict[str, Any] = {}
    if method.name == "ia3":
        # peft's defaults for BERT (utils/constants.py): key, value and output.dense scaled,
        # output.dense as the feed-forward module (scaled on its input).
        config: Any = IA3Config(
            target_modules=["key", "value", "output.dense"],
            feedforward_modules=["output.dense"],
            modules_to_save=[HEAD],
        )
    else:
        assert method.budget is not None
        targets, rank = plan(classifier, method.name, method.budget)
        details = {"targets": targets, "rank": rank}
        pattern = "(?:" + "|".join(t.replace(".", r"\.") for t in targets) + ")"
        if method.name == "lora":
            config = LoraConfig(r=rank, lora_alpha=8, target_modules=pattern,
                                modules_to_save=[HEAD], bias="none")  # fmt: skip
        else:
            with quiet_peft():
                config = VeraConfig(r=rank, target_modules=pattern, projection_prng_key=seed,
                                    save_projection=False, modules_to_save=[HEAD],
                                    bias="none")  # fmt: skip
    with quiet_peft(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(classifier, config)
    return Built(model, method, details)


def checkpoint_bytes(built: Built) -> int:
    """What a user of that library keeps to reload the result onto the same pretrained model."""
    with tempfile.TemporaryDirectory() as folder:
        save(built, Path(folder) / "checkpoint")
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def save(built: Built, folder: Path) -> None:
    """The fine-tune as its library saves it: mapnet.save; peft's save_pretrained (its README
    model card dropped); for the rest, the trained tensors as safetensors."""
    model = built.model
    if isinstance(model, mapnet.MappedModule):
        mapnet.save(model, folder)
    elif built.method.name in PEFT_METHODS:
        with quiet_peft():
            model.save_pretrained(folder)  # type: ignore[operator]
        (folder / "README.md").unlink(missing_ok=True)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, folder / "trained.safetensors")
