"""The library's contract after the core rewrite: one regression test per review finding.

Each test states the behaviour the rewritten core must have. Against the pre-rewrite version
(eae3d46) each one fails, for a behavioural reason or because the API it needs did not exist;
the few marked "guard" in their docstring pass there too and protect behaviour to keep (old
checkpoints, the instance form of `wrap`). Small models, CPU, one thread.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.func import functional_call

import mapnet

DATA = Path(__file__).parent / "data"
PROJECTIONS = ("structured", "dense")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ------------------------------------------------------------------------------ models


class Net(nn.Module):
    """The model the v1 checkpoints in tests/data were made with. `gate` has no reset_parameters:
    every instance draws its own values, so its θ₀ cannot be regenerated from a seed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.gate = nn.Parameter(torch.rand(5))

    def forward(self, x):  # (B, 1, 8, 8) -> (B, 5)
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)) * self.gate


class SmallCNN(nn.Module):
    """conv, bn, fc: every parameter is covered by a reset_parameters()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):  # (B, 1, 8, 8) -> (B, 5)
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class VGGish(nn.Module):
    """torchvision-style attributes: `features`, `classifier`, a plain int `num_classes`."""

    def __init__(self):
        super().__init__()
        self.num_classes = 5
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
        self.classifier = nn.Linear(4 * 6 * 6, self.num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):  # (B, 6) -> (B, 3)
        return self.fc2(torch.tanh(self.fc1(x)))


@dataclass
class GPTConfig:
    vocab_size: int = 32
    n_embd: int = 16
    n_layer: int = 2
    block_size: int = 8


class Block(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.ModuleDict(
            {"qkv": nn.Linear(n_embd, 3 * n_embd), "proj": nn.Linear(n_embd, n_embd)}
        )
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x):  # (B, T, C)
        q, k, v = self.attn["qkv"](self.ln_1(x)).chunk(3, dim=-1)
        heads = [t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v)]  # (B, 2, T, C/2)
        a = nn.functional.scaled_dot_product_attention(*heads, is_causal=True)
        x = x + self.attn["proj"](a.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """GPT-2 shaped: own `.config`, HF-style forward signature, tied head, custom init
    (N(0, 0.02) weights, zero biases) that differs from the modules' reset_parameters()."""

    def __init__(self, config: GPTConfig | None = None):
        super().__init__()
        self.config = config or GPTConfig()
        c = self.config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c.n_embd) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, labels=None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if labels is None:
            return logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


class TrunkHead(nn.Module):
    """A "pretrained trunk + small task head". The head sits between trunk layers in definition
    (= parameter) order, where the old fingerprint's 32 evenly spaced probe positions miss it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.head = nn.Linear(64, 2)
        self.body = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)

    def forward(self, x):  # (B, 16) -> (B, 2)
        h = torch.relu(self.embed(x))
        return self.head(self.norm(torch.relu(self.body(h)) + h))


# ------------------------------------------------------------------------------ helpers


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """factory() under torch.manual_seed(seed), without disturbing the test's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, GPTConfig.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def config(**settings) -> mapnet.MappingConfig:
    return mapnet.MappingConfig(**({"latent_dim": 16} | settings))


def train_steps(mapped: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 0.05) -> None:
    """A few Adam steps in train mode (BatchNorm statistics move too), then eval mode."""
    optimizer = torch.optim.Adam(mapped.parameters(), lr=lr)
    mapped.train()
    for _ in range(steps):
        optimizer.zero_grad()
        mapped(x).square().mean().backward()
        optimizer.step()
    mapped.eval()


def eval_output(mapped: nn.Module, *args) -> torch.Tensor:
    mapped.eval()
    with torch.no_grad():
        return mapped(*args)


def key_ending(state: dict, suffix: str) -> str:
    """The one state-dict key that ends with `suffix` (prefixes are the library's business)."""
    keys = [k for k in state if k == suffix or k.endswith("." + suffix)]
    assert len(keys) == 1, f"expected one key ending in {suffix!r}, got {keys} of {list(state)}"
    return keys[0]


