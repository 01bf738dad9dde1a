"""Fine-tuning updates (paper eq. 25): θ = θ_pre ⊙ (1 + m_⌈j/L⌉) and θ = θ_pre + W u, checked
against a direct computation with the projection as a dense matrix."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import mapnet
from mapnet import CheckpointError, MappingConfig, wrap


class Pretrained(nn.Module):
    """A small 'pretrained' network: conv + norm + two linears, with a fresh head `head`."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.body = nn.Linear(4 * 4 * 4, 7)
        self.head = nn.Linear(7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2, 6, 6) -> (B, classes)
        h = torch.relu(self.norm(self.conv(x))).flatten(1)
        return self.head(torch.relu(self.body(h)))


def pretrained(seed: int = 0) -> Pretrained:
    torch.manual_seed(seed)
    model = Pretrained()
    with torch.no_grad():  # not a default init: the base must really be these weights
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def body_names(model: nn.Module, exclude: str = "head") -> list[str]:
    return [n for n, _ in model.named_parameters() if not n.startswith(exclude)]


def as_matrix(projection: nn.Module) -> torch.Tensor:
    """W (M, d) with its gains, read off by projecting the unit vectors."""
    return projection(torch.eye(projection.in_features)).T


def direct_multiplicative(
    model: nn.Module, mapped: mapnet.MappedModule, z: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """θ = θ_pre ⊙ (1 + g W (z + α z⊙z))_⌈j/L⌉, with W as a dense (M, d) matrix."""
    config = mapped.mapping_config
    flat = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
    projection = mapped.projections[0]
    dense = as_matrix(projection)  # (M, d), gains included
    m = dense @ (z + config.alpha * z * z)  # (M,)
    index = torch.arange(flat.numel()) // config.group_size  # weight j -> its element
    theta = flat * (1 + m[index])
    out, start = {}, 0
    for name in names:
        shape = model.get_parameter(name).shape
        out[name] = theta[start : start + shape.numel()].view(shape)
        start += shape.numel()
    return out


@pytest.mark.parametrize("group_size", [1, 5, 64])
@pytest.mark.parametrize("projection", ["structured", "dense"])
def test_multiplicative_values_and_gradients_equal_a_direct_computation(
    group_size: int, projection: str
) -> None:
    model = pretrained()
    names = body_names(model)
    total = sum(model.get_parameter(n).numel() for n in names)
    assert total % 5 and total % 64  # the last group is a remainder: L does not divide P
    config = MappingConfig(
        latent_dim=8,
        update="multiplicative",
        group_size=group_size,
        exclude_modules=["head"],
        latent_init_std=0.3,
        projection=projection,
    )
    mapped = wrap(model, config)
    assert config.resolved_base == "model" and config.base is None
    z = mapped.latent.detach().clone().requires_grad_(True)
    expected = direct_multiplicative(model, mapped, z, names)
    generated = mapped.generate([mapped.latent])
    for name in names:
        torch.testing.assert_close(generated[name], expected[name], rtol=1e-5, atol=1e-6)
    assert mapped.projections[0].out_features == -(-total // group_size)

    x = torch.randn(5, 2, 6, 6)
    mapped.train()
    (mapped(x).square().sum()).backward()
    plain = torch.func.functional_call(model, {**dict(model.named_parameters()), **expected}, x)
    plain.square().sum().backward()
    torch.testing.assert_close(mapped.latent.grad, z.grad, rtol=1e-4, atol=1e-5)


def test_group_mapping_shares_one_element_per_group_and_a_remainder() -> None:
    model = nn.Linear(10, 1, bias=False)  # P = 10, L = 4: groups {0..3}, {4..7}, {8, 9}
    with torch.no_grad():
        model.weight.copy_(torch.arange(1.0, 11.0))
    config = MappingConfig(latent_dim=2, update="multiplicative", group_size=4, scaling="none")
    mapped = wrap(model, config)
    with torch.no_grad():
        mapped.latent.copy_(torch.tensor([0.7, -0.4]))
    theta = mapped.generate()["weight"].reshape(-1)
    factor = theta / torch.arange(1.0, 11.0)  # 1 + m_⌈j/L⌉
    assert mapped.projections[0].out_features == 3
    for group in (factor[0:4], factor[4:8], factor[8:10]):
        torch.testing.assert_close(group, group[:1].expand_as(group))
    m = as_matrix(mapped.projections[0]) @ (mapped.latent + 0.1 * mapped.latent**2).detach()
    torch.testing.assert_close(factor, 1 + m[torch.arange(10) // 4])


def test_zero_latent_reproduces_the_pretrained_outputs_exactly() -> None:
    model = pretrained().eval()
    mapped = wrap(model, MappingConfig(latent_dim=16, update="multiplicative")).eval()
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(mapped(x), model(x))


def test_additive_update_is_theta_pre_plus_w_u() -> None:
    """update='additive' with base='model' (intrinsic-dimension fine-tuning, Aghajanyan et al.):
    with no modulation and no gains, θ = θ_pre + W z exactly."""
    model = pretrained()
    config = MappingConfig(
        latent_dim=6, base="model", alpha=0.0, scaling="none", latent_init_std=1.0
    )
    mapped = wrap(model, config)
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
    theta = flat + as_matrix(mapped.projections[0]) @ mapped.latent.detach()
    generated = torch.cat([mapped.generate()[n].detach().reshape(-1) for n in names])
    torch.testing.assert_close(generated, theta, rtol=1e-5, atol=1e-6)


def test_only_the_latent_and_a_new_head_train_and_are_counted() -> None:
    model = pretrained()
    model.head = nn.Linear(7, 5)  # a new classification head
    config = MappingConfig(latent_dim=12, update="multiplicative", train_directly=["head"])
    mapped = wrap(model, config)
    trainable = {n: p.numel() for n, p in mapped.named_parameters() if p.requires_grad}
    assert trainable == {"latents.0": 12, "target.head.weight": 35, "target.head.bias": 5}
    assert mapped.num_trainable_parameters() == 12 + 40
    optimizer = torch.optim.Adam(mapped.parameters(), lr=0.1)
    before = {n: b.clone() for n, b in mapped.named_buffers()}
    mapped.train()
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(mapped(torch.randn(6, 2, 6, 6)), torch.arange(6) % 5).backward()
        optimizer.step()
    assert mapped.latent.abs().sum() > 0
    changed = {n for n, b in mapped.named_buffers() if not torch.equal(b, before[n])}
    assert changed <= {
        "target.norm.running_mean",
        "target.norm.running_var",
        "target.norm.num_batches_tracked",
    }  # θ_pre never moves


def test_target_fraction_generates_the_layers_nearest_the_output() -> None:
    model = pretrained()  # conv 76, norm 8, body 455, head 24 numbers
    mapped = wrap(model, MappingConfig(latent_dim=4, update="multiplicative", target_fraction=0.8))
    assert [s.name for s in mapped.specs] == [
        "body.weight",
        "body.bias",
        "head.weight",
        "head.bias",
    ]
    frozen = {s.name for s in mapped.selection.frozen}
    assert frozen == {"conv.weight", "conv.bias", "norm.weight", "norm.bias"}
    assert not any(p.requires_grad for p in mapped.target.parameters())


def test_named_modules_select_like_layer4_plus_fc() -> None:
    model = pretrained()
    mapped = wrap(
        model, MappingConfig(latent_dim=4, update="multiplicative", target_modules=["body", "head"])
    )
    assert {s.layer for s in mapped.specs} == {"body", "head"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"group_size": 0}, "group_size must be > 0"),
        ({"group_size": -3}, "group_size must be > 0"),
        ({"group_size": 10_000}, "group_size=10000 is larger than the 563 selected"),
        ({"target_modules": ["layer4"]}, "target_modules pattern 'layer4' matches no parameter"),
        ({"update": "scaled"}, "update='scaled' is not one of 'additive', 'multiplicative'"),
        ({"target_fraction": 0.0}, "target_fraction must be in (0, 1]"),
        ({"base": "zero"}, "base='zero' would generate all-zero weights"),
    ],
)
def test_bad_fine_tuning_input_is_named(overrides: dict, message: str) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(message),
    ):
        wrap(
            pretrained(),
            MappingConfig(**{"latent_dim": 4, "update": "multiplicative", **overrides}),
        )


