"""peft LoRA / VeRA baselines: analytic counts equal what peft builds, only adapters and head
train, budgets map to the closest rank/targets, errors name the problem, checkpoint bytes are
what save_pretrained writes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from mapnet_experiments.models import peft_adapters as pb
from mapnet_experiments.models.networks import ResNet50

HEAD = "fc"


class SmallCNN(nn.Module):
    """Every layer kind of the real targets: 3×3, 1×1 (one strided), depthwise, Linear, BN."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 12, 1, stride=2, bias=False)
        self.hidden = nn.Linear(12, 6)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        x = torch.relu(self.bn(self.stem(x)))
        x = self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))
        return self.fc(torch.relu(self.hidden(x.mean((2, 3)))))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN()


HEAD_NUMEL = 6 * 5 + 5  # SmallCNN's fc: the trainable copy peft's modules_to_save makes


def trainable_names(peft_model: nn.Module) -> set[str]:
    return {n for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on grouped convs and unsaved projections
        yield


def batch() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# --- counts and trainability ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "expected_modules"),
    [
        (None, ["stem", "expand", "project", "hidden"]),  # depthwise and head left out
        (["expand", "project"], ["expand", "project"]),
        (r"(stem|hidden)", ["stem", "hidden"]),
    ],
)
@pytest.mark.parametrize("rank", [1, 3])
def test_lora_count_equals_peft_and_only_adapters_and_head_train(targets, expected_modules, rank):
    model = small_cnn()
    assert pb.resolve_targets(model, "lora", targets, HEAD) == expected_modules
    expected = pb.adapter_parameter_count(model, rank, "lora", targets, head=HEAD)
    peft_model = pb.apply_lora(model, rank, targets, HEAD)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == expected + HEAD_NUMEL
    adapters = {
        f"base_model.model.{m}.lora_{ab}.default.weight" for m in expected_modules for ab in "AB"
    }
    head = {f"base_model.model.fc.modules_to_save.default.{p}" for p in ("weight", "bias")}
    assert trainable_names(peft_model) == adapters | head


def test_lora_on_depthwise_conv_needs_rank_multiple_of_groups():
    model = small_cnn()
    # lora_A is dense (16·3·3 per rank) and lora_B grouped (16/16 per rank): 16·(144 + 1).
    assert pb.adapter_parameter_count(model, 16, "lora", ["dw"], head=HEAD) == 16 * 145
    peft_model = pb.apply_lora(model, 16, ["dw"], HEAD)
    assert peft_model.get_nb_trainable_parameters()[0] == 16 * 145 + HEAD_NUMEL
    with pytest.raises(ValueError, match=r"multiple of 16"):
        pb.adapter_parameter_count(small_cnn(), 3, "lora", ["dw"], head=HEAD)
    with pytest.raises(ValueError, match=r"multiple of 16"):
        pb.apply_lora(small_cnn(), 3, ["dw"], HEAD)
    assert pb.rank_for_budget(small_cnn(), 5000, "lora", ["dw"], head=HEAD) == 32
    with pytest.raises(ValueError, match=r"cannot merge"):
        pb.merge_for_eval(pb.apply_lora(small_cnn(), 16, ["dw"], HEAD))


def vera_model() -> tuple[SmallCNN, list[str]]:
    model = small_cnn()
    return model, pb.pointwise_convs_as_linear(model, exclude=HEAD)


def test_pointwise_conversion_keeps_the_function():
    reference = small_cnn().eval()
    model, converted = vera_model()
    assert converted == ["expand.linear", "project.linear"]  # the strided one included
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch()), reference(batch()))


@pytest.mark.parametrize("rank", [1, 4])
def test_vera_count_equals_peft_and_only_lambdas_and_head_train(rank):
    model, _ = vera_model()
    targets = pb.eligible_modules(model, "vera", HEAD)
    assert targets == ["expand.linear", "project.linear", "hidden"]
    expected = pb.adapter_parameter_count(model, rank, "vera", targets, head=HEAD)
    assert expected == (16 + 12 + 6) + 3 * rank  # λ_b per output, λ_d per rank
    peft_model = pb.apply_vera(model, rank, targets, HEAD)
    assert peft_model.get_nb_trainable_parameters()[0] == expected + HEAD_NUMEL
    lambdas = {f"base_model.model.{m}.vera_lambda_{bd}.default" for m in targets for bd in "bd"}
    head = {f"base_model.model.fc.modules_to_save.default.{p}" for p in ("weight", "bias")}
    assert trainable_names(peft_model) == lambdas | head
    # One shared A (r × largest in) and B (largest out × r), frozen.
    assert peft_model.base_model.vera_A["default"].shape == (rank, 16)
    assert peft_model.base_model.vera_B["default"].shape == (16, rank)


# --- forward, backward, reproducibility ------------------------------------------------------


