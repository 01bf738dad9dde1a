"""mapnet.export: mapped models as ONNX (checked with onnxruntime), safetensors and torch.export
programs; its errors; the `mapnet export` command; docs/examples/export_onnx.py."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mapnet
from mapnet import export
from mapnet.config import MappingConfig
from mapnet.export import (
    ExportCheckError,
    export_onnx,
    export_program,
    export_safetensors,
    read_export_metadata,
)
from mapnet_experiments.cli import export as export_cli
from mapnet_experiments.models.networks import CNN1, CNN2, LSTMForecaster, SmallCNN, UNet
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import train
from mapnet_experiments.recipe.state import save_model
from mapnet_experiments.recipe.trainer import build
from test_train_cli import tiny_splits

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "export_onnx.py"
# CI installs the integrations extra: there a missing package fails the tests, never skips them.
needs_onnx = pytest.mark.skipif(
    not os.environ.get("CI")
    and any(
        importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")
    ),
    reason="needs the integrations extra (onnx, onnxruntime, onnxscript)",
)


def trained_looking(factory: Callable[[], nn.Module], latent_dim: int = 32) -> mapnet.MappedModule:
    """A mapped model away from θ₀ (a random, nonzero latent) whose BatchNorm statistics have
    moved off their initial 0 and 1, in eval mode: an export of θ₀ alone would prove little."""
    mapped = mapnet.wrap(factory, MappingConfig(latent_dim=latent_dim, seed=3))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mapped.latent.copy_(torch.randn(latent_dim, generator=generator))
        if any(isinstance(m, nn.BatchNorm2d) for m in mapped.modules()):
            for _ in range(3):  # training-mode forwards update the running statistics
                mapped(torch.rand(4, 1, 16, 16, generator=generator))
    return mapped.eval()


def onnx_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


CASES = {  # factory, example batch (batch 1: the exporter must still give any batch size)
    "cnn1": (CNN1, torch.randn(2, 1, 28, 28)),
    "cnn2": (CNN2, torch.randn(1, 1, 28, 28)),
    "lstm": (lambda: LSTMForecaster(num_features=11), torch.rand(1, 24, 11)),
    "unet": (lambda: UNet(num_classes=5, in_channels=1), torch.rand(2, 1, 16, 16)),
}


@needs_onnx
@pytest.mark.parametrize("name", CASES)
def test_onnx_export_reproduces_the_mapped_model(name: str, tmp_path: Path) -> None:
    factory, x = CASES[name]
    mapped = trained_looking(factory)
    path = tmp_path / "new" / "folder" / f"{name}.onnx"  # folders are created
    result = export_onnx(mapped, x, path)
    assert result.max_abs_error is not None and result.max_abs_error <= 1e-4
    assert result.argmax_mismatches == 0
    assert result.checked_batch_sizes == (len(x), len(x) + 1)
    # The file on disk, at a batch size neither the export nor its check saw, against the
    # mapped model itself (not its materialised copy).
    batch = torch.cat([x, x, x])
    got = onnx_outputs(path, batch)
    with torch.no_grad():
        want = mapped(batch).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
    if want.ndim >= 2:  # classes along dim 1: per sample, or per pixel for the U-Net
        assert np.array_equal(got.argmax(1), want.argmax(1))
    described = read_export_metadata(path)
    assert described["format"] == "mapnet-export"
    assert described["mapping"]["latent_dim"] == 32
    assert described["exported_from"] == "MappedModule"


@pytest.mark.parametrize("factory", [CNN2, lambda: SmallCNN((4, 6, 8))], ids=["cnn2", "bn"])
def test_safetensors_export_loads_into_a_fresh_target(
    factory: Callable[[], nn.Module], tmp_path: Path
) -> None:
    mapped = trained_looking(factory)
    path = export_safetensors(mapped, tmp_path / "sub" / "model.safetensors")
    fresh = factory()
    fresh.load_state_dict(load_file(path))  # strict: every weight and buffer is there
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), mapped(x))
    described = read_export_metadata(path)
    assert described["model_class"].endswith(type(fresh).__name__)
    assert described["parameters"] == sum(p.numel() for p in fresh.parameters())


def test_safetensors_export_of_tied_weights_and_of_a_plain_module(tmp_path: Path) -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # one weight under two names
    model.train()
    path = export_safetensors(model, tmp_path / "tied.safetensors")
    fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    fresh.load_state_dict(load_file(path))
    x = torch.randn(2, 4)
    assert torch.equal(fresh(x), model(x))
    assert read_export_metadata(path)["mapping"] is None
    assert model.training  # the caller's module keeps its mode


@pytest.mark.parametrize("name", ["cnn2", "lstm"])
def test_export_program_runs_like_the_mapped_model(name: str, tmp_path: Path) -> None:
    factory, x = CASES[name]
    mapped = trained_looking(factory)
    program = export_program(mapped, x)
    batch = torch.cat([x, x, x])  # exported from batch 1: any batch size
    with torch.no_grad():
        torch.testing.assert_close(program.module()(batch), mapped(batch), rtol=0, atol=1e-6)
    if name == "cnn2":  # saving is opt-in (the .pt2 archive holds pickled data)
        path = tmp_path / "deep" / "cnn2.pt2"
        export_program(mapped, x, path)
        loaded = torch.export.load(path)  # our own file
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(batch), mapped(batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("factory", "x", "message"),
    [
        (CNN2, torch.randn(1, 3, 28, 28), r"'features.0' \(Conv2d\) takes \(B, 1, H, W\)"),
        (lambda: LSTMForecaster(11), torch.rand(1, 24, 7), r"'lstm' \(LSTM\) takes \(B, T, 11\)"),
        (lambda: UNet(5, 1), torch.rand(1, 1, 20, 20), "UNet needs H and W divisible by 8"),
    ],
    ids=["channels", "features", "unet-size"],
)
def test_a_wrong_example_input_names_the_expected_one(
    factory: Callable[[], nn.Module], x: torch.Tensor, message: str, tmp_path: Path
) -> None:
    mapped = mapnet.wrap(factory, MappingConfig(latent_dim=8))
    with pytest.raises(ValueError, match=message):
        export_program(mapped, x)
    with pytest.raises(ValueError, match="does not run on example input"):
        export_onnx(mapped, x, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


class SumOfTwo(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.sum(0) + b.sum(0)


def test_other_bad_arguments_are_named(tmp_path: Path) -> None:
    mapped = mapnet.wrap(CNN2, MappingConfig(latent_dim=8))
    with pytest.raises(ValueError, match="is a folder"):
        export_safetensors(mapped, tmp_path)
    with pytest.raises(TypeError, match=r"MappedModule from mapnet\.wrap"):
        export_safetensors(lambda: CNN2(), tmp_path / "m.safetensors")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"example_inputs\[0\] is a list"):
        export_program(mapped, ([1.0],))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="share the batch size"):
        export_program(SumOfTwo(), (torch.randn(2, 3), torch.randn(4, 3)))
    save_file({"a": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a mapnet export"):
        read_export_metadata(tmp_path / "other.safetensors")


@needs_onnx
def test_a_failed_check_raises_with_the_figures_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = nn.Sequential(nn.Linear(6, 3))
    # torch's side of the comparison, shifted by 0.5: what an exporter bug would look like.
    monkeypatch.setattr(export, "_output_tensors", lambda out: [out + 0.5])
    with pytest.raises(ExportCheckError, match=r"max abs error 0\.5 \(atol 0\.0001\).*not written"):
        export_onnx(model, torch.randn(2, 6), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_missing_package_is_named_with_its_install_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(ImportError, match=r"onnxruntime: pip install onnxruntime .*integrations"):
        export_onnx(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.onnx")


@needs_onnx
def test_static_batch_and_external_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    mapped = trained_looking(lambda: nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 3)))
    monkeypatch.setattr(export, "ONNX_SINGLE_FILE_LIMIT", 0)  # as for a model of 2 GiB or more
    path = tmp_path / "out" / "m.onnx"
    result = export_onnx(mapped, torch.randn(2, 6), path, dynamic_batch=False)
    assert result.checked_batch_sizes == (2,) and result.max_abs_error <= 1e-4
    (data,) = (tmp_path / "out").glob("m.onnx.*.data")  # the weights, beside the graph
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 6]
    export_onnx(mapped, torch.randn(2, 6), path, dynamic_batch=False, check=False)
    (again,) = (tmp_path / "out").glob("m.onnx.*.data")  # a new pair: the old data is gone
    assert again != data
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", again.name]


# ---------------------------------------------------------------- the `mapnet export` command


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mapnet")
    export_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export", *argv])
    return args.run(args)


@pytest.fixture(scope="module")
def cnn2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    config = TrainConfig(epochs=1, batch_size=32, mapping=MappingConfig(latent_dim=16, seed=1))
    train(config, splits=tiny_splits(), progress=False, out_dir=run)
    return run


def test_cli_exports_safetensors_and_a_program(
    cnn2_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mapped = mapnet.load(cnn2_run / "checkpoint", CNN2).eval()
    x = torch.randn(3, 1, 28, 28)
    out = tmp_path / "cnn2.safetensors"
    assert run_cli(str(cnn2_run / "checkpoint"), "--format", "safetensors", "--out", str(out)) == 0
    fresh = CNN2()
    fresh.load_state_dict(load_file(out))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), mapped(x))
    out = tmp_path / "cnn2.pt2"
    assert run_cli(str(cnn2_run), "--format", "program", "--out", str(out)) == 0
    with torch.no_grad():
        got = torch.export.load(out).module()(x)
        torch.testing.assert_close(got, mapped(x), rtol=0, atol=1e-6)
    assert "pickled data" in capsys.readouterr().out


@needs_onnx
def test_cli_exports_checked_onnx(
    cnn2_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "onnx" / "cnn2.onnx"
    assert run_cli(str(cnn2_run), "--format", "onnx", "--out", str(out)) == 0
    assert "onnxruntime matches torch at batch sizes 1, 2" in capsys.readouterr().out
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        want = mapnet.load(cnn2_run / "checkpoint", CNN2).eval()(x).numpy()
    assert np.abs(onnx_outputs(out, x) - want).max() <= 1e-4


def test_cli_rebuilds_a_forecaster_run_with_its_window(tmp_path: Path) -> None:
    """A run folder written by hand (no Beijing data needed): config.json + save_model."""
    config = TrainConfig(
        model="lstm", dataset="beijing-pm25", window=6, mapping=MappingConfig(latent_dim=8)
    )
    run = tmp_path / "lstm-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    module = build(config)
    with torch.no_grad():
        module.latent.normal_()
    save_model(module, run / "checkpoint")
    out = tmp_path / "lstm.pt2"
    assert run_cli(str(run), "--format", "program", "--out", str(out)) == 0
    x = export_cli.example_inputs(config, batch=4)
    assert x.shape == (4, 6, 11)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(out).module()(x), module.eval()(x))


def test_cli_example_input_fits_the_unet() -> None:
    config = TrainConfig(model="unet", dataset="scenes", mapping=MappingConfig(latent_dim=8))
    with torch.no_grad():
        assert build(config).eval()(export_cli.example_inputs(config)).shape == (1, 21, 64, 64)


def test_cli_errors_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        run_cli(str(tmp_path), "--format", "safetensors", "--out", str(tmp_path / "m"))
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    with pytest.raises(FileNotFoundError, match="no checkpoint/ yet"):
        run_cli(str(tmp_path), "--format", "safetensors", "--out", str(tmp_path / "m"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("safetensors", "onnxruntime", "pickled data", "examples:", "1×28×28"):
        assert expected in text


# ---------------------------------------------------------------- the docs example


@needs_onnx
def test_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert len(EXAMPLE.read_text().splitlines()) <= 30
    monkeypatch.chdir(tmp_path)  # it writes small_net.onnx where it runs
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert (tmp_path / "small_net.onnx").is_file()
    printed = capsys.readouterr().out
    error = float(printed.split("max abs error ")[1].split(",")[0])
    assert error <= 1e-4
