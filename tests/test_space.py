"""ModelSpace: many latents through one mapping (batched forward, save/load, exploration)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import mapnet
from damage import edit_manifest, edit_tensors, reseal
from mapnet import CheckpointError, MappingConfig
from mapnet.space import ModelSpace


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 6) -> (B, 3)
        return self.fc2(torch.tanh(self.fc1(x)))


CONFIG = MappingConfig(latent_dim=12, seed=3)


def space(n: int = 5, config: MappingConfig = CONFIG) -> ModelSpace:
    result = ModelSpace(Net, config, n)
    with torch.no_grad():
        result.latents.normal_(generator=torch.Generator().manual_seed(0))
    return result


def test_members_start_at_the_mappings_initial_latent() -> None:
    fresh = ModelSpace(Net, CONFIG, 4)
    mapped = mapnet.wrap(Net, CONFIG)
    assert fresh.latents.shape == (4, 12) and len(fresh) == 4
    assert torch.equal(fresh.latents[2], mapped.latent.detach())
    assert [name for name, p in fresh.named_parameters() if p.requires_grad] == ["latents"]


def test_batched_forward_equals_a_loop_over_members_and_the_members_themselves() -> None:
    s = space()
    x = torch.randn(7, 6)
    batched = s(x)  # (N, B, 3)
    assert batched.shape == (5, 7, 3)
    torch.testing.assert_close(batched, s.loop_forward(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(s(x, chunk_size=2), batched, rtol=0, atol=1e-6)
    for i in range(5):
        torch.testing.assert_close(s.member(i)(x), batched[i], rtol=0, atol=1e-6)
    torch.testing.assert_close(s(x, members=[4, 1]), batched[[4, 1]], rtol=0, atol=1e-6)


def test_gradients_reach_each_members_latent_as_in_a_loop() -> None:
    s = space(3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = sum(nn.functional.cross_entropy(out, y) for out in s(x))
    (grad,) = torch.autograd.grad(loss, s.latents)
    for i in range(3):
        member = s.member(i)
        (expected,) = torch.autograd.grad(nn.functional.cross_entropy(member(x), y), member.latent)
        torch.testing.assert_close(grad[i], expected, rtol=1e-5, atol=1e-7)


def test_save_and_load_are_exact_and_keep_member_records(tmp_path: Path) -> None:
    s = space()
    s.members[1] = {"task": "mnist", "test_acc": 91.5}
    s.save(tmp_path / "space")
    again = ModelSpace.load(tmp_path / "space", Net)
    assert torch.equal(again.latents, s.latents)
    assert again.members[1] == {"task": "mnist", "test_acc": 91.5}
    x = torch.randn(4, 6)
    assert torch.equal(again(x), s(x))
    described = json.loads((tmp_path / "space" / "space.json").read_text())
    assert described["members"] == 5 and described["latent_dim"] == 12
    assert described["identity"]["projection"] == s.mapping.fingerprint()["projection"]


def test_a_space_refuses_another_mapping_and_a_corrupt_file(tmp_path: Path) -> None:
    space().save(tmp_path / "space")
    other_seed = mapnet.wrap(Net, MappingConfig(latent_dim=12, seed=4))
    with pytest.raises(CheckpointError, match="another MappingConfig"):
        ModelSpace.load(tmp_path / "space", other_seed)

    class Wider(Net):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 17)
            self.fc2 = nn.Linear(17, 3)

    with pytest.raises(CheckpointError, match="another architecture"):
        ModelSpace.load(tmp_path / "space", Wider)
    blob = tmp_path / "space" / "space.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"space\.safetensors does not match the checksum"):
        ModelSpace.load(tmp_path / "space", Net)
    with pytest.raises(CheckpointError, match="not a model space folder"):
        ModelSpace.load(tmp_path / "nothing", Net)


def test_from_members_checks_they_share_the_mapping() -> None:
    a, b = mapnet.wrap(Net, CONFIG), mapnet.wrap(Net, CONFIG)
    with torch.no_grad():
        b.latent.fill_(0.3)
    s = ModelSpace.from_members([a, b], members=[{"seed": 0}, {"seed": 1}])
    assert torch.equal(s.latents[1], b.latent.detach())
    x = torch.randn(3, 6)
    torch.testing.assert_close(s(x)[1], b(x), rtol=0, atol=1e-6)
    stranger = mapnet.wrap(Net, MappingConfig(latent_dim=12, seed=9))
    with pytest.raises(CheckpointError, match="member 1"):
        ModelSpace.from_members([a, stranger])


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: ModelSpace(Net, CONFIG, 0), ValueError, "n must be a positive"),
        (lambda: ModelSpace(Net, CONFIG, latents=torch.zeros(3, 11)), ValueError, r"\(K >= 1, 12"),
        (lambda: space()(torch.randn(2, 6), members=[5]), IndexError, "out of range for a space"),
        (lambda: space()(torch.randn(2, 6), latents=torch.zeros(2, 13)), ValueError, "shape"),
        (lambda: space().path(0, 1, steps=1), ValueError, "at least 2 steps"),
        (lambda: ModelSpace(Net, MappingConfig(latent_dim=4, train_directly="fc2.bias"), 2),
         ValueError, "trained directly"),
        (lambda: ModelSpace(lambda: nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)),
                            MappingConfig(latent_dim=4), 2), ValueError, "running statistics"),
    ],
)  # fmt: skip
def test_bad_input_is_named(make, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_non_finite_latents_are_refused_before_the_forward() -> None:
    s = space()
    with torch.no_grad():
        s.latents[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        s(torch.randn(2, 6))


def test_paths_and_soups() -> None:
    s = space(4)
    path = s.path(0, 2, steps=5)
    assert torch.equal(path[0], s.latents[0].detach())
    torch.testing.assert_close(path[-1], s.latents[2].detach())
    torch.testing.assert_close(path[2], (s.latents[0] + s.latents[2]).detach() / 2)
    torch.testing.assert_close(s.uniform_soup([1, 3]), s.latents[[1, 3]].detach().mean(0))
    # Score: closeness to member 1's latent. Member 1 ranks first; averaging it with any other
    # moves away from it, so the greedy soup is member 1 alone.
    target = s.latents[1].detach()
    soup, chosen = s.greedy_soup(lambda z: -float((z - target).norm()))
    assert chosen == [1] and torch.equal(soup, target)
    # Two identical candidates: the second keeps the score, so it joins.
    with torch.no_grad():
        s.latents[3] = s.latents[1]
    assert sorted(s.greedy_soup(lambda z: -float((z - target).norm()))[1]) == [1, 3]


def test_midpoint_loss_is_differentiable_in_both_endpoints() -> None:
    s = space(2)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    generator = torch.Generator().manual_seed(1)
    loss = s.midpoint_loss(lambda out: nn.functional.cross_entropy(out, y), x, generator=generator)
    (grad,) = torch.autograd.grad(loss, s.latents)
    assert loss.ndim == 0 and (grad.abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match="at least 2 members"):
        space(1).midpoint_loss(lambda out: out.sum(), x)
    # Drawn among members 1 and 2 only: member 0's latent gets no gradient.
    s3 = space(3)
    loss = s3.midpoint_loss(lambda out: out.square().mean(), x, pairs=4, among=[1, 2])
    (grad,) = torch.autograd.grad(loss, s3.latents)
    assert grad[0].abs().sum() == 0 and (grad[1:].abs().sum(1) > 0).all()


def test_member_forward_runs_one_member_on_its_own_inputs() -> None:
    s = space(3)
    x = torch.randn(5, 6)
    torch.testing.assert_close(s.member_forward(2, x), s(x)[2], rtol=0, atol=1e-6)


def test_latent_optimisation_fits_a_teacher_and_add_keeps_it() -> None:
    s = space(3)
    teacher = s.member(2)
    x = torch.randn(64, 6)
    with torch.no_grad():
        targets = teacher(x)

    def distance(z: torch.Tensor) -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(s(x, latents=z[None])[0], targets))

    start = s.uniform_soup([0, 1])
    fitted = s.optimise_latent(start, [(x, targets)] * 150, nn.functional.mse_loss, lr=0.05)
    assert distance(fitted) < 0.1 * distance(start)
    s.add(fitted, [{"made_by": "distillation"}])
    assert len(s) == 4 and s.members[3] == {"made_by": "distillation"}
    assert torch.equal(s.latents[3], fitted) and s.latents.requires_grad
    with pytest.raises(ValueError, match="2 member records for 1 latents"):
        s.add(fitted, [{}, {}])


def test_a_learned_base_starts_at_theta0_trains_and_round_trips(tmp_path: Path) -> None:
    fixed, learned = space(3), ModelSpace(Net, CONFIG, 3, learn_base=True)
    with torch.no_grad():
        learned.latents.copy_(fixed.latents)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch.testing.assert_close(learned(x), fixed(x), rtol=0, atol=0)  # θ₀ to begin with
    loss = sum(nn.functional.cross_entropy(out, y) for out in learned(x))
    grad_z, grad_base = torch.autograd.grad(loss, [learned.latents, learned.bases[0]])
    assert grad_base.abs().sum() > 0 and grad_z.abs().sum() > 0
    with torch.no_grad():
        learned.bases[0].add_(0.01 * grad_base)  # the shared part moves: every member changes
    moved = learned(x)
    assert not torch.allclose(moved, fixed(x))
    torch.testing.assert_close(learned.materialize_at(learned.latents[1])(x), moved[1])
    learned.save(tmp_path / "learned")
    again = ModelSpace.load(tmp_path / "learned", Net)
    assert again.bases is not None and torch.equal(again.bases[0], learned.bases[0])
    assert torch.equal(again(x), moved)
    with pytest.raises(ValueError, match="materialize_at"):
        learned.member(0)
    assert ModelSpace.load(_saved(tmp_path), Net).bases is None


def _saved(tmp_path: Path) -> Path:
    return space(2).save(tmp_path / "plain")


def test_a_given_mapped_module_is_left_alone_and_bad_additions_are_refused() -> None:
    mapped = mapnet.wrap(Net, CONFIG)
    s = ModelSpace(mapped, n=2)
    assert mapped.latent.requires_grad  # the caller's module still trains
    with torch.no_grad():
        mapped.latent.fill_(1.0)
    assert torch.equal(s.mapping.latent, torch.zeros(12))  # and the space has its own copy
    assert s.mapping.projections[0] is not None
    with pytest.raises(ValueError, match=r"\(K >= 1, 12\)"):
        s.add(torch.zeros(12, 5))  # 60 numbers: not 5 members of 12
    with pytest.raises(ValueError, match="at least one member"):
        s.uniform_soup([])
    with pytest.raises(TypeError, match="integers"):
        s.member(1.7)  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="out of range"):
        s.member(-3)


def _per_latent_mse(targets: torch.Tensor):
    return lambda outputs: ((outputs - targets) ** 2).mean(dim=(1, 2))  # (K,)


def test_fit_latents_is_plain_gradient_descent_per_latent() -> None:
    s = space(2)
    x, targets = torch.randn(8, 6), torch.randn(3, 8, 3)
    fitted = s.fit_latents(_per_latent_mse(targets), x, steps=4, count=3, step_size=0.5)
    assert fitted.shape == (3, 12) and not fitted.requires_grad
    for k in range(3):  # each latent alone, by hand: the others never enter its steps
        z = torch.zeros(12, requires_grad=True)
        for _ in range(4):
            value = ((s(x, latents=z[None])[0] - targets[k]) ** 2).mean()
            (gradient,) = torch.autograd.grad(value, z)
            z = (z - 0.5 * gradient).detach().requires_grad_(True)
        torch.testing.assert_close(fitted[k], z.detach(), rtol=1e-5, atol=1e-6)
    before = s.latents.detach().clone()
    start = torch.randn(3, 12)
    again = s.fit_latents(_per_latent_mse(targets), x, steps=1, start=start, step_size=0.5)
    assert not torch.equal(again, start) and torch.equal(s.latents, before)  # space untouched
    loss_after = _per_latent_mse(targets)(s(x, latents=fitted))
    assert (loss_after < _per_latent_mse(targets)(s(x, latents=torch.zeros(3, 12)))).all()


def test_meta_learning_the_base_and_step_sizes_through_fit_latents(tmp_path: Path) -> None:
    s = ModelSpace(Net, CONFIG, 1, learn_base=True, learn_step_sizes=0.3)
    assert s.log_step_sizes is not None
    torch.testing.assert_close(s.log_step_sizes.exp(), torch.full((12,), 0.3))
    x, targets = torch.randn(8, 6), torch.randn(4, 8, 3)
    fitted = s.fit_latents(_per_latent_mse(targets), x, steps=2, count=4, create_graph=True)
    outer = _per_latent_mse(targets)(s(x, latents=fitted)).mean()
    grad_base, grad_steps = torch.autograd.grad(outer, [s.bases[0], s.log_step_sizes])
    # The second-order meta-gradient, unrolled by hand: what a first-order shortcut would miss.
    z = torch.zeros(4, 12, requires_grad=True)
    for _ in range(2):
        inner = _per_latent_mse(targets)(s(x, latents=z)).sum()
        (gradient,) = torch.autograd.grad(inner, z, create_graph=True)
        z = z - s.log_step_sizes.exp() * gradient
    reference = torch.autograd.grad(
        _per_latent_mse(targets)(s(x, latents=z)).mean(), [s.bases[0], s.log_step_sizes]
    )
    torch.testing.assert_close(grad_base, reference[0])
    torch.testing.assert_close(grad_steps, reference[1])
    first_order = torch.autograd.grad(  # the inner gradients taken as constants
        _per_latent_mse(targets)(s(x, latents=z.detach())).mean(), s.bases[0]
    )[0]
    assert not torch.allclose(grad_base, first_order, rtol=1e-3, atol=1e-6)
    # The learned step sizes are what fit_latents uses without a step_size: equal to passing them.
    with torch.no_grad():
        s.log_step_sizes.copy_(torch.linspace(-2, 0, 12))
    learned = s.fit_latents(_per_latent_mse(targets), x, steps=2, count=4)
    given = s.fit_latents(
        _per_latent_mse(targets), x, steps=2, count=4, step_size=torch.linspace(-2, 0, 12).exp()
    )
    torch.testing.assert_close(learned, given)
    s.save(tmp_path / "meta")
    again = ModelSpace.load(tmp_path / "meta", Net)
    assert again.log_step_sizes is not None
    assert torch.equal(again.log_step_sizes, s.log_step_sizes)
    torch.testing.assert_close(again.fit_latents(_per_latent_mse(targets), x, steps=2, count=4),
                               learned, rtol=0, atol=0)  # fmt: skip
    assert ModelSpace.load(_saved(tmp_path), Net).log_step_sizes is None


def test_fit_latents_and_step_sizes_refuse_bad_input(tmp_path: Path) -> None:
    s, x = space(2), torch.randn(8, 6)
    mse = _per_latent_mse(torch.zeros(2, 8, 3))
    with pytest.raises(ValueError, match="steps must be a positive"):
        s.fit_latents(mse, x, steps=0, count=2, step_size=0.1)
    with pytest.raises(ValueError, match="pass step_size, or build the space with"):
        s.fit_latents(mse, x, steps=1, count=2)
    with pytest.raises(ValueError, match="start \\(K, d\\) or a positive count"):
        s.fit_latents(mse, x, steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="start or count, not both"):
        s.fit_latents(mse, x, steps=1, count=2, start=torch.zeros(2, 12), step_size=0.1)
    with pytest.raises(ValueError, match="start must have shape"):
        s.fit_latents(mse, x, steps=1, start=torch.zeros(2, 5), step_size=0.1)
    with pytest.raises(ValueError, match="one value per latent, shape \\(2,\\), got \\(\\)"):
        s.fit_latents(lambda out: out.sum(), x, steps=1, count=2, step_size=0.1)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="learn_step_sizes must be a positive"):
            ModelSpace(Net, CONFIG, 1, learn_step_sizes=bad)
    with pytest.raises(ValueError, match="learn_step_sizes must be a positive"):
        ModelSpace(Net, CONFIG, 1, learn_step_sizes=True)  # a bool is not a step size
    with pytest.raises(ValueError, match="one per latent dimension \\(12,\\), got shape \\(3,\\)"):
        s.fit_latents(mse, x, steps=1, count=2, step_size=torch.ones(3))
    with pytest.raises(ValueError, match=r"positive count, got count=2\.5"):
        s.fit_latents(mse, x, steps=1, count=2.5, step_size=0.1)
    # Saved step sizes that are missing, of the wrong width or not finite are refused.
    for name, saved in (("missing", None), ("narrow", torch.zeros(3)),
                        ("nan", torch.full((12,), float("nan")))):  # fmt: skip
        folder = _with_step_sizes(space(1).save(tmp_path / name), saved)
        match = {
            "missing": "lacks the tensor 'log_step_sizes'",
            "narrow": r"'log_step_sizes' has shape \(3,\), this mapping's is \(12,\)",
            "nan": "'log_step_sizes' holds NaN/inf",
        }[name]
        with pytest.raises(CheckpointError, match=match):
            ModelSpace.load(folder, Net)


def _with_step_sizes(folder: Path, log_step_sizes: torch.Tensor | None) -> Path:
    """A saved space rewritten to claim learned step sizes, holding `log_step_sizes` (or
    none), its checksums recomputed: only the step sizes are wrong."""

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        if log_step_sizes is not None:
            tensors["log_step_sizes"] = log_step_sizes

    edit_tensors(folder, "space.safetensors", "space.json", edit)
    edit_manifest(folder, "space.json", lambda d: d.update(learned_step_sizes=True))
    return folder


def test_fit_latents_works_under_no_grad() -> None:
    s, x, targets = space(2), torch.randn(8, 6), torch.randn(2, 8, 3)
    expected = s.fit_latents(_per_latent_mse(targets), x, steps=2, count=2, step_size=0.5)
    with torch.no_grad():  # encoding at evaluation time
        fitted = s.fit_latents(_per_latent_mse(targets), x, steps=2, count=2, step_size=0.5)
    torch.testing.assert_close(fitted, expected, rtol=0, atol=0)


def test_a_space_with_non_finite_latents_is_not_saved_unless_allowed(tmp_path: Path) -> None:
    s = space(4)
    with torch.no_grad():
        s.latents[2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"\['latents'\] hold NaN/inf \(latent rows \[2\]\)"):
        s.save(tmp_path / "space")
    assert not (tmp_path / "space").exists()
    s.save(tmp_path / "space", allow_nonfinite=True)
    with pytest.raises(CheckpointError, match="'latents' holds NaN/inf values"):
        ModelSpace.load(tmp_path / "space", Net)


def _tensor_edit(change: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    return lambda folder: edit_tensors(folder, "space.safetensors", "space.json", change)


def _json_edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda folder: edit_manifest(folder, "space.json", change)


def _not_safetensors(folder: Path) -> None:
    (folder / "space.safetensors").write_bytes(b"\x01\x00")
    reseal(folder, "space.json")


SPACE_DAMAGE = {
    "description is a list": (
        lambda folder: (folder / "space.json").write_text("[1]"),
        "space.json is not a JSON object but a list",
    ),
    "no config": (_json_edit(lambda d: d.pop("config")), "'config' is missing, expected a dict"),
    "records not a list": (
        _json_edit(lambda d: d.update(member_records={"a": 1})),
        "'member_records' is dict, expected a list",
    ),
    "records too few": (
        _json_edit(lambda d: d["member_records"].pop()),
        "3 members but member_records holds 2 entries",
    ),
    "members a string": (_json_edit(lambda d: d.update(members="3")), "'members' is str"),
    "unknown format": (_json_edit(lambda d: d.update(format=7)), "space format 7, this mapnet"),
    "no identity": (
        _tensor_edit(lambda t: t.pop("identity")),
        "lacks the mapping's identity",
    ),
    "not safetensors": (_not_safetensors, "is not a readable safetensors file"),
    "NaN latents": (
        _tensor_edit(lambda t: t["latents"].fill_(float("nan"))),
        "'latents' holds NaN/inf values",
    ),
    "inf latents": (
        _tensor_edit(lambda t: t["latents"][0].fill_(float("inf"))),
        "'latents' holds NaN/inf values",
    ),
    "int32 latents": (
        _tensor_edit(lambda t: t.update(latents=t["latents"].to(torch.int32))),
        "'latents' has dtype torch.int32, not a floating type",
    ),
    "one member short": (
        _tensor_edit(lambda t: t.update(latents=t["latents"][:2].clone())),
        r"'latents' has shape \(2, 12\), this mapping's is \(3, 12\)",
    ),
    "a stray tensor": (
        _tensor_edit(lambda t: t.update(extra=torch.zeros(1))),
        r"holds tensors a space does not: \['extra'\]",
    ),
}


@pytest.mark.parametrize("kind", SPACE_DAMAGE)
def test_a_damaged_space_is_a_checkpoint_error_naming_the_problem(
    tmp_path: Path, kind: str
) -> None:
    """Even with its checksums recomputed, a space whose description or tensors do not make
    sense is refused before it is built."""
    damage, message = SPACE_DAMAGE[kind]
    folder = space(3).save(tmp_path / "space")
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        ModelSpace.load(folder, Net)


def test_a_format_1_space_still_loads(tmp_path: Path) -> None:
    s = space(2)
    folder = s.save(tmp_path / "space")
    blob = (folder / "space.safetensors").read_bytes()

    def as_format_1(description: dict) -> None:
        del description["files"]
        description |= {"format": 1, "tensors_sha256": hashlib.sha256(blob).hexdigest()}

    edit_manifest(folder, "space.json", as_format_1)
    assert torch.equal(ModelSpace.load(folder, Net).latents, s.latents)
