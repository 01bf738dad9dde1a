"""Fine-tuning pretrained networks through a latent, against what a user would pick instead.

The paper fine-tunes an ImageNet ResNet-50 by modulating its frozen weights (§2.2.6, eq. 25):
θ = θ_pre ⊙ (1 + m_⌈j/L⌉), m generated from a latent of ~2k numbers (Tables 2, 5 and 10). Each
row here trains one method at one trainable budget (numbers besides the new head):

    mapnet        update="multiplicative", group_size L (eq. 25)
    additive      θ_pre + g ⊙ W u, base="model" (intrinsic-dimension fine-tuning, per-tensor gains)
    head          the new head only (linear probe)
    full          every weight
    lora, vera    peft's adapters at the rank and targets closest to the budget

Stages, each resumable (a finished row is a results/finetune/<stage>/<id>.json and is skipped):

    select    learning rates of the latent / adapter methods, chosen on a validation split
              (MobileNetV2, a shorter run): the transfer stage reads the choice
    transfer  Fashion-MNIST at 64×64 (grey repeated to 3 channels), ResNet-50 and MobileNetV2
    deepfake  real vs face-swapped faces (mapnet_experiments.data.faces), ResNet-50

Every row runs in its own process, so its peak RSS is its own. BatchNorm statistics stay at their
ImageNet values in every row (the usual choice for parameter-efficient fine-tuning: the saved
state is then the trainable tensors alone, and no method adapts them for free).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

import mapnet
from mapnet import MappingConfig
from mapnet_experiments.bench.harness import machine, peak_rss_bytes
from mapnet_experiments.models import pretrained
from mapnet_experiments.models.peft_adapters import freeze_batchnorm_statistics
from mapnet_experiments.recipe.loop import Loop
from mapnet_experiments.studies.fresh import Runner, in_fresh_process, run_rows

RESULTS_DIR = Path("results/finetune")
REPORT = Path("docs/results/finetune.md")
METHODS = ("mapnet", "additive", "head", "full", "lora", "vera")
# Adam learning rates tried by the select stage for the methods whose scale is new to a user.
SELECT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# Set a priori (standard values), not selected: the head, and full fine-tuning.
HEAD_LR = 1e-3
FULL_LR = 1e-4


@dataclass(frozen=True)
class Setup:
    """What every row of a stage shares: data sizes, resolution, schedule."""

    size: int = 64
    train: int = 4000
    val: int = 1000
    test: int = 10000
    epochs: int = 2
    batch: int = 32
    seed: int = 0


SETUPS = {
    "select": Setup(train=2000, val=1000, test=0, epochs=1),
    "transfer": Setup(),
    # The face set decides its split sizes (24 / 8 / 8 people: 480 / 160 / 160 images).
    "deepfake": Setup(size=112, epochs=3, train=0, val=0, test=0),
}


@dataclass(frozen=True)
class FinetuneRow:
    id: str
    model: str  # "resnet50" | "mobilenet_v2"
    method: str  # one of METHODS
    budget: int = 0  # trainable numbers besides the head (mapnet: the latent size)
    group_size: int = 1
    targets: str = "all"  # "all" | "layer4" (the paper's "layer4 + fc")
    lr: float | None = None  # None: the select stage's choice (or the method's fixed rate)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneRow:
        return cls(**data)


def _transfer_rows(model: str) -> list[FinetuneRow]:
    short = {"resnet50": "r50", "mobilenet_v2": "mnv2"}[model]
    rows = [
        FinetuneRow(f"{short}-head", model, "head"),
        FinetuneRow(f"{short}-full", model, "full"),
    ]
    for group_size in (1, 250, 25000):
        rows.append(
            FinetuneRow(f"{short}-mapnet-L{group_size}-2k", model, "mapnet", 2048, group_size)
        )
    rows += [
        FinetuneRow(f"{short}-mapnet-L1-10k", model, "mapnet", 10240),
        FinetuneRow(f"{short}-mapnet-L1-100k", model, "mapnet", 102400),
        FinetuneRow(f"{short}-additive-2k", model, "additive", 2048),
        FinetuneRow(f"{short}-additive-100k", model, "additive", 102400),
    ]
    for method in ("lora", "vera"):
        for label, budget in (("2k", 2048), ("10k", 10240), ("100k", 102400)):
            # VeRA at 100k on ResNet-50 needs rank 2,213, above most of its layers' widths, and
            # ~3 s a step here (8× a LoRA step): left out; MobileNetV2 has the 100k VeRA row.
            if (model, method, label) != ("resnet50", "vera", "100k"):
                rows.append(FinetuneRow(f"{short}-{method}-{label}", model, method, budget))
    return rows


def _select_rows() -> list[FinetuneRow]:
    rows = []
    for method, budget in (("mapnet", 2048), ("additive", 2048), ("lora", 10240), ("vera", 10240)):
        for lr in SELECT_LRS:
            rows.append(
                FinetuneRow(f"mnv2-{method}-lr{lr:g}", "mobilenet_v2", method, budget, lr=lr)
            )
    return rows


def _deepfake_rows() -> list[FinetuneRow]:
    rows = [
        FinetuneRow("r50-full", "resnet50", "full"),
        FinetuneRow("r50-head", "resnet50", "head"),
    ]
    # All layers at the paper's three L; layer4 + fc at L = 1 (its best, Table 10), for time.
    for targets, sizes in (("all", (1, 250, 25000)), ("layer4", (1,))):
        for group_size in sizes:
            rows.append(
                FinetuneRow(
                    f"r50-mapnet-L{group_size}-{targets}",
                    "resnet50",
                    "mapnet",
                    2048,
                    group_size,
                    targets,
                )
            )
    return rows


STAGES: dict[str, list[FinetuneRow]] = {
    "select": _select_rows(),
    "transfer": _transfer_rows("mobilenet_v2") + _transfer_rows("resnet50"),
    "deepfake": _deepfake_rows(),
    # Step time alone, on a quiet machine: the transfer rows' own timings share the CPU with
    # whatever else ran.
    "steps": [row for row in _transfer_rows("resnet50") if row.budget in (0, 2048)],
}
STEP_THREADS = (1, 2)


# ---------------------------------------------------------------------------------- data


@dataclass
class Data:
    """uint8 images and labels per split; `prepare` turns a batch into the model's input."""

    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    classes: int
    prepare: Callable[[torch.Tensor], torch.Tensor]


