"""The INR population: fitting improves reconstructions, the learned base is kept with its
space, stages resume from their files, and the report has the anchors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from interrupts import interrupted_at_call
from mapnet import CheckpointError, ModelSpace
from mapnet_experiments.models.networks import Siren
from mapnet_experiments.recipe import loop as recipe_loop
from mapnet_experiments.studies.space import inr as inr_study
from test_space_study import fake_sources


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inr_study, "load_idx_dataset", fake_sources)
    settings = {"DIMS": (16,), "CODE_DIM": 16, "META_IMAGES": 24, "TRAIN_IMAGES": 48,
                "TEST_IMAGES": 24, "FULL_TRAIN_IMAGES": 96, "FULL_TEST_IMAGES": 36,
                "BASE_STEPS": 20, "FIT_STEPS": 5, "CHUNK": 24, "META_STEPS": 6,
                "META_BATCH": 8, "META_CHECKPOINT_EVERY": 2, "FULL_DIMS": (16, 8)}  # fmt: skip
    for name, value in settings.items():
        monkeypatch.setattr(inr_study, name, value)
    # The latent classifier's best validation epoch on these few rows comes within its first
    # 25 epochs (measured: the same accuracies at 25, 40 and 150): 30, not 150, per seed.
    classify_once = functools.partial(inr_study.classify_once, epochs=30)
    monkeypatch.setattr(inr_study, "classify_once", classify_once)


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
        ("meta", 16),
        ("meta", 8),
        ("learned", 16),
        ("fixed", 16),
    }
    learned = ModelSpace.load(root / "mnist" / "learned-d16" / "space", Siren)
    fixed = ModelSpace.load(root / "mnist" / "fixed-d16" / "space", Siren)
    meta = ModelSpace.load(root / "mnist" / "meta-d16" / "space", Siren)
    assert learned.bases is not None and fixed.bases is None
    assert not torch.equal(learned.bases[0], learned.mapping.base_0)  # θ₀ was trained
    assert meta.bases is not None and meta.log_step_sizes is not None
    assert not torch.equal(meta.bases[0], meta.mapping.base_0)
    assert not torch.equal(meta.log_step_sizes, torch.zeros(16))  # the step sizes moved from 1
    assert not (root / "mnist" / "meta-d16" / "state").exists()  # finished: no resume state
    expected = {"fixed": (48, 24), "learned": (48, 24), "meta": (48, 24), "meta-full": (96, 36),
                "meta-full-d8": (96, 36)}  # fmt: skip
    for name, (train, test) in expected.items():
        codes = entry["codes"][name]
        assert codes["train_latents"] + codes["val_latents"] == train
        assert codes["val_latents"] == train // 12 and codes["test_latents"] == test
        assert 0 <= codes["test_acc"] <= 100
    assert entry["codes"]["meta"]["steps"] == inr_study.INNER_STEPS
    assert entry["codes"]["meta-full-d8"]["latent_dim"] == 8
    # The headline is the full-data row with the best validation accuracy, whatever the test.
    name, chosen = inr_study.chosen_row(entry)
    assert name in ("meta-full", "meta-full-d8")
    other = entry["codes"]["meta-full-d8" if name == "meta-full" else "meta-full"]
    assert inr_study.validation_accuracy(chosen) >= inr_study.validation_accuracy(other)
    assert {k: v["train_images"] for k, v in entry["pixels"].items()} == {
        "pixels": 48,
        "pixels-full": 96,
    }
    # On these learnable stand-ins the pixels classify: the shared MLP is not broken.
    assert entry["pixels"]["pixels-full"]["test_acc"] > 50
    # A finished stage is read back, not redone.
    marker = root / "mnist" / "codes-fixed.json"
    stored = json.loads(marker.read_text())
    assert inr_study.codes_stage("mnist", "fixed", root, None) == stored
    text = "\n".join(inr_study.report_section(summary))
    assert "| mnist | learned | 16 |" in text and "85.7" in text and "98.5" in text
    assert "| mnist | meta | 16 |" in text and "| mnist | pixels (no INR) | – | 96 / 36 |" in text
    assert text.count("| **") == 1  # one headline row, in bold
    drawn = inr_study.figure(root, tmp_path / "space-inr.png", None)
    assert drawn is not None and drawn.stat().st_size > 5_000
    assert inr_study.figure(tmp_path / "nothing", tmp_path / "none.png", None) is None


def test_an_interrupted_codes_stage_resumes_at_the_next_chunk(
    small: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "inr"
    whole = inr_study.codes_stage("mnist", "fixed", root / "a", None)
    # The base stage fits once, then 2 chunks: the third fit is the second chunk.
    with interrupted_at_call(inr_study, "fit", 3):
        inr_study.codes_stage("mnist", "fixed", root / "b", None)
    pieces = sorted(p.name for p in (root / "b" / "mnist" / "codes-fixed.parts").iterdir())
    assert pieces == ["train-0.safetensors"]
    counted = {"n": 0}
    real = inr_study.fit

    def count(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(inr_study, "fit", count)
    again = inr_study.codes_stage("mnist", "fixed", root / "b", None)
    assert counted["n"] == 2  # the second train chunk and the test chunk, not the first
    assert again == whole
    assert not (root / "b" / "mnist" / "codes-fixed.parts").exists()


def test_meta_encoding_is_its_inner_steps_and_meta_learning_resumes_exactly(
    small: None, tmp_path: Path
) -> None:
    whole = inr_study.meta_stage("mnist", 16, tmp_path / "a", None, progress=False)
    assert whole["steps"] == 6 and whole["images"] == 96
    assert whole["inner_steps"] == inr_study.INNER_STEPS and whole["meta_batch"] == 8
    # Killed right after the second checkpoint, at step 4 (one every 2 steps).
    with interrupted_at_call(recipe_loop, "save_state", 2, after=True):
        inr_study.meta_stage("mnist", 16, tmp_path / "b", None, progress=False)
    folder = tmp_path / "b" / "mnist" / "meta-d16"
    state = json.loads((folder / "state" / "state.json").read_text())
    assert state["epoch"] == 2 and state["history"][-1]["step"] == 4
    # Killed again while writing the next checkpoint: a half-written staging folder is left.
    torn = folder / ".state.staging-torn" / "model"
    torn.mkdir(parents=True)
    (torn / "space.json").write_text("{")
    again = inr_study.meta_stage("mnist", 16, tmp_path / "b", None, progress=False)
    assert again == whole  # resumed from step 4, the torn save dropped
    assert sorted(p.name for p in folder.iterdir()) == ["result.json", "space"]
    a, b = (ModelSpace.load(root / "mnist" / "meta-d16" / "space", Siren)
            for root in (tmp_path / "a", tmp_path / "b"))  # fmt: skip
    assert torch.equal(a.bases[0], b.bases[0]) and torch.equal(a.log_step_sizes, b.log_step_sizes)
    # Encoding is the INNER_STEPS learned steps from z = 0, nothing else.
    target = torch.rand(3, 784)
    latents, quality = inr_study.encode(a, "meta", target)
    expected = a.fit_latents(inr_study.per_image_mse(target), inr_study.coordinates(),
                             steps=inr_study.INNER_STEPS, count=3)  # fmt: skip
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    assert quality.shape == (3,)


def test_meta_resume_refuses_other_settings_and_pixels_scale_safely(
    small: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with interrupted_at_call(recipe_loop, "save_state", 1, after=True):
        inr_study.meta_stage("mnist", 16, tmp_path, None, progress=False)
    monkeypatch.setattr(inr_study, "INNER_STEPS", 2)
    with pytest.raises(CheckpointError, match=r"another config \(fields \['inner_steps'\]\)"):
        inr_study.meta_stage("mnist", 16, tmp_path, None, progress=False)
    # A feature constant over the training rows is not divided by ~0 (a border pixel).
    generator = torch.Generator().manual_seed(0)
    train_labels = torch.arange(48) % 2
    train = torch.randn(48, 3, generator=generator) + 3 * train_labels[:, None]
    train = torch.cat([train, torch.zeros(48, 1)], 1)  # (48, 4): the last feature is 0
    test_labels = torch.arange(24) % 2
    test = torch.randn(24, 3, generator=generator) + 3 * test_labels[:, None]
    test = torch.cat([test, torch.full((24, 1), 0.5)], 1)  # nonzero where training had none
    features = {"train": train, "train_labels": train_labels, "test": test,
                "test_labels": test_labels}  # fmt: skip
    result = inr_study.classify_once(features, epochs=30)
    assert result["test_acc"] > 90
    with pytest.raises(ValueError, match="11 training rows leave none to validate on"):
        inr_study.classify_once({"train": train[:11], "train_labels": train_labels[:11],
                                 "test": test, "test_labels": test_labels})  # fmt: skip