def test_group_size_needs_the_multiplicative_update() -> None:
    with pytest.raises(ValueError, match="group_size=4 needs update='multiplicative'"):
        MappingConfig(group_size=4)


def test_fine_tune_state_holds_the_latent_and_digests_not_the_pretrained_weights() -> None:
    model = pretrained()
    config = MappingConfig(
        latent_dim=8, update="multiplicative", target_modules=["body"], train_directly=["head"]
    )
    mapped = wrap(model, config)
    # BatchNorm statistics still at their pretrained values are held by digest too.
    assert set(mapped.state_dict()) == {
        "latents.0",
        "target.head.weight",
        "target.head.bias",
        "_extra_state",
    }
    identity = mapped.fingerprint()
    assert set(identity["bases"]) == {"body.weight", "body.bias"}
    assert set(identity["frozen"]) == {"conv.weight", "conv.bias", "norm.weight", "norm.bias"}
    assert set(identity["buffers"]) == {
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }
    other = wrap(pretrained(), config)
    assert other.load_state_dict(mapped.state_dict(), strict=True).missing_keys == []

    mapped.train()
    mapped(torch.randn(4, 2, 6, 6))  # the statistics move: now the state carries them
    state = mapped.state_dict()
    assert {"target.norm.running_mean", "target.norm.running_var"} <= set(state)
    fresh = wrap(pretrained(), config)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.target.norm.running_mean, mapped.target.norm.running_mean)


