"""Segmentation data for the U-Net (paper Table 3): a Cityscapes reader, and scenes composed
from real MNIST and Fashion-MNIST images, which this machine can reach (Cityscapes it cannot).

Scenes (`compose_scenes`): a `size`×`size` canvas holds 3–6 objects, each a 28×28 MNIST digit or
Fashion-MNIST garment scaled by 1×, 1.5× or 2× and placed at a random position; later objects
cover earlier ones. A pixel's label is its object's class where the object's (rescaled) pixel
is brighter than `THRESHOLD`, otherwise what lies beneath (background 0 on the bare canvas).
Classes: 0 background, 1–10 the digits 0–9, 11–20 the ten garments: 21 classes. Every scene is
a function of (seed, index) only, and train / validation scenes draw their objects from
disjoint parts of the training images, test scenes from the test images.

Cityscapes (`read_cityscapes`): the official layout, leftImg8bit/<split>/<city>/*_leftImg8bit.png
and gtFine/<split>/<city>/*_gtFine_labelIds.png; labelIds map to the 19 training classes and
everything else to IGNORE (255), as in the benchmark's own labels.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional

IGNORE = 255
# The "scenes" data set of the recipe: 64×64 canvases (a U-Net step on a batch of 16 takes
# 1.7–2.0 s at 128×128 on one thread here, the other core busy, about 5× the 0.3–0.4 s at
# 64×64), 2,000 / 300 / 500 scenes.
SCENE_SIZE = 64
SCENE_COUNTS = (2000, 300, 500)
THRESHOLD = 0.3  # of full intensity: a pixel brighter than this belongs to its object
NUM_SCENE_CLASSES = 21
# Cityscapes labelId -> trainId (the 19 evaluated classes, cityscapesScripts labels.py).
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_CLASSES = 19


@dataclass
class SegmentationSplit:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    masks: torch.Tensor  # (N, H, W) int64 class ids; IGNORE for pixels not scored

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.masks.dim() != 3:
            raise ValueError(
                f"images must be (N, C, H, W) and masks (N, H, W), got "
                f"{tuple(self.images.shape)} and {tuple(self.masks.shape)}"
            )
        if self.images.shape[0] != self.masks.shape[0] or (
            self.images.shape[-2:] != self.masks.shape[-2:]
        ):
            raise ValueError(
                f"images {tuple(self.images.shape)} and masks {tuple(self.masks.shape)} differ "
                "in count or size"
            )


def check_labels(masks: torch.Tensor, num_classes: int) -> None:
    """Every label is a class id in [0, num_classes) or IGNORE."""
    bad = (masks != IGNORE) & ((masks < 0) | (masks >= num_classes))
    if bad.any():
        values = sorted(set(masks[bad].unique().tolist()))[:5]
        raise ValueError(
            f"mask labels {values} are outside 0..{num_classes - 1} (and not the ignore label "
            f"{IGNORE})"
        )


def compose_scenes(
    digits: tuple[torch.Tensor, torch.Tensor],
    garments: tuple[torch.Tensor, torch.Tensor],
    count: int,
    seed: int,
    size: int = SCENE_SIZE,
) -> SegmentationSplit:
    """`count` scenes from (images (N, 28, 28) uint8, labels (N,)) of MNIST and Fashion-MNIST."""
    if size < 56 or size % 8:
        raise ValueError(f"size must be a multiple of 8 and at least 56, got {size}")
    images = torch.zeros(count, 1, size, size)
    masks = torch.zeros(count, size, size, dtype=torch.int64)
    sources = ((digits, 1), (garments, 11))
    for index in range(count):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        objects = int(torch.randint(3, 7, (), generator=generator))
        for _ in range(objects):
            (pool, labels), offset = sources[int(torch.randint(0, 2, (), generator=generator))]
            pick = int(torch.randint(0, len(labels), (), generator=generator))
            scale = (1.0, 1.5, 2.0)[int(torch.randint(0, 3, (), generator=generator))]
            side = int(28 * scale)
            patch = pool[pick].float()[None, None] / 255.0  # (1, 1, 28, 28)
            patch = functional.interpolate(patch, size=(side, side), mode="bilinear")[0, 0]
            top = int(torch.randint(0, size - side + 1, (), generator=generator))
            left = int(torch.randint(0, size - side + 1, (), generator=generator))
            inside = patch > THRESHOLD  # (side, side)
            region = (slice(top, top + side), slice(left, left + side))
            images[index, 0][region] = torch.where(inside, patch, images[index, 0][region])
            masks[index][region] = torch.where(
                inside, torch.tensor(offset + int(labels[pick])), masks[index][region]
            )
    return SegmentationSplit(images, masks)


def scene_splits(
    mnist: dict[str, tuple[torch.Tensor, torch.Tensor]],
    fashion: dict[str, tuple[torch.Tensor, torch.Tensor]],
    counts: tuple[int, int, int] | None = None,
    seed: int = 0,
    size: int | None = None,
) -> dict[str, SegmentationSplit]:
    """Train / val / test scenes; `mnist` and `fashion` map "train" and "test" to (images,
    labels). Train and val scenes use disjoint parts (the first 5/6 and the last 1/6) of the
    training images.
    counts and size default to SCENE_COUNTS and SCENE_SIZE."""
    counts = SCENE_COUNTS if counts is None else counts
    size = SCENE_SIZE if size is None else size

    def part(data: tuple[torch.Tensor, torch.Tensor], which: str) -> tuple[torch.Tensor, ...]:
        images, labels = data
        cut = len(labels) * 5 // 6
        return (images[:cut], labels[:cut]) if which == "train" else (images[cut:], labels[cut:])

    out = {}
    # Each (seed, split) its own scene seed: no run's scenes repeat another run's of any split.
    split_seeds = (3 * seed, 3 * seed + 1, 3 * seed + 2)
    for name, count, split_seed in zip(("train", "val", "test"), counts, split_seeds):
        if name == "test":
            digits, garments = mnist["test"], fashion["test"]
        else:
            digits, garments = part(mnist["train"], name), part(fashion["train"], name)
        out[name] = compose_scenes(digits, garments, count, split_seed, size)  # type: ignore[arg-type]
    return out


def read_cityscapes(
    root: str | Path,
    split: str = "val",
    size: tuple[int, int] = (128, 256),
    limit: int | None = None,
) -> SegmentationSplit:
    """Cityscapes images and fine labels of `split`, resized to `size` (H, W): images
    bilinearly, labels by nearest neighbour; labelIds mapped to the 19 train ids, 255 ignored."""
    from PIL import Image

    root = Path(root)
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist: point at the folder holding leftImg8bit/ and gtFine/ "
                "(Cityscapes' own layout, from cityscapes-dataset.com)"
            )
    files = sorted(image_dir.glob("*/*_leftImg8bit.png"))[:limit]
    if not files:
        raise FileNotFoundError(f"{image_dir} holds no <city>/*_leftImg8bit.png files")
    lookup = torch.full((256,), IGNORE, dtype=torch.int64)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lookup[label_id] = train_id
    images, masks = [], []
    for file in files:
        stem = file.name.removesuffix("_leftImg8bit.png")
        label_file = label_dir / file.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label_file.exists():
            raise FileNotFoundError(f"{file} has no label file {label_file}")
        with Image.open(file) as img, Image.open(label_file) as lab:
            if img.size != lab.size:
                raise ValueError(f"{file} is {img.size}, its labels {label_file} {lab.size}")
            rgb = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            ids = lab.resize((size[1], size[0]), Image.NEAREST)
            images.append(torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8))
            masks.append(torch.frombuffer(bytearray(ids.tobytes()), dtype=torch.uint8))
    image_tensor = torch.stack(images).view(-1, size[0], size[1], 3).permute(0, 3, 1, 2)
    mask_tensor = lookup[torch.stack(masks).view(-1, size[0], size[1]).long()]
    return SegmentationSplit(image_tensor.float() / 255.0, mask_tensor)


# Twenty distinct colours for figures: matplotlib's "tab20", ten hues each dark then light.
TAB20 = [
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
    (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
    (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (127, 127, 127),
    (199, 199, 199), (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
]  # fmt: skip
BACKGROUND_COLOUR = (20, 20, 20)


def mask_palette(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) uint8 colours: class 0 (background) near black; for the scenes' 21
    classes the digits take the ten dark hues and the garments the same hues light, so a key
    can name each colour."""
    if num_classes == NUM_SCENE_CLASSES:
        colours = [BACKGROUND_COLOUR, *TAB20[0::2], *TAB20[1::2]]
    else:
        colours = [BACKGROUND_COLOUR] + [TAB20[i % len(TAB20)] for i in range(num_classes - 1)]
    return torch.tensor(colours, dtype=torch.uint8)


def mask_colours(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, H, W, 3) uint8 colours for figures (`mask_palette`); IGNORE is
    black."""
    palette = mask_palette(num_classes)
    coloured = torch.zeros(*masks.shape, 3, dtype=torch.uint8)
    valid = masks != IGNORE
    coloured[valid] = palette[masks[valid]]
    return coloured


def class_names(kind: str) -> Sequence[str]:
    if kind == "scenes":
        digits = [f"digit {i}" for i in range(10)]
        garments = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                    "sneaker", "bag", "ankle boot"]  # fmt: skip
        return ["background", *digits, *garments]
    raise ValueError(f"unknown kind {kind!r}")
