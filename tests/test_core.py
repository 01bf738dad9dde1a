from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import mapnet
from mapnet.bases import seeded_initialisation
from mapnet.config import MappingConfig
from mapnet.generator import _GeneratedTensors
from mapnet.projections.dense import DenseProjection, orthonormal_matrix
from mapnet.projections.structured import StructuredProjection


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 5)
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


def test_only_latents_are_trainable_and_get_gradients() -> None:
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    mapped = mapnet.wrap(model, MappingConfig(latent_dim=32))
    params = list(mapped.parameters())
    assert len(params) == 1 and params[0] is mapped.latent and params[0].shape == (32,)
    assert mapped.num_trainable_parameters() == 32
    assert mapped.num_target_parameters() == sum(p.numel() for p in model.parameters())

    optimizer = torch.optim.Adam(mapped.parameters(), lr=0.1)
    x = torch.randn(6, 1, 8, 8)
    y0 = mapped(x).detach()
    mapped(x).square().mean().backward()
    assert mapped.latent.grad is not None and mapped.latent.grad.abs().sum() > 0
    z0 = mapped.latent.detach().clone()
    optimizer.step()
    assert not torch.equal(mapped.latent.detach(), z0)
    assert not torch.allclose(mapped(x), y0)
    # The wrapped model itself is untouched: same values, still trainable, no gradients.
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_generated_tensors_match_target_names_shapes_dtypes() -> None:
    model = small_cnn().double()
    mapped = mapnet.wrap(model, MappingConfig(latent_dim=16))
    generated = mapped.generate()
    expected = dict(model.named_parameters())
    assert list(generated) == list(expected)
    for name, param in expected.items():
        assert generated[name].shape == param.shape, name
        assert generated[name].dtype == torch.float64, name
    assert mapped(torch.randn(2, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_zero_latent_generates_the_seeded_initialisation() -> None:
    model = small_cnn()
    mapped = mapnet.wrap(model, MappingConfig(latent_dim=16, seed=3))
    init, uncovered = seeded_initialisation(model, 3)
    assert not uncovered
    for name, value in mapped.generate().items():
        torch.testing.assert_close(value, init[name], rtol=0, atol=0)
    # ... which is a real initialisation, not the model's own values.
    assert not torch.equal(init["conv.weight"], model.conv.weight)


def test_generation_is_the_modulated_projection() -> None:
    """θ = b + g⊙(W̃ z) with W̃_i = W_i(1 + α z_i), built here explicitly."""
    model = small_cnn()
    alpha = 0.3
    mapped = mapnet.wrap(
        model, MappingConfig(latent_dim=10, alpha=alpha, latent_init_std=0.5, projection="dense")
    )
    z = mapped.latent.detach()
    w = mapped.projections[0].weight  # (P, d), gains folded in
    modulated = w * (1 + alpha * z)[None, :]
    expected = mapped._base(0) + modulated @ z
    torch.testing.assert_close(mapped.generate_flat(0).detach(), expected, rtol=1e-5, atol=1e-6)


def test_gains_give_each_tensor_its_init_spread() -> None:
    """With scaling='init_std', one unit of rms(u) moves each tensor by its init std."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 8))
    mapped = mapnet.wrap(model, MappingConfig(latent_dim=128, alpha=0.0))
    init, _ = seeded_initialisation(model, 0)
    with torch.no_grad():
        mapped.latent.copy_(torch.randn(128))
        rms = mapped.latent.square().mean().sqrt().item()
        generated = mapped.generate()
    for name in ("0.weight", "1.weight"):
        spread = (generated[name] - init[name]).std().item() / rms
        assert spread == pytest.approx(init[name].std().item(), rel=0.15), name


def test_orthonormal_matrix_columns_and_rows() -> None:
    tall = orthonormal_matrix(500, 40, seed=1)  # Cholesky-QR path
    torch.testing.assert_close(tall.T @ tall, torch.eye(40), atol=1e-5, rtol=0)
    square_ish = orthonormal_matrix(60, 40, seed=1)  # Householder path
    torch.testing.assert_close(square_ish.T @ square_ish, torch.eye(40), atol=1e-5, rtol=0)
    wide = orthonormal_matrix(30, 50, seed=1)
    torch.testing.assert_close(wide @ wide.T, torch.eye(30), atol=1e-5, rtol=0)
    assert torch.equal(orthonormal_matrix(500, 40, seed=1), tall)
    assert not torch.equal(orthonormal_matrix(500, 40, seed=2), tall)


def test_materialize_gives_same_outputs_and_class() -> None:
    mapped = mapnet.wrap(small_cnn(), MappingConfig(latent_dim=24, latent_init_std=0.3))
    x = torch.randn(5, 1, 8, 8)
    mapped.train()
    mapped(x)  # update running stats once
    mapped.eval()
    plain = mapped.materialize()
    assert type(plain) is SmallCNN
    assert not plain.training
    assert all(isinstance(p, nn.Parameter) for p in plain.parameters())
    assert sum(p.numel() for p in plain.parameters()) == mapped.num_target_parameters()
    torch.testing.assert_close(plain(x), mapped(x), rtol=0, atol=0)


def test_batchnorm_running_stats_update_in_training_and_not_in_eval() -> None:
    mapped = mapnet.wrap(small_cnn(), MappingConfig(latent_dim=8, check_finite=True))
    stats = mapped.target.bn.running_mean
    assert torch.equal(stats, torch.zeros(4))
    mapped.train()
    mapped(torch.randn(8, 1, 8, 8) + 3)
    assert not torch.equal(stats, torch.zeros(4))
    assert mapped.target.bn.num_batches_tracked.item() == 1
    snapshot = stats.clone()
    mapped.eval()
    mapped(torch.randn(8, 1, 8, 8))
    assert torch.equal(stats, snapshot)
    assert "target.bn.running_mean" in mapped.state_dict()


class TiedLM(nn.Module):
    """Embedding tied to the output layer, and a block applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 20)
        h = self.embed(tokens)
        h = torch.tanh(self.block(torch.tanh(self.block(h))))
        return self.head(h)


def test_tied_parameters_are_generated_once_and_stay_tied() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    mapped = mapnet.wrap(model, MappingConfig(latent_dim=12, latent_init_std=0.2))
    assert mapped.num_target_parameters() == 20 * 8 + 8 * 8 + 8
    generated = mapped.generate()
    assert generated["embed.weight"] is generated["head.weight"]
    tokens = torch.randint(0, 20, (3, 5))
    out = mapped(tokens)
    out.sum().backward()
    assert mapped.latent.grad.abs().sum() > 0
    plain = mapped.materialize()
    assert plain.head.weight is plain.embed.weight
    torch.testing.assert_close(plain(tokens), mapped(tokens), rtol=0, atol=0)


class Seq(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.out = nn.Linear(rnn.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> (B, 1)
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 8)
        return self.norm(self.attn(x, x, x, need_weights=False)[0] + x)


MODULE_CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3)), (4, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3), (2, 3, 10)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 6, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 3, 2, stride=2), (2, 4, 5, 5)),
    "batchnorm1d": (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (8, 5)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)), (3, 5)),
    "lstm": (lambda: Seq(nn.LSTM(4, 6, batch_first=True)), (2, 7, 4)),
    "gru": (lambda: Seq(nn.GRU(4, 6, num_layers=2, batch_first=True)), (2, 7, 4)),
    "multihead_attention": (Attention, (2, 5, 8)),
}


