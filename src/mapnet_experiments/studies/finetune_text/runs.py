"""The text study's rows and how one trains: all-MiniLM-L6-v2 + a new head on the tweets
(data.tweets: 3,000 / 1,000 / 2,000 for train / validation / test, 48 tokens, three classes).

Every row is one run: EPOCHS epochs at batch 32 of Adam at a constant learning rate, through
the one loop (recipe.loop): the head at the head's rate (chosen on validation by the head-only
rows), the method's numbers at the row's. Dropout is the model's own (0.1). A row's seed draws
the head's initialisation, the batch order and the method's random parts (LoRA's A, VeRA's key,
mapnet's W), so seeds 0, 1, 2 differ in all of these.

Stages, each resumable (a finished row is <root>/<stage>/<id>.json and is skipped; a row runs
in a fresh process, locked, so two processes started with the same command share a stage):

    select  seed 0: the head's rate over HEAD_LRS, then every method at ~2k (and the methods
            with a natural count) over its grid (LRS); the best final validation accuracy
            wins, ties the smaller rate. A method at ~10k or ~50k trains at the rate chosen for
            it at ~2k: a grid there would cost 33 more runs. The test split is evaluated too
            and never read by a choice: the chosen run is the final stage's seed 0 (a rerun
            would repeat it exactly)
    levers  mapnet variants at ~2k, validation only, each at the rate select chose for the
            main row it changes (`rate_source`): what is modulated, the group size, groups
            inside tensors, columns, twice the steps, a cosine schedule
    final   every row at its chosen rate (with, at ~2k, the lever that led on validation),
            seeds 0 (the select run where there is one), 1, 2;
            the rows at ~2k and with a natural count first, so a stage cut short by --hours
            has the headline comparison whole
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet_experiments.bench.harness import machine, peak_rss_bytes
from mapnet_experiments.models.text_methods import Method, build, checkpoint_bytes
from mapnet_experiments.recipe.loop import Loop
from mapnet_experiments.studies.fresh import Runner, in_fresh_process, run_rows

STUDY_NAME = "finetune-text"
RESULTS_DIR = Path("results/finetune_text")
REPORT = Path("docs/results/finetune-text.md")
EPOCHS = 1
BATCH = 32
CLASSES = 3
BUDGETS = (2048, 10240, 51200)
SEEDS = (0, 1, 2)
HEAD_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
# Where a grid's edge won, the grid went one step further that way (full: 1e-4 of the first
# three; LoRA and additive: their smallest; mapnet: its largest, at every group size, twice).
LRS = {
    "full": (1e-5, 3e-5, 1e-4, 3e-4),
    "bitfit": (1e-4, 1e-3, 1e-2),
    "lora": (3e-4, 1e-3, 3e-3, 1e-2),
    "vera": (3e-3, 1e-2, 3e-2),
    "ia3": (3e-3, 1e-2, 3e-2),
    "mapnet": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "additive": (3e-4, 1e-3, 3e-3, 1e-2),
}


@dataclass(frozen=True)
class TextRow:
    """One run: a method at a learning rate and seed. `lr` None: the rate `select` chose."""

    id: str
    method: Method
    lr: float | None = None
    seed: int = 0
    epochs: int = EPOCHS
    schedule: str = "constant"  # or "cosine": the rate falls to 0 over the run

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextRow:
        return cls(**(data | {"method": Method(**data["method"])}))


def budget_text(budget: int) -> str:
    """~2k, ~10k, ~50k (or the number itself below 1,024)."""
    return f"~{budget // 1024}k" if budget >= 1024 else f"~{budget}"


def row_label(method: Method) -> str:
    """A method's short name in row ids: mapnet-L1-2k, lora-10k, ia3, …"""
    name = method.name
    if name == "mapnet":
        name += f"-L{method.group_size}"
        if method.selection != "linear-weights":
            name += f"-{method.selection}"
        if method.within_tensors:
            name += "-within"
        if method.last_layers is not None:
            name += f"-last{method.last_layers}"
    if method.budget is not None:
        name += f"-{method.budget // 1024}k" if method.budget >= 1024 else f"-{method.budget}"
    return name


