"""Edge cases of the MappedModule contract found in review: loads that must be no-ops, stored
bases of other dtypes, strict=False, tied frozen parameters, nested DDP, the eval cache's key,
attribute fall-through and θ₀ regenerated in its last bits elsewhere."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mapnet
from mapnet.config import MappingConfig
from mapnet.errors import CheckpointError
from mapnet.loss import MappingLoss


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (B, 6) -> (B, 8)
        return torch.relu(self.bn(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 6) -> (B, 3)
        return self.fc2(self.encode(x))


def x_batch() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(3))


def outputs(mapped: nn.Module) -> torch.Tensor:
    mapped.eval()
    with torch.no_grad():
        return mapped(x_batch())


def stepped(mapped: mapnet.MappedModule) -> mapnet.MappedModule:
    with torch.no_grad():
        for z in mapped.latents:
            z.add_(torch.linspace(-0.5, 0.5, z.numel()))
    return mapped


def test_loading_its_own_state_changes_nothing_with_base_zero(tmp_path) -> None:
    """base='zero' with init_std gains: the gains' reference θ₀ is not kept, so a load must not
    re-derive them (it used to set them all to the constant-tensor gain)."""
    config = mapnet.MappingConfig(latent_dim=12, base="zero", latent_init_std=1.0)
    mapped = mapnet.wrap(Net, config)
    before, gains = outputs(mapped), [list(g) for g in mapped.gains]
    mapped.load_state_dict(mapped.state_dict())
    assert mapped.gains == gains
    assert torch.equal(outputs(mapped), before)
    loaded = mapnet.load(mapnet.save(mapped, tmp_path / "c"), Net)
    assert torch.equal(outputs(loaded), before)


def test_base_zero_with_another_reference_initialisation_is_refused() -> None:
    class Wider(Net):
        def __init__(self) -> None:
            super().__init__()
            with torch.no_grad():
                self.fc1.weight.mul_(5)  # same shapes, another spread: other gains

    config = mapnet.MappingConfig(latent_dim=12, base="zero", latent_init_std=1.0)
    state = mapnet.wrap(Net, config).state_dict()
    with pytest.raises(CheckpointError, match=r"gains of \['fc1.weight'\]"):
        mapnet.wrap(Wider, config).load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stored_bases_of_a_half_precision_target_are_taken(dtype: torch.dtype) -> None:
    config = mapnet.MappingConfig(latent_dim=12, base="model", store_base=True)
    torch.manual_seed(0)
    source = stepped(mapnet.wrap(Net().to(dtype), config))
    torch.manual_seed(1)
    other = mapnet.wrap(Net().to(dtype), config)  # other pretrained weights
    other.load_state_dict(source.state_dict())
    x = x_batch().to(dtype)
    source.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), source(x))


def test_strict_false_loads_a_partial_state_and_ignores_extra_keys() -> None:
    source = stepped(mapnet.wrap(Net, latent_dim=12))
    mapped = mapnet.wrap(Net, latent_dim=12)
    state = source.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("target.bn.")}
    partial["extra.weight"] = torch.zeros(2)
    result = mapped.load_state_dict(partial, strict=False)
    assert "extra.weight" in result.unexpected_keys
    assert any(k.startswith("target.bn.") for k in result.missing_keys)
    assert torch.equal(mapped.latent, source.latent)
    with pytest.raises(CheckpointError, match=r"missing 'target\.bn\.running_mean'"):
        mapped.load_state_dict({k: v for k, v in partial.items() if k != "extra.weight"})


def test_a_tied_frozen_parameter_saves_and_loads(tmp_path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    config = mapnet.MappingConfig(latent_dim=6, exclude_modules=("emb",), latent_init_std=0.5)
    mapped = mapnet.wrap(Tied, config)
    assert not mapped.target.emb.weight.requires_grad
    loaded = mapnet.load(mapnet.save(mapped, tmp_path / "c"), Tied)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), mapped(ids))
    assert loaded.target.head.weight is loaded.target.emb.weight


def test_nested_mapped_modules_are_excluded_from_ddp() -> None:
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mapnet.wrap(Net, latent_dim=12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    parent = Parent()
    names = mapnet.exclude_fixed_from_ddp(parent)
    assert "body.base_0" in names and "body.projections.0.sources" in names
    assert "body.target.fc1.weight" in names and "body.target.bn.running_mean" not in names
    # DDP itself runs in a fresh process: tearing a gloo group down inside the test process
    # once hung (the reducer's last reference dropped while gloo's worker waited for the GIL).
    code = textwrap.dedent(
        """
        import os, socket, sys, torch
        from torch import nn
        sys.path.insert(0, sys.argv[1])
        import mapnet
        from test_module_edges import Net, x_batch

        class Parent(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = mapnet.wrap(Net, latent_dim=12)

            def forward(self, x):
                return self.body(x)

        parent = Parent()
        mapnet.exclude_fixed_from_ddp(parent)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        # gloo cannot broadcast the int16 table: construction fails unless it is excluded.
        ddp = nn.parallel.DistributedDataParallel(parent)
        ddp(x_batch()).sum().backward()
        assert parent.body.latent.grad is not None
        print("ok", flush=True)
        os._exit(0)  # no teardown to wait on
        """
    )
    tests = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", code, tests], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr[-2000:]


def test_mapping_loss_follows_gains_changed_by_a_load() -> None:
    config = mapnet.MappingConfig(latent_dim=12, base="model", store_base=True)
    torch.manual_seed(0)
    source = mapnet.wrap(Net(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        other_net = Net()
        other_net.fc1.weight.mul_(3)
    target = mapnet.wrap(other_net, config)
    loss = MappingLoss(target, stability=False)
    target.load_state_dict(source.state_dict())
    fresh = MappingLoss(target, stability=False)
    torch.testing.assert_close(loss.smoothness_loss(), fresh.smoothness_loss())
    torch.testing.assert_close(loss.alignment_loss(), fresh.alignment_loss())


def test_eval_cache_follows_theta0_and_skips_swapped_latents() -> None:
    mapped = mapnet.wrap(Net, latent_dim=12)
    before = outputs(mapped)
    with torch.no_grad():
        mapped.base_0.mul_(2)  # θ₀ changed in place
    assert not torch.equal(outputs(mapped), before)
    z = torch.full_like(mapped.latent, 0.3)
    swapped = functional_call(mapped, {"latents.0": z}, (x_batch(),))
    z.add_(0.2)  # same tensor, changed: a cached result would not follow
    with torch.no_grad():
        again = functional_call(mapped, {"latents.0": z}, (x_batch(),))
    assert not torch.equal(swapped, again)


def test_attributes_of_the_target_and_running_its_methods_on_generated_weights() -> None:
    mapped = stepped(mapnet.wrap(Net, latent_dim=12)).eval()
    x = x_batch()
    assert mapped.fc1 is mapped.target.fc1
    with mapped.applied() as net:
        encoded = net.encode(x)
    g, bn = mapped.generate(), mapped.target.bn
    linear = nn.functional.linear(x, g["fc1.weight"], g["fc1.bias"])
    normed = nn.functional.batch_norm(
        linear, bn.running_mean, bn.running_var, g["bn.weight"], g["bn.bias"], training=False
    )
    torch.testing.assert_close(encoded, torch.relu(normed))
    assert not torch.allclose(encoded, mapped.target.encode(x))  # directly: θ₀, not generated
    layerwise = mapnet.wrap(Net, latent_dim=3, strategy="layerwise")
    with pytest.raises(AttributeError, match="one latent per layer"):
        _ = layerwise.latent


def test_to_empty_is_refused() -> None:
    with pytest.raises(TypeError, match="to_empty"):
        mapnet.wrap(Net, latent_dim=12).to_empty(device="cpu")


def test_theta0_differing_in_last_bits_loads_with_a_warning_and_a_real_change_fails() -> None:
    """Another CPU's vectorised normal_ or another LAPACK thread count regenerates θ₀ a few ulps
    away: the digest differs, the sketch agrees, the state loads with a warning."""
    config = mapnet.MappingConfig(latent_dim=12, base="model")
    torch.manual_seed(0)
    net = Net()
    state = stepped(mapnet.wrap(net, config)).state_dict()
    nudged = Net()
    nudged.load_state_dict(net.state_dict())
    with torch.no_grad():
        nudged.fc1.weight.copy_(torch.nextafter(nudged.fc1.weight, torch.tensor(1.0)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapnet.wrap(nudged, config).load_state_dict(state)
    messages = [str(w.message) for w in caught if "differs from the saved one" in str(w.message)]
    assert len(messages) == 1 and "(fc1.weight)" in messages[0]  # one warning per load
    with torch.no_grad():
        nudged.fc1.weight.view(-1)[7].neg_()  # one entry changed: the weighted sums see it
    with pytest.raises(CheckpointError, match=r"'fc1\.weight' differs"):
        mapnet.wrap(nudged, config).load_state_dict(state)
    nudged.load_state_dict(net.state_dict())
    with torch.no_grad():
        nudged.fc1.weight.add_(0.01)
    with pytest.raises(CheckpointError, match=r"'fc1\.weight' differs"):
        mapnet.wrap(nudged, config).load_state_dict(state)


def test_materialize_keeps_the_parameter_order_and_trainability() -> None:
    config = mapnet.MappingConfig(
        latent_dim=6, train_directly=("bn.bias",), exclude_modules=("fc2",)
    )
    plain = mapnet.wrap(Net, config).materialize()
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in Net().named_parameters()]
    assert all(p.requires_grad for p in plain.parameters())  # fc2 was frozen by the mapping only


def test_unpickled_placeholders_are_views_of_theta0_again() -> None:
    import pickle

    mapped = stepped(mapnet.wrap(Net, latent_dim=12))
    copy_ = pickle.loads(pickle.dumps(mapped))
    theta0 = copy_.base_0.untyped_storage().data_ptr()
    assert copy_.target.fc2.weight.untyped_storage().data_ptr() == theta0
    assert torch.equal(outputs(copy_), outputs(mapped))


def test_wrap_holds_at_most_the_weights_theta0_and_w() -> None:
    """Finding 11: wrap() made ~5 transient copies of the weights. Now a factory's model is
    copied once into θ₀ and freed before W is built, so the peak stays within weights + θ₀ + W
    (6.3M parameters: past 2^22, W keeps int8 signs and one gain per tensor)."""
    from mapnet_experiments.bench.peak_memory import PeakMemory

    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(2500, 2500), nn.ReLU(), nn.Linear(2500, 10))

    with PeakMemory("allocator") as peak:
        mapped = mapnet.wrap(factory, latent_dim=256)
    weights = sum(p.numel() * 4 for p in factory().parameters())
    budget = weights + mapped.projection_bytes() + weights  # weights, W, one θ₀
    assert mapped.projection_bytes() <= 3.1 * mapped.num_generated_parameters()
    assert peak.result()["peak_bytes"] <= budget


def test_a_partial_state_for_other_base_weights_changes_nothing_even_through_a_parent() -> None:
    """Through a parent, torch reports missing keys only after loading: a state that would
    replace θ₀ must be complete before any of it is taken."""
    config = mapnet.MappingConfig(latent_dim=12, base="model", store_base=True)
    torch.manual_seed(0)
    source = nn.ModuleDict({"inner": stepped(mapnet.wrap(Net(), config))})
    torch.manual_seed(1)
    target = nn.ModuleDict({"inner": mapnet.wrap(Net(), config)})
    state = source.state_dict()
    del state["inner.latents.0"]
    before = target.inner.base_0.clone()
    with pytest.raises(CheckpointError, match=r"partial state for other base weights"):
        target.load_state_dict(state)
    assert torch.equal(target.inner.base_0, before)


class Masked(nn.Module):
    """A linear layer, batch statistics, and a buffer that holds -inf by design."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("mask", torch.tensor([0.0, -math.inf, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x)) + self.mask


@pytest.mark.parametrize(
    ("key", "value"),
    [("target.norm.running_mean", math.nan), ("target.norm.running_var", math.inf),
     ("target.fc.bias", -math.inf)],
)  # fmt: skip
def test_non_finite_statistics_and_directly_trained_weights_are_refused_before_loading(
    key: str, value: float, tmp_path: Path
) -> None:
    config = MappingConfig(latent_dim=4, train_directly=("fc.bias",))
    state = mapnet.wrap(Masked(), config).state_dict()
    state[key] = state[key].clone()
    state[key][1] = value
    state["latents.0"] = torch.full((4,), 0.5)
    receiver = mapnet.wrap(Masked(), config)
    before = {k: v.clone() for k, v in receiver.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"non-finite values \(NaN/inf\) in \['{key}'\]"):
        receiver.load_state_dict(state)
    after = receiver.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "_extra_state")
    owner, _, name = key.rpartition(".")
    with torch.no_grad():  # the same value reached by training is not saved either
        getattr(receiver.get_submodule(owner), name)[1] = value
    with pytest.raises(ValueError, match=rf"\['{key}'\] hold NaN/inf"):
        mapnet.save(receiver, tmp_path / "ckpt")


