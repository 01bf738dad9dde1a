"""The lean weight path of a multiplicative update (generator._ModulatedTensors, mapnet.recompute):
the values and gradients of the composed path, bit for bit, with less held for backward."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import nn

import mapnet
import mapnet.module
from mapnet import MappingConfig
from mapnet.generator import _modulate_composed
from mapnet_experiments.models.networks import CNN2, Bottleneck


class ConvBatchNorm(nn.Module):
    """Conv + BatchNorm + a linear head, and an embedding (whose weight no layer keeps)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.norm = nn.BatchNorm2d(6)
        self.embedding = nn.Embedding(40, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x))).mean((2, 3))  # (B, 6)
        return self.head(h + self.embedding(ids).mean(1))


class ResNetLike(nn.Module):
    """A stem, two bottlenecks (one with a projection shortcut) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(Bottleneck(8, 4, stride=2), Bottleneck(16, 4))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _inputs(name: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(3)
    if name == "cnn2":
        return (torch.randn(4, 1, 28, 28, generator=generator),)
    if name == "conv-bn":
        return torch.randn(4, 1, 8, 8, generator=generator), torch.randint(0, 40, (4, 5))
    return (torch.randn(4, 1, 12, 12, generator=generator),)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn2": CNN2,
    "conv-bn": ConvBatchNorm,
    "resnet-like": ResNetLike,
}


HEADS = {"cnn2": "classifier.3", "conv-bn": "head", "resnet-like": "head"}


def _mapped(name: str, group_size: int, **overrides: object) -> mapnet.MappedModule:
    torch.manual_seed(0)
    settings: dict[str, object] = {
        "latent_dim": 32,
        "update": "multiplicative",
        "group_size": group_size,
        "latent_init_std": 0.2,
        "train_directly": [HEADS[name]],
    }
    return mapnet.wrap(MODELS[name](), MappingConfig(**(settings | overrides)))


def _step(mapped: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict]:
    out = mapped(*inputs)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in mapped.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.filterwarnings("ignore:latent larger than the numbers it generates")
@pytest.mark.parametrize("group_size", [1, 7, 250])
@pytest.mark.parametrize("name", list(MODELS))
def test_lean_modulation_equals_the_composed_path(name, group_size, monkeypatch) -> None:
    inputs = _inputs(name)
    lean_out, lean_grads = _step(_mapped(name, group_size), inputs)
    monkeypatch.setattr(mapnet.module, "modulate_group", _modulate_composed)
    out, grads = _step(_mapped(name, group_size), inputs)
    assert torch.equal(lean_out, out)
    assert len(lean_grads) == len(grads) == 3  # latent, head weight and bias
    for name in grads:
        assert torch.equal(lean_grads[name], grads[name]), name


def _generated_refs(mapped: mapnet.MappedModule, monkeypatch) -> dict[str, weakref.ref]:
    refs: dict[str, weakref.ref] = {}
    generate = mapped.generate

    def recording(*args, **kwargs):
        params = generate(*args, **kwargs)
        refs.update({name: weakref.ref(t) for name, t in params.items()})
        return params

    monkeypatch.setattr(mapped, "generate", recording)
    return refs


@pytest.mark.parametrize("name", ["conv-bn", "resnet-like"])
def test_generated_tensors_cheap_to_remake_are_not_held_after_the_forward(
    name, monkeypatch
) -> None:
    """L > 1: after the forward (its graph alive) no generated tensor is; the backward remakes
    them and gives the gradient of the composed path."""
    mapped = _mapped(name, 7)
    refs = _generated_refs(mapped, monkeypatch)
    out = mapped(*_inputs(name))
    gc.collect()
    assert refs and all(ref() is None for ref in refs.values())
    out.square().sum().backward()
    monkeypatch.setattr(mapnet.module, "modulate_group", _modulate_composed)
    _, grads = _step(_mapped(name, 7), _inputs(name))
    assert torch.equal(mapped.latent.grad, grads["latents.0"])


def test_with_l_1_only_the_tensors_a_layer_keeps_outlive_the_forward(monkeypatch) -> None:
    """Every tensor has storage of its own: the embedding table, which no layer keeps for
    backward, is freed after the forward; the conv's and norm's weights are kept."""
    mapped = _mapped("conv-bn", 1)
    refs = _generated_refs(mapped, monkeypatch)
    out = mapped(*_inputs("conv-bn"))
    gc.collect()
    alive = {name for name, ref in refs.items() if ref() is not None}
    assert "embedding.weight" not in alive
    assert {"conv.weight", "norm.weight"} <= alive
    del out


def test_other_saved_tensors_go_to_the_hooks_active_outside() -> None:
    """Offloading with save_on_cpu still sees every other saved tensor; same gradient."""
    inputs = _inputs("resnet-like")
    _, expected = _step(_mapped("resnet-like", 7), inputs)
    packed: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, grads = _step(_mapped("resnet-like", 7), inputs)
    assert packed, "the outer hooks saw no tensor"
    weights = {tuple(p.shape) for n, p in ResNetLike().named_parameters() if "weight" in n}
    assert not weights & {tuple(s) for s in packed if len(s) == 4 and s[0] != 4}
    for name in expected:
        assert torch.equal(grads[name], expected[name]), name


def test_double_backward_through_remade_tensors_reaches_the_latent(monkeypatch) -> None:
    """create_graph=True: the remade tensors are differentiable in z, as the composed path's."""

    def gradient_norm(mapped: mapnet.MappedModule) -> torch.Tensor:
        loss = mapped(*_inputs("resnet-like")).square().sum()
        (grad,) = torch.autograd.grad(loss, mapped.latent, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), mapped.latent)
        return second

    lean = gradient_norm(_mapped("resnet-like", 7, train_directly=[]))
    monkeypatch.setattr(mapnet.module, "modulate_group", _modulate_composed)
    composed = gradient_norm(_mapped("resnet-like", 7, train_directly=[]))
    torch.testing.assert_close(lean, composed, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("group_size", [1, 7])
def test_a_base_changed_between_forward_and_backward_is_refused(group_size) -> None:
    mapped = _mapped("conv-bn", group_size)
    out = mapped(*_inputs("conv-bn"))
    with torch.no_grad():
        mapped.base_0.mul_(1.0)  # in place: its version moves
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
