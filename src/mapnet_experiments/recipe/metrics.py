"""Metrics beyond accuracy: forecasting errors and segmentation scores (paper Tables 3–4)."""

from __future__ import annotations

import math

import torch

from mapnet_experiments.data.scenes import IGNORE


def mse(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ"
        )
    return float(((predictions.double() - targets.double()) ** 2).mean())


def rmse_in_units(scaled_mse: float, span: float) -> float:
    """RMSE in the target's units from the MSE on a min-max scaled target of range `span`."""
    return math.sqrt(scaled_mse) * span


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix over batches (rows: truth, columns: prediction);
    pixels labelled IGNORE are not counted."""

    def __init__(self, num_classes: int):
        if num_classes <= 1:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predicted: torch.Tensor, truth: torch.Tensor) -> None:
        """predicted, truth: (N, H, W) class ids (predicted from logits.argmax(1))."""
        if predicted.shape != truth.shape:
            raise ValueError(
                f"predicted {tuple(predicted.shape)} and truth {tuple(truth.shape)} differ"
            )
        keep = truth != IGNORE
        truth, predicted = truth[keep].long(), predicted[keep].long()
        if truth.numel() and (truth.min() < 0 or truth.max() >= self.num_classes):
            raise ValueError(f"labels outside 0..{self.num_classes - 1} (ignore: {IGNORE})")
        flat = truth * self.num_classes + predicted.clamp(0, self.num_classes - 1)
        self.counts += torch.bincount(flat, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )

    def pixel_accuracy(self) -> float:
        total = int(self.counts.sum())
        return math.nan if total == 0 else float(self.counts.diagonal().sum()) / total

    def iou(self) -> torch.Tensor:
        """(C,) intersection over union per class; NaN for a class absent from both."""
        hits = self.counts.diagonal().double()
        union = self.counts.sum(0).double() + self.counts.sum(1).double() - hits
        return torch.where(union > 0, hits / union.clamp_min(1), torch.full_like(union, math.nan))

    def mean_iou(self) -> float:
        """Mean IoU over the classes present in the truth or the predictions."""
        values = self.iou()
        present = ~values.isnan()
        return math.nan if not present.any() else float(values[present].mean())