def test_a_buffer_holding_inf_by_design_still_loads_and_saves(tmp_path: Path) -> None:
    config = MappingConfig(latent_dim=4, train_directly=("fc.bias",))
    mapped = mapnet.wrap(Masked(), config)
    again = mapnet.load(mapnet.save(mapped, tmp_path / "ckpt"), Masked())
    assert torch.equal(again.target.mask, mapped.target.mask)


def test_a_tree_is_checked_whole_before_torch_writes_any_of_it() -> None:
    """torch loads a parent module by module; mapnet.load_state_dict refuses before any."""

    def tree(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.ModuleDict(
            {"head": nn.Linear(3, 3), "body": mapnet.wrap(nn.Linear(4, 3), latent_dim=5, seed=seed)}
        )

    state = tree(1).state_dict()  # a body mapped with seed 1: not this tree's mapping
    receiver = tree(0)
    head = receiver["head"].weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"MappedModule at 'body\.' was saved with another"):
        mapnet.load_state_dict(receiver, state)
    assert torch.equal(receiver["head"].weight, head)  # nothing was written
    with pytest.raises(CheckpointError, match="another MappingConfig"):
        receiver.load_state_dict(state)  # torch alone: the head was written before the refusal
    assert not torch.equal(receiver["head"].weight, head)

    same = tree(0)
    source = tree(0)
    with torch.no_grad():
        source["body"].latent.fill_(0.25)
        source["head"].bias.fill_(2.0)
    missing = {k: v for k, v in source.state_dict().items() if k != "head.bias"}
    with pytest.raises(CheckpointError, match=r"missing 'head\.bias'"):
        mapnet.load_state_dict(same, missing)
    assert torch.equal(same["body"].latent, torch.zeros(5))
    result = mapnet.load_state_dict(same, source.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(same["body"].latent, source["body"].latent)
    assert torch.equal(same["head"].bias, source["head"].bias)
