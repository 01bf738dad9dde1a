from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mapnet
from mapnet.cli import main
from mapnet.core import MappingConfig
from mapnet.models import CNN1, CNN2
from mapnet.train import Split, TrainConfig, train


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


def test_cli_reports_bad_values_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--latent-dim", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mapnet: error: latent_dim must be > 0, got 0"
    assert main(["data", "fetch", "cifar"]) == 2
    assert "unknown data set(s) ['cifar']" in capsys.readouterr().err


def test_bench_construction_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "construction.json"
    assert main(["bench", "construction", "--smoke", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["target_parameters"] == 108_618
    assert row["projection_bytes"] == 108_618 * 64 * 4
    assert row["construction_seconds"] > 0
    assert row["peak_rss_bytes"] >= row["rss_before_bytes"] > 0
    assert "cnn2 single d=64: built in" in capsys.readouterr().out
