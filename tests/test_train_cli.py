from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mapnet
from mapnet.config import MappingConfig
from mapnet_experiments.cli.main import main
from mapnet_experiments.models.networks import CNN1, CNN2
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import train
from mapnet_experiments.recipe.splits import Split


def test_paper_models_have_the_exact_parameter_counts() -> None:
    assert sum(p.numel() for p in CNN1().parameters()) == 537_994
    assert sum(p.numel() for p in CNN2().parameters()) == 108_618
    x = torch.randn(2, 1, 28, 28)
    assert CNN1()(x).shape == CNN2()(x).shape == (2, 10)


def tiny_splits(n: int = 96) -> dict[str, Split]:
    """Ten linearly separable 'digits': class k lights up row k of the image."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    images = 0.3 * torch.randn(n, 1, 28, 28, generator=generator)
    images[torch.arange(n), 0, 2 * labels + 4, :] += 3.0
    split = Split(images, labels)
    return {"train": split, "val": split, "test": split}


def test_mapped_training_learns_and_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    config = TrainConfig(
        epochs=4, batch_size=16, lr=0.1, mapping=MappingConfig(latent_dim=64, seed=1)
    )
    result = train(config, splits=tiny_splits(), progress=False, out_dir=tmp_path)
    assert result["trainable_parameters"] == 64
    assert result["target_parameters"] == 108_618
    history = result["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result["test_acc"] > 40.0  # chance is 10 %
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_acc"] == result["test_acc"]
    again = mapnet.load(tmp_path / "checkpoint", CNN2())
    assert again.num_trainable_parameters() == 64


def test_plain_training_trains_every_weight(tmp_path: Path) -> None:
    config = TrainConfig(mode="plain", epochs=1, batch_size=32, lr=1e-3)
    result = train(config, splits=tiny_splits(), progress=False, out_dir=tmp_path)
    assert result["trainable_parameters"] == 108_618
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "resnet"}, "model='resnet' is not one of"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"dataset": "cifar10"}, "dataset='cifar10' is not one of"),
    ],
)
def test_train_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_cli_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("--latent-dim", "--strategy", "MAPNET_DATA_DIR", "examples:", "layerwise"):
        assert expected in text


def write_tiny_dataset(root: Path, train: int = 1000, test: int = 200) -> Path:
    """A generated 10-class IDX data set in <root>/tiny/: class k brightens rows 2k+4 and 2k+5."""
    from test_data import write_idx

    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("test", test)):
        labels = torch.randint(0, 10, (n,), generator=generator)
        images = torch.randint(0, 80, (n, 28, 28), generator=generator)
        for offset in (4, 5):
            images[torch.arange(n), 2 * labels + offset] += 150
        prefix = "train" if split == "train" else "t10k"
        write_idx(root / "tiny" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / "tiny" / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def tiny_run_args(root: Path, out: Path, epochs: int = 4) -> list[str]:
    return [
        "train",
        "--data-dir",
        str(root),
        "--dataset",
        "tiny",
        "--epochs",
        str(epochs),
        "--val-size",
        "200",
        "--batch-size",
        "50",
        "--latent-dim",
        "64",
        "--quiet",
        "--loss.stability",
        "true",
        "--out",
        str(out),
    ]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    root = write_tiny_dataset(tmp_path / "data")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(tiny_run_args(root, straight)) == 0

    code = "import sys; from mapnet_experiments.cli.main import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, *tiny_run_args(root, killed)])
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "run ended too early"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = metrics.read_text().count("\n")
    assert 1 <= finished < 4 and not (killed / "results.json").exists()

    assert main(["train", "--out", str(killed), "--resume", *tiny_run_args(root, killed)[1:]]) == 0
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b["history"]]
    assert a["test_acc"] == b["test_acc"] > 50
    latent_a = load_file(straight / "checkpoint" / "tensors.safetensors")["latents.0"]
    latent_b = load_file(killed / "checkpoint" / "tensors.safetensors")["latents.0"]
    assert torch.equal(latent_a, latent_b)
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 4
    assert not (killed / "state").exists()  # the resume state goes once the run is finished


def test_finished_run_keeps_result_metrics_and_checkpoint_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = TrainConfig(epochs=2, batch_size=32, mapping=MappingConfig(latent_dim=32))
    result = train(config, splits=tiny_splits(), progress=False, out_dir=tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert files == [
        "checkpoint",
        "checkpoint/mapnet.json",
        "checkpoint/tensors.safetensors",
        "config.json",
        "metrics.jsonl",
        "results.json",
    ]
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored == json.loads(json.dumps(result))
    capsys.readouterr()

    # Resuming a finished run trains nothing: it returns the stored result, rewrites nothing.
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    (tmp_path / "state").mkdir()  # as if killed between results.json and the state's removal
    (tmp_path / "state" / "trainer.json").write_text("{}")
    again = train(config, splits=tiny_splits(), progress=False, out_dir=tmp_path, resume=True)
    assert again == stored
    assert (tmp_path / "results.json").stat().st_mtime_ns == stamp
    assert not (tmp_path / "state").exists()
    assert capsys.readouterr().err == (
        f"mapnet: {tmp_path} holds a finished run; nothing to resume, returning its results.json\n"
    )
    with pytest.raises(ValueError, match="already holds a finished run; choose another --out"):
        train(config, splits=tiny_splits(), progress=False, out_dir=tmp_path)


def test_run_folder_protects_finished_and_different_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_tiny_dataset(tmp_path / "data", train=300, test=50)
    out = tmp_path / "run"
    args = tiny_run_args(root, out, epochs=1)
    args[args.index("--val-size") + 1] = "50"
    assert main(args) == 0
    assert main(args) == 2  # already holds a run, no --resume
    different = [*args, "--lr", "0.5", "--resume"]
    assert main(different) == 2
    stamp = (out / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0  # finished: shown, not redone
    assert (out / "results.json").stat().st_mtime_ns == stamp
    text = capsys.readouterr().out
    assert f"kept the finished run's {out}/results.json, metrics.jsonl and checkpoint/" in text


def test_config_file_and_overrides(tmp_path: Path) -> None:
    from mapnet_experiments.cli.train import make_train_config, parse_overrides

    assert parse_overrides(["--mapping.alpha", "0.2", "--epochs", "3", "--dataset", "mnist"]) == {
        "mapping": {"alpha": 0.2},
        "epochs": 3,
        "dataset": "mnist",
    }
    file = tmp_path / "run.toml"
    file.write_text("epochs = 4\nlr = 0.05\n[mapping]\nlatent_dim = 1024\nalpha = 0.3\n")
    import argparse

    args = argparse.Namespace(config=file, paper_literal=False)
    config = make_train_config(args, ["--alpha", "0.5", "--latent-dim", "512"])
    assert (config.epochs, config.lr) == (4, 0.05)
    assert (config.mapping.latent_dim, config.mapping.alpha) == (512, 0.5)
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['epoch'\]"):
        make_train_config(args, ["--epoch", "3"])
    with pytest.raises(ValueError, match="--KEY VALUE pairs"):
        parse_overrides(["--epochs"])


def test_cli_reports_bad_values_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--latent-dim", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mapnet: error: latent_dim must be > 0, got 0"
    assert main(["data", "fetch", "cifar"]) == 2
    assert "unknown artifact 'cifar'; known: mnist, fashion-mnist" in capsys.readouterr().err


def test_bench_construction_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "construction.json"
    assert main(["bench", "construction", "--smoke", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["target_parameters"] == 108_618
    assert row["projection_bytes"] == 108_618 * 64 * 4
    assert row["construction_seconds"] > 0
    assert row["peak_rss_bytes"] >= row["rss_before_bytes"] > 0
    assert "cnn2 single d=64: built in" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:latent larger than")  # the paper's 468 > 160
def test_repro_table1_runs_resumes_and_reports_on_tiny_data(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", train=400, test=100)
    results, report = tmp_path / "results", tmp_path / "table1.md"
    args = [
        "repro",
        "table1",
        "--rows",
        "cnn2-baseline,cnn2-layerwise-1872",
        "--datasets",
        "tiny",
        "--epochs",
        "1",
        "--data-dir",
        str(root),
        "--root",
        str(results),
        "--report-to",
        str(report),
        "--val-size",
        "100",
        "--quiet",
    ]
    assert main(args) == 0
    finished = json.loads((results / "cnn2-layerwise-1872-tiny.json").read_text())
    assert finished["trainable_parameters"] == 1872
    assert finished["label"] == "Ours† 1872 (4×468)"
    assert (results / "runs" / "cnn2-layerwise-1872-tiny" / "metrics.jsonl").is_file()
    stamp = (results / "cnn2-baseline-tiny.json").stat().st_mtime_ns
    assert main(args) == 0  # finished runs are skipped, not redone
    assert (results / "cnn2-baseline-tiny.json").stat().st_mtime_ns == stamp
    text = report.read_text()
    assert "| CNN2 | Ours† 1872 (4×468) | 1,872 | 98.98 / 92.84 | – / – | " in text
    assert main(["repro", "table1", "--rows", "cnn3-unet"]) == 2


def test_repro_tuning_scores_on_validation_only(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", train=400, test=100)
    results, report = tmp_path / "results", tmp_path / "tuning.md"
    args = ["repro", "tuning", "--rows", "recipe,alpha-0", "--datasets", "tiny", "--epochs", "1"]
    args += ["--data-dir", str(root), "--root", str(results), "--report-to", str(report)]
    assert main([*args, "--val-size", "100", "--quiet"]) == 0
    recipe = json.loads((results / "recipe-tiny.json").read_text())
    alpha0 = json.loads((results / "alpha-0-tiny.json").read_text())
    assert recipe["config"]["mapping"]["projection"] == "structured"
    assert (recipe["config"]["mapping"]["alpha"], alpha0["config"]["mapping"]["alpha"]) == (0.1, 0)
    for result in (recipe, alpha0):  # a choice is never made on the test split
        assert result["test_acc"] is None and result["best_val_test_acc"] is None
        assert all(row["test_acc"] is None for row in result["history"])
        assert 0 <= result["val_acc"] <= 100
    text = report.read_text()
    delta = alpha0["val_acc"] - recipe["val_acc"]
    assert f"| α = 0 (no modulation) | {alpha0['val_acc']:.2f} | " in text
    assert f"| {delta:+.2f} | 1 |" in text
    assert "| α = 1 | – | – | – | – | – | – |" in text  # not run: shown as such


def test_tuning_rows_override_seed_and_epochs_for_the_whole_run() -> None:
    from mapnet_experiments.studies.tuning import TUNING

    rows = {row.id: row for row in TUNING}
    rival = rows["intrinsic-seed-2"].config("mnist", epochs=10)
    assert (rival.seed, rival.mapping.seed, rival.mapping.alpha, rival.mapping.scaling) == (
        2,
        2,
        0.0,
        "none",
    )
    assert rows["epochs-20"].config("mnist", epochs=10).epochs == 20  # the row's own budget
    assert rows["lr-0.3"].config("mnist").lr == 0.3
    assert rows["recipe"].config("mnist").mapping.projection == "structured"


def test_init_seed_gives_two_plain_runs_one_initialisation() -> None:
    from mapnet_experiments.recipe.trainer import build

    first = build(TrainConfig(mode="plain", seed=0))
    same_init = build(TrainConfig(mode="plain", seed=1, init_seed=0))
    other = build(TrainConfig(mode="plain", seed=1))
    pairs = list(zip(first.parameters(), same_init.parameters()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters()))
    with pytest.raises(ValueError, match="init_seed sets a plain network"):
        TrainConfig(mode="mapped", init_seed=0)