def main_methods() -> list[Method]:
    """The rows of the tables: every method at the budgets it can reach, and at ~2k the lever
    that led the levers stage on validation (L = 250 with groups inside tensors), carried to
    the test split at every seed. It trains at L = 250's rate (`rate_source`)."""
    methods = [Method("head"), Method("full"), Method("bitfit"), Method("ia3")]
    for budget in BUDGETS:
        methods += [Method("lora", budget), Method("vera", budget), Method("additive", budget)]
        methods += [Method("mapnet", budget, 1), Method("mapnet", budget, 250)]
        if budget < 20736:  # a latent wider than the 20,736 rows it modulates has no use
            methods.append(Method("mapnet", budget, "row"))
        if budget == BUDGETS[0]:
            methods.append(Method("mapnet", budget, 250, within_tensors=True))
    return methods


def lever_methods() -> list[Method]:
    """mapnet at ~2k, one change from the main rows each: every tensor of the encoder (its
    LayerNorms, biases and embeddings too) instead of the Linear weights, other group sizes,
    groups that stay inside one tensor, columns instead of rows, and rows of the last layer
    only (where LoRA sits at ~2k: the last layer's query and value) or of the last two."""
    budget = BUDGETS[0]
    return [
        Method("mapnet", budget, 1, "encoder"),
        Method("mapnet", budget, 250, "encoder"),
        Method("mapnet", budget, 16),
        Method("mapnet", budget, 250, within_tensors=True),
        Method("mapnet", budget, 4096),
        Method("mapnet", budget, "column"),
        Method("mapnet", budget, "row", last_layers=1),
        Method("mapnet", budget, "row", last_layers=2),
    ]


# Training levers for the row mode at ~2k: twice the steps, a cosine schedule.
TRAINING_LEVERS = ({"epochs": 2 * EPOCHS}, {"schedule": "cosine"})


def headline(method: Method) -> bool:
    """A row of the headline comparison: at ~2k, or at a method's natural count."""
    return method.budget is None or method.budget == BUDGETS[0]


def select_rows() -> list[TextRow]:
    rows = [TextRow(f"head-lr{lr:g}", Method("head"), lr) for lr in HEAD_LRS]
    for method in main_methods():  # the rows whose rate is their own (see rate_source)
        if method.name != "head" and headline(method) and rate_source(method) == method:
            grid = LRS[method.name]
            rows += [TextRow(f"{row_label(method)}-lr{lr:g}", method, lr) for lr in grid]
    return rows


def lever_rows() -> list[TextRow]:
    rows = [TextRow(row_label(method), method) for method in lever_methods()]
    row_mode = Method("mapnet", BUDGETS[0], "row")
    for change in TRAINING_LEVERS:
        tag = "-".join(f"{k}{v}" for k, v in change.items())
        rows.append(TextRow(f"{row_label(row_mode)}-{tag}", row_mode, **change))
    return rows


def final_rows() -> list[TextRow]:
    rows = [
        TextRow(f"{row_label(m)}-s{seed}", m, None, seed) for seed in SEEDS for m in main_methods()
    ]
    return sorted(rows, key=lambda row: not headline(row.method))  # stable: seeds stay in order


STAGES: dict[str, Callable[[], list[TextRow]]] = {
    "select": select_rows,
    "levers": lever_rows,
    "final": final_rows,
}


# ---------------------------------------------------------------------------------- choices


def _score(result: dict[str, Any]) -> float:
    return result["val_accuracy"]


