"""The INR population: fitting improves reconstructions, the learned base is kept with its
space, stages resume from their files, and the report has the anchors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mapnet import ModelSpace
from mapnet_experiments import inr_study
from mapnet_experiments.models import Siren
from test_space_study import fake_sources


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inr_study, "load_idx_dataset", fake_sources)
    settings = {"DIMS": (16,), "CODE_DIM": 16, "META_IMAGES": 24, "TRAIN_IMAGES": 48,
                "TEST_IMAGES": 24, "VAL_IMAGES": 12, "BASE_STEPS": 20, "FIT_STEPS": 5,
                "CHUNK": 24}  # fmt: skip
    for name, value in settings.items():
        monkeypatch.setattr(inr_study, name, value)


def test_siren_has_its_count_and_fitting_raises_psnr() -> None:
    assert sum(p.numel() for p in Siren().parameters()) == 1_185
    target = torch.rand(4, 784)
    space = ModelSpace(Siren, inr_study._config(16), 4)
    coords = inr_study.coordinates()
    with torch.no_grad():
        before = inr_study.psnr(space(coords).squeeze(-1), target)
    after = inr_study.fit(space, target, steps=20, lr=0.05, base=False)
    assert after.shape == (4,) and (after > before).all()


def test_the_stages_write_resume_and_report(small: None, tmp_path: Path) -> None:
    root = tmp_path / "inr"
    summary = inr_study.run(root, datasets=("mnist",))
    entry = summary["datasets"]["mnist"]
    assert {(r["variant"], r["latent_dim"]) for r in entry["base"]} == {
        ("learned", 16),
        ("fixed", 16),
    }
    learned = ModelSpace.load(root / "mnist" / "learned-d16" / "space", Siren)
    fixed = ModelSpace.load(root / "mnist" / "fixed-d16" / "space", Siren)
    assert learned.bases is not None and fixed.bases is None
    assert not torch.equal(learned.bases[0], learned.mapping.base_0)  # θ₀ was trained
    for variant in ("fixed", "learned"):
        codes = entry["codes"][variant]
        assert codes["train_latents"] + codes["val_latents"] == 48 and codes["test_latents"] == 24
        assert 0 <= codes["test_acc"] <= 100
    # A finished stage is read back, not redone.
    marker = root / "mnist" / "codes-fixed.json"
    stored = json.loads(marker.read_text())
    assert inr_study.codes_stage("mnist", "fixed", root, None) == stored
    text = "\n".join(inr_study.report_section(summary))
    assert "| mnist | learned | 16 |" in text and "85.7" in text and "98.5" in text


def test_an_interrupted_codes_stage_resumes_at_the_next_chunk(
    small: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "inr"
    whole = inr_study.codes_stage("mnist", "fixed", root / "a", None)
    real = inr_study.fit
    calls = {"n": 0}

    def stop_at_the_third_chunk(*args, **kwargs):  # the base stage fits once, then 2 chunks
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(inr_study, "fit", stop_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        inr_study.codes_stage("mnist", "fixed", root / "b", None)
    pieces = sorted(p.name for p in (root / "b" / "mnist" / "codes-fixed.parts").iterdir())
    assert pieces == ["train-0.safetensors"]
    counted = {"n": 0}

    def count(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(inr_study, "fit", count)
    again = inr_study.codes_stage("mnist", "fixed", root / "b", None)
    assert counted["n"] == 2  # the second train chunk and the test chunk, not the first
    assert again == whole
    assert not (root / "b" / "mnist" / "codes-fixed.parts").exists()
