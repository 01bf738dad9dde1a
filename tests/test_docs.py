"""The docs against the committed results: every page under docs/results/ regenerates from
results/ byte for byte (the study pages here, bench.md and defaults.md in test_bench.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
