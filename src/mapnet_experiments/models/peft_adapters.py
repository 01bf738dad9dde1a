"""peft's LoRA and VeRA as fine-tuning baselines for CNNs, at a chosen number of trainable numbers;
LoRA, VeRA and IA3 on a BERT's named layers, and BitFit (the biases), for the fine-tuning bench.

The comparison with mapnet needs three things peft does not give directly: the adapter size
*before* building anything (to pick a rank for a budget), a target rule for budgets that even
rank 1 everywhere overshoots, and the checkpoint size. What peft 0.21.2 does with CNN layers,
read from its source (paths under site-packages/peft):

LoRA (tuners/lora/layer.py)
    nn.Conv2d and nn.Linear are adapted (`dispatch_default`, line 2742). On a conv, lora_A is a
    conv in -> r with the base kernel, stride and padding, lora_B a 1×1 conv r -> out with the
    base groups (lines 1625-1628): r·(in·kh·kw + out/groups) numbers. Grouped and depthwise convs
    work only when r is a multiple of `groups` (ValueError, line 1565) and cannot be merged
    (line 1684); lora_A stays dense, so a depthwise conv costs at least 9·C² numbers — they are
    never default targets here. lora_A drops the base conv's dilation (line 1625), so a dilated
    conv crashes in forward with a shape mismatch; it is refused here instead.
VeRA (tuners/vera/model.py, layer.py)
    Only nn.Linear and transformers' Conv1D (model.py lines 39-46); an nn.Conv2d target raises a
    TypeError (line 239), or "No layers types compatible with VeRA" when nothing else is targeted
    (line 142). One frozen pair A (r × max in), B (max out × r) is shared by all targets, sized to
    the largest in/out and sliced per layer (model.py 147-160, layer.py 280-281), so shapes need
    not match. Trainable per layer: λ_b (out, zeros) and λ_d (r, filled with `d_initial`)
    (layer.py 89-90, 135-139). A and B are drawn from `projection_prng_key`; `save_projection`
    (default True) decides whether they go into the checkpoint (model.py 150-152, 277-286).
    For CNNs, `pointwise_convs_as_linear` rewrites 1×1 convs as an nn.Linear over channels (the
    same function), which is the only way VeRA reaches a conv backbone.
Head (`modules_to_save`)
    The head is wrapped in a ModulesToSaveWrapper: a frozen original plus a trainable copy, which
    is saved, so the trainable count is adapters + the head's own parameters. peft finds it by a
    plain `key.endswith(name)` (utils/other.py line 1088), so "fc" would also catch "se.fc" or
    "sfc"; `apply_lora`/`apply_vera` refuse such an ambiguous head name.

Target names follow peft's rules: a string is a regular expression matched in full against each
module name, a sequence holds names matched exactly or as a dotted suffix ("conv3" matches
"layer4.2.conv3"). The resolved names are handed to peft as an anchored pattern, so peft adapts
exactly the modules counted here. Order is registration order (`named_modules`), which for the
torchvision layouts is forward order except that a block's `downsample` is registered after conv3.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:  # peft is the optional `finetune` extra; the counting needs only torch.
    from peft import PeftModel

Method = Literal["lora", "vera"]
TargetModules = str | Sequence[str] | None
METHODS: tuple[str, ...] = ("lora", "vera")

# peft's own default (LoraConfig.lora_alpha, tuners/lora/config.py line 652): the baseline is
# peft's LoRA as users get it; the scaling is alpha / r.
DEFAULT_LORA_ALPHA = 8


@dataclass(frozen=True)
class BudgetPlan:
    """The adapter `plan_for_budget` chose: targets (registration order), rank, exact count."""

    method: str
    budget: int
    rank: int
    targets: tuple[str, ...]
    adapter_count: int  # trainable numbers besides the head

    @property
    def relative_error(self) -> float:
        return (self.adapter_count - self.budget) / self.budget


class PointwiseLinear(nn.Module):
    """A 1×1 convolution (groups 1, no padding) written as an nn.Linear over the channels.

    Same function and the same weights as the conv it replaces; it exists so that VeRA, which
    peft implements for nn.Linear only, can adapt pointwise convs. The permutations stay outside
    `linear`, so peft's wrapper around `linear` sees (…, channels) tensors as it expects.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not _is_pointwise(conv):
            raise ValueError(f"PointwiseLinear needs a 1×1 conv with groups 1, padding 0: {conv}")
        self.stride: tuple[int, int] = (conv.stride[0], conv.stride[1])
        self.linear = nn.Linear(
            conv.in_channels,
            conv.out_channels,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.flatten(1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)
        self.linear.requires_grad_(conv.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        if self.stride != (1, 1):  # a strided 1×1 conv reads every s-th pixel
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _is_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and (module.padding in ((0, 0), "valid", "same"))  # "same" is 0 for a 1×1 kernel
    )


def pointwise_convs_as_linear(model: nn.Module, exclude: str | None = None) -> list[str]:
    """Replace every 1×1 conv (groups 1, padding 0) outside `exclude` by a `PointwiseLinear`, in
    place, and return the names of the new nn.Linear layers (`<conv name>.linear`, registration
    order): the VeRA targets of a CNN.

    Load pretrained weights before converting: a converted conv's weight moves to
    `<name>.linear.weight` and loses its 1×1 dims. Reloading a VeRA checkpoint needs the same
    conversion applied to the base model first.
    """
    converted = []
    for name, module in list(model.named_modules()):
        if not name or (exclude is not None and _inside(name, exclude)):
            continue
        if _is_pointwise(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PointwiseLinear(module))
            converted.append(f"{name}.linear")
    return converted


def freeze_batchnorm_statistics(model: nn.Module) -> int:
    """Put every BatchNorm in eval mode and return how many there are.

    peft's checkpoint holds adapters and head only, not BatchNorm running statistics, so a model
    whose statistics drift during training cannot be restored from it. Call after each
    `model.train()` to keep the pretrained statistics (the affine γ, β are frozen by peft anyway).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.eval()
    return len(layers)


# ---------------------------------------------------------------------------------------------
# Which modules


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    return method


def _inside(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """peft's matching (tuners_utils.check_target_module_exists): full regex, or exact/suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def _unsupported(name: str, module: nn.Module, method: str) -> str | None:
    """Why `module` cannot be a `method` target (None when it can)."""
    if method == "vera":
        if isinstance(module, nn.Linear):
            return None
        hint = (
            " (a 1×1 conv can be converted first with pointwise_convs_as_linear)"
            if _is_pointwise(module)
            else ""
        )
        return (
            f"{name} is a {type(module).__name__}: peft's VeRA adapts only nn.Linear "
            f"(peft/tuners/vera/model.py, _get_tuner_layer_class){hint}"
        )
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.dilation != (1, 1) and module.kernel_size != (1, 1):
            return (
                f"{name} has dilation {module.dilation}: peft's LoRA builds lora_A without it "
                "and the forward fails on a shape mismatch (peft/tuners/lora/layer.py, "
                "_ConvNd.update_layer)"
            )
        return None
    return (
        f"{name} is a {type(module).__name__}: these LoRA baselines adapt nn.Conv2d and nn.Linear "
        "(name the layers inside it, or pass a regular expression)"
    )


def eligible_modules(model: nn.Module, method: Method, head: str | None = None) -> list[str]:
    """The default targets in registration order, the head and everything in it left out.

    LoRA: every nn.Linear and every nn.Conv2d with groups 1 (grouped/depthwise convs need a rank
    that is a multiple of the groups with a dense lora_A, see the module docstring) and no
    dilation. VeRA: every nn.Linear.
    """
    _check_method(method)
    names = []
    for name, module in model.named_modules():
        if not name or (head is not None and _inside(name, head)):
            continue
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not _unsupported(name, module, method):
            names.append(name)
    if not names:
        where = f" outside the head {head!r}" if head is not None else ""
        if method == "vera":
            raise ValueError(
                f"no nn.Linear{where}: peft's VeRA adapts only nn.Linear, not convs; convert the "
                "1×1 convs with pointwise_convs_as_linear to give VeRA targets"
            )
        raise ValueError(f"no nn.Conv2d (groups 1) or nn.Linear{where} for LoRA")
    return names


def resolve_targets(
    model: nn.Module, method: Method, target_modules: TargetModules, head: str | None = None
) -> list[str]:
    """The full names of the modules `target_modules` selects (peft's matching rules; None means
    `eligible_modules`), checked to be adaptable by `method` and outside the head."""
    _check_method(method)
    if target_modules is None:
        return eligible_modules(model, method, head)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty: name at least one module (None means all)")
    named = [(name, module) for name, module in model.named_modules() if name]
    selected = [(name, module) for name, module in named if _matches(name, target_modules)]
    if isinstance(target_modules, str):
        if not selected:
            raise ValueError(f"target_modules pattern {target_modules!r} matches no module")
    else:  # every entry must match something: a typo would otherwise shrink the adapter silently
        unmatched = [key for key in target_modules if not any(_matches(n, [key]) for n, _ in named)]
        if unmatched:
            raise ValueError(f"target_modules entries match no module: {unmatched}")
    for name, module in selected:
        if head is not None and _inside(name, head):
            raise ValueError(f"target {name} is inside the head {head!r}, which trains fully")
        problem = _unsupported(name, module, method)
        if problem is not None:
            raise ValueError(problem)
    return [name for name, _ in selected]


# ---------------------------------------------------------------------------------------------
# How many numbers


def _cost_line(model: nn.Module, method: str, names: Sequence[str]) -> tuple[int, int, int]:
    """(fixed, per_rank, rank_step): the adapter has fixed + per_rank·r trainable numbers, and r
    must be a multiple of rank_step (the groups of grouped LoRA convs)."""
    fixed, per_rank, step = 0, 0, 1
    for name in names:
        module = model.get_submodule(name)
        if method == "vera":  # λ_b (out) and λ_d (r); A and B are frozen buffers
            fixed += module.out_features
            per_rank += 1
        elif isinstance(module, nn.Conv2d):  # lora_A: in·kh·kw per rank, lora_B: out/groups
            kh, kw = module.kernel_size
            per_rank += module.in_channels * kh * kw + module.out_channels // module.groups
            step = math.lcm(step, module.groups)
        else:  # nn.Linear: A (r × in), B (out × r)
            per_rank += module.in_features + module.out_features
    return fixed, per_rank, step


def _check_rank(rank: int, step: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank % step:
        raise ValueError(
            f"rank {rank} is not a multiple of {step}: peft's LoRA on a grouped conv needs "
            "rank % groups == 0 (peft/tuners/lora/layer.py, _ConvNd.__init__)"
        )


def adapter_parameter_count(
    model: nn.Module,
    rank: int,
    method: Method,
    target_modules: TargetModules = None,
    *,
    head: str | None = None,
) -> int:
    """Trainable numbers peft will add at `rank` (the head not included), without building it."""
    names = resolve_targets(model, method, target_modules, head)
    fixed, per_rank, step = _cost_line(model, method, names)
    _check_rank(rank, step)
    return fixed + per_rank * rank


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")


def rank_for_budget(
    model: nn.Module,
    budget: int,
    method: Method,
    target_modules: TargetModules = None,
    *,
    head: str | None = None,
) -> int:
    """The rank (≥ 1, a multiple of the groups of any grouped conv) whose adapter count is
    closest to `budget`; on a tie the smaller rank.

    "Closest" is taken over no adapter at all as well: when the smallest adapter on these
    targets is more than twice the budget, nothing is nearer and a ValueError says so (restrict
    the targets, e.g. with `targets_for_budget`).
    """
    _check_budget(budget)
    names = resolve_targets(model, method, target_modules, head)
    fixed, per_rank, step = _cost_line(model, method, names)
    smallest = fixed + per_rank * step
    if smallest >= 2 * budget:  # no adapter is at least as close (ties go to the smaller)
        raise ValueError(
            f"budget {budget} is too small for {method} on {len(names)} module(s): the smallest "
            f"adapter (rank {step}) has {smallest} trainable numbers, no nearer the budget than "
            "no adapter; target fewer modules (see targets_for_budget)"
        )
    units = max(1, round((budget - fixed) / (per_rank * step)))
    candidates = {max(1, units - 1), units, units + 1}
    best = min(candidates, key=lambda u: (abs(fixed + per_rank * step * u - budget), u))
    return best * step


def targets_for_budget(
    model: nn.Module, budget: int, method: Method, *, head: str | None = None, rank: int = 1
) -> list[str]:
    """The last eligible modules (registration order, i.e. those next to the head, whose
    features are the most task-specific) whose adapter count at `rank` is closest to `budget`.

    This is the rule when rank 1 on every eligible module exceeds the budget: modules are added
    from the end while that brings the count nearer the budget (ties: fewer modules). ValueError
    when even the last module alone is no nearer the budget than no adapter. A higher `rank`
    trades coverage for rank, e.g. to match a budget that rank 1 everywhere undershoots.
    """
    _check_budget(budget)
    _check_rank(rank, 1)
    candidates = eligible_modules(model, method, head)
    total, best_count, best_total = 0, 0, 0
    for count, name in enumerate(reversed(candidates), start=1):
        fixed, per_rank, _ = _cost_line(model, method, [name])
        total += fixed + per_rank * rank
        if abs(total - budget) < abs(best_total - budget):
            best_count, best_total = count, total
        if total >= budget:  # further modules only move away from the budget
            break
    if best_count == 0:
        last = candidates[-1]
        fixed, per_rank, _ = _cost_line(model, method, [last])
        raise ValueError(
            f"budget {budget} is too small for {method}: rank {rank} on the last module ({last})"
            f" alone has {fixed + per_rank * rank} trainable numbers, no nearer the budget than no "
            "adapter; pass target_modules explicitly to adapt cheaper, earlier layers"
        )
    return candidates[len(candidates) - best_count :]


def plan_for_budget(
    model: nn.Module, budget: int, method: Method, *, head: str | None = None
) -> BudgetPlan:
    """Targets and rank for a budget: every eligible module at `rank_for_budget` when rank 1 on
    all of them fits in the budget, otherwise `targets_for_budget` at rank 1."""
    _check_budget(budget)
    eligible = eligible_modules(model, method, head)
    fixed, per_rank, _ = _cost_line(model, method, eligible)
    if fixed + per_rank <= budget:
        targets = eligible
        rank = rank_for_budget(model, budget, method, targets, head=head)
    else:
        targets = targets_for_budget(model, budget, method, head=head)
        rank = 1
    count = adapter_parameter_count(model, rank, method, targets, head=head)
    return BudgetPlan(method, budget, rank, tuple(targets), count)


# ---------------------------------------------------------------------------------------------
# Building the peft models


def _exact_pattern(names: Sequence[str]) -> str:
    """A regular expression peft matches in full: exactly `names`, none of peft's suffix matching
    (which would, say, extend torchvision's stem "conv1" to every block's conv1)."""
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"


def _check_head(model: nn.Module, head: str) -> None:
    names = [name for name, _ in model.named_modules() if name]
    if head not in names:
        raise ValueError(f"head {head!r} is not a module of the model")
    if not any(p.numel() for p in model.get_submodule(head).parameters()):
        raise ValueError(f"head {head!r} has no parameters to train")
    # peft wraps every module whose name merely ends with the head's (utils/other.py line 1088).
    others = [name for name in names if name != head and name.endswith(head)]
    if others:
        raise ValueError(
            f"head name {head!r} is ambiguous for peft's modules_to_save, which would also train "
            f"and save {others}; rename the head"
        )


def apply_lora(
    model: nn.Module,
    rank: int,
    target_modules: TargetModules,
    head: str,
    *,
    alpha: float = DEFAULT_LORA_ALPHA,
    dropout: float = 0.0,
    seed: int = 0,
) -> PeftModel:
    """Wrap `model` (modified in place) with peft's LoRA at `rank` on `target_modules`; only the
    adapters and the head (`modules_to_save`, saved with them) train.

    `seed` fixes lora_A's Kaiming draws (lora_B starts at zero) without touching the caller's
    random state.
    """
    from peft import LoraConfig

    names = resolve_targets(model, "lora", target_modules, head)
    _check_rank(rank, _cost_line(model, "lora", names)[2])
    _check_head(model, head)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=_exact_pattern(names),
        modules_to_save=[head],
        bias="none",
    )
    return _peft_model(model, config, seed)


def apply_vera(
    model: nn.Module,
    rank: int,
    target_modules: TargetModules,
    head: str,
    *,
    save_projection: bool = False,
    projection_prng_key: int = 0,
    d_initial: float = 0.1,
    seed: int = 0,
) -> PeftModel:
    """Wrap `model` (modified in place) with peft's VeRA at `rank` on nn.Linear `target_modules`
    (for a CNN: the `pointwise_convs_as_linear` names); only λ_b, λ_d and the head train.

    `save_projection=False` (peft's default is True) keeps the shared A, B out of the checkpoint:
    they are regenerated from `projection_prng_key`, as mapnet regenerates its projection from
    its seed, which makes the checkpoint-bytes column like for like. `seed` is for completeness
    (VeRA's own init draws nothing from the global generator once λ_d is reset to d_initial).
    """
    from peft import VeraConfig

    names = resolve_targets(model, "vera", target_modules, head)
    _check_rank(rank, 1)
    _check_head(model, head)
    with warnings.catch_warnings():
        # The warning about restoring A, B from the PRNG key: a deliberate choice, see above.
        warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
        config = VeraConfig(
            r=rank,
            target_modules=_exact_pattern(names),
            projection_prng_key=projection_prng_key,
            save_projection=save_projection,
            d_initial=d_initial,
            modules_to_save=[head],
            bias="none",
        )
    return _peft_model(model, config, seed)


def apply_ia3(
    model: nn.Module,
    target_modules: Sequence[str],
    feedforward_modules: Sequence[str],
    head: str,
) -> PeftModel:
    """Wrap `model` (modified in place) with peft's IA3: a learned vector scales each target's
    output, or its input for the `feedforward_modules` among them; only those vectors and the
    head train. Names follow peft's rules (exact or dotted suffix); the text study's rows
    (models.text_methods) pass peft's own defaults for BERT."""
    from peft import IA3Config

    names = [n for n, _ in model.named_modules() if n and _matches(n, list(target_modules))]
    if not names:
        raise ValueError(f"IA3 target_modules {list(target_modules)} match no module")
    _check_head(model, head)
    config = IA3Config(
        target_modules=list(target_modules),
        feedforward_modules=list(feedforward_modules),
        modules_to_save=[head],
    )
    return _peft_model(model, config)


def train_biases(model: nn.Module, head: str) -> int:
    """BitFit (Ben Zaken et al. 2022): only the biases and the head train (in place); returns
    the number of trainable numbers besides the head."""
    count = 0
    for name, param in model.named_parameters():
        in_head = _inside(name.rpartition(".")[0], head)
        param.requires_grad_(in_head or name.endswith("bias"))
        count += param.numel() if name.endswith("bias") and not in_head else 0
    return count


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft's notes that no caller here can act on, filtered for the duration, and nothing
    else: that `is_gradient_checkpointing` (transformers' attribute peft reads on every
    get_peft_model and save) is deprecated, and that VeRA's A and B are not saved (they are
    regenerated from their key on load, as mapnet's W is: on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient.checkpointing")
        warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
        yield


def _peft_model(model: nn.Module, config: object, seed: int | None = None) -> PeftModel:
    """get_peft_model under `quiet_peft`; with `seed`, its draws come from a generator seeded
    so, the caller's random state untouched."""
    from peft import get_peft_model

    with quiet_peft(), torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return get_peft_model(model, config)


def adapter_state_bytes(model: PeftModel) -> int:
    """Size in bytes of the adapter_model.safetensors `model.save_pretrained` writes: adapters,
    head and, for VeRA with save_projection, A and B; safetensors' header included (it is
    ~100 bytes per tensor, not negligible next to a 2k-number adapter). adapter_config.json
    (~1 kB) and the README model card come on top."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    state = get_peft_model_state_dict(model)
    # save_pretrained clones aliased tensors and makes them contiguous; cloning all does both.
    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    return len(save(tensors, metadata={"format": "pt"}))


def merge_for_eval(model: PeftModel) -> nn.Module:
    """The plain module with the adapters folded into the weights and the trained head in place
    (peft's merge_and_unload; `model` is consumed), so evaluation costs what the base costs.
    peft cannot merge LoRA on grouped convs: keep the unmerged model for those."""
    grouped = [
        name
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and getattr(module.get_base_layer(), "groups", 1) > 1
    ]
    if grouped:
        raise ValueError(f"peft cannot merge LoRA on grouped convs: {grouped}")
    return model.merge_and_unload()


__all__ = [
    "DEFAULT_LORA_ALPHA",
    "METHODS",
    "BudgetPlan",
    "PointwiseLinear",
    "adapter_parameter_count",
    "adapter_state_bytes",
    "apply_ia3",
    "apply_lora",
    "apply_vera",
    "eligible_modules",
    "freeze_batchnorm_statistics",
    "merge_for_eval",
    "plan_for_budget",
    "pointwise_convs_as_linear",
    "rank_for_budget",
    "resolve_targets",
    "targets_for_budget",
    "train_biases",
]
