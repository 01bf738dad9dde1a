"""One committed run folder of each kind under results/ still resumes with today's code: a
finished run is recognised (nothing retrains, its stored result comes back) and its final model
loads. The kinds: a recipe run of every task (classification mapped and plain, forecasting,
segmentation), a model-space population, an INR meta-learned shared part, a fine-tune row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mapnet import ModelSpace
from mapnet_experiments.models.networks import Siren, model_factory
from mapnet_experiments.recipe import trainer as recipe_trainer
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import train
from mapnet_experiments.recipe.state import load_model
from mapnet_experiments.recipe.trainer import build
from mapnet_experiments.studies.finetune.runs import STAGES, run_stage
from mapnet_experiments.studies.space import inr
from mapnet_experiments.studies.space.training import SpaceRun, train_space

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUNS = [
    "table1/runs/cnn2-single-2048-structured-mnist",  # mapped, checkpoint format 1
    "table1/runs/cnn2-baseline-fashion-mnist",  # plain: model.safetensors without a manifest
    "ablations/runs/ours-2048-s0-fashion-mnist",  # checkpoint format 2
    "forecasting/runs/ours-64-s0-beijing-pm25",
    "segmentation/runs/ours-2048-s0-scenes",
]

pytestmark = pytest.mark.skipif(not RESULTS.is_dir(), reason="needs the committed results/")


def _never_trains(*args: object, **kwargs: object) -> None:
    raise AssertionError("a finished run was trained again")


@pytest.mark.parametrize("run", RUNS)
def test_a_finished_recipe_run_resumes_to_its_result_and_its_model_loads(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run"
    shutil.copytree(RESULTS / run, folder)
    stored = json.loads((folder / "results.json").read_text())
    config = TrainConfig.from_dict(json.loads((folder / "config.json").read_text()))
    monkeypatch.setattr(recipe_trainer.Trainer, "fit", _never_trains)
    assert train(config, progress=False, out_dir=folder, resume=True) == stored
    module = build(config)
    load_model(module, folder / "checkpoint")  # every mismatch would be a CheckpointError


def test_a_finished_space_population_resumes_and_its_space_loads(tmp_path: Path) -> None:
    folder = tmp_path / "population"
    shutil.copytree(RESULTS / "space" / "population", folder)
    stored = json.loads((folder / "results.json").read_text())
    run = SpaceRun.from_dict(json.loads((folder / "config.json").read_text()))
    assert train_space(run, folder, resume=True, progress=False) == stored
    space = ModelSpace.load(folder / "space", model_factory(run.model))
    assert space.latents.shape == (len(run.members), run.mapping.latent_dim)


def test_a_finished_inr_shared_part_is_kept_and_loads(tmp_path: Path) -> None:
    shutil.copytree(
        RESULTS / "space" / "inr" / "mnist" / "meta-d128", tmp_path / "mnist" / "meta-d128"
    )
    stored = json.loads((tmp_path / "mnist" / "meta-d128" / "result.json").read_text())
    assert inr.meta_stage("mnist", 128, tmp_path, None, progress=False) == stored
    shared = ModelSpace.load(tmp_path / "mnist" / "meta-d128" / "space", Siren)
    assert shared.bases is not None and shared.log_step_sizes is not None


def test_a_finished_fine_tune_row_is_skipped(tmp_path: Path) -> None:
    row = STAGES["transfer"][0]
    source = RESULTS / "finetune" / "transfer" / f"{row.id}.json"
    (tmp_path / "transfer").mkdir()
    shutil.copy(source, tmp_path / "transfer" / source.name)
    done = run_stage("transfer", [row], tmp_path, progress=False, runner=_never_trains)
    assert done == [tmp_path / "transfer" / source.name]
