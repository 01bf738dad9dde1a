"""The run state and the run folder against damage, edits, other runs, a second writer,
divergence and a full disk: each is refused or reported in one line, and the last good state
stays resumable (recipe.state, recipe.loop, recipe.run, cli)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interrupts import interrupted_at_call
from mapnet import CheckpointError, files
from mapnet.config import MappingConfig
from mapnet_experiments.cli.main import main
from mapnet_experiments.recipe import loop as recipe_loop
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.loop import DivergedError
from mapnet_experiments.recipe.run import train
from mapnet_experiments.recipe.state import MANIFEST, TENSORS
from test_train_cli import tiny_splits, write_tiny_dataset


def config(**changes: object) -> TrainConfig:
    settings = {"epochs": 2, "batch_size": 32, "mapping": MappingConfig(latent_dim=32)}
    return TrainConfig(**(settings | changes))


@pytest.fixture
def cut_run(tmp_path: Path) -> Path:
    """A run folder killed in epoch 2: the state after epoch 1 is committed."""
    out = tmp_path / "run"
    with interrupted_at_call(recipe_loop, "save_state", 2):
        train(config(), splits=tiny_splits(), progress=False, out_dir=out)
    assert json.loads((out / "state" / MANIFEST).read_text())["epoch"] == 1
    return out


def resume(out: Path, **changes: object) -> dict:
    return train(config(**changes), splits=tiny_splits(), progress=False, out_dir=out, resume=True)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(cut_run: Path, tmp_path: Path) -> None:
    whole = train(config(), splits=tiny_splits(), progress=False, out_dir=tmp_path / "whole")
    resumed = resume(cut_run)

    def strip(result: dict) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in result["history"]]

    assert strip(resumed) == strip(whole)


def test_a_flipped_bit_in_an_optimiser_moment_is_refused_naming_the_file(cut_run: Path) -> None:
    tensors = cut_run / "state" / TENSORS
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes: an Adam moment or an RNG state
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors does not match the checksum"):
        resume(cut_run)


def test_a_non_finite_moment_is_refused_even_with_a_matching_checksum(cut_run: Path) -> None:
    state = cut_run / "state"
    tensors = load_file(state / TENSORS)
    moment = next(key for key in tensors if key.endswith("exp_avg_sq"))
    tensors[moment][0] = float("nan")
    save_file(tensors, state / TENSORS)
    manifest = json.loads((state / MANIFEST).read_text())  # re-signed, as an editor could
    blob = (state / TENSORS).read_bytes()
    import hashlib

    entry = manifest["files"][TENSORS]
    entry.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (state / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"{moment}.*non-finite"):
        resume(cut_run)


@pytest.mark.parametrize("epoch", [0, 2, -1, "1", None])
def test_an_edited_epoch_is_refused(cut_run: Path, epoch: object) -> None:
    manifest_file = cut_run / "state" / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["epoch"] = epoch
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="epoch"):
        resume(cut_run)


def test_a_state_of_another_run_is_refused_naming_the_fields(cut_run: Path) -> None:
    other = json.loads((cut_run / "state" / MANIFEST).read_text())
    other["config"]["lr"] = 0.5
    other["config"]["seed"] = 3
    (cut_run / "state" / MANIFEST).write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match=r"another config \(fields \['lr', 'seed'\]\)"):
        resume(cut_run)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda state: (state / MANIFEST).write_text("[1, 2]"), "not a JSON object"),
        (lambda state: (state / MANIFEST).write_text("{"), "not valid JSON"),
        (lambda state: (state / TENSORS).unlink(), "tensors.safetensors"),
        (lambda state: (state / TENSORS).write_bytes(b"x" * 8), "tensors.safetensors"),
    ],
)
def test_damage_is_a_checkpoint_error_naming_the_file(cut_run: Path, damage, message) -> None:
    damage(cut_run / "state")
    with pytest.raises(CheckpointError, match=message):
        resume(cut_run)


def test_an_infinite_learning_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="lr must be finite, got inf"):
        config(lr=float("1e999"))


def test_divergence_stops_the_run_and_keeps_the_last_good_state(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match=r"diverged in epoch 1.*learning rate"):
        train(config(lr=1e6), splits=tiny_splits(), progress=False, out_dir=out)
    assert not (out / "state").exists() and not (out / "results.json").exists()


def test_the_cli_reports_divergence_with_its_own_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_tiny_dataset(tmp_path / "data", train=300, test=50)
    args = ["train", "--data-dir", str(data), "--dataset", "tiny", "--val-size", "50", "--quiet",
            "--latent-dim", "32", "--lr", "1e6", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("mapnet: error: training diverged") and "Traceback" not in err
    assert main([*args[:-4], "--lr", "1e999"]) == 2
    assert "lr must be finite" in capsys.readouterr().err


def test_a_second_resume_of_a_live_run_is_refused_naming_its_pid(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = (
        "import sys, time; from mapnet import files; held = files.lock(sys.argv[1]); "
        "held.__enter__(); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(files.InUseError, match=f"in use by pid {holder.pid}"):
            train(config(), splits=tiny_splits(), progress=False, out_dir=out, resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()  # the refused run wrote nothing


def test_out_under_a_file_and_a_lost_checkpoint_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_tiny_dataset(tmp_path / "data", train=300, test=50)
    (tmp_path / "a-file").write_text("")
    base = ["train", "--data-dir", str(data), "--dataset", "tiny", "--val-size", "50",
            "--quiet", "--latent-dim", "32"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "a-file" / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err
    out = tmp_path / "run"
    assert main([*base, "--out", str(out)]) == 0
    capsys.readouterr()
    import shutil

    shutil.rmtree(out / "checkpoint")
    assert main([*base, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint/ is missing" in err


def test_a_full_disk_is_one_line_and_the_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_tiny_dataset(tmp_path / "data", train=300, test=50)
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(data), "--dataset", "tiny", "--val-size", "50", "--quiet",
            "--latent-dim", "32", "--epochs", "2", "--out", str(out)]  # fmt: skip
    real = recipe_loop.save_state
    calls = {"n": 0}

    def full_at_second_save(*a: object, **k: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "state"))
        real(*a, **k)

    monkeypatch.setattr(recipe_loop, "save_state", full_at_second_save)
    assert main(args) == 4
    err = capsys.readouterr().err
    assert err.startswith("mapnet: error: no space left on the device") and err.count("\n") == 1
    assert "Nothing was corrupted" in err and "--resume" in err
    monkeypatch.setattr(recipe_loop, "save_state", real)
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["epochs"] == 2


def test_the_lock_is_released_when_a_run_ends(tmp_path: Path) -> None:
    out = tmp_path / "run"
    started = time.monotonic()
    train(config(epochs=1), splits=tiny_splits(), progress=False, out_dir=out)
    with files.lock(out):  # free again at once
        pass
    assert time.monotonic() - started < 60
    assert torch.isfinite(torch.tensor(json.loads((out / "results.json").read_text())["test_acc"]))
