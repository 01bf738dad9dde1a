"""Training a population of models as one `mapnet.ModelSpace` (`mapnet repro space`).

Every member is a latent of the same mapping (paper §2.2: W and θ₀ fixed by the seed) with its
own data: a data set, optionally a class subset and a training subset, and its own batch order.
Members train side by side, one batch each per step, with one Adam over the (N, d) latents;
Adam acts element by element, so without path flattening each member follows exactly the
trajectory it would follow alone.

Path flattening (`flatten` > 0, as NetSpace trains its space): each step also adds
`flatten` × the loss, on a batch of that task, of a random point between two members of the
same task (ModelSpace.midpoint_loss), which pulls the straight path between them towards low
loss.

An epoch is the full training split's step count for every member (a member on a subset sees
it several times). State is saved after every epoch (atomic folder swap) and a run resumes
from it; a finished run keeps results.json and the final space.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm import tqdm

from mapnet import MappingConfig, ModelSpace
from mapnet.checks import from_dict
from mapnet.files import atomic_write_bytes
from mapnet_experiments.models import model_factory
from mapnet_experiments.train import (
    Split,
    TrainConfig,
    evaluate,
    flatten_optimizer,
    load_splits,
    recover_state,
    remove_state,
    replace_folder,
    unflatten_optimizer,
    write_json,
)

STATE_FORMAT = 1
LATENTS_FILE = "latents_by_epoch.safetensors"


@dataclass
class Member:
    """One member's data: `seed` orders its batches, draws its training subset and, with
    start_std > 0, its starting latent N(0, start_std²) (0: the mapping's start, z = 0)."""

    label: str
    dataset: str = "fashion-mnist"  # a TrainConfig data set (any IDX folder name with data_dir)
    seed: int = 0
    classes: list[int] | None = None  # train, validate and test on these classes only
    train_fraction: float = 1.0
    start_std: float = 0.0

    def __post_init__(self) -> None:
        if self.classes is not None:
            self.classes = list(self.classes)
            if not self.classes or len(set(self.classes)) != len(self.classes):
                raise ValueError(f"member {self.label!r}: classes must be distinct and nonempty")
            if not all(isinstance(c, int) and 0 <= c < 10 for c in self.classes):
                raise ValueError(f"member {self.label!r}: classes must lie in 0..9")
        if not 0 <= self.start_std < math.inf:
            raise ValueError(f"member {self.label!r}: start_std must be >= 0, got {self.start_std}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(
                f"member {self.label!r}: train_fraction must be in (0, 1], got "
                f"{self.train_fraction}"
            )

    @property
    def task(self) -> str:
        """Members of one task share data and can be interpolated on it."""
        return self.dataset + ("" if self.classes is None else f":{self.classes}")


@dataclass
class SpaceRun:
    members: list[Member]
    model: str = "cnn2"
    mapping: MappingConfig = field(
        default_factory=lambda: MappingConfig(latent_dim=2048, projection="structured")
    )
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    flatten: float = 0.0
    val_size: int = 5000
    split_seed: int = 0  # one validation split for every member of a data set
    data_dir: str | None = None

    def __post_init__(self) -> None:
        self.members = [m if isinstance(m, Member) else from_dict(Member, m) for m in self.members]
        if isinstance(self.mapping, dict):
            self.mapping = MappingConfig.from_dict(self.mapping)
        if not self.members:
            raise ValueError("a space run needs at least one member")
        labels = [m.label for m in self.members]
        if len(set(labels)) != len(labels):
            raise ValueError(f"member labels must be distinct, got {labels}")
        model_factory(self.model)
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.flatten < 0:
            raise ValueError(f"flatten must be >= 0, got {self.flatten}")
        if self.flatten > 0 and not any(len(v) > 1 for v in self.tasks().values()):
            raise ValueError("flatten > 0 needs two members of one task to flatten between")

    def tasks(self) -> dict[str, list[int]]:
        """Member indices by task."""
        grouped: dict[str, list[int]] = {}
        for index, member in enumerate(self.members):
            grouped.setdefault(member.task, []).append(index)
        return grouped

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"mapping": self.mapping.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpaceRun:
        return from_dict(cls, data)


def _subset(split: Split, classes: list[int] | None) -> Split:
    if classes is None:
        return split
    keep = torch.isin(split.targets, torch.tensor(classes))
    return Split(split.inputs[keep], split.targets[keep])


def member_splits(run: SpaceRun) -> tuple[list[dict[str, Split]], int]:
    """Each member's train / val / test: its data set's splits (one validation carve per data
    set, by split_seed), its classes, and a seeded subset of the training split; and the
    largest full training split (an epoch's length)."""
    by_dataset: dict[str, dict[str, Split]] = {}
    result = []
    for member in run.members:
        if member.dataset not in by_dataset:
            config = TrainConfig(
                dataset=member.dataset,
                seed=run.split_seed,
                val_size=run.val_size,
                data_dir=run.data_dir,
            )
            by_dataset[member.dataset] = load_splits(config)
        splits = {k: _subset(v, member.classes) for k, v in by_dataset[member.dataset].items()}
        if member.train_fraction < 1:
            train = splits["train"]
            count = max(1, round(member.train_fraction * len(train)))
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(member.seed))
            chosen = pick[:count].sort().values
            splits["train"] = Split(train.inputs[chosen], train.targets[chosen])
        result.append(splits)
    return result, max(len(splits["train"]) for splits in by_dataset.values())