def rate_source(method: Method) -> Method:
    """The main row at ~2k whose chosen rate `method` trains at: itself for a row select
    searched; the same method at ~2k for ~10k and ~50k; for a mapnet lever, the main row with
    its group size, or for one select did not search, L = 250 (another L) or the row mode
    (columns)."""
    if method.budget is not None and method.budget != BUDGETS[0]:
        method = dataclasses.replace(method, budget=BUDGETS[0])
    if method.name == "mapnet":
        group = method.group_size
        if group not in (1, 250, "row"):
            group = "row" if isinstance(group, str) else 250
        method = Method("mapnet", method.budget, group)
    return method


def chosen_lr(method: Method, root: Path, stage: str = "select") -> float:
    """The rate `stage` chose for `method` (best final validation accuracy; ties: smaller),
    through `rate_source`."""
    method = rate_source(method)
    grid = HEAD_LRS if method.name == "head" else LRS[method.name]
    scores = {}
    for lr in grid:
        file = root / stage / f"{row_label(method)}-lr{lr:g}.json"
        if not file.exists():
            raise ValueError(
                f"{file} is missing: run `mapnet repro finetune-text --stages {stage}` first "
                "(it chooses the learning rates on the validation split)"
            )
        scores[lr] = _score(json.loads(file.read_text()))
    return max(scores, key=lambda lr: (scores[lr], -lr))


def head_lr(root: Path) -> float:
    return chosen_lr(Method("head"), root)


# ---------------------------------------------------------------------------------- data


@dataclass
class Batches:
    """A split's token ids, attention masks and labels, in memory."""

    ids: torch.Tensor  # (N, L) int64
    mask: torch.Tensor  # (N, L) int64
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@cache
def tweet_data() -> dict[str, Batches]:
    from mapnet_experiments.data.tweets import encode, load_tweet_splits
    from mapnet_experiments.models.text import load_minilm_tokenizer

    splits = load_tweet_splits(progress=False)
    tokenizer = load_minilm_tokenizer(progress=False)
    data = {}
    for name in ("train", "validation", "test"):
        split = getattr(splits, name)
        ids, mask = encode(split.texts, tokenizer)
        data[name] = Batches(ids, mask, split.label_tensor())
    return data


@torch.no_grad()
def scores(model: nn.Module, data: Batches, batch: int = 250) -> dict[str, float]:
    """Accuracy % and macro-F1 % of `model` (put in eval mode) on `data`."""
    model.eval()
    predicted = torch.cat(
        [
            model(data.ids[i : i + batch], data.mask[i : i + batch]).argmax(1)
            for i in range(0, len(data), batch)
        ]
    )
    confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.int64)
    confusion.index_put_((data.labels, predicted), torch.ones_like(predicted), accumulate=True)
    true_positive = confusion.diag().double()
    precision = true_positive / confusion.sum(0).clamp(min=1)
    recall = true_positive / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {
        "accuracy": 100 * true_positive.sum().item() / len(data),
        "macro_f1": 100 * f1.mean().item(),
    }


# ---------------------------------------------------------------------------------- a run