def transfer_data(setup: Setup, model: str) -> Data:
    """Fashion-MNIST: a fixed random training subset, a validation split held out of the
    training images, and the first `setup.test` test images (all 10,000 by default)."""
    from mapnet_experiments.data.mnist import load_idx_dataset, train_val_split

    images, labels = load_idx_dataset("fashion-mnist", "train")
    train_idx, val_idx = train_val_split(len(images), setup.val, setup.seed)
    train_idx = train_idx[: setup.train]
    splits = {
        "train": (images[train_idx, 0], labels[train_idx]),
        "val": (images[val_idx, 0], labels[val_idx]),
    }
    if setup.test:
        test_images, test_labels = load_idx_dataset("fashion-mnist", "test")
        splits["test"] = (test_images[: setup.test, 0], test_labels[: setup.test])
    return Data(splits, 10, lambda batch: pretrained.from_grayscale(model, batch, setup.size))


def deepfake_data(setup: Setup, model: str) -> Data:
    from mapnet_experiments.data import faces as deepfake

    faces = deepfake.build_face_swap_dataset(
        size=setup.size, seed=setup.seed, image_format="uint8", progress=False
    )
    splits = {name: (faces[name].images, faces[name].labels) for name in ("train", "val", "test")}
    return Data(
        splits, 2, lambda batch: pretrained.preprocess(model, batch, size=setup.size, crop=False)
    )


def batches(
    images: torch.Tensor, labels: torch.Tensor, size: int, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(images), generator=generator) if generator else None
    for start in range(0, len(images), size):
        index = slice(start, start + size) if order is None else order[start : start + size]
        yield images[index], labels[index]


# ---------------------------------------------------------------------------------- methods


def _head_first_names(head: str) -> Callable[[str], bool]:
    return lambda name: name.startswith(head + ".") or f".{head}." in name


