"""Deepfake-detection videos: Celeb-DF v2 and FaceForensics++ readers, and their frames as tensors.

The paper's Tables 2 and 10 fine-tune a pretrained ResNet-50 to tell real from fake faces on
Celeb-DF v2 and FaceForensics++ (FF++). Neither can be downloaded by a program, so this module reads
their on-disk layouts (for a user who has them); `mapnet_experiments.data.faces` builds a small real
stand-in. Labels everywhere: 0 = real, 1 = fake.

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
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CELEB_DF_FOLDERS",
    "FAKE",
    "FF_COMPRESSIONS",
    "FF_METHODS",
    "FF_SPLITS",
    "REAL",
    "FaceSample",
    "VideoDecoderUnavailableError",
    "expand_frames",
    "list_frames",
    "load_faces",
    "read_celeb_df",
    "read_faceforensics",
    "resize_uint8",
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


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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
        images[i] = resize_uint8(chw[None], (size, size))[0]
    labels = torch.tensor([f.label for f in frames], dtype=torch.int64)
    if dtype == torch.uint8:
        return images, labels
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.uint8 or a float dtype, got {dtype}")
    return images.to(dtype).div_(255), labels