class _Batches:
    """One member's endless, seeded stream of training batch indices."""

    def __init__(self, size: int, batch: int, seed: int):
        self.size, self.batch = size, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(size, generator=self.generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position >= self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        chosen = self.order[self.position : self.position + self.batch]
        self.position += self.batch
        return chosen

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order,
            "position": torch.tensor(self.position),
        }

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], int(state["position"])


def build_space(run: SpaceRun) -> ModelSpace:
    factory = model_factory(run.model)
    space = ModelSpace(factory, run.mapping, len(run.members))
    space.members = [dataclasses.asdict(m) for m in run.members]
    with torch.no_grad():
        for index, member in enumerate(run.members):
            if member.start_std > 0:  # an independent start in z, as plain nets have in weights
                generator = torch.Generator().manual_seed(member.seed)
                space.latents[index].normal_(0, member.start_std, generator=generator)
    return space


def evaluate_members(space: ModelSpace, splits: list[dict[str, Split]], test: bool = True):
    """Validation (and test) accuracy of every member on its own task."""
    rows = []
    for index, member_splits_ in enumerate(splits):
        plain = space.materialize_at(space.latents[index])
        row = {f"val_{k}": v for k, v in evaluate(plain, member_splits_["val"]).items()}
        if test:
            row |= {f"test_{k}": v for k, v in evaluate(plain, member_splits_["test"]).items()}
        rows.append(row)
    return rows