def build(row: FinetuneRow, classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained network with a new head, prepared for the row's method, and what it is."""
    net = pretrained.load_pretrained(row.model, num_classes=classes)
    head = pretrained.HEADS[row.model]
    info: dict[str, Any] = {"head": head}
    if row.method in ("mapnet", "additive"):
        scope: dict[str, Any] = {}
        if row.targets == "layer4":
            scope["target_modules"] = ["layer4"]
        if row.method == "mapnet":
            config = MappingConfig(
                latent_dim=row.budget,
                update="multiplicative",
                group_size=row.group_size,
                train_directly=[head],
                **scope,
            )
        else:
            config = MappingConfig(
                latent_dim=row.budget, base="model", alpha=0.0, train_directly=[head], **scope
            )
        with warnings.catch_warnings():  # L = 25000: fewer elements than latent numbers
            warnings.filterwarnings("ignore", "latent larger than")
            # A factory hands the network over: its weights become θ_pre, not copied twice.
            model: nn.Module = mapnet.wrap(lambda: net, config)
        del net
        info["mapping"] = config.to_dict()
        info["generated_rows"] = [p.out_features for p in model.projections]
        info["modulated_parameters"] = model.num_generated_parameters()
        # Numbers the latent can move independently: fewer than d when L leaves fewer rows.
        info["effective_numbers"] = sum(
            min(p.in_features, p.out_features) for p in model.projections
        )
        return model, info
    if row.method in ("lora", "vera"):
        from mapnet_experiments.models import peft_adapters as pb

        if row.method == "vera":  # peft's VeRA adapts nn.Linear only: 1×1 convs become Linear
            info["pointwise_as_linear"] = len(pb.pointwise_convs_as_linear(net, exclude=head))
        plan = pb.plan_for_budget(net, row.budget, row.method, head=head)
        apply = pb.apply_lora if row.method == "lora" else pb.apply_vera
        model = apply(net, plan.rank, plan.targets, head)
        info |= {
            "rank": plan.rank,
            "adapted_modules": len(plan.targets),
            "adapter_numbers": plan.adapter_count,
        }
        return model, info
    for name, param in net.named_parameters():
        param.requires_grad_(row.method == "full" or _head_first_names(head)(name))
    return net, info


def _batchnorm_statistics(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.detach().clone()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var)
        if t is not None
    ]


def trainable_counts(model: nn.Module, head: str) -> tuple[int, int]:
    """(numbers besides the head, the head's numbers) that train."""
    is_head = _head_first_names(head)
    rest = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not is_head(n))
    heads = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_head(n))
    return rest, heads


def checkpoint_bytes(model: nn.Module, row: FinetuneRow) -> int:
    """What a user would store to reload the result onto the same pretrained network."""
    with tempfile.TemporaryDirectory() as folder:
        if isinstance(model, mapnet.MappedModule):
            mapnet.save(model, Path(folder) / "ckpt")
        elif row.method in ("lora", "vera"):
            model.save_pretrained(folder)
            Path(folder, "README.md").unlink(missing_ok=True)  # peft's model card, not the state
        else:
            state = {
                n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad
            }
            Path(folder, "model.safetensors").write_bytes(save_safetensors(state))
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, split: str, batch: int = 250) -> float:
    model.eval()
    images, labels = data.splits[split]
    correct = 0
    for x, y in batches(images, labels, batch, None):
        correct += (model(data.prepare(x)).argmax(1) == y).sum().item()
    return correct / len(images)


def selected_lr(row: FinetuneRow, root: Path) -> float:
    """The row's learning rate: its own, the fixed rate of head/full, or the select stage's."""
    if row.lr is not None:
        return row.lr
    if row.method in ("head", "full"):
        return HEAD_LR if row.method == "head" else FULL_LR
    scores = select_scores(row.method, root)
    best = max(scores.values())
    return min(lr for lr, accuracy in scores.items() if accuracy == best)  # ties: the smaller


def select_scores(method: str, root: Path) -> dict[float, float]:
    """Validation accuracy per learning rate of SELECT_LRS from the select stage's results;
    the whole grid must be there (a partial grid would choose from what happened to finish)."""
    results = [json.loads(f.read_text()) for f in sorted((root / "select").glob("*.json"))]
    scores = {r["row"]["lr"]: r["val_accuracy"] for r in results if r["row"]["method"] == method}
    missing = [lr for lr in SELECT_LRS if lr not in scores]
    if missing:
        raise FileNotFoundError(
            f"the select stage has not scored {method!r} at learning rate(s) {missing} in "
            f"{root / 'select'}: run `mapnet repro finetune --stages select` first (it picks "
            "the learning rate on the validation split)"
        )
    return {lr: scores[lr] for lr in SELECT_LRS}


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """One cross-entropy step; returns its wall time and the loss."""
    tick = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - tick, loss


