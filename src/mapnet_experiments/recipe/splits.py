"""The data of a run: train / validation / test splits in memory, by the dataset's task.

Data stay in memory as tensors (MNIST is 47 MB) and batches are index slices: on a 2-core
machine a DataLoader's worker processes cost more than they save.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mapnet_experiments.data.air_quality import find_series, forecasting_splits, read_single_site
from mapnet_experiments.data.mnist import load_idx_dataset, train_val_split
from mapnet_experiments.data.scenes import scene_splits
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.tasks import task_of

NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


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
