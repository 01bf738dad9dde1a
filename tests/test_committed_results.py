"""Committed results stay valid: Table 1's final checkpoints, written by mapnet 0.1 (checkpoint
format 1), load into today's library and reproduce their recorded test figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import mapnet
from mapnet_experiments.models.networks import MODELS
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.splits import load_splits
from mapnet_experiments.recipe.trainer import evaluate

RUNS = Path(__file__).resolve().parents[1] / "results" / "table1" / "runs"
# A dense and a structured row of each data set that MAPNET_DATA_DIR (CI: the shared copies) holds.
CASES = ["cnn2-single-2048-structured-mnist", "cnn2-single-1024-fashion-mnist"]


@pytest.mark.skipif(
    not os.environ.get("MAPNET_DATA_DIR"), reason="needs MAPNET_DATA_DIR (real data)"
)
@pytest.mark.parametrize("run", CASES)
def test_committed_checkpoint_reproduces_its_test_accuracy(run: str) -> None:
    result = json.loads((RUNS / run / "results.json").read_text())
    config = TrainConfig.from_dict(result["config"])
    assert mapnet.checkpoint.read_description(RUNS / run / "checkpoint")["version"] == 1
    mapped = mapnet.load(RUNS / run / "checkpoint", MODELS[config.model])
    splits = load_splits(config)
    measured = evaluate(mapped.materialize(), splits["test"])
    assert measured["acc"] == pytest.approx(result["test_acc"], abs=1e-9)
    assert measured["loss"] == pytest.approx(result["test_loss"], rel=1e-5)
