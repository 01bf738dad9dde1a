"""Row- and column-aligned modulation (eq. 25 with one element per row or column): the
activation path equals the weight path with the same grouping and a direct computation; what
falls back, what warns; materialize, save and load, selection by type and parameter name,
groups inside tensors."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mapnet
from mapnet import CheckpointError, MappingConfig
from mapnet.rows import SCALE

MODES = ["row", "column"]
# The fallback notice, where a test does not look at it.
pytestmark = pytest.mark.filterwarnings("ignore:mapnet. group_size=.*fall back:UserWarning")


def as_matrix(projection: nn.Module) -> torch.Tensor:
    """W (M, d) with its gains, read off by projecting the unit vectors."""
    return projection(torch.eye(projection.in_features, dtype=torch.float64)).T


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` with weights moved off any default initialisation (a 'pretrained' model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


class Attention(nn.Module):
    """A hand-written BERT-style block: embedding, self-attention, LayerNorm, feed-forward."""

    def __init__(self, vocab: int = 13, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (N, T) -> (N, 3)
        x = self.embed(ids)
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        x = self.norm(x + self.out(weights @ v))
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x.mean(1))


class ConvNet(nn.Module):
    """Conv1d and Conv2d (one grouped, one without bias), no BatchNorm, and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, groups=2, bias=False)
        self.conv3 = nn.Conv1d(6, 5, 2, padding_mode="circular", padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 2, 6, 6) -> (N, 3)
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (N, 6, 4, 4)
        h = torch.relu(self.conv3(h.flatten(2)))  # (N, 5, 17)
        return self.head(h.mean(-1))


class Recurrent(nn.Module):
    """A GRU (the weight path) with a Linear projection (the activation path) and a head."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 6, batch_first=True)
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, 4) -> (N, 3)
        out, _ = self.gru(x)
        return self.head(torch.tanh(self.proj(out[:, -1])))


def bert_block() -> nn.Module:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

    config = BertConfig(
        vocab_size=17,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=12,
        attn_implementation="eager",
    )

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = BertEmbeddings(config)
            self.layer = BertLayer(config)
            self.head = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            hidden = self.layer(self.embeddings(input_ids=ids))
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # by transformers release
            return self.head(hidden.mean(1))

    return Bert().eval()  # no dropout: both paths see the same function


def gpt2_block() -> nn.Module:
    """GPT-2's embeddings and one block: its projections are transformers' Conv1D (θ stored
    (in, out)), whose rows are θ's columns."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = GPT2Config(vocab_size=17, n_positions=12, n_embd=8, n_layer=1, n_head=2,
                        attn_implementation="eager")  # fmt: skip

    class GPT2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(17, 8), nn.Embedding(12, 8)
            self.block = GPT2Block(config)
            self.head = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            hidden = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
            hidden = self.block(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # by transformers release
            return self.head(hidden.mean(1))

    return GPT2().eval()


def ids_input() -> torch.Tensor:
    ids = torch.randint(1, 13, (3, 7), generator=torch.Generator().manual_seed(1))
    ids[0, 5:] = 0  # padding: the padding row's factor must get no gradient
    return ids


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "attention": (Attention, ids_input),
    "bert": (bert_block, ids_input),
    "gpt2": (gpt2_block, ids_input),
    "conv": (ConvNet, lambda: torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2))),
    "gru": (Recurrent, lambda: torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(3))),
}


def make(case: str) -> tuple[nn.Module, torch.Tensor]:
    factory, inputs = CASES[case]
    torch.manual_seed(0)
    return perturbed(factory()).double(), inputs().double() if case in ("conv", "gru") else inputs()


def config(mode: str, **overrides) -> MappingConfig:
    settings = dict(
        latent_dim=6,
        update="multiplicative",
        group_size=mode,
        train_directly=("head",),
        latent_init_std=0.5,
    )
    return MappingConfig(**(settings | overrides))


