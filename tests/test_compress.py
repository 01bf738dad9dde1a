"""mapnet.compress: low-rank Linear, magnitude pruning with fixed masks, int8 fake quantisation
and post-training int8 with its pickle-free save and load."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save
from torch import nn

import mapnet
from damage import edit_manifest, edit_tensors, reseal
from mapnet.compress import (
    CompressedWeights,
    LowRankLinear,
    factorize_linear,
    fake_quantize_int8,
    load_quantized,
    magnitude_masks,
    quantize_int8,
    save_quantized,
)
from mapnet.errors import CheckpointError
from mapnet_experiments.models.networks import CNN2, CNN2LowRank


def test_low_rank_linear_is_the_product_of_its_factors() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(12, 7, 3)
    x = torch.randn(5, 12)
    expected = x @ (layer.u @ layer.v).T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    assert sum(p.numel() for p in layer.parameters()) == 7 * 3 + 3 * 12 + 7
    assert torch.linalg.matrix_rank(layer.u @ layer.v) == 3


def test_cnn2_with_rank_32_fc1_has_the_papers_count() -> None:
    model = CNN2LowRank()
    assert sum(p.numel() for p in model.parameters()) == 35_914
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_factorize_linear_at_full_rank_reproduces_the_layer() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(8, 6)
    before = model(x)
    factorize_linear(model, ["0"], rank=4)
    assert isinstance(model[0], LowRankLinear)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_factorize_linear_keeps_the_best_rank_r_approximation() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(10, 8)
    weight = layer.weight.detach().clone()
    model = factorize_linear(nn.Sequential(layer), ["0"], rank=2)
    values = torch.linalg.svdvals(weight)
    error = torch.linalg.matrix_norm(model[0].u @ model[0].v - weight)
    torch.testing.assert_close(error, values[2:].square().sum().sqrt(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: LowRankLinear(8, 4, 0), "rank must be > 0"),
        (lambda: LowRankLinear(8, 4, -2), "rank must be > 0"),
        (lambda: LowRankLinear(8, 4, 5), "rank 5 exceeds"),
        (lambda: factorize_linear(CNN2(), ["features.0"], 2), "is a Conv2d, not an nn.Linear"),
        (lambda: factorize_linear(CNN2(), ["nope"], 2), "'nope' is not a submodule"),
    ],
)
def test_bad_low_rank_input_is_named(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_magnitude_masks_keep_the_largest_entries_of_each_tensor() -> None:
    weights = {"a": torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2]), "b": torch.arange(20.0) - 10}
    masks = magnitude_masks(weights, 0.6)
    assert masks["a"].tolist() == [False, True, False, True, False]  # ⌈0.4·5⌉ = 2 kept
    assert masks["b"].sum() == math.ceil(0.4 * 20)
    kept = weights["b"][masks["b"]].abs()
    assert kept.min() >= weights["b"][~masks["b"]].abs().max()


def test_global_masks_rank_all_numbers_together() -> None:
    weights = {"small": torch.full((10,), 0.01), "large": torch.arange(1.0, 11.0)}
    masks = magnitude_masks(weights, 0.5, scope="global")
    assert masks["small"].sum() == 0  # every small entry is below every large one
    assert masks["large"].all()
    per_tensor = magnitude_masks(weights, 0.5)
    assert per_tensor["small"].sum() == 5 and per_tensor["large"].tolist()[5:] == [True] * 5
    with pytest.raises(ValueError, match="scope='layer' is not one of"):
        magnitude_masks(weights, 0.5, scope="layer")
    model = CompressedWeights.pruned(CNN2(), 0.9, scope="global")
    assert model.nonzero_weights() == math.ceil(0.1 * 108_618)  # 10,862, the paper's count


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_a_sparsity_outside_zero_one_is_refused(sparsity: float) -> None:
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        magnitude_masks({"a": torch.ones(3)}, sparsity)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        CompressedWeights.pruned(CNN2(), sparsity)


def test_masks_must_name_weights_of_their_shapes() -> None:
    with pytest.raises(ValueError, match=r"mask for 'fc\.weight', which is not a weight"):
        CompressedWeights(CNN2(), {"fc.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"has shape \(3,\), the weight \(16,\)"):
        CompressedWeights(CNN2(), {"features.0.bias": torch.ones(3, dtype=torch.bool)})


def _tiny_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(16, 1, 28, 28, generator=generator),
            torch.randint(0, 10, (16,), generator=generator),
        )
        for _ in range(steps)
    ]


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "plain"])
def test_pruned_weights_stay_zero_while_training_continues(mapped: bool) -> None:
    torch.manual_seed(0)
    inner = mapnet.wrap(CNN2, latent_dim=64) if mapped else CNN2()
    if mapped:
        with torch.no_grad():
            inner.latent.normal_()
    model = CompressedWeights.pruned(inner, 0.9)
    masks = {name: model.mask(name).clone() for name in model.mask_names}
    total = sum(m.numel() for m in masks.values())
    kept = sum(math.ceil(0.1 * m.numel()) for m in masks.values())
    assert len(masks) == 8 and total == 108_618
    assert model.nonzero_weights() == kept == 10_864  # ⌈10 %⌉ of each of CNN2's 8 tensors
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    start = {k: v.detach().clone() for k, v in model.compressed_weights().items()}
    for x, y in _tiny_batches(4):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = {k: v.detach() for k, v in model.compressed_weights().items()}
    for name, mask in masks.items():
        assert torch.equal(model.mask(name), mask), f"mask of {name} changed"
        assert after[name][~mask].abs().max() == 0, f"a pruned entry of {name} moved"
    assert any(not torch.equal(after[n][masks[n]], start[n][masks[n]]) for n in masks)
    assert model.nonzero_weights() <= kept
    plain = model.materialize()
    assert type(plain) is CNN2
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)


def test_only_the_latent_trains_through_a_pruned_mapping() -> None:
    inner = mapnet.wrap(CNN2, latent_dim=32)
    model = CompressedWeights.pruned(inner, 0.5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["module.latents.0"]
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert inner.latent.grad is not None and inner.latent.grad.abs().sum() > 0


def test_fake_quantisation_rounds_to_the_int8_grid_with_a_straight_through_gradient() -> None:
    torch.manual_seed(3)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    rounded = fake_quantize_int8(weight)
    scale = weight.detach().flatten(1).abs().amax(1) / 127.5  # (C,)
    steps = rounded.detach() / scale[:, None, None, None]
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    assert steps.min() >= -128 and steps.max() <= 127
    assert (rounded - weight).abs().max() <= scale.max() / 2 + 1e-6
    clamped = weight.detach() / scale[:, None, None, None] > 127  # max|w| / scale = 127.5
    assert clamped.sum() >= 1  # torch's own fake quantisation would give these no gradient
    rounded.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight through, everywhere
    bias = torch.randn(4)
    assert fake_quantize_int8(bias) is bias  # 1-d stays float, as in int8 kernels


def test_quantisation_aware_training_runs_through_rounded_generated_weights() -> None:
    inner = mapnet.wrap(CNN2, latent_dim=32)
    with torch.no_grad():
        inner.latent.normal_()
    model = CompressedWeights(inner, fake_quant=True)
    conv = model.compressed_weights()["features.0.weight"]
    generated = inner.generate()["features.0.weight"].detach()
    scale = generated.flatten(1).abs().amax(1) / 127.5
    steps = conv.detach() / scale[:, None, None, None]
    torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert inner.latent.grad is not None and inner.latent.grad.abs().sum() > 0


def _calibration() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(32, 1, 28, 28, generator=generator) for _ in range(2)]


def test_an_int8_model_round_trips_through_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    float_model = mapnet.wrap(CNN2, latent_dim=64).materialize().eval()
    int8 = quantize_int8(float_model, _calibration())
    x = torch.randn(16, 1, 28, 28)
    expected = int8(x)
    assert (expected - float_model(x)).abs().max() < 0.1  # int8 is close to float
    stored = save_quantized(int8, tmp_path / "q")
    assert stored == sum(f.stat().st_size for f in (tmp_path / "q").iterdir())
    assert stored < 0.4 * 4 * 108_618  # int8 weights: about a quarter of float32
    assert not list((tmp_path / "q").glob("*.pt")) and not list((tmp_path / "q").glob("*.pkl"))
    again = load_quantized(tmp_path / "q", CNN2(), x[:1])  # other float weights: replaced
    assert torch.equal(again(x), expected)


def test_int8_loading_names_a_wrong_file_or_architecture(tmp_path: Path) -> None:
    int8 = quantize_int8(CNN2().eval(), _calibration())
    save_quantized(int8, tmp_path / "q")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_quantized(tmp_path / "q", CNN2LowRank(), torch.randn(1, 1, 28, 28))
    with pytest.raises(CheckpointError, match="not an int8 model folder"):
        load_quantized(tmp_path / "missing", CNN2(), torch.randn(1, 1, 28, 28))
    from mapnet_experiments.models.networks import SmallCNN

    small = quantize_int8(SmallCNN((4, 8, 16)).eval(), [torch.randn(8, 1, 28, 28)])
    save_quantized(small, tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"another architecture: .* is \(4, 1, 3, 3\)"):
        load_quantized(tmp_path / "small", SmallCNN((8, 16, 32)), torch.randn(1, 1, 28, 28))
    (tmp_path / "q" / "quantized.json").write_text('{"format": "mapnet-int8"}')
    with pytest.raises(CheckpointError, match="holds no state description"):
        load_quantized(tmp_path / "q", CNN2(), torch.randn(1, 1, 28, 28))
    (tmp_path / "q" / "quantized.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="is not a mapnet-int8 file"):
        load_quantized(tmp_path / "q", CNN2(), torch.randn(1, 1, 28, 28))


def test_int8_needs_an_ordinary_module_and_a_calibration_batch() -> None:
    mapped = mapnet.wrap(CNN2, latent_dim=16)
    with pytest.raises(TypeError, match=r"call \.materialize\(\) on the mapped model first"):
        quantize_int8(mapped, _calibration())
    with pytest.raises(ValueError, match="calibration holds no batch"):
        quantize_int8(CNN2(), [])


def test_materialize_with_weights_checks_names_and_shapes() -> None:
    mapped = mapnet.wrap(CNN2, latent_dim=16)
    weights = mapped.generate()
    with pytest.raises(ValueError, match="lacks generated parameter"):
        mapped.materialize({k: v for k, v in weights.items() if k != "features.0.bias"})
    with pytest.raises(ValueError, match=r"'features.0.bias' has shape \(3,\)"):
        mapped.materialize(weights | {"features.0.bias": torch.zeros(3)})
    zeros = {k: torch.zeros_like(v) for k, v in weights.items()}
    assert all(p.abs().sum() == 0 for p in mapped.materialize(zeros).parameters())


class Tiny(nn.Module):
    """A convolution (int8 per channel) and a linear layer (packed parameters: a dtype and a
    (weight, bias) tuple): every kind of entry an int8 state holds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 6, 6) -> (B, 4)
        return self.fc(torch.relu(self.conv(x)).flatten(1))