@pytest.mark.parametrize("strategy", ["single", "layerwise"])
@pytest.mark.parametrize("case", sorted(MODULE_CASES))
def test_module_kinds_forward_backward_materialize(case: str, strategy: str) -> None:
    factory, shape = MODULE_CASES[case]
    torch.manual_seed(0)
    model = factory()
    total = sum(p.numel() for p in model.parameters())
    latent = min(8, total - 1) if strategy == "single" else 3
    mapped = mapnet.wrap(
        model, MappingConfig(latent_dim=latent, strategy=strategy, latent_init_std=0.1)
    )
    x = torch.randn(*shape)
    out = mapped(x)
    assert out.shape == model(x).shape
    out.square().mean().backward()
    grads = [z.grad for z in mapped.latents]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    mapped.eval()
    torch.testing.assert_close(mapped.materialize()(x), mapped(x), rtol=1e-6, atol=1e-6)


def test_embedding_alone() -> None:
    mapped = mapnet.wrap(nn.Embedding(30, 4), MappingConfig(latent_dim=10, latent_init_std=0.1))
    out = mapped(torch.tensor([[1, 2, 29]]))
    assert out.shape == (1, 3, 4)
    out.sum().backward()
    assert mapped.latent.grad.abs().sum() > 0


def test_module_reused_twice_in_one_forward() -> None:
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    mapped = mapnet.wrap(model, MappingConfig(latent_dim=6, latent_init_std=0.1))
    assert mapped.num_target_parameters() == 30
    x = torch.randn(3, 5)
    plain = mapped.materialize()
    assert plain[0] is plain[2]
    torch.testing.assert_close(plain(x), mapped(x), rtol=0, atol=0)


