"""Image-classification training, plain or mapped: the loop behind `mapnet train`.

Data stay in memory as tensors (MNIST is 47 MB) and batches are index slices: on a 2-core
machine a DataLoader's worker processes cost more than they save.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm import tqdm

from mapnet.checkpoint import atomic_write_bytes, save
from mapnet.core import MappedModule, MappingConfig, wrap
from mapnet.data import DATASETS, load_idx_dataset, train_val_split
from mapnet.models import MODELS

MODES = ("mapped", "plain")
# Per-dataset pixel mean and std of the training split, for input standardisation.
NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


@dataclass
class TrainConfig:
    """One training run. `mapping` is used when mode == "mapped"."""

    model: str = "cnn2"
    dataset: str = "mnist"
    mode: str = "mapped"
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    seed: int = 0
    val_size: int = 5000
    mapping: MappingConfig = field(default_factory=MappingConfig)

    def __post_init__(self) -> None:
        for name, allowed in (("model", tuple(MODELS)), ("dataset", DATASETS), ("mode", MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if isinstance(self.mapping, dict):
            self.mapping = MappingConfig.from_dict(self.mapping)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Split:
    images: torch.Tensor  # (N, 1, 28, 28) float32, standardised
    labels: torch.Tensor  # (N,) int64


def load_splits(dataset: str, val_size: int, seed: int) -> dict[str, Split]:
    """Train / validation (carved from train, seeded) / test, standardised."""
    mean, std = NORMALISATION[dataset]

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - mean) / std

    train_images, train_labels = load_idx_dataset(dataset, "train")
    test_images, test_labels = load_idx_dataset(dataset, "test")
    train_idx, val_idx = train_val_split(len(train_labels), val_size, seed)
    train_images = prepare(train_images)
    return {
        "train": Split(train_images[train_idx], train_labels[train_idx]),
        "val": Split(train_images[val_idx], train_labels[val_idx]),
        "test": Split(prepare(test_images), test_labels),
    }


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of `model` (plain, in eval mode) on `split`."""
    if len(split.labels) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(split.labels), batch_size):
        x = split.images[start : start + batch_size]
        y = split.labels[start : start + batch_size]
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(split.labels), 100.0 * correct / len(split.labels)


def build(config: TrainConfig) -> nn.Module:
    """The module to train: the target itself, or the target wrapped; seeded."""
    torch.manual_seed(config.seed)
    target = MODELS[config.model]()
    return target if config.mode == "plain" else wrap(target, config.mapping)


def plain_view(module: nn.Module) -> nn.Module:
    """The module to evaluate: a mapped model generates its weights once, not once per batch."""
    return module.materialize() if isinstance(module, MappedModule) else module


def train(
    config: TrainConfig,
    splits: dict[str, Split] | None = None,
    progress: bool = True,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Train per `config`; returns its figures. The test split is evaluated once, at the end."""
    started = time.perf_counter()
    splits = splits or load_splits(config.dataset, config.val_size, config.seed)
    module = build(config)
    build_seconds = time.perf_counter() - started
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    train_split = splits["train"]
    history = []
    for epoch in range(config.epochs):
        module.train()
        order = torch.randperm(len(train_split.labels), generator=generator)
        steps = range(0, len(order), config.batch_size)
        bar = tqdm(
            steps, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False
        )
        total, seen, correct = 0.0, 0, 0
        for start in bar:
            idx = order[start : start + config.batch_size]
            x, y = train_split.images[idx], train_split.labels[idx]
            logits = module(x)
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{100 * correct / seen:.2f}")
        val_loss, val_acc = evaluate(plain_view(module), splits["val"])
        history.append(
            {"epoch": epoch + 1, "train_loss": total / seen, "train_acc": 100 * correct / seen,
             "val_loss": val_loss, "val_acc": val_acc, "seconds": time.perf_counter() - started}
        )  # fmt: skip
    final = plain_view(module)
    test_loss, test_acc = evaluate(final, splits["test"])
    target_params = sum(p.numel() for p in MODELS[config.model]().parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    result = {
        "config": config.to_dict(),
        "trainable_parameters": trainable,
        "target_parameters": target_params,
        "history": history,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "build_seconds": build_seconds,
        "wall_seconds": time.perf_counter() - started,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "argv": sys.argv,
    }
    if out_dir is not None:
        save_checkpoint(module, out_dir / "checkpoint")
        write_json(out_dir / "results.json", result)
    return result


def save_checkpoint(module: nn.Module, folder: Path) -> None:
    """A mapped model as a mapnet checkpoint; a plain one as a safetensors state dict."""
    if isinstance(module, MappedModule):
        save(module, folder)
    else:
        atomic_write_bytes(folder / "model.safetensors", save_safetensors(module.state_dict()))


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())