@pytest.mark.parametrize("base", ["model", "multiplicative"])
def test_a_strict_load_of_a_fine_tune_state_that_lost_a_moved_statistic_is_refused(
    base: str,
) -> None:
    """A fine-tune state leaves out the statistics still pretrained; one that training moved
    and the state then lost must not come back as its pretrained value."""
    settings = {"update": "multiplicative"} if base == "multiplicative" else {"base": "model"}
    config = MappingConfig(latent_dim=8, target_modules=["body"], **settings)
    trained = wrap(pretrained(), config).train()
    trained(torch.randn(4, 2, 6, 6))  # the statistics move
    state = trained.state_dict()
    del state["target.norm.running_mean"]
    receiver = wrap(pretrained(), config)
    with pytest.raises(
        CheckpointError, match=re.escape("missing 'target.norm.running_mean' (the state was saved")
    ):
        receiver.load_state_dict(state, strict=True)
    assert torch.equal(receiver.target.norm.running_var, pretrained().norm.running_var)
    receiver.train()(torch.randn(4, 2, 6, 6))
    own = receiver.target.norm.running_mean.clone()
    receiver.load_state_dict(state, strict=False)  # the rest; the lost one left as it is
    assert torch.equal(receiver.target.norm.running_var, trained.target.norm.running_var)
    assert torch.equal(receiver.target.norm.running_mean, own)


def test_fine_tune_state_is_refused_when_the_pretrained_statistics_differ() -> None:
    config = MappingConfig(latent_dim=8, update="multiplicative", target_modules=["body"])
    state = wrap(pretrained(), config).state_dict()
    model = pretrained()
    model.norm.running_var.mul_(2)
    with pytest.raises(
        CheckpointError, match=re.escape("pretrained buffer 'norm.running_var' differs")
    ):
        wrap(model, config).load_state_dict(state)


