"""What every study's report is made of: cells, means over seeds, the recipe in words, the
finished runs of a table read once, training curves, and the page written whole."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mapnet_experiments.studies.runner import TableRow, run_id, run_name

# Every page that quotes the public reproduction's figures says where they come from in these
# words. The project's specification quotes an independent public reproduction of the paper
# beside the paper's own figures but names neither its authors nor an address, and this
# repository records neither, so it is named as precisely as that allows and not linked.
PUBLIC_SOURCE = (
    "an independent public reproduction of the paper (Sen & Mukherjee, 2026, *Mapping "
    "Networks*): its figures as this project's specification quotes them, which names neither "
    "the reproduction's authors nor an address, so it cannot be linked"
)
PUBLIC_REPRODUCTION = f"'public repro' = {PUBLIC_SOURCE} ([sources](README.md#sources))."


def mean_std(values: list[float], digits: int = 2, seeds: int = 3) -> str:
    """ "mean ± std" over seeds (sample std), the count added when it is not `seeds`; '–' when
    none finished."""
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    text = f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return text + ("" if len(values) == seeds else f" ({len(values)} seeds)")


def seed0_config(root: Path, spec_id: str, dataset: str) -> dict[str, Any] | None:
    """The stored config of a table row's seed-0 run (None until it has finished)."""
    file = root / f"{run_name(f'{spec_id}-s0', dataset)}.json"
    return json.loads(file.read_text())["config"] if file.exists() else None


def recipe_text(plain: dict[str, Any] | None, mapped: dict[str, Any] | None) -> str:
    """How a table's runs trained, from two stored run configs (a plain and a mapped one)."""
    config = plain or mapped
    if config is None:
        return ""
    lrs = []
    if plain is not None:
        lrs.append(f"{plain['lr']:g} trained directly")
    if mapped is not None:
        lrs.append(f"{mapped['lr']:g} through a latent")
    return (
        f"{config['epochs']} epochs of {config['optimizer'].capitalize()}, {config['schedule']} "
        f"schedule, batch {config['batch_size']}, learning rate {' and '.join(lrs)}"
    )


def cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def per_dataset(results: list[dict[str, Any] | None], cell: Callable[[dict], str]) -> str:
    """One table cell holding a figure per data set ('–' where the run is missing)."""
    return " / ".join(cell(r) if r else "–" for r in results)


Results = dict[tuple[str, str], dict[str, Any]]  # (row id, dataset) -> a finished run's JSON


def load_results(rows: list[TableRow], root: Path, datasets: tuple[str, ...]) -> Results:
    """Every finished run of `rows` under `root`, read once for a whole report."""
    return {
        (row.id, dataset): json.loads(file.read_text())
        for row in rows
        for dataset in datasets
        if (file := root / f"{run_id(row, dataset)}.json").exists()
    }


def write_page(lines: list[str], out: Path) -> str:
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def draw_curves(panels: dict[str, dict[str, dict[str, Any]]], out: Path, title: str) -> Path:
    """Training and validation accuracy per epoch from finished runs' JSON: one panel per
    name, one curve per data set ({panel: {dataset: result}})."""
    from mapnet_experiments.studies.plots import Curve, training_curves

    curves = {
        name: [
            Curve(
                DATASET_NAMES.get(dataset, dataset),
                [row["train_acc"] for row in result["history"]],
                [row["val_acc"] for row in result["history"]],
            )
            for dataset, result in runs.items()
        ]
        for name, runs in panels.items()
        if runs
    }
    return training_curves(curves, out, title)