def train_steps(peft_model: nn.Module, steps: int) -> dict[str, torch.Tensor]:
    """Gradients of the last of `steps` SGD steps, by parameter name."""
    optimiser = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    target = torch.arange(4) % 5
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(peft_model(batch()), target).backward()
        optimiser.step()
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


def test_lora_gradients_reach_both_factors():
    peft_model = pb.apply_lora(small_cnn(), 2, None, HEAD)
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]
    grads = train_steps(peft_model, 1)
    # lora_B starts at zero, so at step 1 only B (and the head) see a gradient ...
    assert all(
        g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n or "modules_to_save" in n
    )
    # ... and once B has moved, A does too.
    grads = train_steps(peft_model, 1)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in frozen)


def test_vera_gradients_reach_both_scalings():
    model, _ = vera_model()
    peft_model = pb.apply_vera(model, 3, None, HEAD)
    grads = train_steps(peft_model, 1)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lambda_b" in n)  # λ_b starts at 0
    grads = train_steps(peft_model, 1)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_seed_fixes_the_init_and_leaves_the_callers_generator_alone():
    def lora_a(seed: int, model: nn.Module | None = None) -> torch.Tensor:
        peft_model = pb.apply_lora(model or small_cnn(), 2, ["expand"], HEAD, seed=seed)
        return peft_model.base_model.model.expand.lora_A["default"].weight.detach().clone()

    model = small_cnn()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = lora_a(0, model)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first, lora_a(0))
    assert not torch.equal(first, lora_a(1))


def test_merge_for_eval_matches_the_adapted_model():
    peft_model = pb.apply_lora(small_cnn(), 2, None, HEAD)
    train_steps(peft_model, 2)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(batch())
        merged = pb.merge_for_eval(peft_model)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(batch()), adapted, rtol=1e-4, atol=1e-5)


def test_freeze_batchnorm_statistics():
    peft_model = pb.apply_lora(small_cnn(), 1, None, HEAD)
    peft_model.train()
    assert pb.freeze_batchnorm_statistics(peft_model) == 1
    statistics = peft_model.base_model.model.bn.running_mean.clone()
    train_steps(peft_model, 1)
    assert torch.equal(peft_model.base_model.model.bn.running_mean, statistics)


# --- budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "vera"])
@pytest.mark.parametrize("budget", [60, 333, 1000, 4321])
def test_rank_for_budget_is_the_closest_rank(method, budget):
    model, _ = vera_model() if method == "vera" else (small_cnn(), None)
    count = {r: pb.adapter_parameter_count(model, r, method, head=HEAD) for r in range(1, budget)}
    best = min(count, key=lambda r: (abs(count[r] - budget), r))
    assert pb.rank_for_budget(model, budget, method, head=HEAD) == best


