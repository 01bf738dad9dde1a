"""Figures and generated reports of the ablation, compression and budget tables: drawn from
results files, with the numbers the files hold."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from mapnet.files import write_json
from mapnet_experiments.studies import ablations as ablation_tables
from mapnet_experiments.studies import budget, compression, trajectory
from test_train_cli import write_tiny_dataset


def fake_result(test_acc: float, history: int = 3, **extra: object) -> dict:
    rows = [{"train_acc": 50.0 + i, "val_acc": 45.0 + i, "epoch": i + 1} for i in range(history)]
    return {
        "test_acc": test_acc,
        "train_acc": test_acc + 1.5,
        "val_acc": test_acc - 0.5,
        "trainable_parameters": 2048,
        "nonzero_weights": 10_864,
        "history": rows,
    } | extra


def test_ablation_report_gives_mean_and_std_over_seeds(tmp_path: Path) -> None:
    values = {0: 87.0, 1: 88.0, 2: 89.5}
    for seed, value in values.items():
        write_json(tmp_path / f"ours-2048-s{seed}-fashion-mnist.json", fake_result(value))
    write_json(tmp_path / "wm-2048-s0-mnist.json", fake_result(96.0))
    text = ablation_tables.report(tmp_path, tmp_path / "docs" / "ablations.md")
    mean, std = statistics.mean(values.values()), statistics.stdev(values.values())
    row = next(line for line in text.splitlines() if line.startswith("| Ours* 2048 |"))
    assert f"{mean:.2f} ± {std:.2f}" in row and "98.66 / 91.88" in row
    assert "| 1.50 ± 0.00 |" in row  # the gap: train − test
    wm = next(line for line in text.splitlines() if line.startswith("| Ours* − WM 2048"))
    assert "96.00 (1 seed)" in wm
    table6 = next(line for line in text.splitlines() if line.startswith("| Ours* 2048 | 8"))
    assert "[87.88]" in table6 and "[91.88]" in table6  # the paper's beside ours
    assert (tmp_path / "docs" / "curves-ablations.png").stat().st_size > 10_000


def test_compression_report_lists_int8_bytes_and_times(tmp_path: Path) -> None:
    write_json(tmp_path / "cnn2-prune-s0-mnist.json", fake_result(97.0))
    timing = {"threads1": {"float": 4.0, "int8": 2.0}, "threads2": {"float": 3.0, "int8": 1.5}}
    write_json(
        tmp_path / "int8" / "cnn2-s0-mnist.json",
        {
            "test_acc_float": 99.0,
            "test_acc_int8": 98.9,
            "float_bytes": 434_472,
            "int8_bytes": 120_000,
            "inference_ms": timing,
        },
    )
    text = compression.report(tmp_path, tmp_path / "compression.md")
    prune = next(line for line in text.splitlines() if line.startswith("| CNN2 + Prune"))
    assert "| 10,864 |" in prune and "97.00 (1 seed)" in prune
    int8 = next(line for line in text.splitlines() if line.startswith("| cnn2 | mnist"))
    assert "434,472 → 120,000" in int8 and "4.00 → 2.00" in int8 and "3.00 → 1.50 (2)" in int8


def test_budget_report_picks_the_small_cnn_on_validation_and_says_where_mapnet_lies(
    tmp_path: Path,
) -> None:
    write_json(tmp_path / "single-2048-fashion-mnist.json", fake_result(87.5))
    flat = fake_result(88.0, trainable_parameters=2060, val_acc=87.0)
    growing = fake_result(89.0, trainable_parameters=1702, val_acc=86.0)  # better test, worse val
    assert not any(row.id.startswith("small-") for row, _ in budget.plan(tmp_path))  # no lr yet
    for row in budget.SELECT:  # the lr choice: 3e-3 has the best validation accuracy
        lr = row.train["lr"]
        write_json(
            tmp_path / f"{row.id}-fashion-mnist.json", fake_result(80.0 + 1000 * lr * (lr < 5e-3))
        )
    assert budget.chosen_lr(tmp_path) == 3e-3
    assert {row.id for row, _ in budget.plan(tmp_path)} >= {"small-flat-8192-lr0.003"}
    write_json(tmp_path / "small-flat-2048-lr0.003-fashion-mnist.json", flat)
    write_json(tmp_path / "small-growing-2048-lr0.003-fashion-mnist.json", growing)
    write_json(
        tmp_path / "small-flat-2048-lr0.01-fashion-mnist.json", fake_result(99.0, val_acc=99.0)
    )
    baseline = tmp_path / "baseline.json"
    write_json(baseline, fake_result(90.0))
    text = budget.report(tmp_path, tmp_path / "budget.md", baseline)
    row = next(line for line in text.splitlines() if line.startswith("| 2,048 |"))
    assert "| 88.00 (2,060) |" in row  # chosen by validation accuracy, not test, at lr 3e-3
    assert "at lr 0.003, chosen on validation" in text
    assert "mapnet single 2,048: 87.50, below the small CNN of 2,060 (88.00, -0.50)" in text
    assert (tmp_path / "budget.png").stat().st_size > 10_000


def test_small_cnns_match_their_budgets() -> None:
    from mapnet_experiments.models.networks import SmallCNN, small_cnn_parameters, small_cnn_widths

    for size in budget.BUDGETS:
        for shape in budget.SHAPES:
            widths = small_cnn_widths(size, shape)
            count = sum(p.numel() for p in SmallCNN(widths).parameters())
            assert count == small_cnn_parameters(widths)
    assert small_cnn_widths(2048, "flat") == (10, 10, 10)
    assert SmallCNN((4, 8, 16))(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_pca_finds_the_direction_of_a_line() -> None:
    t = torch.linspace(0, 1, 20)[:, None]
    rows = t * torch.tensor([[3.0, 4.0, 0.0]]) + 1e-4 * torch.randn(20, 3)
    coordinates, share = trajectory.pca_2d(rows)
    assert share[0] > 0.999
    spread = coordinates[:, 0].max() - coordinates[:, 0].min()
    assert spread == pytest.approx(5.0, rel=1e-3)  # the line's length, |(3, 4)| = 5


def test_trajectories_start_together_and_are_drawn(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", train=300, test=50)
    source = trajectory.run(
        "tiny", epochs=1, every=1, root=tmp_path, data_dir=str(root), progress=False, val_size=50
    )
    data = json.loads(source.read_text())
    assert set(data["panels"]) == {"all weights", "conv1", "conv2", "fc1", "fc2"}
    steps = math.ceil(250 / 128) + 1  # 2 batches in the epoch, plus the starting point
    assert data["snapshots"] == {"trained directly": steps, "mapnet, Ours* 2048": steps}
    for panel in data["panels"].values():
        plain, mapped = panel["pca"].values()
        assert plain[0] == pytest.approx(mapped[0], abs=1e-4)  # the same θ₀
        assert plain[-1] != pytest.approx(mapped[-1], abs=1e-4)
    figure = trajectory.figure(source, tmp_path / "t.png")
    assert figure.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no tsne coordinates"):
        trajectory.figure(source, tmp_path / "t2.png", "tsne")


def test_trajectories_with_tsne(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    root = write_tiny_dataset(tmp_path / "data", train=600, test=50)
    source = trajectory.run(
        "tiny",
        1,
        every=1,
        root=tmp_path,
        data_dir=str(root),
        progress=False,
        val_size=50,
        tsne=True,
    )
    panel = json.loads(source.read_text())["panels"]["fc1"]
    assert [len(points) for points in panel["tsne"].values()] == [6, 6]  # 5 steps + the start
    assert trajectory.figure(source, tmp_path / "t.png", "tsne").exists()


def _captured(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures plots.py draws, kept open instead of saved."""
    from mapnet_experiments import figures
    from mapnet_experiments.studies import plots

    kept: list = []
    for module in (plots, figures):  # line_chart saves through figures' own name
        monkeypatch.setattr(module, "save", lambda plt, fig, out: kept.append(fig) or out)
    return kept


