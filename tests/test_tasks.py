"""One training loop for every task: regression (the forecaster) and segmentation (the U-Net)
train, report their own metrics, pick the best epoch by them and resume exactly."""

from __future__ import annotations

import math

import pytest
import torch

from interrupts import interrupted_at_call
from mapnet import MappingConfig
from mapnet_experiments.data.scenes import compose_scenes
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import train
from mapnet_experiments.recipe.splits import Split
from mapnet_experiments.recipe.tasks import Task, task_of
from mapnet_experiments.recipe.trainer import Trainer, evaluate
from test_segmentation_data import fake_source


def forecasting_splits(n: int = 192) -> dict[str, Split]:
    generator = torch.Generator().manual_seed(0)
    windows = torch.rand(n, 24, 11, generator=generator)
    targets = windows[:, -1, 0] * 0.8 + 0.1  # learnable from the last hour
    split = Split(windows, targets)
    return {"train": split, "val": split, "test": split}


def scene_splits(n: int = 8) -> dict[str, Split]:
    scenes = compose_scenes(fake_source(40, 0), fake_source(40, 1), n, seed=0, size=56)
    cropped = Split(scenes.images[..., :48, :48], scenes.masks[..., :48, :48])  # /8
    return {"train": cropped, "val": cropped, "test": cropped}


def test_the_dataset_decides_the_task_and_the_model_must_fit_it() -> None:
    assert task_of("beijing-pm25").kind == "regression"
    assert task_of("scenes") == Task("segmentation", 21)
    assert task_of("mnist").kind == task_of("my-idx-set").kind == "classification"
    with pytest.raises(ValueError, match="is a regression task: model must be one of"):
        TrainConfig(dataset="beijing-pm25", model="cnn2")
    with pytest.raises(ValueError, match="window must be a positive number"):
        TrainConfig(dataset="beijing-pm25", model="lstm", window=0)
    with pytest.raises(ValueError, match="task 'ranking' is not one of"):
        Task("ranking")


def test_a_mapped_forecaster_trains_on_mse_and_picks_its_best_epoch_by_it() -> None:
    config = TrainConfig(
        model="lstm", dataset="beijing-pm25", epochs=3, batch_size=32, lr=0.05,
        mapping=MappingConfig(latent_dim=64),
    )  # fmt: skip
    result = train(config, splits=forecasting_splits(), progress=False)
    assert result["task"] == "regression" and result["trainable_parameters"] == 64
    history = result["history"]
    assert {"train_mse", "val_mse", "test_mse", "val_loss"} <= set(history[0])
    assert "train_acc" not in history[0]
    assert history[-1]["train_mse"] < history[0]["train_mse"]
    best = min(history, key=lambda r: r["val_mse"])
    assert result["best_val_mse"] == best["val_mse"] and result["best_val_epoch"] == best["epoch"]
    assert result["test_mse"] == history[-1]["test_mse"]


def test_segmentation_trains_with_pixel_metrics() -> None:
    config = TrainConfig(
        model="unet", dataset="scenes", mode="plain", epochs=2, batch_size=4, lr=1e-3
    )
    result = train(config, splits=scene_splits(), progress=False)
    assert result["task"] == "segmentation"
    row = result["history"][-1]
    assert 0 <= row["val_pixel_acc"] <= 100 and 0 <= row["val_miou"] <= 1
    assert result["best_val_miou"] == max(r["val_miou"] for r in result["history"])


def test_evaluate_gives_each_tasks_metrics() -> None:
    splits = forecasting_splits(16)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(24 * 11, 1), torch.nn.Flatten(0)
    )
    metrics = evaluate(model, splits["val"], Task("regression"))
    with torch.no_grad():
        expected = float(((model(splits["val"].inputs) - splits["val"].targets) ** 2).mean())
    assert metrics["mse"] == pytest.approx(expected, rel=1e-5) and metrics["loss"] == metrics["mse"]


@pytest.mark.parametrize("task", ["regression", "segmentation"])
def test_each_task_resumes_to_the_uninterrupted_result(
    task: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    if task == "regression":
        config = TrainConfig(model="lstm", dataset="beijing-pm25", epochs=2, batch_size=64,
                             lr=0.05, mapping=MappingConfig(latent_dim=32))  # fmt: skip
        splits = forecasting_splits()
    else:
        config = TrainConfig(model="unet", dataset="scenes", epochs=2, batch_size=4, lr=0.1,
                             mapping=MappingConfig(latent_dim=32))  # fmt: skip
        splits = scene_splits()
    whole = train(config, splits=splits, progress=False, out_dir=tmp_path / "whole")
    # Killed in epoch two, after epoch one's state was committed.
    with interrupted_at_call(Trainer, "end_epoch", 2):
        train(config, splits=splits, progress=False, out_dir=tmp_path / "cut", resume=True)
    epochs_run = []
    original = Trainer.end_epoch

    def counted(self: Trainer, epoch: int) -> dict:
        epochs_run.append(epoch)
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "end_epoch", counted)
    resumed = train(config, splits=splits, progress=False, out_dir=tmp_path / "cut", resume=True)
    assert epochs_run == [2]  # it went on from the saved epoch, it did not start over

    def strip(result: dict) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in result["history"]]

    assert strip(resumed) == strip(whole)


def test_a_batch_without_scored_pixels_has_zero_loss_not_nan() -> None:
    task = Task("segmentation", 3)
    outputs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ignored = torch.full((2, 4, 4), 255)
    loss = task.loss(outputs, ignored)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(outputs.grad).all()
    meter = task.meter()
    meter.update(outputs.detach(), ignored, loss_mean=loss.item())
    meter.update(outputs.detach(), torch.zeros(2, 4, 4, dtype=torch.int64))
    assert all(not math.isnan(v) for v in meter.result().values())


def test_outputs_and_targets_that_do_not_fit_the_task_are_named() -> None:
    with pytest.raises(ValueError, match=r"differ in shape \(a \(B, 1\) output needs"):
        Task("regression").meter().update(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match=r"mask labels \[7\] are outside 0..2"):
        Task("segmentation", 3).meter().update(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="differ in size"):
        Task("segmentation", 3).meter().update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"loss\.task_loss is set by the dataset's task"):
        TrainConfig(loss={"task_loss": "mse"})


def test_a_diverged_epoch_is_never_the_best() -> None:
    task = Task("regression")
    assert max([math.nan, 0.3, 0.1], key=task.rank) == 0.1
    assert max([math.nan, 50.0, 60.0], key=Task("classification").rank) == 60.0