def run_row(stage: str, row: TextRow, root: Path, progress: bool = True) -> dict[str, Any]:
    """Train one row and return its result (not written: `run_stage` does, atomically)."""
    from mapnet_experiments.models.text import load_sentence_classifier

    lr = row.lr if row.lr is not None else chosen_lr(row.method, root)
    chosen = root / "select" / f"{row_label(row.method)}-lr{lr:g}.json"
    if stage == "final" and row.seed == 0 and chosen.exists():  # select's run at this rate
        return json.loads(chosen.read_text()) | {"stage": stage, "reused": str(chosen)}
    data = tweet_data()
    head_rate = lr if row.method.name == "head" else head_lr(root)
    torch.manual_seed(row.seed)  # the head's initialisation
    started = time.perf_counter()
    built = build(load_sentence_classifier(CLASSES, progress=False), row.method, row.seed)
    build_seconds = time.perf_counter() - started
    head, rest = built.parameter_groups()
    groups = [{"params": head, "lr": head_rate}] + ([{"params": rest, "lr": lr}] if rest else [])
    optimizer = torch.optim.Adam(groups)
    train = data["train"]
    steps = math.ceil(len(train) / BATCH)
    order = torch.Generator().manual_seed(row.seed)
    total = steps * row.epochs
    rates = [group["lr"] for group in optimizer.param_groups]

    def cosine(step: int) -> list[float]:  # every group's rate falls by the same factor
        factor = 0.5 * (1 + math.cos(math.pi * step / total))
        return [rate * factor for rate in rates]

    loop = Loop(optimizer, epochs=row.epochs, steps=steps, config={"row": dataclasses.asdict(row)},
                label=f"{stage}/{row.id} epoch", show_progress=progress, loss_key="loss",
                lr_at=cosine if row.schedule == "cosine" else None)  # fmt: skip
    step_seconds: list[float] = []
    state = {"permutation": torch.empty(0, dtype=torch.int64), "loss": math.nan, "tick": 0.0}

    def step(i: int) -> dict[str, float]:
        if i == 0:
            built.model.train()
            state["permutation"] = torch.randperm(len(train), generator=order)
        chosen = state["permutation"][i * BATCH : (i + 1) * BATCH]
        state["tick"] = time.perf_counter()
        logits = built.model(train.ids[chosen], train.mask[chosen])
        loss = nn.functional.cross_entropy(logits, train.labels[chosen])
        loss.backward()
        state["loss"] = loss.item()
        return {"loss": state["loss"]}

    def after_step() -> None:
        step_seconds.append(time.perf_counter() - state["tick"])

    def end_epoch(epoch: int) -> dict[str, Any]:
        figures = scores(built.model, data["validation"])
        return {"epoch": epoch, "loss": state["loss"]} | {f"val_{k}": v for k, v in figures.items()}

    history = loop.run(step, end_epoch, dict, lambda folder: None, after_step=after_step)
    besides_head, head_numbers = built.trainable_counts()
    result = {
        "stage": stage,
        "row": dataclasses.asdict(row) | {"lr": lr},
        "head_lr": head_rate,
        "label": row_label(row.method),
        "trainable_besides_head": besides_head,
        "head_parameters": head_numbers,
        "details": built.details,
        "history": history,
        "val_accuracy": history[-1]["val_accuracy"],
        "val_macro_f1": history[-1]["val_macro_f1"],
        "step_seconds_median": statistics.median(step_seconds[1:] or step_seconds),
        "build_seconds": build_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "checkpoint_bytes": checkpoint_bytes(built),
        "epochs": row.epochs,
        "schedule": row.schedule,
        "batch": BATCH,
        "steps": total,
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }
    if stage in ("select", "final"):  # levers never see the test split
        result |= {f"test_{k}": v for k, v in scores(built.model, data["test"]).items()}
    return result


def run_stage(
    stage: str,
    rows: list[TextRow],
    root: Path = RESULTS_DIR,
    deadline: float | None = None,
    progress: bool = True,
    runner: Runner | None = None,
    poll: float = 30.0,
) -> list[Path]:
    """Run every row not yet finished; returns the result files. The head's rows go first and
    the others wait until every head row has finished (they need its rate), polling every
    `poll` seconds while another process trains one. A row is locked while it runs, so
    processes started with the same command share a stage."""
    runner = runner or functools.partial(in_fresh_process, run_row)
    heads = [row for row in rows if row.method.name == "head"]
    others = [row for row in rows if row.method.name != "head"]
    done = run_rows(STUDY_NAME, stage, heads, root, runner, deadline, progress)
    while len(done) < len(heads):
        if deadline is not None and time.monotonic() > deadline:
            return done
        time.sleep(poll)  # another process is training a head row
        done = run_rows(STUDY_NAME, stage, heads, root, runner, deadline, progress)
    return done + run_rows(STUDY_NAME, stage, others, root, runner, deadline, progress)
