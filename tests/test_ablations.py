"""The paper's Table 7 variants (mapnet_experiments.models.variants), the Table 6–8 rows and the
training recipe's variant / pruning / QAT options."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import mapnet
from interrupts import interrupted_at_call
from mapnet import MappingConfig
from mapnet.compress import CompressedWeights, magnitude_masks
from mapnet_experiments.models.networks import CNN2
from mapnet_experiments.models.variants import SeparateModulation, TrainableMapping, build_variant
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import train
from mapnet_experiments.recipe.state import load_model
from mapnet_experiments.recipe.trainer import Trainer
from mapnet_experiments.studies import ablations as ablation_tables
from mapnet_experiments.studies.runner import run_table
from test_train_cli import tiny_splits

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
P = 108_618


def trainable(module: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}


def step(module: nn.Module) -> None:
    module.zero_grad()
    nn.functional.cross_entropy(module(X), torch.arange(4)).backward()


@pytest.mark.parametrize(
    ("variant", "d", "expected"),
    [
        ("ours", 64, {"latents.0": 64}),
        ("lv-wmap", 64, {"mapped.latents.0": 64, "modulation.0": 64}),
        ("full-dnn", 5, {"weight": 5 * P}),
        ("lv-full-dnn", 5, {"weight": 5 * P, "latent": 5}),  # the paper's 543,095
        ("lv-full-dnn", 15, {"weight": 15 * P, "latent": 15}),  # the paper's 1,629,285
    ],
)
def test_each_variant_trains_exactly_its_tensors(variant: str, d: int, expected: dict) -> None:
    projection = "dense" if "dnn" in variant else "structured"
    module = build_variant(variant, CNN2, MappingConfig(latent_dim=d, projection=projection))
    assert trainable(module) == expected
    if variant == "lv-full-dnn":
        assert sum(expected.values()) == {5: 543_095, 15: 1_629_285}[d]
    with torch.no_grad():  # away from z = 0, where s would get no gradient
        for param in module.parameters():
            if param.requires_grad and param.dim() == 1:
                param.normal_()
    frozen_before = {n: b.clone() for n, b in module.named_buffers()}
    fixed_before = {n: p.clone() for n, p in module.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)  # every parameter, fixed ones too
    step(module)
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, f"{name} is fixed but received a gradient"
    optimizer.step()
    for name, buffer in module.named_buffers():  # W, θ₀, placeholders, a fixed z: untouched
        assert torch.equal(buffer, frozen_before[name]), name
    for name, param in module.named_parameters():
        if name in fixed_before:
            assert torch.equal(param, fixed_before[name]), name


def test_without_modulation_the_latent_enters_linearly() -> None:
    config = MappingConfig(latent_dim=32, alpha=0.0)
    mapped = mapnet.wrap(CNN2, config)
    z = torch.randn(32)
    theta = mapped.generate([z])["classifier.3.weight"]
    doubled = mapped.generate([2 * z])["classifier.3.weight"]
    base = mapped.base_tensor("classifier.3.weight")
    torch.testing.assert_close(doubled - base, 2 * (theta - base), atol=1e-6, rtol=1e-5)


def test_separate_modulation_is_w_times_z_modulated_by_s() -> None:
    alpha = 0.3
    module = build_variant("lv-wmap", CNN2, MappingConfig(latent_dim=16, alpha=alpha))
    assert isinstance(module, SeparateModulation)
    assert module.mapped.mapping_config.alpha == 0.0
    z, s = torch.randn(16), torch.randn(16)
    with torch.no_grad():
        module.mapped.latent.copy_(z)
        module.modulation[0].copy_(s)
    reference = mapnet.wrap(CNN2, MappingConfig(latent_dim=16, alpha=0.0))
    expected = reference.generate([z * (1 + alpha * s)])  # W̃ z with W̃_i = W_i (1 + α s_i)
    got = module.mapped.generate(module.effective_latents())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    torch.testing.assert_close(module.materialize()(X), module(X), atol=1e-5, rtol=1e-5)


def test_trainable_mapping_starts_as_the_fixed_mapping_at_its_own_z() -> None:
    config = MappingConfig(latent_dim=5, projection="dense", alpha=0.1)
    module = build_variant("full-dnn", CNN2, config)
    assert isinstance(module, TrainableMapping)
    assert module.weight.shape == (P, 5)
    fixed = mapnet.wrap(CNN2, config)
    expected = fixed.generate([module.latent])
    got = module.generated()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    assert module.latent.abs().sum() > 0  # a fixed z = 0 would give W no gradient
    torch.testing.assert_close(module.materialize()(X), module(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "wmap"}, "variant='wmap' is not one of"),
        (
            {"variant": "full-dnn", "mode": "plain", "mapping": MappingConfig(projection="dense")},
            "needs mode='mapped'",
        ),
        ({"variant": "lv-wmap", "loss": {"stability": True}}, "need variant='ours'"),
        (
            {
                "variant": "full-dnn",
                "mapping": MappingConfig(strategy="layerwise", latent_dim=4, projection="dense"),
            },
            "needs strategy='single'",
        ),
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.5}, r"sparsity must be in \[0, 1\)"),
        ({"prune_scope": "layer"}, "prune_scope='layer' is not one of"),
        ({"model": "smallcnn-4-x-2"}, "smallcnn-a-b-c"),
        (
            {"variant": "full-dnn", "mapping": MappingConfig(latent_dim=5)},
            "set projection='dense'",
        ),
        (
            {"variant": "lv-wmap", "sparsity": 0.5},
            "sparsity and fake_quant act on generated weights",
        ),
        ({"variant": "lv-wmap", "fake_quant": True}, "act on generated weights"),
        ({"loss": {"stability": True}, "sparsity": 0.5}, "cannot be combined with sparsity"),
        ({"loss": {"alignment": True}, "fake_quant": True}, "cannot be combined"),
    ],
)
def test_bad_variant_and_compression_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("variant", ["lv-wmap", "lv-full-dnn", "pruned", "qat"])
def test_a_variant_trains_and_resumes_through_the_recipe(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense = "dnn" in variant
    config = TrainConfig(
        epochs=2,
        batch_size=32,
        lr=1e-3 if dense else 0.1,
        variant=variant if variant in ("lv-wmap", "lv-full-dnn") else "ours",
        mapping=MappingConfig(latent_dim=8, projection="dense" if dense else "structured"),
    )
    if variant in ("pruned", "qat"):  # continue a finished run, as Table 8's rows do
        base = dataclasses.replace(config, epochs=1)
        train(base, splits=tiny_splits(), progress=False, out_dir=tmp_path / "base")
        compression = {"sparsity": 0.9, "prune_scope": "global"} if variant == "pruned" else {}
        config = dataclasses.replace(
            config,
            start_from=str(tmp_path / "base"),
            fake_quant=variant == "qat",
            **compression,
        )
    whole = train(config, splits=tiny_splits(), progress=False, out_dir=tmp_path / "whole")

    with interrupted_at_call(Trainer, "end_epoch", 2):  # killed after epoch 1 was saved
        train(config, splits=tiny_splits(), progress=False, out_dir=tmp_path / "cut", resume=True)
    resumed = train(
        config, splits=tiny_splits(), progress=False, out_dir=tmp_path / "cut", resume=True
    )

    def strip(result: dict) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in result["history"]]

    assert strip(resumed) == strip(whole)
    assert resumed["trainable_parameters"] == whole["trainable_parameters"]
    assert (tmp_path / "cut" / "checkpoint" / "model.safetensors").is_file()
    assert not (tmp_path / "cut" / "state").exists()


def test_pruning_continues_a_finished_mapped_run_with_fixed_masks(tmp_path: Path) -> None:
    base = TrainConfig(epochs=1, batch_size=32, lr=0.1, mapping=MappingConfig(latent_dim=16))
    train(base, splits=tiny_splits(), progress=False, out_dir=tmp_path / "base")
    pruned = dataclasses.replace(
        base, start_from=str(tmp_path / "base"), sparsity=0.9, epochs=2, lr=0.01
    )
    result = train(pruned, splits=tiny_splits(), progress=False, out_dir=tmp_path / "pruned")
    assert result["trainable_parameters"] == 16
    assert result["nonzero_weights"] == 10_864  # ⌈10 %⌉ of every CNN2 tensor
    # The continued run starts where the base ended: its masks come from the trained weights.
    trained = mapnet.wrap(CNN2, base.mapping)
    load_model(trained, tmp_path / "base" / "checkpoint")
    expected = magnitude_masks(
        {s.name: t for s, t in zip(trained.specs, trained.generate().values())}, 0.9
    )
    final = CompressedWeights(mapnet.wrap(CNN2, base.mapping), expected)
    state = load_file(tmp_path / "pruned" / "checkpoint" / "model.safetensors")
    final.load_state_dict(state)
    for name, mask in expected.items():
        assert torch.equal(final.mask(name), mask)


def test_a_start_from_that_does_not_fit_is_named(tmp_path: Path) -> None:
    plain = TrainConfig(mode="plain", epochs=1, batch_size=32, lr=1e-3)
    train(plain, splits=tiny_splits(), progress=False, out_dir=tmp_path / "plain")
    wrong = TrainConfig(epochs=1, start_from=str(tmp_path / "plain"), sparsity=0.5)
    with pytest.raises(mapnet.CheckpointError, match=r"mapnet\.json"):
        train(wrong, splits=tiny_splits(), progress=False)
    missing = TrainConfig(mode="plain", epochs=1, start_from=str(tmp_path / "nowhere"))
    with pytest.raises(mapnet.CheckpointError, match=r"nowhere.checkpoint.* not found"):
        train(missing, splits=tiny_splits(), progress=False)


def test_table_rows_have_the_papers_counts_and_seeds() -> None:
    runs = ablation_tables.plan("ablations")
    ids = [row.id for row, _ in runs]
    assert len(ids) == len(set(ids))
    seeds = [row.seed for row, _ in runs]
    assert sorted(set(seeds)) == [0, 1, 2]
    first_seed_1 = seeds.index(1)
    assert all(s == 0 for s in seeds[:first_seed_1])  # seed-major: seed 0 complete first
    by_id = {row.id: row for row, _ in runs}
    lv = by_id["lv-full-dnn-5-s0"].config("mnist")
    assert lv.variant == "lv-full-dnn" and lv.mapping.latent_dim == 5
    assert by_id["wm-2048-s1"].config("mnist").mapping.alpha == 0.0
    assert by_id["wmap-2048-s0"].config("mnist").mapping.latent_dim == 1024  # 1024 + 1024
    table6 = [row for row, datasets in runs if row.id.startswith("loss-")]
    assert len(table6) == 8 * 3 and all(
        datasets == ("fashion-mnist",) for row, datasets in runs if row.id.startswith("loss-")
    )
    compression = {row.id: row for row, _ in ablation_tables.plan("compression")}
    prune = compression["ours-2048-prune-s2"]
    config = prune.config("mnist", root=Path("r"))
    assert config.start_from == str(Path("r/runs/ours-2048-s2-mnist")) and config.sparsity == 0.9
    assert compression["cnn2-lrd-s0"].config("mnist").model == "cnn2-lrd"


def test_a_run_locked_by_another_process_is_left_to_it(tmp_path: Path) -> None:
    rows = [spec.row(0) for spec in ablation_tables.TABLE7[:1]]
    out = tmp_path / "runs" / "cnn2-s0-mnist"
    code = (
        "import sys, time; from mapnet import files; held = files.lock(sys.argv[1]); "
        "held.__enter__(); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        written = run_table(rows, root=tmp_path, datasets=("mnist",), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert written == [] and not out.exists()


def test_a_continued_row_without_its_base_is_named_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = next(s for s in ablation_tables.TABLE8 if s.id == "ours-2048-prune")
    written = run_table([spec.row(0)], root=tmp_path, datasets=("mnist",), progress=False)
    assert written == [] and not (tmp_path / "runs" / "ours-2048-prune-s0-mnist").exists()
    assert "runs continuing ours-2048-s0-mnist wait" in capsys.readouterr().out


def test_a_continued_row_runs_once_its_base_finishes_in_the_same_call(tmp_path: Path) -> None:
    from test_train_cli import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", train=300, test=50)
    specs = {s.id: s for s in ablation_tables.TABLE7 + ablation_tables.TABLE8}
    prune = dataclasses.replace(
        specs["cnn2-prune"], train=specs["cnn2-prune"].train | {"epochs": 1}
    )
    rows = [prune.row(0), specs["cnn2"].row(0)]  # the continued row first: it must wait
    written = run_table(
        rows,
        root=tmp_path / "r",
        datasets=("tiny",),
        epochs=1,
        progress=False,
        data_dir=str(data),
        val_size=50,
    )
    assert {p.name for p in written} == {"cnn2-s0-tiny.json", "cnn2-prune-s0-tiny.json"}
    result = json.loads((tmp_path / "r" / "cnn2-prune-s0-tiny.json").read_text())
    assert result["config"]["start_from"] == str(tmp_path / "r" / "runs" / "cnn2-s0-tiny")
    assert result["nonzero_weights"] == math.ceil(0.1 * 108_618)  # global pruning


def test_the_tables_learning_rates_are_the_committed_choices() -> None:
    """The hard-coded choices equal what the committed select runs choose on validation."""
    root = Path(__file__).resolve().parents[1] / "results" / "ablations"
    chosen = ablation_tables.choices(root)
    if len(chosen) < 7:
        pytest.skip("the select runs are not all committed")
    assert chosen["FULL_DNN_LR"] == ablation_tables.FULL_DNN_LR
    assert chosen["PRUNE_MAPPED_LR"] == ablation_tables.PRUNE_MAPPED_LR
    assert chosen["PRUNE_PLAIN_LR"] == ablation_tables.PRUNE_PLAIN_LR
    assert (
        chosen["PRUNE_MAPPED_SCOPE"] == chosen["PRUNE_PLAIN_SCOPE"] == ablation_tables.PRUNE_SCOPE
    )
    assert chosen["QAT_MAPPED_LR"] == ablation_tables.QAT_MAPPED_LR
    assert chosen["QAT_PLAIN_LR"] == ablation_tables.QAT_PLAIN_LR
