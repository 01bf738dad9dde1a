"""What a study adds to the results index (`mapnet repro index`, studies.index): a paragraph
for docs/results/README.md and rows for README.md's when-to-pick table. Every figure in them is
read from results/ and every verdict word ("beats", "loses", "within the seed spread") is
decided by the numbers; the helpers here turn comparisons into those words.

A study offers its facts through `Study.facts(results) -> Facts | None`, `results` being the
results/ folder (None while its results are missing)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Pick:
    """One row of README.md's when-to-pick table: what is compared (at equal budgets where it
    applies), mapnet's figure, the alternative's (named), and which to pick, from the numbers."""

    question: str
    mapnet: str
    other: str
    verdict: str


@dataclass(frozen=True)
class Facts:
    """A study's section of docs/results/README.md and its rows of the when-to-pick table.
    page: what the section links, relative to docs/results/; command: how to rerun it."""

    heading: str
    page: str
    command: str
    paragraph: str
    picks: tuple[Pick, ...] = ()


def read(path: Path) -> Any:
    """A results file's JSON, or None when it is missing."""
    return json.loads(path.read_text()) if path.exists() else None


def points(value: float, digits: int = 2) -> str:
    """A signed difference in points: +1.44, −0.40 (a real minus sign)."""
    return f"{value:+.{digits}f}".replace("-", "−")


def listing(items: Sequence[str], empty: str = "none") -> str:
    """ "a", "a and b", "a, b and c"."""
    items = list(items)
    if not items:
        return empty
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def pair(values: Sequence[float], digits: int = 2) -> str:
    """Figures per data set: "98.02 / 87.58"."""
    return " / ".join(f"{v:.{digits}f}" for v in values)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def times(bigger: float, smaller: float) -> str:
    """How many times one figure is the other: "53×" (one decimal below 10)."""
    factor = bigger / smaller
    return f"{factor:.1f}×" if factor < 10 else f"{factor:.0f}×"


def better(mapnet: float, other: float, higher_is_better: bool = True) -> str:
    """'mapnet' or 'the alternative' by the numbers ('neither' on a tie)."""
    if mapnet == other:
        return "neither"
    return "mapnet" if (mapnet > other) == higher_is_better else "the alternative"
