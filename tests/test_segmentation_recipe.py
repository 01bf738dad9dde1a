"""`mapnet repro segmentation` end to end on tiny generated IDX sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mapnet_experiments.data import scenes as segmentation_data
from mapnet_experiments.recipe import splits as train_module
from mapnet_experiments.studies import segmentation


def fake_sources(name: str, split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands in for load_idx_dataset (the built-in names are checksummed)."""
    n = 60 if split == "train" else 12
    generator = torch.Generator().manual_seed(len(name) + n)
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 6:22, 6:22] = 200
    return images, torch.randint(0, 10, (n,), generator=generator)


def test_the_segmentation_table_runs_reports_and_draws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segmentation_data, "SCENE_COUNTS", (8, 4, 4))
    monkeypatch.setattr(segmentation_data, "SCENE_SIZE", 56)
    monkeypatch.setattr(segmentation, "SEEDS", (0,))  # one seed's rows: the test's time
    monkeypatch.setattr(train_module, "load_idx_dataset", fake_sources)
    data = tmp_path / "data"
    root = tmp_path / "results"
    written = segmentation.run(root, data_dir=str(data), progress=False, epochs=1)
    assert len(written) == len(segmentation.SPECS)
    result = json.loads((root / "ours-8192-s0-scenes.json").read_text())
    assert result["task"] == "segmentation" and result["trainable_parameters"] == 8192
    assert 0 <= result["test_miou"] <= 1
    text = segmentation.report(root, tmp_path / "s.md")
    row = next(line for line in text.splitlines() if line.startswith("| Ours* 8192"))
    assert "| 97.92 / 0.4623 |" in row and f"{result['test_miou']:.4f}" in row
    figure = segmentation.figure(root, tmp_path / "s.png", data_dir=str(data), count=2)
    assert figure is not None and figure.stat().st_size > 5_000
