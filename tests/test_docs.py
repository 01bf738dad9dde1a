"""The docs against the committed results: every page under docs/results/ regenerates from
results/ byte for byte (the study pages and the index here, bench.md and defaults.md in
test_bench.py); README.md quotes no figure but its generated block, and its example runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mapnet_experiments.studies import index
from mapnet_experiments.studies.registry import STUDIES
from mapnet_experiments.studies.study import Options

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "results"
# Pages no study writes: `mapnet bench report`'s two (tested in test_bench.py), the transcript of
# `make run`, and the index (tested below).
OTHER_PAGES = {"bench.md", "defaults.md", "main-job.md", "README.md"}

needs_results = pytest.mark.skipif(not (ROOT / "results").is_dir(), reason="no committed results")


@needs_results
@pytest.mark.parametrize("name", [name for name, study in STUDIES.items() if study.page])
def test_study_page_regenerates_from_the_committed_results(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's text only (figures=False: the same text, without seconds of drawing; the
    figures' code is tested on generated results in test_figures.py)."""
    monkeypatch.chdir(ROOT)  # the pages name their sources as results/…
    study = STUDIES[name]
    out = tmp_path / study.page
    study.report(Options(report_to=out, figures=False))
    assert out.read_text() == (PAGES / study.page).read_text()
    assert [p.name for p in tmp_path.iterdir()] == [study.page]  # no figure drawn


def test_every_results_page_is_written_by_a_study_or_named_here() -> None:
    written = {study.page for study in STUDIES.values() if study.page}
    assert {p.name for p in PAGES.glob("*.md")} <= written | OTHER_PAGES


# ---------------------------------------------------------------- README.md and the index

README = ROOT / "README.md"
# Every number README.md may hold outside its generated block, and why: none is a result. A
# number glued to a name (CNN2, table1, int8) is part of the name and not counted.
README_NUMBERS = {
    "2026": "the paper's year (Sen & Mukherjee, 2026)",
    "2.2": "the paper's section (§2.2)",
    "2.2.5": "the paper's section (§2.2.5, compression)",
    "2.2.6": "the paper's section (§2.2.6, fine-tuning)",
    "20": "eq. 20, and the example's 20 steps",
    "21": "eq. 21",
    "25": "eq. 25",
    "1": "Table 1, a name",
    "3.10": "the oldest Python supported",
    "2.13.0": "the torch the Makefile pins",
    # The library example's own settings and shapes.
    "28": "the example's image side",
    "784": "the example's 28 × 28 inputs",
    "64": "the example's hidden width",
    "10": "the example's classes",
    "256": "the example's latent size",
    "0": "the example's seed and labels' lowest class",
    "0.1": "the example's learning rate",
    "512": "the example's batch",
}
NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)*(?![\w])")


def _readme_parts() -> tuple[str, str]:
    """(the generated block, everything outside it)."""
    text = README.read_text()
    start, end = text.index(index.BEGIN), text.index(index.END) + len(index.END)
    return text[start:end], text[:start] + text[end:]


def test_readme_is_a_front_door() -> None:
    assert len(README.read_text().splitlines()) <= 150


def test_readme_holds_no_figure_outside_its_generated_block() -> None:
    _, outside = _readme_parts()
    found = {m.group() for m in NUMBER.finditer(outside)}
    assert found <= set(README_NUMBERS), sorted(found - set(README_NUMBERS))


@needs_results
def test_readme_block_and_results_index_regenerate_from_the_committed_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every figure README.md and docs/results/README.md quote, recomputed from results/:
    both files written again into tmp_path must equal the committed ones byte for byte."""
    monkeypatch.chdir(ROOT)
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text())
    page = tmp_path / "index.md"
    index.write(STUDIES.values(), ROOT / "results", page, readme)
    assert page.read_text() == (PAGES / "README.md").read_text()
    assert readme.read_text() == README.read_text()


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    """The library example, cut from README.md as it is, in a fresh process."""
    text = README.read_text()
    example = re.search(r"## Use it from your own training loop\n\n```python\n(.*?)```", text, re.S)
    assert example is not None
    code = example.group(1)
    assert len(code.splitlines()) <= 15
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    trained, generated = re.fullmatch(r"(\d+) trained, (\d+)\n", done.stdout).groups()
    assert int(trained) == 256 and int(generated) == 784 * 64 + 64 + 64 * 10 + 10
    assert (tmp_path / "run" / "ckpt" / "mapnet.json").is_file()


def test_index_leaves_out_what_has_no_results(tmp_path: Path) -> None:
    """A study (or the bench) whose results are missing adds nothing, so a new study's facts
    appear once its results are committed."""
    assert index.collect(tmp_path, STUDIES.values()) == []
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{index.BEGIN}\nold\n{index.END}\nafter\n")
    index.write(STUDIES.values(), tmp_path, tmp_path / "index.md", readme)
    assert readme.read_text().startswith(f"intro\n{index.BEGIN}\n| measured |")
    assert readme.read_text().endswith(f"{index.END}\nafter\n")
    assert "## Sources" in (tmp_path / "index.md").read_text()


# ---------------------------------------------------------------- the other docs

DOCS = [
    README,
    ROOT / "CONTRIBUTING.md",
    ROOT / "CHANGELOG.md",
    *sorted((ROOT / "docs").glob("*.md")),
    PAGES / "README.md",
]


def test_api_reference_is_current() -> None:
    """docs/api.md is what `python -m mapnet_experiments.apidocs` writes from the docstrings
    now (run `make docs` after changing a public docstring or signature)."""
    from mapnet_experiments import apidocs

    assert apidocs.page() == (ROOT / "docs" / "api.md").read_text()


def test_cli_page_names_every_command_and_study() -> None:
    from mapnet_experiments.cli.main import main

    text = (ROOT / "docs" / "cli.md").read_text()
    for study in STUDIES:
        assert f"| `{study}` |" in text, study
    for command in ("train", "repro", "bench", "data fetch", "export"):
        assert f"`mapnet {command}" in text, command
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_resolve_and_name_no_machine_paths(doc: Path) -> None:
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+:", target):
            assert (doc.parent / target).exists(), f"{doc.name}: {target}"
    assert "/work/" not in text and "../shared" not in text


def test_citation_and_package_agree_on_the_version() -> None:
    import mapnet

    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(r"^version: (\S+)$", cff, re.M).group(1) == mapnet.__version__
    assert f"## {mapnet.__version__} " in (ROOT / "CHANGELOG.md").read_text()


# Files over CONTRIBUTING's 700 lines when the rule was written down: each may only shrink.
LONG_FILES = {"src/mapnet/module.py": 725, "tests/test_contract.py": 1002}


def test_no_file_grows_past_700_lines() -> None:
    for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        name = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        assert lines <= LONG_FILES.get(name, 700), f"{name}: {lines} lines"
