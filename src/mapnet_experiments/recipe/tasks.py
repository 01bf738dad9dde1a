"""What a run optimises and reports, beside the one training loop (train.py): classification
(accuracy), regression (MSE: the forecaster of paper Table 4) and segmentation (pixel accuracy
and mIoU: the U-Net of Table 3).

A task gives the loss (also the mapping loss's task term) and a meter that accumulates a split's
metrics batch by batch; `primary` is the validation metric that picks the best epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mapnet_experiments.data.scenes import IGNORE, check_labels
from mapnet_experiments.recipe.metrics import ConfusionMatrix

if TYPE_CHECKING:
    from mapnet_experiments.recipe.distributed import Ranks


class Meter:
    """Sums of a split's metrics over batches; `result()` gives their means."""

    def __init__(self, task: Task):
        self.task = task
        self.loss_sum = 0.0
        self.count = 0  # samples (pixels for segmentation) the loss is averaged over
        self.correct = 0
        self.confusion = ConfusionMatrix(task.num_classes) if task.kind == "segmentation" else None

    @torch.no_grad()
    def update(
        self, outputs: torch.Tensor, targets: torch.Tensor, loss_mean: float | None = None
    ) -> None:
        """Add a batch. `loss_mean`: the batch's mean loss as already computed (training),
        used instead of recomputing it."""
        kind = self.task.kind
        self.task.check(outputs, targets)
        if loss_mean is not None:
            count = self.task.scored(targets)
            self.loss_sum += loss_mean * count
            self.count += count
            if kind == "classification":
                self.correct += int((outputs.argmax(1) == targets).sum())
            elif kind == "segmentation":
                self.confusion.update(outputs.argmax(1), targets)  # type: ignore[union-attr]
            return
        if kind == "classification":
            self.loss_sum += nn.functional.cross_entropy(outputs, targets, reduction="sum").item()
            self.correct += int((outputs.argmax(1) == targets).sum())
            self.count += len(targets)
        elif kind == "regression":
            self.loss_sum += float(((outputs.double() - targets.double()) ** 2).sum())
            self.count += targets.numel()
        else:
            scored = self.task.scored(targets)
            loss = nn.functional.cross_entropy(
                outputs, targets, ignore_index=IGNORE, reduction="sum"
            )
            self.loss_sum += loss.item()
            self.count += scored
            self.confusion.update(outputs.argmax(1), targets)  # type: ignore[union-attr]

    def sum_over(self, ranks: Ranks) -> None:
        """Add up the meters of every rank (each saw its own part of the batches)."""
        if not ranks.distributed:
            return
        sums = torch.tensor([self.loss_sum, self.count, self.correct], dtype=torch.float64)
        ranks.sum_(sums)
        self.loss_sum, self.count, self.correct = sums[0].item(), int(sums[1]), int(sums[2])
        if self.confusion is not None:
            ranks.sum_(self.confusion.counts)

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {name: float("nan") for name in self.task.metrics}
        loss = self.loss_sum / self.count
        if self.task.kind == "classification":
            return {"loss": loss, "acc": 100.0 * self.correct / self.count}
        if self.task.kind == "regression":
            return {"loss": loss, "mse": loss}
        confusion = self.confusion
        assert confusion is not None
        return {
            "loss": loss,
            "pixel_acc": 100.0 * confusion.pixel_accuracy(),
            "miou": confusion.mean_iou(),
        }


@dataclass(frozen=True)
class Task:
    kind: str  # "classification", "regression" or "segmentation"
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.kind!r} is not one of {TASK_KINDS}")

    @property
    def metrics(self) -> tuple[str, ...]:
        return {
            "classification": ("loss", "acc"),
            "regression": ("loss", "mse"),
            "segmentation": ("loss", "pixel_acc", "miou"),
        }[self.kind]

    @property
    def primary(self) -> str:
        """The validation metric that picks the best epoch."""
        return {"classification": "acc", "regression": "mse", "segmentation": "miou"}[self.kind]

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "regression"

    @property
    def loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The batch-mean loss: also MappingLoss's task term."""
        if self.kind == "classification":
            return nn.functional.cross_entropy
        if self.kind == "regression":
            return nn.functional.mse_loss
        return _segmentation_loss

    def scored(self, targets: torch.Tensor) -> int:
        """How many numbers a batch's mean loss averages over: samples, target values, or
        pixels that are not IGNORE."""
        if self.kind == "segmentation":
            return int((targets != IGNORE).sum())
        return targets.numel()

    def meter(self) -> Meter:
        return Meter(self)

    def check(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Clear errors for outputs and targets that do not fit the task."""
        if self.kind == "regression" and outputs.shape != targets.shape:
            raise ValueError(
                f"regression outputs {tuple(outputs.shape)} and targets "
                f"{tuple(targets.shape)} differ in shape (a (B, 1) output needs .squeeze(-1))"
            )
        if self.kind == "segmentation":
            if outputs.shape[-2:] != targets.shape[-2:]:
                raise ValueError(
                    f"segmentation outputs {tuple(outputs.shape)} and masks "
                    f"{tuple(targets.shape)} differ in size"
                )
            check_labels(targets, self.num_classes)

    def rank(self, value: float) -> float:
        """A number to maximise: NaN (a diverged epoch) ranks below every other value."""
        if math.isnan(value):
            return -math.inf
        return value if self.higher_is_better else -value


def _segmentation_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored pixels; 0 for a batch with none (not NaN)."""
    scored = (targets != IGNORE).sum().clamp_min(1)
    total = nn.functional.cross_entropy(outputs, targets, ignore_index=IGNORE, reduction="sum")
    return total / scored


TASK_KINDS = ("classification", "regression", "segmentation")
CLASSIFICATION = Task("classification")
# The data sets of the other tasks; any other name (MNIST, Fashion-MNIST, a custom IDX set) is
# classification.
DATASET_TASKS = {
    "beijing-pm25": Task("regression"),
    "scenes": Task("segmentation", num_classes=21),
}
TASK_MODELS = {"regression": ("lstm",), "segmentation": ("unet",)}


def task_of(dataset: str) -> Task:
    return DATASET_TASKS.get(dataset, CLASSIFICATION)
