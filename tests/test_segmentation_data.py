"""Scenes from MNIST / Fashion-MNIST images, the Cityscapes reader (on generated files), the
segmentation metrics against hand-computed cases, and the U-Net's size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mapnet_experiments.data.scenes import (
    IGNORE,
    NUM_SCENE_CLASSES,
    SegmentationSplit,
    check_labels,
    compose_scenes,
    read_cityscapes,
    scene_splits,
)
from mapnet_experiments.models.networks import UNet
from mapnet_experiments.recipe.metrics import ConfusionMatrix, mse, rmse_in_units


def fake_source(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 6:22, 6:22] = 200  # a bright square: its pixels belong to the object
    labels = torch.randint(0, 10, (n,), generator=generator)
    return images, labels


def test_scenes_are_deterministic_and_label_bright_pixels_with_their_class() -> None:
    digits, garments = fake_source(50, 0), fake_source(50, 1)
    a = compose_scenes(digits, garments, 4, seed=3, size=64)
    b = compose_scenes(digits, garments, 4, seed=3, size=64)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.masks, compose_scenes(digits, garments, 4, seed=4, size=64).masks)
    assert a.images.shape == (4, 1, 64, 64) and a.masks.shape == (4, 64, 64)
    check_labels(a.masks, NUM_SCENE_CLASSES)
    bright = a.images[:, 0] > 0.3
    assert torch.equal(bright, a.masks > 0)  # object pixels carry a class, the rest background
    assert (a.masks == 0).any() and (a.masks > 0).any()


def test_scene_splits_draw_from_disjoint_images() -> None:
    mnist = {"train": fake_source(60, 0), "test": fake_source(12, 1)}
    fashion = {"train": fake_source(60, 2), "test": fake_source(12, 3)}
    mnist["train"][0][50:] = 0  # the last sixth (validation's pool) is blank
    fashion["train"][0][50:] = 0
    splits = scene_splits(mnist, fashion, counts=(3, 3, 3), size=64)
    assert (splits["val"].masks == 0).all()  # val scenes use only the held-out images
    assert (splits["train"].masks > 0).any() and (splits["test"].masks > 0).any()
    # And the other way round: with the training pool blank, only validation shows objects.
    mnist = {"train": fake_source(60, 0), "test": fake_source(12, 1)}
    fashion = {"train": fake_source(60, 2), "test": fake_source(12, 3)}
    mnist["train"][0][:50] = 0
    fashion["train"][0][:50] = 0
    splits = scene_splits(mnist, fashion, counts=(3, 3, 3), size=64)
    assert (splits["train"].masks == 0).all() and (splits["val"].masks > 0).any()


def test_bad_masks_and_sizes_are_named() -> None:
    with pytest.raises(ValueError, match=r"mask labels \[21\] are outside 0..20"):
        check_labels(torch.tensor([[0, 21, IGNORE]]), NUM_SCENE_CLASSES)
    with pytest.raises(ValueError, match="differ in count or size"):
        SegmentationSplit(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple of 8"):
        compose_scenes(fake_source(2, 0), fake_source(2, 1), 1, 0, size=60)


def write_cityscapes(root: Path, city: str = "aachen", frames: int = 2) -> Path:
    from PIL import Image

    for index in range(frames):
        stem = f"{city}_000000_{index:06d}"
        image_dir = root / "leftImg8bit" / "val" / city
        label_dir = root / "gtFine" / "val" / city
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        rgb = torch.full((32, 64, 3), 100 + index, dtype=torch.uint8)
        Image.fromarray(rgb.numpy()).save(image_dir / f"{stem}_leftImg8bit.png")
        ids = torch.zeros(32, 64, dtype=torch.uint8)
        ids[:, :16] = 7  # road -> 0
        ids[:, 16:32] = 26  # car -> 13
        ids[:, 32:48] = 4  # static: not evaluated -> 255
        ids[:, 48:] = 33  # bicycle -> 18
        Image.fromarray(ids.numpy()).save(label_dir / f"{stem}_gtFine_labelIds.png")
    return root


def test_cityscapes_reader_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cs")
    split = read_cityscapes(root, "val", size=(16, 32))
    assert split.images.shape == (2, 3, 16, 32) and split.masks.shape == (2, 16, 32)
    assert split.images[1].mean() == pytest.approx(101 / 255, abs=1e-3)
    assert split.masks[0, 0, :8].unique().tolist() == [0]
    assert split.masks[0, 0].unique().tolist() == [0, 13, 18, IGNORE]


def test_cityscapes_reader_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="leftImg8bit/ and gtFine/"):
        read_cityscapes(tmp_path / "nowhere")
    root = write_cityscapes(tmp_path / "cs", frames=1)
    label = next((root / "gtFine").rglob("*.png"))
    label.unlink()
    with pytest.raises(FileNotFoundError, match="has no label file"):
        read_cityscapes(root)


def test_pixel_accuracy_and_miou_by_hand() -> None:
    truth = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]]])
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    matrix = ConfusionMatrix(3)
    matrix.update(predicted, truth)
    assert matrix.pixel_accuracy() == pytest.approx(4 / 6)  # ignored pixels not counted
    # class 0: hit 1, union 3 (truth 2, predicted 2); class 1: 2 / 3; class 2: 1 / 2
    torch.testing.assert_close(matrix.iou(), torch.tensor([1 / 3, 2 / 3, 1 / 2]).double())
    assert matrix.mean_iou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    empty = ConfusionMatrix(4)
    empty.update(predicted, truth)
    assert math.isnan(empty.iou()[3]) and empty.mean_iou() == pytest.approx(matrix.mean_iou())
    with pytest.raises(ValueError, match=r"labels outside 0\.\.2"):
        matrix.update(torch.zeros(1, 2), torch.tensor([[0, 5]]))


def test_forecast_errors_by_hand() -> None:
    assert mse(torch.tensor([0.1, 0.3]), torch.tensor([0.0, 0.5])) == pytest.approx(0.025)
    assert rmse_in_units(0.0025, 994.0) == pytest.approx(49.7)
    with pytest.raises(ValueError, match="differ"):
        mse(torch.zeros(3), torch.zeros(4))


def test_the_unet_has_about_the_papers_count_and_keeps_the_resolution() -> None:
    net = UNet(num_classes=19, in_channels=3)
    assert sum(p.numel() for p in net.parameters()) == 1_734_803  # the paper: ~1.73M
    assert net(torch.randn(1, 3, 32, 64)).shape == (1, 19, 32, 64)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.randn(1, 3, 30, 64))