def test_layerwise_sizes() -> None:
    model = small_cnn()
    per_layer = mapnet.wrap(model, MappingConfig(latent_dim=7, strategy="layerwise"))
    assert [g.name for g in per_layer.groups] == ["conv", "bn", "fc"]
    assert [z.numel() for z in per_layer.latents] == [7, 7, 7]
    assert per_layer.num_trainable_parameters() == 21

    equal = mapnet.wrap(
        model, MappingConfig(latent_dim=20, strategy="layerwise", layer_split="equal")
    )
    assert [z.numel() for z in equal.latents] == [7, 7, 6]

    proportional = mapnet.wrap(
        model, MappingConfig(latent_dim=100, strategy="layerwise", layer_split="proportional")
    )
    sizes = [z.numel() for z in proportional.latents]
    assert sum(sizes) == 100
    assert sizes[2] > sizes[0] > sizes[1] >= 1  # fc 725 > conv 40 > bn 8 parameters

    explicit = mapnet.wrap(
        model, MappingConfig(latent_dim={"conv": 5, "bn": 2, "fc": 30}, strategy="layerwise")
    )
    assert [z.numel() for z in explicit.latents] == [5, 2, 30]


def test_layerwise_warns_when_a_latent_exceeds_its_layer() -> None:
    with pytest.warns(UserWarning, match=r"bn \(9 > 8\)"):
        mapnet.wrap(small_cnn(), MappingConfig(latent_dim=9, strategy="layerwise"))


def test_paper_literal_config_trains() -> None:
    config = MappingConfig.paper_literal(latent_dim=16)
    assert (config.scaling, config.base, config.latent_init_std) == ("none", "zero", 1.0)
    mapped = mapnet.wrap(small_cnn(), config)
    assert mapped.latent.abs().sum() > 0
    w = mapped.projections[0].weight
    torch.testing.assert_close(w.T @ w, torch.eye(16), atol=1e-5, rtol=0)  # plain orthonormal
    mapped(torch.randn(4, 1, 8, 8)).sum().backward()
    assert mapped.latent.grad.abs().sum() > 0


def test_projection_is_regenerated_identically_from_the_seed() -> None:
    a = mapnet.wrap(small_cnn(), MappingConfig(latent_dim=16, seed=5, projection="dense"))
    b = mapnet.wrap(small_cnn(), MappingConfig(latent_dim=16, seed=5, projection="dense"))
    c = mapnet.wrap(small_cnn(), MappingConfig(latent_dim=16, seed=6, projection="dense"))
    assert torch.equal(a.projections[0].weight, b.projections[0].weight)
    assert not torch.equal(a.projections[0].weight, c.projections[0].weight)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert "projections.0.weight" not in a.state_dict()