def test_curves_keep_one_colour_per_data_set_across_panels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Fashion-MNIST-only panel (Table 6's rows) must not take MNIST's colour."""
    from mapnet_experiments.studies.plots import Curve, training_curves

    kept = _captured(monkeypatch)
    both = [Curve("MNIST", [1, 2], [1, 2]), Curve("Fashion-MNIST", [3, 4], [3, 4])]
    training_curves({"both": both, "one": [both[1]]}, tmp_path / "c.png", "t")
    axes = kept[0].axes
    assert axes[1].lines[0].get_color() == axes[0].lines[2].get_color()  # Fashion-MNIST val
    assert axes[1].lines[0].get_color() != axes[0].lines[0].get_color()  # not MNIST's
    legend = [text.get_text() for text in kept[0].legends[0].get_texts()]
    assert legend == ["MNIST val", "MNIST train", "Fashion-MNIST val", "Fashion-MNIST train"]


def test_space_latents_figure_names_tasks_and_axes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mapnet_experiments.studies.space.study import figures, task_name

    assert task_name("fashion-mnist:[5, 6, 7, 8, 9]") == "Fashion-MNIST, classes 5–9"
    assert task_name("mnist") == "MNIST, all classes"
    kept = _captured(monkeypatch)
    tasks = ["mnist", "mnist:[0, 1, 2, 3, 4]"]
    analysis = {
        "paths": {"pair": {"test": [90.0, 50.0, 89.0]}},
        "embedding": {
            "tasks": tasks * 2,
            "epochs": [1, 1, 2, 2],
            "pca": [[0, 0], [1, 1], [2, 2], [3, 3]],
            "pca_variance": [0.5, 0.25],
        },
    }
    figures(analysis, tmp_path)
    latents = kept[1]
    assert latents.axes[0].get_xlabel() == "PC 1 (50 % of variance)"
    assert latents.axes[0].get_ylabel() == "PC 2 (25 %)"
    legend = [text.get_text() for text in latents.legends[0].get_texts()]
    assert legend == ["MNIST, all classes", "MNIST, classes 0–4"]


def test_segmentation_key_has_a_distinct_colour_per_class() -> None:
    from mapnet_experiments.data.scenes import NUM_SCENE_CLASSES, class_names, mask_palette

    palette = [tuple(c) for c in mask_palette(NUM_SCENE_CLASSES).tolist()]
    assert len(set(palette)) == NUM_SCENE_CLASSES == len(class_names("scenes"))
