"""`TrainConfig`: one training run's settings, checked when built, and how a config stored by an
older version reads today (fields added since take their defaults)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from mapnet import MappingConfig
from mapnet.checks import from_dict
from mapnet.compress import PRUNE_SCOPES, check_sparsity
from mapnet_experiments.data.mnist import DATASETS
from mapnet_experiments.models.networks import SMALL_CNN, model_factory
from mapnet_experiments.models.variants import check_variant
from mapnet_experiments.recipe.tasks import DATASET_TASKS, TASK_MODELS, task_of

MODES = ("mapped", "plain")
# The recipe feeds 1×28×28 images: these and "smallcnn-a-b-c"; resnet50 (3×64×64) is a
# benchmark target only.
IMAGE_MODELS = ("cnn1", "cnn2", "cnn2-lrd")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
# Per-dataset pixel mean and std of the training split, for input standardisation; other


@dataclass
class TrainConfig:
    """One training run. `mapping` and `loss` are used when mode == "mapped".

    loss: keyword arguments of MappingLoss (e.g. {"stability": true, "coefficients": "fixed"});
        empty = the task loss alone.
    data_dir: read `dataset` from <data_dir>/<dataset>/ instead of the built-in sources (IDX
        files; beijing-pm25: its CSV; scenes: the mnist/ and fashion-mnist/ folders); any
        classification name is then allowed (a custom IDX set is checked for structure only).
    variant: mode "mapped" only: what trains (mapnet_experiments.models.variants.VARIANTS; the
        paper's Table 7). "ours" is the method.
    start_from: a finished run folder whose final checkpoint (same model, mode and mapping)
        the run starts from instead of the initialisation: pruning and quantisation-aware
        training continue a trained run (paper Table 8).
    sparsity: prune this fraction of the generated (plain: all) weights by magnitude at the
        start, the masks fixed for the rest of training; prune_scope "tensor" prunes every
        tensor by that fraction, "global" all numbers together (mapnet.compress.magnitude_masks).
    fake_quant: train through int8-rounded weights (quantisation-aware training).
    window: forecasting only: hours of history per input window.
    init_seed: mode "plain": the seed of the network's initialisation (None: `seed`, which
        also orders the batches), for two runs from one init in different orders.
    split_seed: classification: the seed that carves the validation split from the training
        set (None: `seed`), for runs in different orders on one split.

    The dataset decides the task (mapnet_experiments.recipe.tasks): "beijing-pm25" is forecasting
    (model "lstm"), "scenes" segmentation (model "unet"), any other classification.
    """

    model: str = "cnn2"
    dataset: str = "mnist"
    mode: str = "mapped"
    epochs: int = 1
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    seed: int = 0
    val_size: int = 5000
    data_dir: str | None = None
    mapping: MappingConfig = field(default_factory=MappingConfig)
    loss: dict[str, Any] = field(default_factory=dict)
    variant: str = "ours"
    start_from: str | None = None
    sparsity: float = 0.0
    prune_scope: str = "tensor"
    fake_quant: bool = False
    window: int = 24
    init_seed: int | None = None
    split_seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mapping, dict):
            self.mapping = MappingConfig.from_dict(self.mapping)
        task = task_of(self.dataset)
        if task.kind == "classification":
            model_factory(self.model)  # a clear error for an unknown model name
            if self.model not in IMAGE_MODELS and not self.model.startswith(SMALL_CNN + "-"):
                raise ValueError(
                    f"model={self.model!r} is not one of {IMAGE_MODELS} or smallcnn-a-b-c "
                    "(the recipe feeds 1×28×28 images)"
                )
        elif self.model not in TASK_MODELS[task.kind]:
            raise ValueError(
                f"dataset {self.dataset!r} is a {task.kind} task: model must be one of "
                f"{TASK_MODELS[task.kind]}, got {self.model!r}"
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window <= 0:
            raise ValueError(f"window must be a positive number of hours, got {self.window!r}")
        if "task_loss" in self.loss:
            raise ValueError(
                "loss.task_loss is set by the dataset's task (cross-entropy, MSE, per-pixel "
                "cross-entropy); remove it"
            )
        choices = {
            "mode": MODES,
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
        }
        if self.data_dir is None:
            choices["dataset"] = (*DATASETS, *DATASET_TASKS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.val_size, int) or self.val_size < 0:
            raise ValueError(f"val_size must be an int >= 0, got {self.val_size!r}")
        for name in ("lr", "momentum", "weight_decay", "sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):  # 1e999 parses to inf
                raise ValueError(f"{name} must be finite, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not isinstance(self.loss, dict):
            raise ValueError(f"loss must be a dict of MappingLoss options, got {self.loss!r}")
        check_variant(self.variant, self.mapping)
        if self.variant != "ours" and self.mode != "mapped":
            raise ValueError(f"variant={self.variant!r} needs mode='mapped'")
        if self.loss and self.variant != "ours":
            raise ValueError(
                f"the mapping loss terms {sorted(self.loss)} need variant='ours' (a MappedModule)"
            )
        check_sparsity(self.sparsity)
        compressed = self.sparsity > 0 or self.fake_quant is True
        if compressed and self.variant != "ours":
            raise ValueError(
                f"sparsity and fake_quant act on generated weights: variant={self.variant!r} "
                "trains other tensors (use variant='ours' or mode='plain')"
            )
        if compressed and self.loss and self.mode == "mapped":
            raise ValueError(
                f"the mapping loss terms {sorted(self.loss)} cannot be combined with sparsity "
                "or fake_quant (the loss regularises the uncompressed mapping)"
            )
        if self.prune_scope not in PRUNE_SCOPES:
            raise ValueError(f"prune_scope={self.prune_scope!r} is not one of {PRUNE_SCOPES}")
        if not isinstance(self.fake_quant, bool):
            raise ValueError(f"fake_quant must be true or false, got {self.fake_quant!r}")
        for name in ("init_seed", "split_seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an int or null, got {value!r}")
        if self.init_seed is not None and self.mode != "plain":
            raise ValueError(
                "init_seed sets a plain network's initialisation; a mapped one starts from the "
                "mapping's θ₀ (mapping.seed)"
            )
        if self.start_from is not None and not isinstance(self.start_from, str):
            raise ValueError(f"start_from must be a run folder path, got {self.start_from!r}")

    def to_dict(self) -> dict[str, Any]:
        # The mapping's own to_dict: it names the base that base=None resolves to.
        return dataclasses.asdict(self) | {"mapping": self.mapping.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data)


ADDED_MAPPING_FIELDS = (
    "target_modules",
    "exclude_modules",
    "train_directly",
    "store_base",
    "check_finite",
    "update",
    "group_size",
    "target_fraction",
    "target_types",
    "parameter_names",
    "groups_within_tensors",
)


# TrainConfig fields added since (the ablation and compression runs); absent means the default.
ADDED_TRAIN_FIELDS = (
    "variant",
    "start_from",
    "sparsity",
    "prune_scope",
    "fake_quant",
    "window",
    "init_seed",
    "split_seed",
)


def stored_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A stored config.json as `to_dict()` writes it today (JSON types): the fields added since
    take their defaults. Nothing else is filled in, so any other difference still counts."""
    own = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {**{name: own[name] for name in ADDED_TRAIN_FIELDS if name not in saved}, **saved}
    mapping = saved.get("mapping")
    if not isinstance(mapping, dict):
        return saved
    defaults = json.loads(json.dumps(MappingConfig().to_dict()))
    added = {name: defaults[name] for name in ADDED_MAPPING_FIELDS if name not in mapping}
    return {**saved, "mapping": {**mapping, **added}}


def differing(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the fields that differ, nested tables dotted ("mapping.projection")."""
    names = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += [f"{key}.{name}" for name in differing(a, b)]
        elif a != b or (key in saved) != (key in wanted):
            names.append(key)
    return names