def snapshot(mapped: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the latents and the target's buffers."""
    values = {f"latent{i}": z.detach().clone() for i, z in enumerate(mapped.latents)}
    values |= {f"buffer:{n}": b.detach().clone() for n, b in mapped.target.named_buffers()}
    return values


def assert_unchanged(mapped: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(mapped)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"


def count_generations(monkeypatch: pytest.MonkeyPatch, mapped: nn.Module) -> list[int]:
    """Count the projection passes (W u) that generate weights: [n], updated in place.

    Wraps the projections' `forward` and `_matvec`; a call made from inside another (forward
    calling _matvec or the reverse) is not counted again.
    """
    calls, depth = [0], [0]

    def counting(original):
        def method(self, *args, **kwargs):
            calls[0] += depth[0] == 0
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return method

    candidates = [*mapped.modules(), *getattr(mapped, "projections", ())]
    classes = {type(m) for m in candidates if hasattr(type(m), "_matvec")}
    assert classes, "no projection module with a _matvec found"
    for cls in classes:
        for name in ("forward", "_matvec"):
            if name in vars(cls):
                monkeypatch.setattr(cls, name, counting(vars(cls)[name]))
    return calls


def set_dense_limit(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Lower DENSE_MAX_BYTES in mapnet.projections and wherever else mapnet holds a copy."""
    assert isinstance(importlib.import_module("mapnet.projections").DENSE_MAX_BYTES, int)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "mapnet" and isinstance(
            getattr(module, "DENSE_MAX_BYTES", None), int
        ):
            monkeypatch.setattr(module, "DENSE_MAX_BYTES", limit)


# ------------------------------------------------------------------------------ choosing parameters


@pytest.mark.parametrize(
    ("factory", "patterns", "generated"),
    [
        (SmallCNN, ["fc"], {"fc.weight", "fc.bias"}),
        (SmallCNN, ["c*"], {"conv.weight", "conv.bias"}),
        (
            TinyGPT,
            ["blocks.*.attn"],
            {
                f"blocks.{i}.attn.{m}.{p}"
                for i in range(2)
                for m in ("qkv", "proj")
                for p in ("weight", "bias")
            },
        ),
    ],
)
def test_target_modules_generate_only_the_matching_modules(factory, patterns, generated) -> None:
    model = seeded(factory)
    mapped = mapnet.wrap(model, config(target_modules=patterns))
    assert set(mapped.generate()) == generated
    # The others stay frozen parameters holding the model's values.
    for name, param in mapped.target.named_parameters():
        assert name not in generated
        assert not param.requires_grad, name
        assert torch.equal(param, model.get_parameter(name)), name
    trainable = [id(p) for p in mapped.parameters() if p.requires_grad]
    assert trainable == [id(z) for z in mapped.latents]


def test_exclude_modules_are_not_generated_and_stay_frozen() -> None:
    model = seeded(SmallCNN)
    mapped = mapnet.wrap(model, config(exclude_modules=["bn"]))
    assert set(mapped.generate()) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    for name in ("bn.weight", "bn.bias"):
        param = mapped.target.get_parameter(name)
        assert isinstance(param, nn.Parameter) and not param.requires_grad
        assert torch.equal(param, model.get_parameter(name))
    assert mapped.num_trainable_parameters() == 16


@pytest.mark.parametrize(
    ("patterns", "direct"),
    [
        (["bn"], {"bn.weight", "bn.bias"}),  # a module name
        (["fc.bias"], {"fc.bias"}),  # a parameter name
        (["*.bias"], {"conv.bias", "bn.bias", "fc.bias"}),  # a parameter pattern
    ],
)
def test_train_directly_keeps_ordinary_trainable_parameters(patterns, direct) -> None:
    mapped = mapnet.wrap(seeded(SmallCNN), config(train_directly=patterns))
    trainable = {n for n, p in mapped.target.named_parameters() if p.requires_grad}
    assert trainable == direct
    assert not direct & set(mapped.generate())
    params = {id(p) for p in mapped.parameters()}
    assert all(id(mapped.target.get_parameter(n)) in params for n in direct)
    extra = sum(mapped.target.get_parameter(n).numel() for n in direct)
    assert mapped.num_trainable_parameters() == 16 + extra

    mapped.eval()  # running statistics: conv.bias is not normalised away
    mapped(randn(4, 1, 8, 8)).square().mean().backward()
    assert mapped.latent.grad is not None and mapped.latent.grad.abs().sum() > 0
    for name in direct:
        grad = mapped.target.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "train_directly"])
def test_a_pattern_that_matches_nothing_is_an_error_naming_it(field) -> None:
    with pytest.raises(ValueError, match=r"nonexistent\*"):
        mapnet.wrap(seeded(SmallCNN), config(**{field: ["fc", "nonexistent*"]}))


def test_frozen_parameters_are_not_generated() -> None:
    model = seeded(SmallCNN)
    model.conv.weight.requires_grad_(False)
    mapped = mapnet.wrap(model, config())
    assert "conv.weight" not in mapped.generate()
    assert "conv.bias" in mapped.generate()
    frozen = mapped.target.conv.weight
    assert isinstance(frozen, nn.Parameter) and not frozen.requires_grad
    assert torch.equal(frozen, model.conv.weight)
    assert mapped.num_trainable_parameters() == 16


# ------------------------------------------------------------------------------ wrap and θ₀


def test_wrapping_an_instance_regenerates_theta0_from_reset_parameters() -> None:
    """Guard (old documented behaviour): θ₀ is reset_parameters() under the seed, the instance
    is untouched, and a parameter no reset covers keeps the instance's values."""
    model = seeded(Net, seed=7)
    before = copy.deepcopy(model.state_dict())
    mapped = mapnet.wrap(model, config(seed=3))
    theta0 = mapped.generate()  # z = 0: θ = θ₀
    reference = seeded(Net, seed=3)  # same construction order: reset_parameters under seed 3...
    reference.gate.data.copy_(model.gate)  # ...but gate, which none covers, is the instance's
    for name, value in reference.named_parameters():
        assert torch.equal(theta0[name], value), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_wrapping_a_factory_gives_exactly_the_models_own_initialisation() -> None:
    mapped = mapnet.wrap(lambda: TinyGPT(), config(latent_dim=32, seed=5))
    reference = seeded(TinyGPT, seed=5)
    theta0 = mapped.generate()
    for name, value in reference.named_parameters():
        assert torch.equal(theta0[name], value), name
    # GPT-2's N(0, 0.02) embedding, not nn.Embedding.reset_parameters()' N(0, 1).
    assert theta0["wte.weight"].std() < 0.05


@pytest.mark.parametrize("form", ["instance", "factory"])
def test_wrap_never_touches_the_global_rng(monkeypatch, form) -> None:
    model = seeded(Net)
    subject = model if form == "instance" else lambda: Net()

    def forbidden(*args, **kwargs):
        raise AssertionError("wrap() seeded a global RNG")

    for owner, name in [
        (torch, "manual_seed"),
        (torch.random, "manual_seed"),
        (torch.cuda, "manual_seed"),
        (torch.cuda, "manual_seed_all"),
    ]:
        monkeypatch.setattr(owner, name, forbidden)
    state = torch.get_rng_state()
    mapped = mapnet.wrap(subject, config(seed=1))
    assert torch.equal(torch.get_rng_state(), state)
    assert mapped(randn(2, 1, 8, 8)).shape == (2, 5)


@pytest.mark.gpu
@gpu
def test_wrap_never_touches_the_cuda_rng() -> None:
    torch.cuda.init()
    states = torch.cuda.get_rng_state_all()
    mapnet.wrap(lambda: Net(), config(seed=1))
    mapnet.wrap(seeded(Net).cuda(), config(seed=2))
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(after, states))


# ---------------------------------------------------------------------- looks like the target


def test_mapping_config_does_not_hide_the_targets_own_config() -> None:
    model = seeded(TinyGPT)
    settings = config(latent_dim=32)
    mapped = mapnet.wrap(model, settings)
    assert mapped.mapping_config == settings
    assert isinstance(mapped.mapping_config, mapnet.MappingConfig)
    assert mapped.config == model.config and mapped.config.n_embd == 16


def test_attribute_access_falls_through_to_the_target() -> None:
    mapped = mapnet.wrap(seeded(VGGish), config())
    assert mapped.features is mapped.target.features
    assert mapped.classifier is mapped.target.classifier
    assert mapped.num_classes == 5
    with pytest.raises(AttributeError):
        _ = mapped.no_such_attribute


def test_forward_signature_is_the_targets() -> None:
    model = seeded(TinyGPT)
    mapped = mapnet.wrap(model, config(latent_dim=32))
    assert inspect.signature(mapped.forward) == inspect.signature(model.forward)
    assert list(inspect.signature(mapped.forward).parameters) == [
        "input_ids",
        "attention_mask",
        "labels",
    ]
    ids = tokens()
    loss = mapped(input_ids=ids, labels=ids)
    assert loss.dim() == 0 and torch.isfinite(loss)


# ------------------------------------------------------------------------------ state_dict


def test_state_dict_holds_latents_buffers_stored_bases_and_identity() -> None:
    model = seeded(Net)
    mapped = mapnet.wrap(model, config())
    state = mapped.state_dict()
    assert torch.equal(state["latents.0"], mapped.latent.detach())
    for buffer in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(state[key_ending(state, buffer)], mapped.target.get_buffer(buffer))
    # gate: no reset_parameters covers it, so its θ₀ (the instance's values) is stored.
    assert torch.equal(state[key_ending(state, "base.gate")], model.gate.detach())
    assert any(k.endswith("_extra_state") for k in state), list(state)
    # θ₀ the seed regenerates is not stored (store_base=False).
    assert not [k for k in state if k.endswith("base.conv.weight")]


def test_store_base_puts_every_base_tensor_in_the_state_dict() -> None:
    mapped = mapnet.wrap(seeded(Net), config(store_base=True))
    state = mapped.state_dict()
    theta0 = mapped.generate()
    for name in (
        "gate",
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "fc.weight",
        "fc.bias",
    ):
        assert torch.equal(state[key_ending(state, f"base.{name}")], theta0[name]), name


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_state_dict_round_trip_reproduces_outputs_exactly(projection) -> None:
    settings = config(projection=projection)
    model, fresh_model = seeded(Net, seed=0), seeded(Net, seed=1)
    assert not torch.equal(model.gate, fresh_model.gate)  # the uncovered θ₀ differs
    mapped = mapnet.wrap(model, settings)
    x = randn(4, 1, 8, 8)
    train_steps(mapped, x)
    expected = eval_output(mapped, x)

    fresh = mapnet.wrap(fresh_model, settings)
    fresh.load_state_dict(mapped.state_dict())
    assert torch.equal(eval_output(fresh, x), expected)


def test_state_dict_round_trip_through_safetensors() -> None:
    settings = config()
    mapped = mapnet.wrap(seeded(Net, seed=0), settings)
    x = randn(4, 1, 8, 8)
    train_steps(mapped, x)
    expected = eval_output(mapped, x)

    blob = safetensors.torch.save(mapped.state_dict())
    fresh = mapnet.wrap(seeded(Net, seed=1), settings)
    fresh.load_state_dict(safetensors.torch.load(blob))
    assert torch.equal(eval_output(fresh, x), expected)


def _pretrained_and_reheaded() -> tuple[nn.Module, nn.Module]:
    pretrained = seeded(TrunkHead)
    reheaded = copy.deepcopy(pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        reheaded.head.reset_parameters()
    return pretrained, reheaded


def test_fingerprint_covers_every_base_tensor() -> None:
    pretrained, reheaded = _pretrained_and_reheaded()
    settings = config(latent_dim=32, base="model")
    fingerprint = mapnet.wrap(pretrained, settings).fingerprint()
    assert isinstance(fingerprint, dict)
    json.dumps(fingerprint)  # serialisable
    assert mapnet.wrap(copy.deepcopy(pretrained), settings).fingerprint() == fingerprint
    assert mapnet.wrap(reheaded, settings).fingerprint() != fingerprint


def test_state_dict_for_other_base_weights_is_refused_naming_the_tensor() -> None:
    pretrained, reheaded = _pretrained_and_reheaded()
    settings = config(latent_dim=32, base="model")
    mapped = mapnet.wrap(pretrained, settings)
    train_steps(mapped, randn(8, 16))
    fresh = mapnet.wrap(reheaded, settings)
    before = snapshot(fresh)
    with pytest.raises(mapnet.CheckpointError, match=r"head\.(weight|bias)"):
        fresh.load_state_dict(mapped.state_dict())
    assert_unchanged(fresh, before)


def test_checkpoint_for_other_base_weights_is_refused_naming_the_tensor(tmp_path) -> None:
    pretrained, reheaded = _pretrained_and_reheaded()
    mapped = mapnet.wrap(pretrained, config(latent_dim=32, base="model"))
    train_steps(mapped, randn(8, 16))
    mapnet.save(mapped, tmp_path / "ckpt")
    with pytest.raises(mapnet.CheckpointError, match=r"head\.(weight|bias)"):
        mapnet.load(tmp_path / "ckpt", reheaded)


def _trained_and_fresh() -> tuple[nn.Module, nn.Module]:
    settings = config()
    source = mapnet.wrap(seeded(SmallCNN), settings)
    train_steps(source, randn(4, 1, 8, 8))
    return source, mapnet.wrap(seeded(SmallCNN), settings)


def test_load_state_dict_with_a_wrong_shaped_latent_changes_nothing() -> None:
    source, fresh = _trained_and_fresh()
    state = source.state_dict()
    state["latents.0"] = torch.zeros(17)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"latent") as error:
        fresh.load_state_dict(state)
    assert isinstance(error.value, mapnet.CheckpointError)
    assert_unchanged(fresh, before)


def test_load_state_dict_with_a_wrong_shaped_buffer_changes_nothing() -> None:
    source, fresh = _trained_and_fresh()
    state = source.state_dict()
    state[key_ending(state, "bn.running_mean")] = torch.zeros(5)
    before = snapshot(fresh)
    with pytest.raises(mapnet.CheckpointError, match=r"bn\.running_mean"):
        fresh.load_state_dict(state)
    assert_unchanged(fresh, before)


# ------------------------------------------------------------------------------ projections


def test_default_projection_is_structured() -> None:
    assert mapnet.MappingConfig().projection == "structured"
    assert mapnet.wrap(seeded(SmallCNN), latent_dim=16).mapping_config.projection == "structured"


def test_dense_projection_is_refused_above_the_documented_size(monkeypatch) -> None:
    limit = importlib.import_module("mapnet.projections").DENSE_MAX_BYTES
    assert isinstance(limit, int) and limit > 0
    model = seeded(lambda: nn.Linear(20, 20))  # P = 420; dense W: 420 · 16 · 4 = 26880 bytes
    set_dense_limit(monkeypatch, 20_000)
    with pytest.raises(ValueError, match="structured"):
        mapnet.wrap(model, config(projection="dense"))
    mapnet.wrap(model, config(projection="structured"))  # the same target is fine structured
    set_dense_limit(monkeypatch, 1_000_000)
    mapnet.wrap(model, config(projection="dense"))  # and dense well below the limit


# ------------------------------------------------------------------------------ dtype and device


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_double_follows_to_and_matches_float32(projection) -> None:
    mapped = mapnet.wrap(seeded(SmallCNN), config(projection=projection, latent_init_std=0.1))
    x = randn(4, 1, 8, 8)
    expected = eval_output(mapped, x)
    mapped.double()
    out = eval_output(mapped, x.double())
    assert out.dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in mapped.generate().values())
    torch.testing.assert_close(out, expected.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_bfloat16_follows_to(projection) -> None:
    mapped = mapnet.wrap(seeded(SmallCNN), config(projection=projection, latent_init_std=0.1))
    x = randn(4, 1, 8, 8)
    expected = eval_output(mapped, x)
    mapped.to(torch.bfloat16)
    out = eval_output(mapped, x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_placeholders_stay_views_of_theta0_after_a_dtype_change() -> None:
    mapped = mapnet.wrap(seeded(SmallCNN), config())

    def storage(name: str) -> int:
        return mapped.target.get_submodule(name).weight.untyped_storage().data_ptr()

    assert storage("fc") == storage("conv")
    mapped.double()
    assert mapped.target.fc.weight.dtype == torch.float64
    assert storage("fc") == storage("conv")


@pytest.mark.gpu
@gpu
def test_cuda_follows_to_and_matches_cpu() -> None:
    mapped = mapnet.wrap(seeded(SmallCNN), config(latent_init_std=0.1))
    x = randn(4, 1, 8, 8)
    expected = eval_output(mapped, x)
    mapped.cuda()
    torch.testing.assert_close(eval_output(mapped, x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@gpu
def test_cuda_state_dict_round_trip() -> None:
    settings = config()
    mapped = mapnet.wrap(seeded(Net).cuda(), settings)
    x = randn(4, 1, 8, 8).cuda()
    train_steps(mapped, x)
    fresh = mapnet.wrap(seeded(Net, seed=1).cuda(), settings)
    fresh.load_state_dict(mapped.state_dict())
    assert torch.equal(eval_output(fresh, x), eval_output(mapped, x))


# ------------------------------------------------------------------------------ no host sync


def test_non_finite_latent_does_not_sync_by_default() -> None:
    mapped = mapnet.wrap(seeded(SmallCNN), config())
    with torch.no_grad():
        mapped.latent.fill_(float("nan"))
    out = mapped(randn(2, 1, 8, 8))  # no check, no error: the NaN shows in the output
    assert torch.isnan(out).all()


def test_check_finite_reports_the_non_finite_latent() -> None:
    mapped = mapnet.wrap(
        seeded(SmallCNN), config(strategy="layerwise", latent_dim=8, check_finite=True)
    )
    x = randn(2, 1, 8, 8)
    assert torch.isfinite(mapped(x)).all()
    with torch.no_grad():
        mapped.latents[2][0] = float("nan")  # the "fc" layer's latent
    with pytest.raises(ValueError, match=r"fc|latents\.2"):
        mapped(x)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_vmap_over_a_batch_of_latents(projection) -> None:
    mapped = mapnet.wrap(seeded(MLP), config(latent_dim=8, projection=projection))
    x = randn(5, 6)

    def run(z):
        return functional_call(mapped, {"latents.0": z}, (x,))

    zs = randn(3, 8, seed=1) * 0.3
    out = torch.func.vmap(run)(zs)
    assert out.shape == (3, 5, 3)
    for z, batch in zip(zs, out):
        torch.testing.assert_close(batch, run(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_forward_and_reverse_jacobians_of_the_latent_agree(projection) -> None:
    """jacfwd runs the forward-mode rule under vmap; jacrev the backward."""
    mapped = mapnet.wrap(seeded(MLP), config(latent_dim=8, projection=projection))
    x = randn(5, 6)

    def loss(z):
        return functional_call(mapped, {"latents.0": z}, (x,)).square().sum()

    z = randn(8, seed=2) * 0.3
    forward, reverse = torch.func.jacfwd(loss)(z), torch.func.jacrev(loss)(z)
    assert forward.shape == (8,) and torch.isfinite(forward).all() and forward.abs().sum() > 0
    torch.testing.assert_close(forward, reverse, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_forward_compiles_without_graph_breaks(projection) -> None:
    torch._dynamo.reset()
    mapped = mapnet.wrap(seeded(SmallCNN), config(projection=projection))
    explanation = torch._dynamo.explain(mapped)(randn(2, 1, 8, 8))
    assert explanation.graph_break_count == 0, str(explanation)[:3000]


def test_compiled_forward_equals_eager() -> None:
    torch._dynamo.reset()
    mapped = mapnet.wrap(seeded(SmallCNN), config(latent_init_std=0.1))
    mapped.eval()
    x = randn(4, 1, 8, 8)
    expected = mapped(x)
    compiled = torch.compile(mapped, fullgraph=True)  # one graph, or an error
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ inference cache


def test_eval_no_grad_forwards_generate_the_weights_once(monkeypatch) -> None:
    mapped = mapnet.wrap(seeded(SmallCNN), config(latent_init_std=0.1))
    calls = count_generations(monkeypatch, mapped)
    x = randn(2, 1, 8, 8)
    mapped.eval()
    with torch.no_grad():
        first = mapped(x)
        second = mapped(x)
    assert calls[0] == 1
    assert torch.equal(first, second)


def test_cache_is_used_only_in_eval_mode_without_grad(monkeypatch) -> None:
    mapped = mapnet.wrap(seeded(SmallCNN), config(latent_init_std=0.1))
    calls = count_generations(monkeypatch, mapped)
    x = randn(2, 1, 8, 8)
    mapped.train()
    mapped(x)
    mapped(x)
    assert calls[0] == 2, "train mode regenerates every forward"
    with torch.no_grad():
        mapped(x)
        mapped(x)
    assert calls[0] == 4, "train mode regenerates under no_grad too"
    mapped.eval()
    with torch.no_grad():
        mapped(x)
        mapped(x)
    assert calls[0] == 5, "eval + no_grad generates once"
    mapped(x).sum().backward()  # eval with grad: a fresh, differentiable generation
    assert calls[0] == 6
    assert mapped.latent.grad is not None and mapped.latent.grad.abs().sum() > 0


def test_in_place_latent_change_invalidates_the_cache(monkeypatch) -> None:
    mapped = mapnet.wrap(seeded(SmallCNN), config(latent_init_std=0.1))
    calls = count_generations(monkeypatch, mapped)
    x = randn(2, 1, 8, 8)
    mapped.eval()
    with torch.no_grad():
        before = mapped(x)
        mapped(x)
        assert calls[0] == 1
        mapped.latent.add_(1)
        after = mapped(x)
    assert calls[0] == 2
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_optimizer_step_invalidates_the_cache(monkeypatch, optimizer) -> None:
    mapped = mapnet.wrap(seeded(MLP), config(latent_dim=8, latent_init_std=0.1))  # no buffers
    calls = count_generations(monkeypatch, mapped)
    x = randn(4, 6)
    step = optimizer(mapped.parameters(), lr=0.1)
    before = eval_output(mapped, x)
    eval_output(mapped, x)
    assert calls[0] == 1
    mapped.train()
    mapped(x).square().mean().backward()
    step.step()
    after = eval_output(mapped, x)
    assert calls[0] == 3  # the training forward, then one eval generation
    assert not torch.allclose(after, before)


def test_load_state_dict_invalidates_the_cache(monkeypatch) -> None:
    source, fresh = _trained_and_fresh()
    x = randn(2, 1, 8, 8)
    calls = count_generations(monkeypatch, fresh)
    stale = eval_output(fresh, x)
    eval_output(fresh, x)
    assert calls[0] == 1
    fresh.load_state_dict(source.state_dict())
    loaded = eval_output(fresh, x)
    assert not torch.allclose(loaded, stale)
    assert torch.equal(loaded, eval_output(source, x))


def test_cache_does_not_serve_a_latent_swapped_in_by_functional_call() -> None:
    """Guard: functional_call's latent must win over cached weights of the module's own."""
    mapped = mapnet.wrap(seeded(SmallCNN), config())
    other = mapnet.wrap(seeded(SmallCNN), config(latent_init_std=0.3, seed=0))
    x = randn(2, 1, 8, 8)
    mapped.eval()
    other.eval()
    z = other.latent.detach().clone()
    with torch.no_grad():
        own = mapped(x)
        swapped = functional_call(mapped, {"latents.0": z}, (x,))
        assert torch.equal(mapped(x), own)
    assert not torch.allclose(swapped, own)
    torch.testing.assert_close(swapped, eval_output(other, x), rtol=0, atol=0)


# ------------------------------------------------------------------------------ old checkpoints


@pytest.mark.parametrize("kind", ["dense", "structured"])
def test_version_1_checkpoints_load_and_reproduce_their_outputs(kind) -> None:
    """Files written by the pre-rewrite version load, with the projection they name (dense is
    no longer the default), and reproduce the outputs recorded with them."""
    folder = DATA / f"v1-{kind}"
    io = safetensors.torch.load_file(folder / "expected-io.safetensors")
    mapped = mapnet.load(folder, Net())
    assert mapped.mapping_config.projection == kind  # the file's, not the new default
    out = eval_output(mapped, io["x"])
    # Float rounding, not the mapping: the recorded outputs came from another CPU, whose kernels
    # may sum in another order (bit equality holds on one machine, tested elsewhere).
    torch.testing.assert_close(out, io["y"], rtol=0, atol=1e-6)


def test_unknown_checkpoint_version_is_refused_naming_it(tmp_path) -> None:
    """Guard."""
    folder = tmp_path / "ckpt"
    shutil.copytree(DATA / "v1-structured", folder)
    description = json.loads((folder / "mapnet.json").read_text())
    description["version"] = 99
    (folder / "mapnet.json").write_text(json.dumps(description))
    with pytest.raises(mapnet.CheckpointError, match="99"):
        mapnet.load(folder, Net())


# ------------------------------------------------------------------------------ no system tools


# Run in a fresh interpreter: system tools are forbidden before mapnet is first imported, and a
# re-import in this process could clash with whatever mapnet registers with torch on import.
_NO_SYSTEM_TOOLS = """
import os, subprocess, sys, tempfile
import torch
from torch import nn

def forbidden(*args, **kwargs):
    raise AssertionError(f"mapnet ran a system tool: {args!r}")

for name in ("run", "Popen", "call", "check_call", "check_output", "getoutput",
             "getstatusoutput"):
    setattr(subprocess, name, forbidden)
for name in ("system", "popen"):
    setattr(os, name, forbidden)

import mapnet
assert os.path.dirname(mapnet.__file__) == sys.argv[1], mapnet.__file__

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))

settings = mapnet.MappingConfig(latent_dim=8)
mapped = mapnet.wrap(MLP(), settings)
x = torch.randn(4, 6)
optimizer = torch.optim.Adam(mapped.parameters(), lr=0.05)
for _ in range(3):
    optimizer.zero_grad()
    mapped(x).square().mean().backward()
    optimizer.step()
mapped.eval()
expected = mapped(x)
with tempfile.TemporaryDirectory() as folder:
    mapnet.save(mapped, folder)
    loaded = mapnet.load(folder, MLP()).eval()
    assert torch.equal(loaded(x), expected)
again = mapnet.wrap(MLP(), settings)
again.load_state_dict(mapped.state_dict())
assert torch.equal(again.eval()(x), expected)
print("ok")
"""


def _imported_modules(source: Path) -> set[str]:
    """Modules a source file imports: import statements and import_module("...") calls."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return names


def test_library_never_runs_system_tools() -> None:
    package = Path(mapnet.__file__).parent
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", _NO_SYSTEM_TOOLS, str(package)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]

    # ... and the package (src/mapnet) does not even import the means to.
    sources = sorted(package.rglob("*.py"))
    assert sources
    offenders = sorted(
        f"{path.relative_to(package)}: import {name}"
        for path in sources
        for name in _imported_modules(path)
        if name.split(".")[0] in ("subprocess", "mapnet_experiments")
    )
    assert not offenders


def _mapnet_imports(package: Path) -> dict[str, set[str]]:
    """For every module of the package `mapnet`, the mapnet modules it imports (at module level
    or in a function; not under `if TYPE_CHECKING:`, which never runs). `from mapnet import x`
    is the module mapnet.x where one exists, else the package itself."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        pending: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
        while pending:
            node = pending.pop()
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                pending += node.orelse
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            pending += ast.iter_child_nodes(node)
        graph[name] = {t for t in targets if t in modules}
    return graph


def test_the_library_imports_run_one_way() -> None:
    """Only mapnet/__init__ imports the package itself (no module reaches back up for a name),
    and the imports between mapnet's modules form no cycle."""
    graph = _mapnet_imports(Path(mapnet.__file__).parent)
    assert {"mapnet.files", "mapnet.state", "mapnet.checkpoint", "mapnet.identity"} <= set(graph)
    assert sorted(name for name, targets in graph.items() if "mapnet" in targets) == []
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for target in graph[name]:
                visit(target, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())
