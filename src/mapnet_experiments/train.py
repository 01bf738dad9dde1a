"""Image classification, plain or mapped: the recipe behind `mapnet train`.

A run folder holds everything needed to resume it exactly:

    config.json     the TrainConfig (a resumed run must be given the same one)
    metrics.jsonl   one line per finished epoch: train/val/test loss and accuracy, lr, seconds
    state/          while the run is unfinished only: model + optimiser + RNG state after the
                    last finished epoch (atomic swap); removed once results.json is written
    checkpoint/     the final model (a mapnet checkpoint, or model.safetensors for plain runs)
    results.json    written last: its presence means the run is complete

A finished run keeps its result, metrics and final checkpoint, so results/ stays small; resuming
it trains nothing and returns the stored results.json.

Data stay in memory as tensors (MNIST is 47 MB) and batches are index slices: on a 2-core
machine a DataLoader's worker processes cost more than they save.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm import tqdm

from mapnet import MappedModule, MappingConfig
from mapnet.checkpoint import load_into, save
from mapnet.checks import from_dict
from mapnet.compress import PRUNE_SCOPES, CompressedWeights, check_sparsity
from mapnet.errors import CheckpointError
from mapnet.files import atomic_write_bytes
from mapnet.loss import MappingLoss
from mapnet_experiments.ablations import build_variant, check_variant
from mapnet_experiments.data import DATASETS, load_idx_dataset, train_val_split
from mapnet_experiments.distributed import RankLostError, Ranks, Traffic
from mapnet_experiments.forecasting_data import (
    SINGLE_SITE_NUMERIC,
    SINGLE_SITE_WIND,
    find_series,
    forecasting_splits,
    read_single_site,
)
from mapnet_experiments.models import SMALL_CNN, LSTMForecaster, UNet, model_factory
from mapnet_experiments.segmentation_data import scene_splits
from mapnet_experiments.tasks import CLASSIFICATION, DATASET_TASKS, TASK_MODELS, Task, task_of

SINGLE_SITE_FEATURES = len(SINGLE_SITE_NUMERIC) + len(SINGLE_SITE_WIND)

MODES = ("mapped", "plain")
# The recipe feeds 1×28×28 images: these and "smallcnn-a-b-c"; resnet50 (3×64×64) is a
# benchmark target only.
IMAGE_MODELS = ("cnn1", "cnn2", "cnn2-lrd")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
# Per-dataset pixel mean and std of the training split, for input standardisation; other
# (custom) data sets are standardised with their own training-split statistics.
NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
STATE_FORMAT = 1


@dataclass
class TrainConfig:
    """One training run. `mapping` and `loss` are used when mode == "mapped".

    loss: keyword arguments of MappingLoss (e.g. {"stability": true, "coefficients": "fixed"});
        empty = the task loss alone.
    data_dir: read `dataset` from <data_dir>/<dataset>/ instead of the built-in sources (IDX
        files; beijing-pm25: its CSV; scenes: the mnist/ and fashion-mnist/ folders); any
        classification name is then allowed (a custom IDX set is checked for structure only).
    variant: mode "mapped" only: what trains (mapnet_experiments.ablations.VARIANTS; the
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

    The dataset decides the task (mapnet_experiments.tasks): "beijing-pm25" is forecasting
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
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
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


@dataclass
class Split:
    """One split's inputs and targets, in memory. Classification: images (N, C, H, W) float32,
    standardised, and labels (N,) int64; forecasting: windows (N, T, F) and targets (N,);
    segmentation: images (N, C, H, W) and masks (N, H, W) int64."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(
                f"{len(self.inputs)} inputs but {len(self.targets)} targets in a split"
            )

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def images(self) -> torch.Tensor:  # the classification names
        return self.inputs

    @property
    def labels(self) -> torch.Tensor:
        return self.targets


def load_splits(config: TrainConfig) -> dict[str, Split]:
    """Train / validation / test of the config's dataset (its task's own pipeline)."""
    kind = task_of(config.dataset).kind
    if kind == "regression":
        return _forecasting_splits(config)
    if kind == "segmentation":
        return _scene_splits(config)
    return _image_splits(config)


def _forecasting_splits(config: TrainConfig) -> dict[str, Split]:
    """Consecutive train / validation / test periods, min-max scaled on the training hours."""
    series = read_single_site(find_series(config.dataset, config.data_dir))
    windows, _ = forecasting_splits(series, config.window)
    return {name: Split(w.inputs, w.targets) for name, w in windows.items()}


def _scene_splits(config: TrainConfig) -> dict[str, Split]:
    """Scenes composed from MNIST and Fashion-MNIST (segmentation_data.scene_splits)."""
    root = Path(config.data_dir) if config.data_dir is not None else None
    sources = {
        name: {split: _squeezed(load_idx_dataset(name, split, root)) for split in ("train", "test")}
        for name in ("mnist", "fashion-mnist")
    }
    scenes = scene_splits(sources["mnist"], sources["fashion-mnist"], seed=config.seed)
    return {name: Split(s.images, s.masks) for name, s in scenes.items()}


def _squeezed(data: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data  # (N, 1, H, W) -> (N, H, W)
    return images[:, 0], labels


def _image_splits(config: TrainConfig) -> dict[str, Split]:
    """Train / validation (carved from train, seeded) / test, standardised."""
    root = Path(config.data_dir) if config.data_dir is not None else None
    train_images, train_labels = load_idx_dataset(config.dataset, "train", root)
    test_images, test_labels = load_idx_dataset(config.dataset, "test", root)
    split_seed = config.seed if config.split_seed is None else config.split_seed
    train_idx, val_idx = train_val_split(len(train_labels), config.val_size, split_seed)
    train_images = train_images.float() / 255.0
    if config.dataset in NORMALISATION:
        mean, std = NORMALISATION[config.dataset]
    else:
        fit = train_images[train_idx]
        mean, std = fit.mean().item(), fit.std().item() or 1.0
    train_images = (train_images - mean) / std
    return {
        "train": Split(train_images[train_idx], train_labels[train_idx]),
        "val": Split(train_images[val_idx], train_labels[val_idx]),
        "test": Split((test_images.float() / 255.0 - mean) / std, test_labels),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, task: Task = CLASSIFICATION, batch_size: int = 1000
) -> dict[str, float]:
    """The task's metrics of `model` (plain, put in eval mode) on `split`, e.g. {"loss": mean
    cross-entropy, "acc": accuracy %}; NaN for an empty split."""
    model.eval()
    meter = task.meter()
    for start in range(0, len(split), batch_size):
        meter.update(
            model(split.inputs[start : start + batch_size]),
            split.targets[start : start + batch_size],
        )
    return meter.result()


def build(config: TrainConfig) -> nn.Module:
    """The module to train: the target itself, or the target wrapped; seeded. A mapped model is
    built from the class as a factory, so θ₀ is its own initialisation under the mapping's seed
    (for CNN1, CNN2 and ResNet-50 the same values reset_parameters() regenerates)."""
    torch.manual_seed(config.seed if config.init_seed is None else config.init_seed)
    factory = target_factory(config)
    if config.mode == "plain":
        module = factory()
    else:
        module = build_variant(config.variant, factory, config.mapping)
    if config.start_from is not None:
        load_model(module, Path(config.start_from) / "checkpoint")
    if config.sparsity > 0 or config.fake_quant:
        module = CompressedWeights.pruned(
            module, config.sparsity, config.fake_quant, config.prune_scope
        )
    return module


def target_factory(config: TrainConfig) -> Callable[[], nn.Module]:
    """The target network's zero-argument factory, shaped for the config's data."""
    if config.model == "lstm":
        return functools.partial(LSTMForecaster, num_features=SINGLE_SITE_FEATURES)
    if config.model == "unet":
        task = task_of(config.dataset)
        return functools.partial(UNet, num_classes=task.num_classes, in_channels=1)
    return model_factory(config.model)


def plain_view(module: nn.Module) -> nn.Module:
    """The module to evaluate: a mapped model (any variant, compressed or not) generates its
    weights once, not once per batch."""
    materialize = getattr(module, "materialize", None)
    return materialize() if callable(materialize) else module


class Trainer:
    """Model, loss, optimiser and batch order of one run, with exact save/restore."""

    def __init__(self, config: TrainConfig, ranks: Ranks | None = None):
        self.config = config
        self.ranks = ranks or Ranks()
        self.task = task_of(config.dataset)
        started = time.perf_counter()
        self.module = build(config)
        self.build_seconds = time.perf_counter() - started  # the model and its mapping alone
        self.loss_fn = None
        self.traffic = Traffic()
        self.forward_module = self.module  # what the training forward runs through
        if self.ranks.distributed:
            if config.loss:
                raise ValueError(
                    f"the mapping loss terms {sorted(config.loss)} are not supported across "
                    "processes (their extra forwards and coefficients are not synchronised); "
                    "train them with one process"
                )
            self.forward_module = self.ranks.wrap(self.module, self.traffic)
        if isinstance(self.module, MappedModule):
            # The recipe's loss is the task loss alone unless config.loss switches terms on.
            # Across processes it only carries its state, so a run's checkpoints are the same
            # for any number of processes and resume on any.
            terms = {"stability": False, "smoothness": False, "alignment": False}
            self.loss_fn = MappingLoss(self.module, self.task.loss, **(terms | config.loss))
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.loss_fn is not None:
            params += list(self.loss_fn.parameters())
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=config.lr, weight_decay=config.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
        self.batch_order = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    def trainable_parameters(self) -> int:
        """What every table reports: latents (or weights) plus trainable loss coefficients."""
        count = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        return count + (self.loss_fn.num_trainable_parameters() if self.loss_fn else 0)

    def lr_at(self, step: int, total: int) -> float:
        if self.config.schedule == "cosine":
            return self.config.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
        return self.config.lr

    def train_epoch(
        self, split: Split, progress: bool, on_step: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """One epoch; `on_step` is called after every optimiser step (e.g. to record weights)."""
        config = self.config
        self.module.train()
        order = torch.randperm(len(split), generator=self.batch_order)
        steps_per_epoch = math.ceil(len(order) / config.batch_size)
        bar = tqdm(
            range(steps_per_epoch),
            disable=not (progress and self.ranks.is_main),
            leave=False,
            desc=f"epoch {self.epoch + 1}/{config.epochs}",
        )
        meter = self.task.meter()
        seen = 0
        terms: dict[str, float] = {}
        for step in bar:
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            lr = self.lr_at(self.epoch * steps_per_epoch + step, config.epochs * steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.ranks.distributed:
                logits, y, task = self._shared_step(split, batch)
            else:
                x, y = split.inputs[batch], split.targets[batch]
                if self.loss_fn is not None:
                    out = self.loss_fn(x, y)
                    loss, logits = out.total, out.outputs
                    for key, value in out.values.items():
                        terms[key] = terms.get(key, 0.0) + value * len(y)
                    task = out.values.get("task", loss.item())
                else:
                    logits = self.module(x)
                    loss = self.task.loss(logits, y)
                    task = loss.item()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            if on_step is not None:
                on_step()
            if len(y):
                meter.update(logits.detach(), y, loss_mean=task)  # the training-mode loss
            seen += len(y)
            bar.set_postfix({k: f"{v:.4f}" for k, v in meter.result().items()})
        self.epoch += 1
        meter.sum_over(self.ranks)
        row = {f"train_{k}": v for k, v in meter.result().items()} | {"lr": lr}
        row.update({f"loss_{k}": v / seen for k, v in terms.items() if k != "task"})
        return row

    def _shared_step(
        self, split: Split, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One step of a multi-process run on this rank's share of `batch`. Its mean loss is
        weighted by its share of the batch, so DDP's average over ranks is the gradient of the
        whole batch's mean. A rank whose share is empty (a last batch smaller than the number
        of ranks) takes part with one sample at weight 0 (BatchNorm statistics see it).
        Returns this rank's outputs, targets and mean loss."""
        idx = self.ranks.shard(batch)
        empty = len(idx) == 0
        x, y = (
            split.inputs[idx if not empty else batch[:1]],
            split.targets[idx if not empty else batch[:1]],
        )
        whole = self.task.scored(split.targets[batch])
        share = 0.0 if empty or whole == 0 else self.task.scored(y) / whole
        try:
            logits = self.forward_module(x)  # DDP may broadcast buffers here
            loss = self.task.loss(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            (loss * (share * self.ranks.world_size)).backward()  # the all-reduce runs here
        except RuntimeError as error:
            lost = self.ranks.lost(error)
            if lost is None:
                raise
            raise lost from None
        self.optimizer.step()
        self.traffic.step_done()
        if empty:
            return logits[:0], y[:0], 0.0
        return logits, y, loss.item()

    # ------------------------------------------------------------ exact save / restore

    def save_state(self, folder: Path) -> None:
        """Everything needed to continue as if never stopped; replaces `folder` atomically."""
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        save_model(self.module, staging / "model")
        tensors, meta = flatten_optimizer(self.optimizer.state_dict())
        tensors["rng.batch_order"] = self.batch_order.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.loss_fn is not None:
            for key, value in self.loss_fn.state_dict().items():
                tensors[f"loss.{key}"] = value.detach().clone()
        atomic_write_bytes(staging / "trainer.safetensors", save_safetensors(tensors))
        description = {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "history": self.history,
            "optimizer": meta,
            "config": self.config.to_dict(),
        }
        atomic_write_bytes(staging / "trainer.json", json.dumps(description, indent=1).encode())
        replace_folder(staging, folder)

    def restore_state(self, folder: Path) -> None:
        try:
            description = json.loads((folder / "trainer.json").read_text())
            tensors = load_safetensors((folder / "trainer.safetensors").read_bytes())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{folder}: training state unreadable: {error}") from None
        if description.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{folder}: unknown training-state format")
        load_model(self.module, folder / "model")
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, description["optimizer"]))
        self.batch_order.set_state(tensors["rng.batch_order"])
        torch.set_rng_state(tensors["rng.torch"])
        if self.loss_fn is not None:
            prefix = "loss."
            self.loss_fn.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
        self.epoch = description["epoch"]
        self.history = description["history"]


