"""The repro rows build exactly the configs their committed runs in results/ were made with.

MappingConfig's default projection changed from "dense" to "structured"; a row that left it unnamed
would now build another W than its stored run, so a rerun would not be the run reported and a
resume would be refused. These tests read the committed results/ folders.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import _prepare_run_dir
from mapnet_experiments.studies.runner import DATASETS, TableRow, run_id
from mapnet_experiments.studies.table1 import TABLE1
from mapnet_experiments.studies.tuning import TUNING

RESULTS = Path(__file__).resolve().parents[1] / "results"
TABLES = {"table1": TABLE1, "tuning": TUNING}

# MappingConfig fields added since these runs were made, with the values their absence means.
ADDED = {
    "target_modules": None,
    "exclude_modules": [],
    "train_directly": [],
    "store_base": False,
    "check_finite": False,
    "update": "additive",
    "group_size": 1,
    "target_fraction": 1.0,
    "target_types": None,
    "parameter_names": None,
    "groups_within_tensors": False,
}

# TrainConfig fields added since (the ablation and compression runs).
ADDED_TRAIN = {
    "variant": "ours",
    "start_from": None,
    "sparsity": 0.0,
    "prune_scope": "tensor",
    "fake_quant": False,
    "window": 24,
    "init_seed": None,
    "split_seed": None,
}


def as_json(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict()))


def stored_configs(table: str) -> list[tuple[TableRow, str, Path, dict[str, Any]]]:
    """(row, dataset, file, stored config) for every committed file that records a config."""
    root = RESULTS / table
    found = []
    for row in TABLES[table]:
        for dataset in DATASETS:
            rid = run_id(row, dataset)
            for file, key in (
                (root / f"{rid}.json", "config"),
                (root / "runs" / rid / "results.json", "config"),
                (root / "runs" / rid / "config.json", None),
            ):
                if file.exists():
                    data = json.loads(file.read_text())
                    found.append((row, dataset, file, data if key is None else data[key]))
    return found


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_committed_file_belongs_to_a_row(table: str) -> None:
    root = RESULTS / table
    ids = {run_id(row, dataset) for row in TABLES[table] for dataset in DATASETS}
    results = {file.stem for file in root.glob("*.json")}
    runs = {folder.name for folder in (root / "runs").iterdir()}
    assert results and runs, f"no committed runs under {root}"
    assert results <= ids, f"result files no row makes: {sorted(results - ids)}"
    assert runs <= ids, f"run folders no row makes: {sorted(runs - ids)}"


@pytest.mark.parametrize("table", sorted(TABLES))
def test_rows_build_the_stored_configs(table: str) -> None:
    found = stored_configs(table)
    # Tables 1 and tuning are complete: a result file, results.json and config.json per run.
    assert len(found) == 3 * len(TABLES[table]) * len(DATASETS)
    for row, dataset, file, stored in found:
        wanted = as_json(row.config(dataset))
        for name, default in ADDED_TRAIN.items():
            assert wanted.pop(name) == default, f"{row.id}: {name} is not its default"
            assert stored.pop(name, default) == default, f"{file}: {name}"
        for name, default in ADDED.items():
            assert wanted["mapping"].pop(name) == default, f"{row.id}: {name} is not its default"
            assert stored["mapping"].get(name, default) == default, f"{file}: {name}"
            stored["mapping"].pop(name, None)
        assert stored == wanted, f"{file} differs from what row {row.id!r} builds"


def test_table1_rows_name_their_projection() -> None:
    projections = {row.id: row.mapping.get("projection") for row in TABLE1}
    assert projections.pop("cnn2-single-2048-structured") == "structured"
    assert set(projections.values()) == {"dense"}
    intrinsic = next(row for row in TABLE1 if row.id == "cnn2-intrinsic-2048")
    assert intrinsic.config("mnist").mapping.projection == "dense"  # through the preset too


@pytest.mark.parametrize("table", sorted(TABLES))
def test_committed_runs_resume_with_their_rows(table: str, tmp_path: Path) -> None:
    """The stored config.json (written before the new fields existed) is accepted as is."""
    checked = 0
    for row, dataset, file, _ in stored_configs(table):
        if file.name != "config.json":
            continue
        out = tmp_path / file.parent.name
        out.mkdir()
        shutil.copy(file, out / "config.json")
        _prepare_run_dir(out, row.config(dataset), resume=True)
        checked += 1
    assert checked == len(TABLES[table]) * len(DATASETS)


def test_resume_still_refuses_a_different_mapping(tmp_path: Path) -> None:
    rows = {row.id: row for row in TABLE1}
    stored = RESULTS / "table1" / "runs" / "cnn2-single-2048-mnist" / "config.json"
    assert "check_finite" not in json.loads(stored.read_text())["mapping"]  # an old config
    shutil.copy(stored, tmp_path / "config.json")
    config = rows["cnn2-single-2048"].config("mnist")

    dense = config.mapping
    # What the row built while relying on the default:
    config.mapping = dataclasses.replace(dense, projection="structured")
    with pytest.raises(ValueError, match=r"fields \['mapping\.projection'\]"):
        _prepare_run_dir(tmp_path, config, resume=True)

    # A new field away from its default is a difference:
    config.mapping = dataclasses.replace(dense, check_finite=True)
    with pytest.raises(ValueError, match=r"fields \['mapping\.check_finite'\]"):
        _prepare_run_dir(tmp_path, config, resume=True)

    config.mapping = dense
    config.lr = 0.05
    with pytest.raises(ValueError, match=r"fields \['lr'\]"):
        _prepare_run_dir(tmp_path, config, resume=True)