@pytest.mark.parametrize(
    ("changed", "kind"), [("body.bias", "base (θ₀)"), ("conv.weight", "frozen pretrained weight")]
)
def test_fine_tune_state_is_refused_on_other_pretrained_weights(changed: str, kind: str) -> None:
    config = MappingConfig(latent_dim=8, update="multiplicative", target_modules=["body"])
    state = wrap(pretrained(), config).state_dict()
    model = pretrained()
    with torch.no_grad():
        model.get_parameter(changed).mul_(1.01)
    other = wrap(model, config)
    with pytest.raises(CheckpointError, match=re.escape(kind) + f" (of )?{changed!r} differs"):
        other.load_state_dict(state)


def test_fine_tune_checkpoint_round_trips_in_a_fresh_process(tmp_path: Path) -> None:
    config = MappingConfig(
        latent_dim=8,
        update="multiplicative",
        group_size=3,
        train_directly=["head"],
        target_modules=["conv", "body"],
    )
    mapped = wrap(pretrained(), config)
    with torch.no_grad():
        mapped.latent.normal_()
        mapped.target.head.weight.add_(1.0)
    mapped.eval()
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    expected = mapped(x).detach()
    mapnet.save(mapped, tmp_path / "ckpt")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import mapnet
        from test_finetune_update import pretrained
        mapped = mapnet.load({str(tmp_path / "ckpt")!r}, pretrained()).eval()
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        print(json.dumps(mapped(x).detach().reshape(-1).tolist()))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    got = torch.tensor(json.loads(out.stdout)).view_as(expected)
    assert torch.equal(got, expected)
    with pytest.raises(CheckpointError, match="differs"):
        mapnet.load(tmp_path / "ckpt", pretrained(seed=1))


def test_identity_is_compressed_and_plain_json_from_mapnet_0_2_0_still_reads() -> None:
    from mapnet.identity import compact, decode

    mapped = wrap(pretrained(), MappingConfig(latent_dim=8, update="multiplicative"))
    encoded = mapped.state_dict()["_extra_state"]
    identity = mapped.fingerprint()
    assert len(encoded) < len(json.dumps(identity)) / 2
    # Written compact (short digests, one combined digest per kind); a fine-tune state's
    # identity also lists the pretrained buffers it holds (none moved).
    assert decode(encoded, "here") == compact(identity) | {"buffers_held": []}
    plain = torch.frombuffer(bytearray(json.dumps(identity).encode()), dtype=torch.uint8)
    assert decode(plain, "here") == identity
    with pytest.raises(CheckpointError, match="identity is unreadable"):
        decode(torch.tensor([1, 2, 3], dtype=torch.uint8), "here")


