"""`mapnet repro space` end to end on small generated data (the built-in names are
checksummed, so load_idx_dataset is replaced)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mapnet_experiments.recipe import splits as train_module
from mapnet_experiments.studies.space import study as space_study


def fake_sources(name: str, split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable stand-ins: class k brightens rows 2k+4 and 2k+5."""
    n = 240 if split == "train" else 60
    generator = torch.Generator().manual_seed(len(name) + n)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=generator, dtype=torch.uint8)
    for offset in (4, 5):
        images[torch.arange(n), 0, 2 * labels + offset] = 220
    return images, labels


def test_the_space_study_trains_analyses_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_module, "load_idx_dataset", fake_sources)
    for name, value in [("EPOCHS", 1), ("VAL_SIZE", 40), ("OPTIMISE_STEPS", 3),
                        ("DISTIL_STEPS", 3), ("PATH_STEPS", 3)]:  # fmt: skip
        monkeypatch.setattr(space_study, name, value)
    root = tmp_path / "space"
    space_study.train_all(root, data_dir=str(tmp_path / "data"), progress=False)
    result = space_study.analyse(root, data_dir=str(tmp_path / "data"), tsne=False)
    assert len(result["members"]) == 12
    paths = result["paths"]
    assert set(paths) == {
        "mapped (one space, z)",
        "mapped, path flattening (z)",
        "mapped, independent starts (z)",
        "plain, independent inits (weights)",
        "plain, one init (weights)",
    }
    for path in paths.values():
        assert len(path["test"]) == 3
        bar = path["barrier"]
        ends = (path["test"][0] + path["test"][-1]) / 2
        assert bar["barrier_max"] == pytest.approx(ends - min(path["test"]))
    # The path's ends are the members themselves.
    members = json.loads((root / "population" / "results.json").read_text())["members"]
    assert paths["mapped (one space, z)"]["test"][0] == pytest.approx(members[0]["test_acc"])
    soups = result["soups"]
    assert len(soups["members"]) == 6  # the Fashion-MNIST task: 4 orders, 2 half subsets
    assert set(soups["greedy soup"]["members"]) <= set(soups["members"])
    assert len(result["embedding"]["pca"]) == 12  # 1 epoch × 12 members
    text = space_study.report(root, tmp_path / "docs" / "space.md")
    assert "| mapped, path flattening (z) |" in text and "greedy soup" in text
    assert (tmp_path / "docs" / "space-paths.png").stat().st_size > 5_000
    assert (tmp_path / "docs" / "space-latents.png").stat().st_size > 5_000
    # The speed stage, small: vmap against the loop, the weights alone, and their report.
    threads = torch.get_num_threads()
    measured = space_study.speed(root, members=3, repeats=1)
    for row in measured["rows"]:
        assert row["max_abs_difference"] < 1e-5 and row["speedup"] > 0
        assert row["generate_ms"] > 0 and row["generate_vmap_ms"] > 0
    text = space_study.report(root, tmp_path / "docs" / "space.md")
    assert "| weights alone, vmap | at most |" in text and "| CNN2, batch 32 |" in text
    assert "5× faster than a loop is met for" in text  # judged on the measured rows
    assert "The INR targets are not measured yet" in text
    assert torch.get_num_threads() == threads  # the stage restores the thread count