def wrapped(model: nn.Module, cfg: MappingConfig) -> mapnet.MappedModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback notice: tested on its own
        return mapnet.wrap(model, cfg)


def values_and_gradients(
    mapped: mapnet.MappedModule, run: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mapped.zero_grad(set_to_none=True)
    out = run()
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    head = mapped.target.head.weight.grad.clone()
    return out.detach(), mapped.latent.grad.clone(), head


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-6):
    scale = expected.abs().max().clamp_min(1e-30)
    assert (actual - expected).abs().max() / scale <= tolerance


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_activation_path_equals_the_weight_path_with_the_same_grouping(case: str, mode: str):
    model, x = make(case)
    mapped = wrapped(model, config(mode))
    activation = values_and_gradients(mapped, lambda: mapped(x))
    # The weight path: every tensor θ_pre ⊙ (1 + m) formed, the hooks' factors left at one.
    weight = values_and_gradients(
        mapped, lambda: functional_call(mapped.target, mapped.generate(), (x,))
    )
    for got, expected in zip(activation, weight):
        assert_relative(got, expected)
    assert activation[1].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_gpt2s_conv1d_runs_on_the_activation_path_one_element_per_output_feature(mode: str):
    model, _ = make("gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = mapnet.wrap(model, config(mode, target_types=["Conv1D"]))
    assert not [w for w in caught if "fall back" in str(w.message)]
    conv1d = [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    axis = 1 if mode == "row" else 0  # θ (in, out): a row is an output feature, a column an input
    assert mapped.num_generated_parameters() == sum(m.weight.numel() for m in conv1d) + (
        sum(m.bias.numel() for m in conv1d) if mode == "row" else 0
    )
    assert mapped.projections[0].out_features == sum(m.weight.shape[axis] for m in conv1d)
    attention = mapped.target.block.attn.c_attn
    assert getattr(attention, SCALE).shape == (attention.weight.shape[axis],)


@pytest.mark.parametrize("mode", MODES)
def test_grouping_matches_a_direct_computation(mode: str) -> None:
    """Rows: one element per output channel (the bias shares it), columns: per input channel
    (a grouped conv's channel feeds its group only; biases unmodulated), in module order."""
    model, x = make("conv")
    mapped = wrapped(model, config(mode))
    z = mapped.latent.detach()
    m = as_matrix(mapped.projections[0]) @ (z + 0.1 * z * z)  # (M,)
    expected, start = copy.deepcopy(model), 0
    with torch.no_grad():
        for name in ("conv1", "conv2", "conv3"):
            conv = expected.get_submodule(name)
            if mode == "row":
                factor = 1 + m[start : start + conv.out_channels]
                start += conv.out_channels
                conv.weight.mul_(factor.view(-1, *(1,) * (conv.weight.dim() - 1)))
                if conv.bias is not None:
                    conv.bias.mul_(factor)
            else:
                factor = 1 + m[start : start + conv.in_channels]
                start += conv.in_channels
                per_group = conv.in_channels // conv.groups
                for out in range(conv.out_channels):
                    group = out // (conv.out_channels // conv.groups)
                    part = factor[group * per_group : (group + 1) * per_group]
                    conv.weight[out].mul_(part.view(-1, *(1,) * (conv.weight.dim() - 2)))
    assert start == mapped.groups[0].rows
    with torch.no_grad():
        assert_relative(mapped(x), expected(x), 1e-12)


def test_embedding_rows_scale_each_tokens_vector() -> None:
    model, ids = make("attention")
    cfg = config("row", target_modules=("embed",), train_directly=())
    mapped = wrapped(model, cfg)
    z = mapped.latent.detach()
    m = as_matrix(mapped.projections[0]) @ (z + 0.1 * z * z)  # (13,): one per token
    assert m.numel() == 13
    expected = model.embed.weight.detach() * (1 + m)[:, None]
    assert_relative(mapped.generate()["embed.weight"].detach(), expected, 1e-12)
    with torch.no_grad(), mapped.applied() as net:  # the target's own modules, modulated
        assert_relative(net.embed(ids), expected[ids], 1e-12)
    with torch.no_grad():
        assert torch.equal(mapped.target.embed(ids), model.embed(ids))  # outside: θ_pre


def test_the_fallback_notice_names_each_module_once() -> None:
    model, _ = make("gru")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = mapnet.wrap(model, config("row"))
    notices = [str(w.message) for w in caught if "fall back to the weight path" in str(w.message)]
    assert notices == [
        "mapnet: group_size='row': 1 module(s) fall back to the weight path (their weights are "
        "generated every step): gru (GRU)"
    ]
    scaled = {name for name, buffer in mapped.target.named_buffers() if name.endswith(SCALE)}
    assert scaled == {f"proj.{SCALE}"}  # the Linear runs on the activation path


def test_multihead_attention_falls_back_whole() -> None:
    """nn.MultiheadAttention hands out_proj.weight to its functional form: out_proj's forward
    never runs, so out_proj is on the weight path too."""
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = mapnet.wrap(perturbed(mha), config("row", train_directly=()))
    (notice,) = [str(w.message) for w in caught if "weight path" in str(w.message)]
    assert (
        "<root> (MultiheadAttention)" in notice and "out_proj (NonDynamicallyQuantizable" in notice
    )
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    out = mapped(x, x, x)[0]
    assert_relative(out, functional_call(mapped.target, mapped.generate(), (x, x, x))[0])


def test_a_module_whose_weight_its_parent_reads_directly_is_named_in_the_first_forward() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.used = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(nn.functional.linear(x, self.fc.weight))  # fc's forward never runs

    mapped = wrapped(Tied(), config("row", train_directly=()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped(torch.randn(2, 4))
        mapped(torch.randn(2, 4))  # checked once
    messages = [str(w.message) for w in caught if "did not run" in str(w.message)]
    assert len(messages) == 1 and re.search(r"first forward: fc\. ", messages[0])


@pytest.mark.parametrize("after", ["bn", "sequential"])
def test_a_row_scaled_conv_before_a_batchnorm_warns_naming_both(after: str) -> None:
    if after == "bn":

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(2, 4, 3)
                self.bn = nn.BatchNorm2d(4)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.bn(self.conv(x))

        model, names = Net(), "conv -> bn"
    else:
        model = nn.Sequential(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)))
        names = "0.0 -> 0.1"
    for mode, expected in (("row", 1), ("column", 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mapnet.wrap(model, config(mode, train_directly=(), target_types=("Conv2d",)))
        warned = [str(w.message) for w in caught if "normalises away" in str(w.message)]
        assert len(warned) == expected
        if expected:
            assert names in warned[0] and "group_size='column'" in warned[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["attention", "conv", "gru"])
def test_materialize_is_the_plain_merged_model(case: str, mode: str) -> None:
    model, x = make(case)
    mapped = wrapped(model, config(mode))
    plain = mapped.materialize()
    assert type(plain) is type(model)
    assert not any(name.endswith(SCALE) for name, _ in plain.named_buffers())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules())
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        assert_relative(plain(x), mapped(x), 1e-12)
    if mode == "row" and case != "gru":
        first = next(n for n, _ in model.named_parameters() if n.endswith("bias"))
        assert not torch.equal(plain.get_parameter(first), model.get_parameter(first))


@pytest.mark.parametrize("mode", MODES)
def test_state_and_checkpoint_round_trips_are_exact(mode: str, tmp_path: Path) -> None:
    model, x = make("attention")
    mapped = wrapped(model, config(mode))
    with torch.no_grad():
        mapped.latent.normal_()
        mapped.target.head.weight.add_(1)
    expected = mapped(x)
    state = mapped.state_dict()
    assert sorted(state) == ["_extra_state", "latents.0", "target.head.bias", "target.head.weight"]
    fresh = wrapped(make("attention")[0], config(mode))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), expected)
    mapnet.save(mapped, tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = mapnet.load(tmp_path / "ckpt", make("attention")[0])
    assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("tensor", ["query.weight", "norm.bias", "embed.weight"])
def test_a_perturbed_base_tensor_is_refused_naming_it(tensor: str, tmp_path: Path) -> None:
    """Activation-path (query, embed) and weight-path (norm) tensors alike."""
    mapped = wrapped(make("attention")[0], config("row"))
    mapnet.save(mapped, tmp_path / "ckpt")
    other = make("attention")[0]
    with torch.no_grad():
        other.get_parameter(tensor).view(-1)[1] += 1e-3
    with pytest.raises(CheckpointError, match=re.escape(f"'{tensor}' differs")):
        wrapped(other, config("row")).load_state_dict(mapped.state_dict())
    with pytest.raises(CheckpointError, match=re.escape(f"'{tensor}' differs")):
        mapnet.load(tmp_path / "ckpt", other)


def test_a_difference_hidden_by_the_short_digests_is_refused() -> None:
    from mapnet.identity import decode, encode

    mapped = wrapped(make("attention")[0], config("row"))
    state = mapped.state_dict()
    written = decode(state["_extra_state"], "here")
    written["bases_sha256"] = "0" * 64
    state["_extra_state"] = encode(written)
    with pytest.raises(CheckpointError, match="combined sha256"):
        wrapped(make("attention")[0], config("row")).load_state_dict(state)


def test_no_copy_of_the_activation_path_weights() -> None:
    """θ_pre of an activation-path module is the target's own tensor: with a factory, the
    factory's very storage; the flat θ₀ holds only the weight-path tensors."""
    made: list[nn.Module] = []

    def factory() -> nn.Module:
        made.append(perturbed(Attention()))
        return made[-1]

    mapped = wrapped(factory, config("row", train_directly=(), target_types=("Linear",)))
    pointers = {n: p.data_ptr() for n, p in made[0].named_buffers() if not n.endswith(SCALE)}
    generated = {spec.name for spec in mapped.specs}
    assert {n for n in pointers} >= generated
    assert mapped.base_0.numel() == 0  # every selected Linear is on the activation path
    assert mapped.target is made[0]
    assert all(mapped.target.get_buffer(n).data_ptr() == pointers[n] for n in generated)


@pytest.mark.parametrize("mode", MODES)
def test_eval_cache_to_double_functional_call_and_ddp_list(mode: str) -> None:
    model, x = make("attention")
    mapped = wrapped(model.float(), config(mode))
    mapped.eval()
    with torch.no_grad():
        first = mapped(x)
        assert mapped._cache is not None and f"query.{SCALE}" in mapped._cache[1]
        assert torch.equal(mapped(x), first)
        z = torch.randn(6)
        swapped = functional_call(mapped, {"latents.0": z}, (x,))
    assert not torch.allclose(swapped, first)
    double = copy.deepcopy(mapped).double()
    assert double.target.query.weight.dtype == torch.float64
    assert double.target.query.get_buffer(SCALE).dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(double(x).float(), first, rtol=1e-5, atol=1e-6)
    ignored = set(mapped.fixed_tensor_names())
    assert f"target.query.{SCALE}" in ignored and "target.query.weight" in ignored
    assert not ignored & {name for name, _ in mapped.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
def test_compiles_without_graph_breaks(mode: str) -> None:
    torch._dynamo.reset()
    model, x = make("attention")
    mapped = wrapped(model, config(mode))
    explanation = torch._dynamo.explain(mapped)(x)
    assert explanation.graph_break_count == 0, str(explanation)[:3000]
    compiled = torch.compile(mapped, backend="aot_eager", fullgraph=True)
    expected = values_and_gradients(mapped, lambda: mapped(x))
    for got, want in zip(values_and_gradients(mapped, lambda: compiled(x)), expected):
        assert_relative(got, want)


def test_parameter_groups_split_latents_and_direct_parameters() -> None:
    mapped = wrapped(make("attention")[0], config("row"))
    groups = mapped.parameter_groups()
    assert groups["latents"] == [mapped.latent]
    assert groups["direct"] == [mapped.target.head.weight, mapped.target.head.bias]
    together = [id(p) for p in groups["latents"] + groups["direct"]]
    assert sorted(together) == sorted(id(p) for p in mapped.parameters())


def test_column_mode_leaves_linear_and_conv_biases_frozen() -> None:
    mapped = wrapped(make("attention")[0], config("column"))
    frozen = {spec.name for spec in mapped.selection.frozen}
    assert {"query.bias", "up.bias", "down.bias"} <= frozen
    assert "norm.bias" in {spec.name for spec in mapped.specs}  # a LayerNorm's: the weight path
    assert mapped.materialize().query.bias.requires_grad


def test_selection_by_module_type_and_parameter_name() -> None:
    model = Attention()
    linear_weights = ["query", "key", "value", "out", "up", "down"]
    cfg = config("row", target_types=("Linear",), parameter_names=("weight",))
    mapped = wrapped(model, cfg)
    assert [s.name for s in mapped.specs] == [f"{n}.weight" for n in linear_weights]
    assert mapped.groups[0].rows == 8 * 5 + 16  # one element per output row
    assert mapped.num_generated_parameters() == 4 * 64 + 2 * 128
    counts = {
        ("Linear",): 7 * 2,
        ("LayerNorm",): 2,
        ("Embedding", "LayerNorm"): 3,
    }
    for types, count in counts.items():
        selected = wrapped(model, config(1, latent_dim=2, target_types=types, train_directly=()))
        assert len(selected.specs) == count
    biases = wrapped(model, config(1, latent_dim=2, parameter_names=("bias",)))
    assert all(s.name.endswith(".bias") for s in biases.specs) and len(biases.specs) == 7
    with pytest.raises(ValueError, match=r"target_types \['Conv2d'\] own no parameter"):
        mapnet.wrap(model, config("row", target_types=("Conv2d",)))
    with pytest.raises(ValueError, match="parameter_names pattern 'gamma'"):
        mapnet.wrap(model, config("row", parameter_names=("gamma",)))
    with pytest.raises(ValueError, match="names inside one module"):
        config("row", parameter_names=("norm.weight",))


def test_row_weights_only_keeps_the_bias_unscaled() -> None:
    """parameter_names=("weight",): y = (1 + m) ⊙ (θ_pre x) + b, on activations and weights."""
    model, x = make("attention")
    mapped = wrapped(model, config("row", parameter_names=("weight",), target_types=("Linear",)))
    activation = values_and_gradients(mapped, lambda: mapped(x))
    weight = values_and_gradients(
        mapped, lambda: functional_call(mapped.target, mapped.generate(), (x,))
    )
    for got, expected in zip(activation, weight):
        assert_relative(got, expected)
    assert torch.equal(mapped.materialize().query.bias, model.query.bias)


def test_numeric_groups_within_tensors_restart_at_every_tensor() -> None:
    model, x = make("conv")
    cfg = MappingConfig(
        latent_dim=4,
        update="multiplicative",
        group_size=5,
        groups_within_tensors=True,
        latent_init_std=0.5,
    )
    mapped = wrapped(model, cfg)
    names = [n for n, _ in model.named_parameters()]
    sizes = [model.get_parameter(n).numel() for n in names]
    assert mapped.groups[0].rows == sum(-(-size // 5) for size in sizes)
    z = mapped.latent.detach()
    m = as_matrix(mapped.projections[0]) @ (z + 0.1 * z * z)
    generated, start = mapped.generate(), 0
    for name, size in zip(names, sizes):
        count = -(-size // 5)
        factor = (1 + m[start : start + count]).repeat_interleave(5)[:size]
        start += count
        expected = model.get_parameter(name).detach().reshape(-1) * factor
        assert_relative(generated[name].detach().reshape(-1), expected, 1e-12)
    across = wrapped(model, MappingConfig(**(cfg.to_dict() | {"groups_within_tensors": False})))
    assert across.groups[0].rows == -(-sum(sizes) // 5)  # mapnet 0.2's grouping, unchanged
    with torch.no_grad():
        assert_relative(mapped(x), mapped.materialize()(x), 1e-12)


def test_config_validates_and_round_trips_the_new_settings() -> None:
    with pytest.raises(ValueError, match="needs update='multiplicative'"):
        MappingConfig(group_size="row")
    with pytest.raises(ValueError, match="group_size='rows' is not one of"):
        MappingConfig(update="multiplicative", group_size="rows")
    with pytest.raises(ValueError, match="groups_within_tensors needs"):
        MappingConfig(groups_within_tensors=True)
    cfg = config("column", target_types=["Linear"], parameter_names="weight")
    assert cfg.target_types == ("Linear",) and cfg.parameter_names == ("weight",)
    assert MappingConfig.from_dict(cfg.to_dict()) == cfg
    old = {
        k: v for k, v in MappingConfig(update="multiplicative", group_size=250).to_dict().items()
    }
    for name in ("target_types", "parameter_names", "groups_within_tensors"):
        del old[name]  # a config written by mapnet 0.2
    restored = MappingConfig.from_dict(old)
    assert restored.groups_within_tensors is False and restored.target_types is None


def test_model_space_refuses_a_layout() -> None:
    with pytest.raises(ValueError, match="row/column groups"):
        mapnet.ModelSpace(lambda: Attention(), config("row", train_directly=()), n=2)


class TiedAndReused(nn.Module):
    """A language-model shape: the head tied to the embedding, and a Linear used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(9, 4)
        self.mid = nn.Linear(4, 4)
        self.again = self.mid
        self.lm_head = nn.Linear(4, 9, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.again(torch.tanh(self.mid(self.wte(ids))))))


@pytest.mark.parametrize("mode", MODES)
def test_a_tied_head_and_a_reused_module(mode: str) -> None:
    torch.manual_seed(0)
    mapped = wrapped(perturbed(TiedAndReused()).double(), config(mode, train_directly=()))
    ids = ids_input() % 9
    units = {unit.pieces[0].name: unit.modules for unit in mapped._layouts[0]}
    assert units["wte.weight"] == ("wte", "lm_head") and units["mid.weight"] == ("mid",)
    expected = mapped(ids)
    with torch.no_grad():
        # torch's default tie_weights=True names the reused module twice and leaves a
        # swapped-in tensor in its slot: the next forward must not read it.
        functional_call(mapped.target, mapped.generate(), (ids,))
        assert torch.equal(mapped(ids), expected)
        assert_relative(mapped.materialize()(ids), expected, 1e-12)
    activation = values_and_gradients_of_latent(mapped, lambda: mapped(ids))
    weight = values_and_gradients_of_latent(
        mapped, lambda: functional_call(mapped.target, mapped.generate(), (ids,))
    )
    assert_relative(activation, weight)


def values_and_gradients_of_latent(mapped, run) -> torch.Tensor:
    mapped.zero_grad(set_to_none=True)
    run().square().sum().backward()
    return mapped.latent.grad.clone()


def test_a_reused_modules_placeholder_holds_no_graph_after_a_forward() -> None:
    mapped = mapnet.wrap(TiedAndReused(), MappingConfig(latent_dim=3, latent_init_std=0.5))
    mapped(ids_input() % 9).sum().backward()
    assert mapped.target.mid.weight.grad_fn is None