def train_space(
    run: SpaceRun, out: Path, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train the population; `out` gets config.json, state/ while unfinished, then
    results.json (per-member figures by epoch), space/ (the final latents) and
    latents_by_epoch.safetensors (every member's latent after each epoch)."""
    out = Path(out)
    config_file = out / "config.json"
    if config_file.exists():
        # Read back through SpaceRun: a field added since (its default) means the same run.
        saved = SpaceRun.from_dict(json.loads(config_file.read_text())).to_dict()
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(run.to_dict())):
            raise ValueError(f"{out} holds a space run with another config")
        if (out / "results.json").exists():
            return json.loads((out / "results.json").read_text())
        if not resume:
            raise ValueError(f"{out} already holds a run; pass resume=True or choose another")
    else:
        write_json(config_file, run.to_dict())
    started = time.perf_counter()
    splits, full = member_splits(run)
    space = build_space(run)
    optimizer = torch.optim.Adam([space.latents], lr=run.lr)
    streams = [
        _Batches(len(s["train"]), run.batch_size, member.seed)
        for s, member in zip(splits, run.members)
    ]
    flatten_rng = torch.Generator().manual_seed(run.split_seed)
    tasks = [indices for indices in run.tasks().values() if len(indices) > 1]
    steps = math.ceil(full / run.batch_size)
    epoch, history, elapsed = 0, [], 0.0
    state = out / "state"
    recover_state(out)
    if resume and state.exists():
        epoch, history, elapsed = _restore(state, space, optimizer, streams, flatten_rng)
    while epoch < run.epochs:
        space.train()
        sums = torch.zeros(len(run.members))
        flat_sum = 0.0
        bar = tqdm(range(steps), disable=not progress, leave=False, desc=f"epoch {epoch + 1}")
        for _ in bar:
            batches = []
            total = torch.zeros(())
            for index, (member_splits_, stream) in enumerate(zip(splits, streams)):
                chosen = stream.next()
                x, y = (
                    member_splits_["train"].inputs[chosen],
                    member_splits_["train"].targets[chosen],
                )
                loss = nn.functional.cross_entropy(space.member_forward(index, x), y)
                total = total + loss
                sums[index] += loss.item()
                batches.append((x, y))
            if run.flatten > 0:
                task = tasks[int(torch.randint(len(tasks), (1,), generator=flatten_rng))]
                x, y = batches[task[0]]  # a batch of that task
                mid = space.midpoint_loss(
                    lambda outputs, y=y: nn.functional.cross_entropy(outputs, y),
                    x,
                    among=task,
                    generator=flatten_rng,
                )
                total = total + run.flatten * mid
                flat_sum += mid.item()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        epoch += 1
        row: dict[str, Any] = {"epoch": epoch, "flatten_loss": flat_sum / steps}
        row["members"] = [
            {"train_loss": float(s) / steps} | figures
            for s, figures in zip(sums, evaluate_members(space, splits))
        ]
        row["seconds"] = elapsed + time.perf_counter() - started
        history.append(row)
        if progress:
            accuracy = [f"{m['val_acc']:.1f}" for m in row["members"]]
            print(f"  epoch {epoch}: val acc {' '.join(accuracy)} ({row['seconds']:.0f} s)")
        # The latents first: a stop between the two leaves a row that the resumed epoch
        # replaces (the file is cut to the saved epochs before each append).
        _append_latents(out / LATENTS_FILE, space.latents.detach(), epoch)
        _save_state(state, space, optimizer, streams, flatten_rng, epoch, history)
    space.save(out / "space")
    result = {
        "config": run.to_dict(),
        "members": [
            {"label": m.label, "task": m.task} | history[-1]["members"][i]
            for i, m in enumerate(run.members)
        ],
        "history": history,
        "trainable_parameters": space.latents.numel(),
        "wall_seconds": history[-1]["seconds"],
        "versions": {"torch": torch.__version__},
        "threads": torch.get_num_threads(),
    }
    write_json(out / "results.json", result)
    remove_state(out)  # the resume state goes once the results are on disk
    return result


def _append_latents(path: Path, latents: torch.Tensor, epoch: int) -> None:
    """Every member's latent after each epoch, (epochs, N, d): the space's trajectories."""
    earlier = load_safetensors(path.read_bytes())["latents"][: epoch - 1] if path.exists() else None
    rows = latents[None] if earlier is None else torch.cat([earlier, latents[None]])
    atomic_write_bytes(path, save_safetensors({"latents": rows.contiguous()}))


def _save_state(
    folder: Path,
    space: ModelSpace,
    optimizer: torch.optim.Optimizer,
    streams: list[_Batches],
    flatten_rng: torch.Generator,
    epoch: int,
    history: list[dict[str, Any]],
) -> None:
    staging = folder.with_name(folder.name + ".tmp")
    space.save(staging / "space")
    tensors, meta = flatten_optimizer(optimizer.state_dict())
    for index, stream in enumerate(streams):
        tensors |= {f"stream.{index}.{k}": v for k, v in stream.state().items()}
    tensors["flatten_rng"] = flatten_rng.get_state()
    atomic_write_bytes(staging / "trainer.safetensors", save_safetensors(tensors))
    description = {"format": STATE_FORMAT, "epoch": epoch, "history": history, "optimizer": meta}
    atomic_write_bytes(staging / "trainer.json", json.dumps(description).encode())
    replace_folder(staging, folder)


def _restore(
    folder: Path,
    space: ModelSpace,
    optimizer: torch.optim.Optimizer,
    streams: list[_Batches],
    flatten_rng: torch.Generator,
) -> tuple[int, list[dict[str, Any]], float]:
    saved = ModelSpace.load(folder / "space", space.mapping)
    with torch.no_grad():
        space.latents.copy_(saved.latents)
    description = json.loads((folder / "trainer.json").read_text())
    tensors = load_safetensors((folder / "trainer.safetensors").read_bytes())
    optimizer.load_state_dict(unflatten_optimizer(tensors, description["optimizer"]))
    for index, stream in enumerate(streams):
        prefix = f"stream.{index}."
        stream.restore({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    flatten_rng.set_state(tensors["flatten_rng"])
    history = description["history"]
    return description["epoch"], history, history[-1]["seconds"] if history else 0.0