def time_steps(row: FinetuneRow, rounds: int = 3, steps: int = 3) -> dict[str, Any]:
    """Median training step (a fixed random batch at the transfer setup's size and batch) at
    each of STEP_THREADS, measured side by side: rounds alternate the thread counts."""
    setup = SETUPS["transfer"]
    model, info = build(row, 10)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(setup.batch, 3, setup.size, setup.size, generator=generator)
    y = torch.randint(0, 10, (setup.batch,), generator=generator)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    freeze_batchnorm_statistics(model)

    def step() -> float:
        return train_step(model, optimizer, x, y)[0]

    step()  # warm-up: first-touch allocations
    times: dict[int, list[float]] = {t: [] for t in STEP_THREADS}
    default = torch.get_num_threads()
    try:
        for _ in range(rounds):
            for threads in STEP_THREADS:
                torch.set_num_threads(threads)
                times[threads] += [step() for _ in range(steps)]
    finally:
        torch.set_num_threads(default)
    return {
        "stage": "steps",
        "row": dataclasses.asdict(row),
        "step_seconds_median": {str(t): statistics.median(v) for t, v in times.items()},
        "batch": setup.batch,
        "size": setup.size,
        "machine": machine(),
        "commit": _commit(),
        **info,
    }


def run_row(stage: str, row: FinetuneRow, root: Path, progress: bool = True) -> dict[str, Any]:
    """Train one row and return its result (not written: `run_stage` does, atomically)."""
    if stage == "steps":
        return time_steps(row)
    setup = SETUPS[stage]
    torch.manual_seed(setup.seed)
    data = (deepfake_data if stage == "deepfake" else transfer_data)(setup, row.model)
    lr = selected_lr(row, root)
    started = time.perf_counter()
    model, info = build(row, data.classes)
    build_seconds = time.perf_counter() - started
    head = info["head"]
    is_head = _head_first_names(head)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if is_head(n)], "lr": HEAD_LR},  # the same in every row
        {"params": [p for n, p in named if not is_head(n)], "lr": lr},
    ]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    statistics_before = _batchnorm_statistics(model)
    generator = torch.Generator().manual_seed(setup.seed)
    images, labels = data.splits["train"]
    loop = Loop(
        optimizer,
        epochs=setup.epochs,
        steps=math.ceil(len(images) / setup.batch),
        config={"stage": stage, "row": dataclasses.asdict(row)},
        label=f"{stage}/{row.id} epoch",
        show_progress=progress,
        loss_key="loss",
    )
    step_times: list[float] = []
    epoch_batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
    ticks = {"step": 0.0}
    last = {"loss": math.nan}

    def step(i: int) -> dict[str, float]:
        nonlocal epoch_batches
        if i == 0:
            model.train()
            freeze_batchnorm_statistics(model)
            epoch_batches = batches(images, labels, setup.batch, generator)
        x, y = next(epoch_batches)
        ticks["step"] = time.perf_counter()
        loss = nn.functional.cross_entropy(model(data.prepare(x)), y)
        loss.backward()
        last["loss"] = loss.item()
        return last

    def after_step() -> None:  # the optimiser's step is part of a step's time
        step_times.append(time.perf_counter() - ticks["step"])

    def end_epoch(epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "loss": last["loss"], "val_accuracy": evaluate(model, data, "val")}

    history = loop.run(step, end_epoch, dict, lambda folder: None, after_step=after_step)
    rest, head_numbers = trainable_counts(model, head)
    after = _batchnorm_statistics(model)
    unchanged = all(torch.equal(a, b) for a, b in zip(statistics_before, after))
    result = {
        "stage": stage,
        "row": dataclasses.asdict(row) | {"lr": lr},
        "setup": dataclasses.asdict(setup),
        "split_sizes": {name: len(split[1]) for name, split in data.splits.items()},
        "trainable_besides_head": rest,
        "head_parameters": head_numbers,
        "head_lr": optimizer.param_groups[0]["lr"],  # the head's group comes first
        "batchnorm_statistics_unchanged": unchanged,
        "val_accuracy": history[-1]["val_accuracy"],
        "history": history,
        "step_seconds_median": statistics.median(step_times[1:] or step_times),
        "build_seconds": build_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "checkpoint_bytes": checkpoint_bytes(model, row),
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "commit": _commit(),
        **info,
    }
    if "test" in data.splits:
        result["test_accuracy"] = evaluate(model, data, "test")
    return result


def _commit() -> str | None:
    """The repository's commit (with "+dirty" for local changes): each row re-imports the tree."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def run_stage(
    stage: str,
    rows: list[FinetuneRow],
    root: Path = RESULTS_DIR,
    deadline: float | None = None,
    progress: bool = True,
    runner: Runner | None = None,
) -> list[Path]:
    """Run every row not yet finished, each in a fresh process (studies.fresh); returns the
    result files. A row is finished when its result file exists, so an interrupted stage
    resumes at the row it was in (rows take minutes; a row itself restarts)."""
    runner = runner or functools.partial(in_fresh_process, run_row)
    return run_rows("finetune", stage, rows, root, runner, deadline, progress)