TINY_INPUT = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("int8") / "q"
    save_quantized(quantize_int8(Tiny().eval(), [TINY_INPUT]), folder)
    return folder


def _flip_bit(name: str, byte: int, bit: int) -> Callable[[Path], None]:
    """Flip one bit of the tensor `name` inside the file, its checksum left as saved."""

    def damage(folder: Path) -> None:
        file = folder / "quantized.safetensors"
        blob = bytearray(file.read_bytes())
        header = 8 + int.from_bytes(blob[:8], "little")  # safetensors: size, JSON, data
        start, _ = json.loads(blob[8:header])[name]["data_offsets"]
        blob[header + start + byte] ^= 1 << bit
        file.write_bytes(bytes(blob))

    return damage


def _unsealed(change: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    """Rewrite the tensor file, its checksum left as saved."""

    def damage(folder: Path) -> None:
        tensors = load_file(str(folder / "quantized.safetensors"))
        change(tensors)
        (folder / "quantized.safetensors").write_bytes(save(tensors))

    return damage


def _tensors(change: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    return lambda folder: edit_tensors(folder, "quantized.safetensors", "quantized.json", change)


def _entry(key: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda folder: edit_manifest(folder, "quantized.json", lambda d: change(d["state"][key]))


def _state(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda folder: edit_manifest(folder, "quantized.json", lambda d: change(d["state"]))


def _from_another_model(folder: Path) -> None:
    torch.manual_seed(7)
    other = folder.parent / f"{folder.name}-other"
    save_quantized(quantize_int8(Tiny().eval(), [TINY_INPUT]), other)
    (folder / "quantized.safetensors").write_bytes((other / "quantized.safetensors").read_bytes())


def _truncated_and_resealed(folder: Path) -> None:
    (folder / "quantized.safetensors").write_bytes(b"\x08\x00\x00")
    reseal(folder, "quantized.json")


FC = "fc._packed_params._packed_params"
INT8_DAMAGE = {
    # Caught by the checksum alone: on 62d413d each of these loaded without a word.
    "flipped int8 weight bit": (_flip_bit("conv.weight", 3, 6), "does not match the checksum"),
    "flipped scale exponent": (
        _flip_bit("conv.weight.scales", 7, 4),  # float64: byte 7 holds the exponent's top bits
        "does not match the checksum",
    ),
    "doubled scales": (
        _unsealed(lambda t: t["conv.weight.scales"].mul_(2)),
        "does not match the checksum",
    ),
    "tensor file of another model": (_from_another_model, "does not match the checksum"),
    # With the checksums recomputed, the reader's own checks.
    "NaN bias": (
        _tensors(lambda t: t["conv.bias"].fill_(float("nan"))),
        "'conv.bias' holds NaN/inf values",
    ),
    "zero scales": (
        _tensors(lambda t: t["conv.weight.scales"].zero_()),
        "conv.weight.scales are not all positive",
    ),
    "not safetensors": (_truncated_and_resealed, "is not a readable safetensors file"),
    "weights as float": (
        _tensors(lambda t: t.update({"conv.weight": t["conv.weight"].float()})),
        "'conv.weight' has dtype torch.float32, this model's torch.int8",
    ),
    "a tensor missing": (_tensors(lambda t: t.pop("conv.weight.zero_points")), "lacks the tensor"),
    "a stray tensor": (
        _tensors(lambda t: t.update(extra=torch.zeros(1))),
        r"holds tensors no entry names: \['extra'\]",
    ),
    "entry is a list": (
        _state(lambda state: state.update({"conv.bias": []})),
        "'conv.bias' is described by a list, not an object",
    ),
    "state is a list": (
        lambda f: edit_manifest(f, "quantized.json", lambda d: d.update(state=[])),
        "holds no state description",
    ),
    "description is a list": (
        lambda f: (f / "quantized.json").write_text("[]"),
        "quantized.json is not a JSON object but a list",
    ),
    "quint8 for qint8": (
        _entry("conv.weight", lambda e: e.update(dtype="quint8")),
        "is torch.quint8",
    ),
    "dtype that is a function": (
        _entry("fc._packed_params.dtype", lambda e: e.update(dtype="load")),
        "names the dtype 'load', which is not one",
    ),
    "float16 packed dtype": (
        _entry("fc._packed_params.dtype", lambda e: e.update(dtype="float16")),
        "should be the dtype torch.qint8",
    ),
    "another axis": (
        _entry("conv.weight", lambda e: e.update(axis=1)),
        "per channel along axis 0",
    ),
    "tuple of one": (_entry(FC, lambda e: e["tuple"].pop()), "holds 1 items, this model's 2"),
    "per-tensor scale": (
        _entry(FC, lambda e: e["tuple"][0].update(per_tensor=e["tuple"][0].pop("per_channel"))),
        "should be int8 per channel",
    ),
}


@pytest.mark.parametrize("kind", INT8_DAMAGE)
def test_a_damaged_int8_folder_is_a_checkpoint_error_naming_the_problem(
    saved_int8: Path, tmp_path: Path, kind: str
) -> None:
    damage, message = INT8_DAMAGE[kind]
    folder = tmp_path / "q"
    shutil.copytree(saved_int8, folder)
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(folder, Tiny(), TINY_INPUT)


def test_quantize_int8_names_a_non_finite_weight_or_batch() -> None:
    model = Tiny().eval()
    with torch.no_grad():
        model.fc.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"'fc\.weight' holds NaN/inf values"):
        quantize_int8(model, [TINY_INPUT])
    with pytest.raises(ValueError, match="calibration batch 1 holds NaN/inf"):
        quantize_int8(Tiny().eval(), [TINY_INPUT, torch.full_like(TINY_INPUT, float("inf"))])
