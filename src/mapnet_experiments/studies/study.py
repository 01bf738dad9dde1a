"""The contract every study keeps: a name, its stages, how to run them and how to report, read by
`mapnet repro` from the registry (studies.registry). A study writes results/<name>/ and a page
under docs/results/; its stages resume where a killed session stopped."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mapnet_experiments.studies.facts import Facts


@dataclass(frozen=True)
class Options:
    """What `mapnet repro` passes every study; each uses the fields that apply to it.

    root: the results folder (None: the study's own). report_to: the page (None: its own).
    rows: row ids to run (None: all). epochs: per run (None: the study's own). hours: start no
    new run after this many hours. seeds: for studies that repeat rows over seeds. figures:
    False writes the pages' text only (the same text; the tests compare it with the committed
    pages without the seconds of drawing)."""

    root: Path | None = None
    report_to: Path | None = None
    datasets: tuple[str, ...] = ("mnist", "fashion-mnist")
    rows: tuple[str, ...] | None = None
    epochs: int | None = None
    hours: float | None = None
    data_dir: str | None = None
    val_size: int = 5000
    progress: bool = True
    tsne: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    figures: bool = True
    started: float = 0.0  # time.monotonic() when the command started

    def root_or(self, default: Path) -> Path:
        return self.root if self.root is not None else default

    def report_or(self, default: Path) -> Path:
        return self.report_to if self.report_to is not None else default

    @property
    def deadline(self) -> float | None:
        """time.monotonic() after which no new run starts (None: no limit)."""
        if self.hours is None:
            return None
        return (self.started or time.monotonic()) + 3600 * self.hours


@dataclass(frozen=True)
class Study:
    """One `mapnet repro NAME`.

    stages: every stage `--stages` accepts, in the order they run; default: those run when
    --stages is not given. run(options, stages) runs them; report(options) writes the page(s)
    from the results alone and returns the text to print. example: a command line for --help.
    page: the page `report` writes, under docs/results/ (None: the study draws figures only);
    the tests regenerate it from the committed results and compare it byte for byte.
    facts(results): what the study adds to the results index and README.md's when-to-pick
    table, from the results/ folder alone (studies.facts; None: nothing)."""

    name: str
    summary: str
    stages: tuple[str, ...]
    default: tuple[str, ...]
    run: Callable[[Options, tuple[str, ...]], None]
    report: Callable[[Options], str]
    example: str
    page: str | None = None
    facts: Callable[[Path], Facts | None] | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.default) - set(self.stages))
        if unknown:
            raise ValueError(f"study {self.name!r}: default stages {unknown} are not stages")

    def chosen(self, text: str | None) -> tuple[str, ...]:
        """The stages a `--stages a,b` value names (None: the default), checked and in the
        study's order."""
        if text is None:
            return self.default
        named = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [stage for stage in named if stage not in self.stages]
        if unknown or not named:
            raise ValueError(
                f"unknown stage(s) {unknown or [text]} for {self.name}; its stages: "
                f"{', '.join(self.stages)}"
            )
        return tuple(stage for stage in self.stages if stage in named)