def replace_folder(staging: Path, folder: Path) -> None:
    """Swap the completely written folder `staging` in for `folder`: the old one is removed only
    after the new one is complete on disk (`recover_state` mends a swap cut between renames)."""
    previous = folder.with_name(folder.name + ".old")
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def recover_state(out: Path) -> None:
    """Before resuming from out/state: drop an interrupted save, finish an interrupted swap."""
    shutil.rmtree(out / "state.tmp", ignore_errors=True)
    old, state = out / "state.old", out / "state"
    if old.exists() and not state.exists():
        old.rename(state)


def save_model(module: nn.Module, folder: Path) -> None:
    """A mapped model as a mapnet checkpoint; any other module (plain, an ablation variant, a
    compressed model: their state dicts hold a mapped model's identity) as
    folder/model.safetensors."""
    if isinstance(module, MappedModule):
        save(module, folder)
    else:
        atomic_write_bytes(folder / "model.safetensors", save_safetensors(module.state_dict()))


def load_model(module: nn.Module, folder: Path) -> None:
    """The inverse of save_model: every mismatch is a CheckpointError naming the folder."""
    if isinstance(module, MappedModule):
        load_into(folder, module)
        return
    try:
        state = load_safetensors((folder / "model.safetensors").read_bytes())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: model unreadable ({error})") from None
    try:
        module.load_state_dict(state)
    except (RuntimeError, CheckpointError) as error:  # names, shapes: the message lists them
        raise CheckpointError(f"{folder} does not fit this model: {error}") from None


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimiser state as safetensors-ready tensors plus JSON-ready scalars (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def train(
    config: TrainConfig,
    splits: dict[str, Split] | None = None,
    progress: bool = True,
    out_dir: Path | None = None,
    resume: bool = False,
    evaluate_test: bool = True,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Train per `config`; returns its figures. With `out_dir`, every epoch is checkpointed and
    `resume=True` continues from the last finished one, to the same result as an uninterrupted
    run. The test split is evaluated after each epoch for the record; choices use validation.
    `evaluate_test=False` (runs that exist to make a choice) never touches the test split: its
    figures are None. `ranks`: one process of a multi-process run (mapnet_experiments.
    distributed); rank 0 evaluates and writes, every rank returns the same figures."""
    started = time.perf_counter()
    ranks = ranks or Ranks()
    if out_dir is not None:
        if ranks.is_main:
            _prepare_run_dir(Path(out_dir), config, resume)
        ranks.barrier()
        finished = _finished_result(Path(out_dir), main=ranks.is_main)
        if finished is not None:
            return finished
    splits = splits or load_splits(config)
    data_seconds = time.perf_counter() - started
    trainer = Trainer(config, ranks)
    task = trainer.task
    build_seconds = trainer.build_seconds
    state_dir = Path(out_dir) / "state" if out_dir is not None else None
    if resume and state_dir is not None and state_dir.exists():
        trainer.restore_state(state_dir)
        if progress and ranks.is_main:
            print(f"resuming after epoch {trainer.epoch} of {config.epochs}", file=sys.stderr)
    main_epoch = ranks.from_main(trainer.epoch)
    if main_epoch != trainer.epoch:
        raise ValueError(
            f"rank {ranks.rank} resumed after epoch {trainer.epoch}, rank 0 after epoch "
            f"{main_epoch}: every rank must see the same {out_dir} (a shared file system)"
        )
    elapsed_before = trainer.history[-1]["seconds"] if trainer.history else 0.0
    while trainer.epoch < config.epochs:
        row: dict[str, Any] = trainer.train_epoch(splits["train"], progress)
        if ranks.is_main:
            view = plain_view(trainer.module)
            for name, value in evaluate(view, splits["val"], task).items():
                row[f"val_{name}"] = value
            tested = evaluate(view, splits["test"], task) if evaluate_test else {}
            for name in task.metrics:
                row[f"test_{name}"] = tested.get(name)
            row["epoch"] = trainer.epoch
            row["seconds"] = elapsed_before + time.perf_counter() - started
        row = ranks.from_main(row)
        trainer.history.append(row)
        if progress and ranks.is_main:
            key = task.primary
            print(
                f"  epoch {row['epoch']}: train {key} {row[f'train_{key}']:.4g}  val {key} "
                f"{row[f'val_{key}']:.4g}  ({row['seconds']:.0f} s)",
                file=sys.stderr,
            )
        if state_dir is not None and ranks.is_main:
            trainer.save_state(state_dir)
            _write_metrics(Path(out_dir) / "metrics.jsonl", trainer.history)

    history = trainer.history
    key = task.primary
    best = max(history, key=lambda r: (task.rank(r[f"val_{key}"]), -r["epoch"])) if history else {}
    result = {
        "config": config.to_dict(),
        "task": task.kind,
        "trainable_parameters": trainer.trainable_parameters(),
        "target_parameters": sum(p.numel() for p in target_factory(config)().parameters()),
        "epochs": len(history),
        "history": history,
        **{
            f"{phase}_{name}": history[-1][f"{phase}_{name}"]
            for phase in ("train", "val", "test")
            for name in task.metrics
        },
        f"best_val_{key}": best.get(f"val_{key}"),
        "best_val_epoch": best.get("epoch"),
        f"best_val_test_{key}": best.get(f"test_{key}"),
        "nonzero_weights": _nonzero_weights(trainer.module),
        "build_seconds": build_seconds,
        "data_seconds": data_seconds,
        "wall_seconds": history[-1]["seconds"],
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
    }
    if ranks.distributed:
        result["processes"] = ranks.world_size
        result["allreduce_bytes_per_step"] = trainer.traffic.max_step_bytes
    if out_dir is not None and ranks.is_main:
        save_model(trainer.module, Path(out_dir) / "checkpoint")
        write_json(Path(out_dir) / "results.json", result)
        remove_state(Path(out_dir))  # only after results.json: a crash before it can resume
    try:
        ranks.barrier()  # every rank ends once the results are on disk
    except RankLostError:
        if not ranks.is_main:  # rank 0 has written the results: a peer lost now costs nothing
            raise
    return result


def _nonzero_weights(module: nn.Module) -> int:
    """Nonzero parameters of the network the trained model runs as (what pruning reduces)."""
    with torch.no_grad():
        return sum(int(p.count_nonzero()) for p in plain_view(module).parameters())


def _finished_result(out: Path, main: bool = True) -> dict[str, Any] | None:
    """The stored result of a finished run in `out` (None if unfinished); any resume state left
    by a crash after results.json was written is removed (by rank 0 of several)."""
    results_file = out / "results.json"
    if not results_file.exists():
        return None
    try:
        result = json.loads(results_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{results_file}: unreadable ({error}); remove it to redo the run"
        ) from None
    if main:
        remove_state(out)
        print(
            f"mapnet: {out} holds a finished run; nothing to resume, returning its results.json",
            file=sys.stderr,
        )
    return result


def saved_epoch(out: Path) -> int | None:
    """The last epoch an unfinished run in `out` saved (None if none)."""
    for name in ("state", "state.old"):  # state.old: interrupted between a swap's renames
        try:
            return int(json.loads((out / name / "trainer.json").read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def remove_state(out: Path) -> None:
    for name in ("state", "state.tmp", "state.old"):
        shutil.rmtree(out / name, ignore_errors=True)


# MappingConfig fields added in mapnet 0.2 (src/mapnet/config.py). A run folder written before
# them does not name them, which means their defaults.
ADDED_MAPPING_FIELDS = (
    "target_modules",
    "exclude_modules",
    "train_directly",
    "store_base",
    "check_finite",
    "update",
    "group_size",
    "target_fraction",
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


def _differing(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the fields that differ, nested tables dotted ("mapping.projection")."""
    names = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += [f"{key}.{name}" for name in _differing(a, b)]
        elif a != b or (key in saved) != (key in wanted):
            names.append(key)
    return names


def _prepare_run_dir(out: Path, config: TrainConfig, resume: bool) -> None:
    config_file = out / "config.json"
    if config_file.exists():
        saved = stored_config(json.loads(config_file.read_text()))
        if not resume:
            if (out / "results.json").exists():
                raise ValueError(f"{out} already holds a finished run; choose another --out")
            raise ValueError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --out"
            )
        wanted = json.loads(json.dumps(config.to_dict()))
        if saved != wanted:
            raise ValueError(
                f"{out} holds a run with a different config (fields {_differing(saved, wanted)});"
                " resume it with the same settings or choose another --out"
            )
        recover_state(out)
        return
    write_json(config_file, config.to_dict())


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole from the saved state, so after a resume it never holds a lost epoch.
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in history).encode())


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())
