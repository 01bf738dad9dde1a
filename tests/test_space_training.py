"""A population trained as one ModelSpace: independence, path flattening, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interrupts import interrupted_at_call
from mapnet import MappingConfig, ModelSpace
from mapnet_experiments.recipe import loop as recipe_loop
from mapnet_experiments.studies.space import training as space_training
from mapnet_experiments.studies.space.training import Member, SpaceRun, train_space
from test_train_cli import write_tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 600 training rows after the 100 held out: 12 steps of 50 per epoch; still learnable well
    # above chance in 2 epochs (the rows brightened per class).
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), train=700, test=100)


def run(data: Path, members: list[Member], **kwargs) -> SpaceRun:
    settings = {"epochs": 2, "batch_size": 50, "val_size": 100, "data_dir": str(data)}
    mapping = MappingConfig(latent_dim=64, projection="structured")
    return SpaceRun(members, mapping=mapping, **(settings | kwargs))


A = Member("a", dataset="tiny", seed=0)
B = Member("b", dataset="tiny", seed=1)
HALF = Member("half", dataset="tiny", seed=2, classes=[0, 1, 2, 3, 4], train_fraction=0.5)


def latents(out: Path) -> torch.Tensor:
    return ModelSpace.load(out / "space", _cnn2).latents


def _cnn2():
    from mapnet_experiments.models.networks import CNN2

    return CNN2()


def test_members_train_exactly_as_they_would_alone(data: Path, tmp_path: Path) -> None:
    together = train_space(run(data, [A, B, HALF]), tmp_path / "together", progress=False)
    alone = train_space(run(data, [A]), tmp_path / "alone", progress=False)
    assert torch.equal(latents(tmp_path / "together")[0], latents(tmp_path / "alone")[0])
    first, third = together["members"][0], together["members"][2]
    assert first["test_acc"] == alone["members"][0]["test_acc"] > 30  # chance: 10 %
    assert third["task"] == "tiny:[0, 1, 2, 3, 4]"
    assert together["trainable_parameters"] == 3 * 64
    assert not (tmp_path / "together" / "state").exists()  # finished: result and space only
    from safetensors.torch import load_file

    by_epoch = load_file(str(tmp_path / "together" / space_training.LATENTS_FILE))["latents"]
    assert by_epoch.shape == (2, 3, 64)
    assert torch.equal(by_epoch[-1], latents(tmp_path / "together"))


def test_path_flattening_changes_the_latents_and_is_recorded(data: Path, tmp_path: Path) -> None:
    plain = train_space(run(data, [A, B]), tmp_path / "plain", progress=False)
    flat = train_space(run(data, [A, B], flatten=1.0), tmp_path / "flat", progress=False)
    assert plain["history"][-1]["flatten_loss"] == 0
    assert flat["history"][-1]["flatten_loss"] > 0
    assert not torch.equal(latents(tmp_path / "plain"), latents(tmp_path / "flat"))
    with pytest.raises(ValueError, match="two members of one task"):
        run(data, [A, HALF], flatten=1.0)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(data: Path, tmp_path: Path) -> None:
    config = run(data, [A, HALF], epochs=3, flatten=0.0)
    straight = train_space(config, tmp_path / "straight", progress=False)
    with interrupted_at_call(space_training, "evaluate_members", 2):  # in epoch two
        train_space(config, tmp_path / "cut", progress=False)
    state = json.loads((tmp_path / "cut" / "state" / "state.json").read_text())
    assert state["epoch"] == 1
    with pytest.raises(ValueError, match="already holds a run"):
        train_space(config, tmp_path / "cut", progress=False)
    resumed = train_space(config, tmp_path / "cut", resume=True, progress=False)
    assert torch.equal(latents(tmp_path / "cut"), latents(tmp_path / "straight"))
    from safetensors.torch import load_file

    files = [tmp_path / name / space_training.LATENTS_FILE for name in ("cut", "straight")]
    cut, whole = (load_file(str(f))["latents"] for f in files)
    assert cut.shape[0] == 3 and torch.equal(cut, whole)
    assert [m["test_acc"] for m in resumed["members"]] == [
        m["test_acc"] for m in straight["members"]
    ]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Member("x", classes=[3, 3]), "distinct"),
        (lambda: Member("x", classes=[10]), "0..9"),
        (lambda: Member("x", train_fraction=0), r"\(0, 1\]"),
        (lambda: Member("x", start_std=-1.0), "start_std must be >= 0"),
        (lambda: SpaceRun([Member("x"), Member("x")]), "distinct"),
        (lambda: SpaceRun([]), "at least one member"),
    ],
)
def test_bad_settings_are_named(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_a_stop_between_the_latents_and_the_state_loses_no_row(data: Path, tmp_path: Path) -> None:
    config = run(data, [A], epochs=3)
    train_space(config, tmp_path / "straight", progress=False)
    # At the second save epoch 2's latents are written, its state is not.
    with interrupted_at_call(recipe_loop, "save_state", 2):
        train_space(config, tmp_path / "cut", progress=False)
    train_space(config, tmp_path / "cut", resume=True, progress=False)
    from safetensors.torch import load_file

    files = [tmp_path / name / space_training.LATENTS_FILE for name in ("cut", "straight")]
    cut, whole = (load_file(str(f))["latents"] for f in files)
    assert cut.shape == whole.shape == (3, 1, 64) and torch.equal(cut, whole)


def test_a_finished_folder_refuses_another_config(data: Path, tmp_path: Path) -> None:
    train_space(run(data, [A], epochs=1), tmp_path / "done", progress=False)
    with pytest.raises(ValueError, match="another config"):
        train_space(run(data, [A], epochs=2), tmp_path / "done", progress=False)


def test_members_can_start_at_independent_random_latents(data: Path) -> None:
    wide = [Member("w0", "tiny", 0, start_std=1.0), Member("w1", "tiny", 1, start_std=1.0)]
    space = space_training.build_space(run(data, [*wide, A]))
    a, b, zero = space.latents.detach()
    assert torch.equal(zero, torch.zeros(64))  # start_std 0: the mapping's start
    assert not torch.equal(a, b) and 0.8 < a.std().item() < 1.2
    again = space_training.build_space(run(data, wide)).latents.detach()
    assert torch.equal(again[0], a)  # drawn from the member's seed: reproducible


def test_a_config_saved_before_a_field_existed_still_resumes(data: Path, tmp_path: Path) -> None:
    train_space(run(data, [A], epochs=1), tmp_path / "old", progress=False)
    config = tmp_path / "old" / "config.json"
    saved = json.loads(config.read_text())
    for member in saved["members"]:
        del member["start_std"]  # as written before start_std existed
    config.write_text(json.dumps(saved))
    again = train_space(run(data, [A], epochs=1), tmp_path / "old", progress=False)
    assert again["members"][0]["label"] == "a"
    with pytest.raises(ValueError, match="another config"):  # a real difference still counts
        train_space(run(data, [A], epochs=2), tmp_path / "old", progress=False)