def test_switching_to_the_multiplicative_update_by_override_modulates_the_pretrained_weights() -> (
    None
):
    model = pretrained().eval()
    mapped = wrap(model, MappingConfig(latent_dim=8), update="multiplicative").eval()
    assert mapped.mapping_config.resolved_base == "model"
    x = torch.randn(3, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(mapped(x), model(x))
    assert mapped.mapping_config.to_dict()["base"] == "model"


def loaded_statistics(receiver: mapnet.MappedModule) -> torch.Tensor:
    return receiver.target.norm.running_mean.clone()


@pytest.mark.parametrize("how", ["strict", "not strict", "inside a parent"])
def test_omitted_statistics_are_restored_on_a_receiver_whose_statistics_drifted(how: str) -> None:
    config = MappingConfig(latent_dim=8, update="multiplicative")
    state = wrap(pretrained(), config).state_dict()
    assert "target.norm.running_mean" not in state
    receiver = wrap(pretrained(), config)
    receiver.train()
    receiver(torch.randn(4, 2, 6, 6))  # the receiver's statistics move away from the pretrained
    assert not torch.equal(loaded_statistics(receiver), pretrained().norm.running_mean)
    if how == "inside a parent":
        parent = nn.Sequential(receiver)
        parent.load_state_dict({f"0.{k}": v for k, v in state.items()}, strict=True)
    else:
        receiver.load_state_dict(state, strict=how == "strict")
    assert torch.equal(loaded_statistics(receiver), pretrained().norm.running_mean)


def test_omission_of_pretrained_statistics_survives_a_dtype_cast() -> None:
    config = MappingConfig(latent_dim=8, update="multiplicative")
    state = wrap(pretrained(), config).state_dict()
    receiver = wrap(pretrained(), config).double()
    receiver.load_state_dict(state, strict=True)
    assert "target.norm.running_var" not in receiver.state_dict()
    assert receiver.target.norm.running_var.dtype == torch.float64


def test_a_wrongly_shaped_statistic_is_refused_before_anything_is_loaded() -> None:
    config = MappingConfig(latent_dim=8, update="multiplicative")
    source = wrap(pretrained(), config)
    state = source.state_dict()
    state["latents.0"] = torch.full((8,), 0.5)
    state["target.norm.running_mean"] = torch.zeros(5)
    receiver = wrap(pretrained(), config)
    with pytest.raises(CheckpointError, match=r"'target.norm.running_mean' has shape \(5,\)"):
        receiver.load_state_dict(state)
    assert torch.equal(receiver.latent, torch.zeros(8))


def test_a_fine_tune_state_of_mapnet_0_2_0_still_loads() -> None:
    """0.2.0 wrote every frozen weight and buffer, and an identity without digests of them."""
    from mapnet.identity import decode

    config = MappingConfig(latent_dim=8, base="model", target_modules=["body"])
    model = pretrained()
    source = wrap(model, config)
    with torch.no_grad():
        source.latent.normal_()
    state = source.state_dict()
    identity = decode(state["_extra_state"], "here")
    for key in ("frozen", "buffers"):
        del identity[key]
    for name in ("update", "group_size", "target_fraction"):
        del identity["config"][name]
    state["_extra_state"] = torch.frombuffer(
        bytearray(json.dumps(identity).encode()), dtype=torch.uint8
    )
    full = {f"target.{k}": v for k, v in model.state_dict().items() if not k.startswith("body")}
    receiver = wrap(pretrained(), config)
    receiver.load_state_dict(full | state, strict=True)
    assert torch.equal(receiver.latent, source.latent)


def test_targets_with_non_tensor_extra_state_wrap_for_fine_tuning() -> None:
    class WithExtra(nn.Linear):
        def get_extra_state(self) -> dict:
            return {"note": "kept"}

        def set_extra_state(self, state: dict) -> None:
            self.note = state

    mapped = wrap(
        nn.Sequential(WithExtra(4, 3)), MappingConfig(latent_dim=4, update="multiplicative")
    )
    fresh = wrap(
        nn.Sequential(WithExtra(4, 3)), MappingConfig(latent_dim=4, update="multiplicative")
    )
    with pytest.raises(CheckpointError, match="base"):  # other random weights: refused
        fresh.load_state_dict(mapped.state_dict())


@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_multiplicative_with_an_activation_layerwise_and_in_float64(activation: str) -> None:
    model = pretrained().double()
    config = MappingConfig(
        latent_dim=3,
        strategy="layerwise",
        update="multiplicative",
        group_size=2,
        activation=activation,
        latent_init_std=0.5,
    )
    mapped = wrap(model, config)
    sigma = torch.tanh if activation == "tanh" else (lambda t: t)
    for index, group in enumerate(mapped.groups):
        z = mapped.latents[index].detach()
        flat = torch.cat([model.get_parameter(s.name).detach().reshape(-1) for s in group.specs])
        m = sigma(as_matrix(mapped.projections[index]).double() @ (z + 0.1 * z * z))
        expected = flat * (1 + m[torch.arange(flat.numel()) // 2])
        got = torch.cat([mapped.generate()[s.name].detach().reshape(-1) for s in group.specs])
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected)


def test_mapping_loss_on_a_multiplicative_update_uses_hutchinson() -> None:
    from mapnet.loss import MappingLoss

    mapped = wrap(pretrained(), MappingConfig(latent_dim=8, update="multiplicative"))
    loss = MappingLoss(mapped)
    assert loss.smoothness_estimator == "hutchinson"
    with pytest.raises(ValueError, match="needs an additive update"):
        MappingLoss(mapped, smoothness_estimator="exact")