def test_transformer_encoder_loss_falls_in_20_steps() -> None:
    """A model family the library was not designed around."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2), nn.Linear(16, 3))
    mapped = mapnet.wrap(model, MappingConfig(latent_dim=64, seed=1))
    mapped.eval()  # no dropout: a deterministic loss curve
    x = torch.randn(32, 6, 16)
    y = torch.randint(0, 3, (32,))
    optimizer = torch.optim.Adam(mapped.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(mapped(x)[:, 0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"latent_dim": 0}, ValueError, "latent_dim must be > 0"),
        ({"latent_dim": -3}, ValueError, "latent_dim must be > 0"),
        ({"latent_dim": 2.5}, TypeError, "latent_dim must be an int"),
        ({"latent_dim": True}, TypeError, "latent_dim must be an int"),
        ({"strategy": "global"}, ValueError, "strategy='global' is not one of"),
        ({"activation": "swish2"}, ValueError, "activation='swish2' is not one of"),
        ({"scaling": "xavier"}, ValueError, "scaling='xavier'"),
        ({"base": "pretrained"}, ValueError, "base='pretrained'"),
        ({"projection": "sparse"}, ValueError, "projection='sparse'"),
        ({"alpha": float("nan")}, ValueError, "alpha must be finite"),
        ({"seed": -1}, ValueError, "seed must be in"),
        ({"latent_dim": {"fc": 3}}, ValueError, "needs strategy='layerwise'"),
        ({"latent_dim": {"fc": 0}, "strategy": "layerwise"}, ValueError, r"latent_dim\['fc'\]"),
        ({"base": "zero"}, ValueError, "all-zero weights"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        MappingConfig(**kwargs)


@pytest.mark.parametrize("name", ["alpha", "latent_init_std", "target_fraction"])
@pytest.mark.parametrize("text", ["1e999", "-1e999", "NaN"])
def test_every_float_option_of_a_config_must_be_finite(name: str, text: str) -> None:
    data = {"projection": "structured", name: json.loads(text)}  # 1e999 parses to inf
    with pytest.raises(ValueError, match=f"^{name} must be finite, got"):
        MappingConfig.from_dict(data)


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    config = MappingConfig(latent_dim={"a": 3}, strategy="layerwise", alpha=0.2)
    assert MappingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown MappingConfig field\(s\) \['latent'\]"):
        MappingConfig.from_dict({"latent": 3, "projection": "dense"})
    with pytest.raises(ValueError, match="must name 'projection'"):
        MappingConfig.from_dict({"latent_dim": 8})  # its default changed: never guessed
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 0.5  # type: ignore[misc]  # W, θ₀ and the identity derive from it


def test_wrap_rejects_bad_models() -> None:
    with pytest.raises(ValueError, match="ReLU has no parameters"):
        mapnet.wrap(nn.ReLU())
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module"):
        mapnet.wrap("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a MappingConfig"):
        mapnet.MappedModule(nn.Linear(2, 2), {"latent_dim": 2})  # type: ignore[arg-type]


def test_single_latent_must_be_smaller_than_the_target() -> None:
    with pytest.raises(ValueError, match=r"latent_dim=12 is not smaller than the 12 generated"):
        mapnet.wrap(nn.Linear(3, 3), MappingConfig(latent_dim=12))


def test_layer_dict_must_name_existing_layers() -> None:
    config = MappingConfig(latent_dim={"conv": 2, "bn": 2, "fc2": 2}, strategy="layerwise")
    with pytest.raises(ValueError, match=r"unknown: \['fc2'\], missing: \['fc'\]"):
        mapnet.wrap(small_cnn(), config)


def test_budget_too_small_for_layers() -> None:
    config = MappingConfig(latent_dim=2, strategy="layerwise", layer_split="equal")
    with pytest.raises(ValueError, match="cannot give each of the 3 layers"):
        mapnet.wrap(small_cnn(), config)


def test_non_finite_latent_is_reported() -> None:
    mapped = mapnet.wrap(small_cnn(), MappingConfig(latent_dim=8, check_finite=True))
    with torch.no_grad():
        mapped.latent[3] = math.nan
    with pytest.raises(ValueError, match=r"1 non-finite value"):
        mapped(torch.randn(2, 1, 8, 8))


def test_parameters_without_reset_are_kept_from_the_model() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.full((4,), 2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.scale

    mapped = mapnet.wrap(Scaled(), MappingConfig(latent_dim=5))
    assert mapped.stored_base_names == ["scale"]
    assert torch.equal(mapped.generate()["scale"], torch.full((4,), 2.0))


def test_dense_projection_loss_helpers_match_the_matrix() -> None:
    from mapnet.projections.dense import DenseProjection

    row_scale = torch.linspace(0.5, 2.0, 300)
    projection = DenseProjection(300, 20, seed=3, row_scale=row_scale)
    w = projection.weight
    torch.testing.assert_close(w, orthonormal_matrix(300, 20, 3) * row_scale[:, None])
    c = torch.rand(20)
    torch.testing.assert_close(projection.weighted_row_sq_norms(c), (w * w) @ c)
    torch.testing.assert_close(projection.column_sq_norms(), (w * w).sum(0))
    torch.testing.assert_close(projection.column_means(), w.mean(0))
    u, offset = torch.randn(20), torch.randn(300)
    torch.testing.assert_close(projection(u, offset), w @ u + offset)  # θ₀ + W u in one addmv


@pytest.mark.parametrize("strategy", ["single", "layerwise"])
def test_structured_projection_end_to_end(strategy: str) -> None:
    config = MappingConfig(latent_dim=6, strategy=strategy, projection="structured")
    mapped = mapnet.wrap(small_cnn(), config)
    assert mapped.projection_bytes() < 8 * mapped.num_target_parameters()
    x = torch.randn(4, 1, 8, 8)
    optimizer = torch.optim.Adam(mapped.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = mapped(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    mapped.eval()
    torch.testing.assert_close(mapped.materialize()(x), mapped(x), rtol=0, atol=0)


def test_intrinsic_dimension_preset_is_theta0_plus_projection() -> None:
    config = MappingConfig.intrinsic_dimension(
        latent_dim=12, latent_init_std=0.5, projection="dense"
    )
    mapped = mapnet.wrap(small_cnn(), config)
    z = mapped.latent.detach()
    w = mapped.projections[0].weight
    torch.testing.assert_close(w.T @ w, torch.eye(12), atol=1e-5, rtol=0)
    expected = mapped._base(0) + w @ z
    torch.testing.assert_close(mapped.generate_flat(0).detach(), expected)


# The fused generator (one autograd node per group) against the composed path it replaces.
FUSED_SHAPES = ((3, 4), (5,), (2, 2, 2))  # P = 25


class WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)  # its gradient is None: the fused backward must cope

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 6) -> (B, 3)
        return self.used(x)


def _composed_generate(mapped: mapnet.MappedModule) -> dict[str, torch.Tensor]:
    """What generate() computed before the fused node: generate_flat, then split and view."""
    params = {}
    for index, group in enumerate(mapped.groups):
        flat = mapped.generate_flat(index)
        for spec, piece in zip(group.specs, flat.split([s.numel for s in group.specs])):
            for alias in spec.names:
                params[alias] = piece.view(spec.shape)
    return params


@pytest.mark.parametrize(
    "settings",
    [
        {"projection": "dense"},
        {"projection": "structured"},
        {"projection": "structured", "strategy": "layerwise", "latent_dim": 5},
        {"projection": "structured", "activation": "tanh", "alpha": 0.0},
        {"projection": "dense", "base": "zero", "latent_init_std": 1.0},
    ],
)
def test_fused_generation_equals_the_composed_path(settings: dict) -> None:
    config = MappingConfig(**({"latent_dim": 8, "latent_init_std": 0.3} | settings))
    for model in (small_cnn(), WithUnusedLayer()):
        mapped = mapnet.wrap(model, config)
        fused, composed = mapped.generate(), _composed_generate(mapped)
        assert list(fused) == list(composed)
        weights = {name: torch.randn(t.shape) for name, t in fused.items()}
        grads = []
        for params in (fused, composed):
            torch.testing.assert_close(params, fused, rtol=0, atol=0)
            used = {k: v for k, v in params.items() if not k.startswith("unused")}
            loss = sum((t * weights[k]).sum() for k, t in used.items())
            # A layerwise latent of the unused layer gets no gradient on either path.
            grads.append(torch.autograd.grad(loss, list(mapped.parameters()), allow_unused=True))
        for fused_grad, composed_grad in zip(*grads):
            assert (fused_grad is None) == (composed_grad is None)
            if fused_grad is not None:
                torch.testing.assert_close(fused_grad, composed_grad, rtol=1e-5, atol=1e-7)


# torch.func.jvp itself triggers torch's own torch.jit.script deprecation warning.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", [DenseProjection, StructuredProjection])
def test_fused_generation_derivatives(kind: type) -> None:
    """First and second derivatives, forward mode and vmap, in z and in the offset θ₀."""
    proj = kind(25, 6, 1, torch.linspace(0.5, 1.5, 25)).double()
    sizes = [math.prod(s) for s in FUSED_SHAPES]

    def fused(z: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _GeneratedTensors.apply(z, proj, offset, 0.3, FUSED_SHAPES)

    def composed(z: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = proj(z + 0.3 * z * z) + offset  # (..., 25)
        lead = flat.shape[:-1]
        return tuple(p.reshape(*lead, *s) for p, s in zip(flat.split(sizes, -1), FUSED_SHAPES))

    z = torch.randn(6, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(25, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused, (z, offset))
    assert torch.autograd.gradgradcheck(fused, (z, offset))
    tangents = (torch.randn(6, dtype=torch.float64), torch.randn(25, dtype=torch.float64))
    primals = (z.detach(), offset.detach())
    _, fused_tangent = torch.func.jvp(fused, primals, tangents)
    _, composed_tangent = torch.func.jvp(composed, primals, tangents)
    torch.testing.assert_close(fused_tangent, composed_tangent, rtol=1e-12, atol=1e-12)
    zs, offsets = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 25, dtype=torch.float64)
    for in_dims, args in (((0, None), (zs, primals[1])), ((0, 0), (zs, offsets))):
        batched = torch.func.vmap(fused, in_dims=in_dims)(*args)
        torch.testing.assert_close(batched, composed(*args), rtol=1e-12, atol=1e-12)
    assert [t.shape for t in batched] == [(4, *s) for s in FUSED_SHAPES]