def test_budget_below_the_smallest_adapter_is_an_error():
    model = small_cnn()
    smallest = pb.adapter_parameter_count(model, 1, "lora", head=HEAD)  # 27+8 + 8+16 + 16+12 + 18
    assert pb.rank_for_budget(model, smallest // 2 + 1, "lora", head=HEAD) == 1
    with pytest.raises(ValueError, match=rf"budget {smallest // 2} is too small.*{smallest}"):
        pb.rank_for_budget(model, smallest // 2, "lora", head=HEAD)
    with pytest.raises(ValueError, match=r"too small.*hidden"):
        pb.targets_for_budget(model, 5, "lora", head=HEAD)  # hidden alone: 12 + 6 = 18
    with pytest.raises(ValueError, match=r"budget must be a positive integer"):
        pb.rank_for_budget(model, 0, "lora", head=HEAD)


def test_targets_for_budget_takes_the_closest_run_of_last_modules():
    model = small_cnn()
    eligible = pb.eligible_modules(model, "lora", HEAD)  # stem, expand, project, hidden
    rank1 = [pb.adapter_parameter_count(model, 1, "lora", [n], head=HEAD) for n in eligible]
    assert rank1 == [27 + 8, 8 + 16, 16 + 12, 12 + 6]
    assert pb.targets_for_budget(model, 20, "lora", head=HEAD) == ["hidden"]  # 18
    assert pb.targets_for_budget(model, 40, "lora", head=HEAD) == ["project", "hidden"]  # 46
    assert pb.targets_for_budget(model, 40, "lora", head=HEAD, rank=2) == ["hidden"]  # 36
    plan = pb.plan_for_budget(model, 60, "lora", head=HEAD)  # rank 1 everywhere is 105
    assert (plan.targets, plan.rank, plan.adapter_count) == (("expand", "project", "hidden"), 1, 70)
    plan = pb.plan_for_budget(model, 400, "lora", head=HEAD)  # fits: all modules, rank 4 = 420
    assert (plan.targets, plan.rank, plan.adapter_count) == (tuple(eligible), 4, 420)
    peft_model = pb.apply_lora(model, plan.rank, plan.targets, HEAD)
    assert peft_model.get_nb_trainable_parameters()[0] == 420 + HEAD_NUMEL


# --- errors -------------------------------------------------------------------------------------


def test_clear_errors():
    model = small_cnn()
    with pytest.raises(ValueError, match=r"unknown method 'ia3'"):
        pb.adapter_parameter_count(model, 1, "ia3", head=HEAD)
    with pytest.raises(ValueError, match=r"match no module: \['conv9'\]"):
        pb.apply_lora(model, 1, ["expand", "conv9"], HEAD)
    with pytest.raises(ValueError, match=r"pattern 'layer4.*' matches no module"):
        pb.rank_for_budget(model, 100, "lora", "layer4.*", head=HEAD)
    with pytest.raises(ValueError, match=r"stem is a Conv2d: peft's VeRA adapts only nn.Linear"):
        pb.apply_vera(model, 4, ["stem", "hidden"], HEAD)
    with pytest.raises(ValueError, match=r"expand is a Conv2d.*pointwise_convs_as_linear"):
        pb.adapter_parameter_count(model, 4, "vera", ["expand"], head=HEAD)
    with pytest.raises(ValueError, match=r"bn is a BatchNorm2d"):
        pb.apply_lora(model, 1, ["bn"], HEAD)
    with pytest.raises(ValueError, match=r"inside the head"):
        pb.apply_lora(model, 1, ["fc"], HEAD)
    with pytest.raises(ValueError, match=r"rank must be a positive integer"):
        pb.apply_lora(model, 0, None, HEAD)
    with pytest.raises(ValueError, match=r"head 'classifier' is not a module"):
        pb.apply_lora(model, 1, None, "classifier")
    model.sfc = nn.Linear(2, 2)  # peft would also wrap it as part of the head
    with pytest.raises(ValueError, match=r"ambiguous.*\['sfc'\]"):
        pb.apply_lora(model, 1, ["expand"], HEAD)
    dilated = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"dilation"):
        pb.apply_lora(dilated, 1, ["0"], "1")
    # VeRA on a plain CNN: the only Linear is the head, so there is nothing to adapt.
    cnn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no nn.Linear outside the head '2'.*VeRA"):
        pb.plan_for_budget(cnn, 100, "vera", head="2")


# --- checkpoint bytes ---------------------------------------------------------------------------


def saved_bytes(peft_model: nn.Module, folder: Path) -> int:
    peft_model.save_pretrained(str(folder))
    return (folder / "adapter_model.safetensors").stat().st_size


def test_adapter_state_bytes_is_the_save_pretrained_file(tmp_path: Path):
    peft_model = pb.apply_lora(small_cnn(), 2, None, HEAD)
    lora_bytes = pb.adapter_state_bytes(peft_model)
    assert lora_bytes == saved_bytes(peft_model, tmp_path / "lora")
    numbers = pb.adapter_parameter_count(small_cnn(), 2, "lora", head=HEAD) + HEAD_NUMEL
    assert 4 * numbers < lora_bytes < 4 * numbers + 2000  # float32 payload + header

    sizes = {}
    for save_projection in (False, True):
        model, targets = vera_model()
        peft_model = pb.apply_vera(model, 8, targets, HEAD, save_projection=save_projection)
        sizes[save_projection] = pb.adapter_state_bytes(peft_model)
        assert sizes[save_projection] == saved_bytes(peft_model, tmp_path / f"v{save_projection}")
    assert sizes[True] - sizes[False] >= 4 * 8 * (16 + 16)  # A (8 × 16) and B (16 × 8)


# --- the real network, once -------------------------------------------------------------------


def test_resnet50_budgets_match_peft():
    model = ResNet50(num_classes=10)
    with pytest.raises(ValueError, match=r"no nn.Linear outside the head 'fc'"):
        pb.eligible_modules(model, "vera", HEAD)
    # Rank 1 on every conv is 79,443 numbers: 2k and 10k keep only the last convs of layer4.
    assert pb.adapter_parameter_count(model, 1, "lora", head=HEAD) == 79_443
    plan = pb.plan_for_budget(model, 2_000, "lora", head=HEAD)
    assert (plan.targets, plan.rank, plan.adapter_count) == (("layer4.2.conv3",), 1, 2_560)
    plan = pb.plan_for_budget(model, 10_000, "lora", head=HEAD)
    assert plan.targets == ("layer4.2.conv1", "layer4.2.conv2", "layer4.2.conv3")
    peft_model = pb.apply_lora(model, plan.rank, plan.targets, HEAD)
    assert peft_model.get_nb_trainable_parameters()[0] == 10_240 + 2048 * 10 + 10
    with torch.no_grad():
        assert peft_model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
