"""`mapnet repro table1`: the paper's Table 1 (paper Table 1), one resumable run per row.

Each run trains in results/table1/runs/<id>/ (config, metrics.jsonl and, while it is unfinished,
the per-epoch resume state: small enough to commit, so a later session on a fresh machine picks
up where this one stopped) and, when finished, leaves results/table1/<id>.json; its folder then
keeps results.json, metrics.jsonl and the final checkpoint, not the resume state (train.py's
docstring lists the folder). The report is generated from those files only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapnet.config import MappingConfig
from mapnet.files import write_json
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import train

TABLE1_DIR = Path("results/table1")

# Choices for every row, made on the validation split (docs/method.md), never on test.
EPOCHS = 10
MAPPED = {"optimizer": "adam", "lr": 0.1, "schedule": "cosine"}
PLAIN = {"optimizer": "adam", "lr": 1e-3, "schedule": "cosine"}


@dataclass(frozen=True)
class Row:
    """One row of Table 1 with the paper's and the public reproduction's figures (paper Table 1)."""

    id: str
    model: str
    label: str
    mode: str
    mapping: dict[str, Any]
    paper: tuple[float | None, float | None]  # (MNIST, Fashion-MNIST) test accuracy %
    public: tuple[float | None, float | None]
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (lr, loss …)
    seed: int = 0  # the run's seed: W, θ₀, batch order and the validation split
    # Another row's id: this run continues that row's finished run on the same data set
    # (pruning and quantisation-aware training start from a trained model).
    start_from: str | None = None

    def config(
        self,
        dataset: str,
        seed: int | None = None,
        epochs: int = EPOCHS,
        data_dir: str | None = None,
        val_size: int = 5000,
        root: Path | None = None,
    ) -> TrainConfig:
        seed = self.seed if seed is None else seed
        settings = {"epochs": epochs} | (PLAIN if self.mode == "plain" else MAPPED) | self.train
        if self.start_from is not None:
            if root is None:
                raise ValueError(f"row {self.id!r} starts from another run: give the results root")
            settings["start_from"] = str(root / "runs" / run_name(self.start_from, dataset))
        if self.mapping.get("preset") == "intrinsic_dimension":
            mapping = MappingConfig.intrinsic_dimension(
                **{k: v for k, v in self.mapping.items() if k != "preset"}, seed=seed
            )
        else:
            mapping = MappingConfig(**self.mapping, seed=seed)
        return TrainConfig(
            model=self.model,
            dataset=dataset,
            mode=self.mode,
            seed=seed,
            data_dir=data_dir,
            val_size=val_size,
            mapping=mapping,
            **settings,
        )


def _layerwise(total: int, split: str = "equal") -> dict[str, Any]:
    return {"strategy": "layerwise", "latent_dim": total, "layer_split": split}


# Every row names its projection. These runs were made when MappingConfig's default was "dense";
# the default is now "structured", and a row that relied on it would build a different W than its
# stored results/table1/runs/<id>/config.json records (a resume would refuse it, a rerun would
# not be the run reported). The baselines train no mapping, but their stored configs record one.
TABLE1 = [
    Row(
        "cnn1-baseline",
        "cnn1",
        "CNN1",
        "plain",
        {"projection": "dense"},
        (99.32, 92.89),
        (99.38, 92.29),
    ),
    Row(
        "cnn1-single-1024",
        "cnn1",
        "Ours* 1024",
        "mapped",
        {"latent_dim": 1024, "projection": "dense"},
        (98.78, 93.02),
        (None, None),
    ),
    Row(
        "cnn1-single-2072",
        "cnn1",
        "Ours* 2072",
        "mapped",
        {"latent_dim": 2072, "projection": "dense"},
        (99.56, 93.91),
        (97.51, 86.21),
    ),
    # 4078 over CNN1's 6 layers: the paper gives no split; equal (680 ×4, 679 ×2) as for CNN2.
    Row(
        "cnn1-layerwise-4078",
        "cnn1",
        "Ours† 4078",
        "mapped",
        _layerwise(4078) | {"projection": "dense"},
        (99.67, 94.83),
        (98.09, 88.62),
    ),
    Row(
        "cnn1-intrinsic-2048",
        "cnn1",
        "Intrinsic dim. 2048 (Li et al.)",
        "mapped",
        {"preset": "intrinsic_dimension", "latent_dim": 2048, "projection": "dense"},
        (None, None),
        (None, None),
    ),
    Row(
        "cnn2-baseline",
        "cnn2",
        "CNN2",
        "plain",
        {"projection": "dense"},
        (98.69, 90.40),
        (99.06, 91.19),
    ),
    Row(
        "cnn2-single-1024",
        "cnn2",
        "Ours* 1024",
        "mapped",
        {"latent_dim": 1024, "projection": "dense"},
        (97.88, 89.49),
        (97.10, 85.04),
    ),
    Row(
        "cnn2-single-2048",
        "cnn2",
        "Ours* 2048",
        "mapped",
        {"latent_dim": 2048, "projection": "dense"},
        (98.66, 91.88),
        (98.08, 86.82),
    ),
    # Not in the paper: the same row with the O(P) structured projection (issue 4's parity check).
    Row(
        "cnn2-single-2048-structured",
        "cnn2",
        "Ours* 2048, structured W",
        "mapped",
        {"latent_dim": 2048, "projection": "structured"},
        (None, None),
        (None, None),
    ),
    Row(
        "cnn2-layerwise-1872",
        "cnn2",
        "Ours† 1872 (4×468)",
        "mapped",
        _layerwise(1872) | {"projection": "dense"},
        (98.98, 92.84),
        (None, None),
    ),
    Row(
        "cnn2-layerwise-2688",
        "cnn2",
        "Ours† 2688 (4×672)",
        "mapped",
        _layerwise(2688) | {"projection": "dense"},
        (99.18, 93.35),
        (98.35, 87.38),
    ),
    Row(
        "cnn2-intrinsic-2048",
        "cnn2",
        "Intrinsic dim. 2048 (Li et al.)",
        "mapped",
        {"preset": "intrinsic_dimension", "latent_dim": 2048, "projection": "dense"},
        (None, None),
        (None, None),
    ),
]
DATASETS = ("mnist", "fashion-mnist")

# `mapnet repro tuning`: what the Table 1 recipe was checked against, on the validation split
# only (these runs never evaluate the test split). CNN2 single d = 2048 with the structured
# projection: its Table 1 twin matches the dense row (docs/results/table1.md) at 1/5 of the cost,
# so ten-epoch comparisons fit a session. Each row changes one thing from the recipe.
TUNING_DIR = Path("results/tuning")
_TUNED = {"latent_dim": 2048, "projection": "structured"}
_ALL_TERMS = {"stability": True, "smoothness": True, "alignment": True}
_INTRINSIC = {"preset": "intrinsic_dimension"}  # α = 0, no gains: MappingConfig's own preset


def _tuning(id: str, label: str, mapping: dict[str, Any], seed: int = 0, **train: Any) -> Row:
    return Row(
        id, "cnn2", label, "mapped", _TUNED | mapping, (None, None), (None, None), train, seed
    )


TUNING = [
    _tuning("recipe", "the Table 1 recipe (α 0.1, per-tensor gains, lr 0.1, task loss)", {}),
    _tuning("alpha-0", "α = 0 (no modulation)", {"alpha": 0.0}),
    _tuning("alpha-1", "α = 1", {"alpha": 1.0}),
    _tuning("scaling-none", "no per-tensor gains (scaling none)", {"scaling": "none"}),
    _tuning("intrinsic", "α = 0 and no gains (intrinsic dimension)", _INTRINSIC),
    _tuning("lr-0.03", "lr 0.03", {}, lr=0.03),
    _tuning("lr-0.3", "lr 0.3", {}, lr=0.3),
    _tuning("tanh", "σ = tanh", {"activation": "tanh"}),
    _tuning(
        "all-terms",
        "all mapping-loss terms (stability, smoothness, alignment)",
        {},
        loss=_ALL_TERMS,
    ),
    _tuning("epochs-20", "20 epochs", {}, epochs=20),
    # Seed spread: another W, θ₀, batch order and validation split, for the recipe and for the
    # closest rival (α = 0, no gains), so a difference can be told from the draw.
    _tuning("recipe-seed-1", "the recipe, seed 1", {}, seed=1),
    _tuning("recipe-seed-2", "the recipe, seed 2", {}, seed=2),
    _tuning("intrinsic-seed-1", "α = 0 and no gains, seed 1", _INTRINSIC, seed=1),
    _tuning("intrinsic-seed-2", "α = 0 and no gains, seed 2", _INTRINSIC, seed=2),
]


def run_name(row_id: str, dataset: str) -> str:
    """A run's name: its result file <root>/<name>.json, its folder <root>/runs/<name>/."""
    return f"{row_id}-{dataset}"


def run_id(row: Row, dataset: str) -> str:
    return run_name(row.id, dataset)


def run_table(
    rows: list[Row],
    datasets: tuple[str, ...] = DATASETS,
    root: Path = TABLE1_DIR,
    epochs: int = EPOCHS,
    deadline: float | None = None,
    progress: bool = True,
    data_dir: str | None = None,
    val_size: int = 5000,
    evaluate_test: bool = True,
    plan: list[tuple[Row, tuple[str, ...]]] | None = None,
    poll: float = 30.0,
) -> list[Path]:
    """Run every (row, dataset) not finished yet, resuming partial ones; returns result files.

    `deadline` (time.monotonic() seconds): start no new run after it, so a session-limited
    machine stops between runs rather than inside one (a run killed anyway resumes per epoch).
    `evaluate_test=False` for runs that exist to make a choice (the tuning table).
    `plan`: (row, its data sets) pairs instead of every row on `datasets`.

    Each run is locked while it trains (an flock, released when its process ends however it
    ends), so several processes started with the same command share the table, each taking
    the next free run: on two cores, two one-thread processes. A run that starts from another
    row's run waits until that run has finished: passes repeat while they make progress, and
    while a base run is being trained by another process this one polls every `poll` seconds.
    """
    pairs = plan if plan is not None else [(row, datasets) for row in rows]
    while True:
        written: list[Path] = []
        trained = False
        waiting: dict[str, bool] = {}  # unfinished base run -> another process is training it
        for row, row_datasets in pairs:
            for dataset in row_datasets:
                result_file = root / f"{run_id(row, dataset)}.json"
                if result_file.exists():
                    written.append(result_file)
                    continue
                if deadline is not None and time.monotonic() > deadline:
                    print(f"deadline reached; {run_id(row, dataset)} and later runs left for later")
                    return written
                base = run_name(row.start_from, dataset) if row.start_from else None
                if base is not None and not (root / f"{base}.json").exists():
                    waiting[base] = _locked_elsewhere(root / "runs" / base)
                    continue
                out = root / "runs" / run_id(row, dataset)
                with _run_lock(out) as mine:
                    if result_file.exists():  # finished by another process meanwhile
                        written.append(result_file)
                        continue
                    if not mine:  # another process is training it
                        continue
                    print(f"== {run_id(row, dataset)} ({out})", flush=True)
                    config = row.config(
                        dataset, epochs=epochs, data_dir=data_dir, val_size=val_size, root=root
                    )
                    result = train(
                        config,
                        progress=progress,
                        out_dir=out,
                        resume=True,
                        evaluate_test=evaluate_test,
                    )
                    result |= {"row": row.id, "label": row.label, "dataset": dataset}
                    write_json(result_file, result)
                    written.append(result_file)
                    trained = True
        if waiting and trained:
            continue  # a base may have finished in this pass
        if any(waiting.values()):
            time.sleep(poll)
            continue
        for base in waiting:
            print(f"-- runs continuing {base} wait: it is unfinished and no process is training it")
        return written


def _locked_elsewhere(out: Path) -> bool:
    """True while another process holds the run lock of <out>."""
    with _run_lock(out) as mine:
        return not mine


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[bool]:
    """An exclusive, non-blocking flock on <out>.lock: yields False if another process holds it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def mean_std(values: list[float], digits: int = 2, seeds: int = 3) -> str:
    """ "mean ± std" over seeds (sample std), the count added when it is not `seeds`; '–' when
    none finished."""
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    text = f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return text + ("" if len(values) == seeds else f" ({len(values)} seeds)")


def seed0_config(root: Path, spec_id: str, dataset: str) -> dict[str, Any] | None:
    """The stored config of a table row's seed-0 run (None until it has finished)."""
    file = root / f"{run_name(f'{spec_id}-s0', dataset)}.json"
    return json.loads(file.read_text())["config"] if file.exists() else None


def recipe_text(plain: dict[str, Any] | None, mapped: dict[str, Any] | None) -> str:
    """How a table's runs trained, from two stored run configs (a plain and a mapped one)."""
    config = plain or mapped
    if config is None:
        return ""
    lrs = []
    if plain is not None:
        lrs.append(f"{plain['lr']:g} trained directly")
    if mapped is not None:
        lrs.append(f"{mapped['lr']:g} through a latent")
    return (
        f"{config['epochs']} epochs of {config['optimizer'].capitalize()}, {config['schedule']} "
        f"schedule, batch {config['batch_size']}, learning rate {' and '.join(lrs)}"
    )


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _per_dataset(results: list[dict[str, Any] | None], cell: Callable[[dict], str]) -> str:
    """One table cell holding a figure per data set ('–' where the run is missing)."""
    return " / ".join(cell(r) if r else "–" for r in results)


Results = dict[tuple[str, str], dict[str, Any]]  # (row id, dataset) -> a finished run's JSON


def _load_results(rows: list[Row], root: Path, datasets: tuple[str, ...]) -> Results:
    """Every finished run of `rows` under `root`, read once for a whole report."""
    return {
        (row.id, dataset): json.loads(file.read_text())
        for row in rows
        for dataset in datasets
        if (file := root / f"{run_id(row, dataset)}.json").exists()
    }


def _write(lines: list[str], out: Path) -> str:
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def report(
    root: Path = TABLE1_DIR,
    out: Path = Path("docs/results/table1.md"),
    datasets: tuple[str, ...] = DATASETS,
) -> str:
    """Markdown table from results/table1/*.json: paper vs public reproduction vs ours."""
    loaded = _load_results(TABLE1, root, datasets)
    finished = len(loaded)
    lines = [
        f"# Table 1 reproduced (test accuracy %, {' / '.join(datasets)})",
        "",
        "Generated by `mapnet repro table1 --report` from `results/table1/*.json`; the runs come",
        f"from `mapnet repro table1` ({finished} of {len(TABLE1) * len(datasets)} finished; '–' ="
        " not run yet). Every run: seed 0, batch 128, a 5,000-image validation split carved from"
        f" the training set, {EPOCHS} epochs, cosine learning rate; mapped rows: Adam lr"
        f" {MAPPED['lr']}, task loss only (chosen on validation, docs/method.md), dense"
        f" projection unless the row says otherwise; baselines: Adam lr {PLAIN['lr']}.",
        "'ours (final)' is the test accuracy after the last epoch, 'ours (best val)' the test",
        "accuracy at the epoch with the best validation accuracy, 'gap' the running training",
        "accuracy over the last epoch minus the final test accuracy.",
        "",
        "| model | row | trainable | paper | public repro | ours (final) | ours (best val) "
        "| gap | epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in TABLE1:
        results = [loaded.get((row.id, dataset)) for dataset in datasets]
        trainable = next((f"{r['trainable_parameters']:,}" for r in results if r), "–")

        final = _per_dataset(results, lambda r: _cell(r["test_acc"]))
        at_best_val = _per_dataset(results, lambda r: _cell(r["best_val_test_acc"]))
        gap = _per_dataset(results, lambda r: _cell(r["train_acc"] - r["test_acc"]))
        epochs = _per_dataset(results, lambda r: str(r["epochs"]))
        lines.append(
            f"| {row.model.upper()} | {row.label} | {trainable} | "
            f"{_cell(row.paper[0])} / {_cell(row.paper[1])} | "
            f"{_cell(row.public[0])} / {_cell(row.public[1])} | {final} | "
            f"{at_best_val} | {gap} | {epochs} |"
        )
    panels = {
        f"{row.model.upper()} {row.label}": {
            dataset: loaded[(row.id, dataset)]
            for dataset in datasets
            if (row.id, dataset) in loaded
        }
        for row in TABLE1
    }
    figure = out.with_name("curves-table1.png")
    draw_curves(panels, figure, "Table 1 runs: accuracy per epoch (seed 0)")
    lines += [
        "",
        f"Training (dashed) and validation (solid) accuracy per epoch: [{figure.name}]"
        f"({figure.name}).",
    ]
    return _write(lines + _targets_section(loaded, datasets), out)


DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def draw_curves(panels: dict[str, dict[str, dict[str, Any]]], out: Path, title: str) -> Path:
    """Training and validation accuracy per epoch from finished runs' JSON: one panel per
    name, one curve per data set ({panel: {dataset: result}})."""
    from mapnet_experiments.studies.plots import Curve, training_curves

    curves = {
        name: [
            Curve(
                DATASET_NAMES.get(dataset, dataset),
                [row["train_acc"] for row in result["history"]],
                [row["val_acc"] for row in result["history"]],
            )
            for dataset, result in runs.items()
        ]
        for name, runs in panels.items()
        if runs
    }
    return training_curves(curves, out, title)


def _targets_section(loaded: Results, datasets: tuple[str, ...]) -> list[str]:
    """Issue 3's targets for every finished mapped run: at least the public reproduction (the
    paper's figure is the goal), and a train–test gap ≤ 1.8 points and below the baseline's."""
    lines = [
        "",
        "## Targets, run by run",
        "",
        "Δ = ours (final) minus the reference, in points; gap = training minus test accuracy,",
        "compared with the paper's 1.8 and with the same model's baseline on the same data set.",
        "",
        "| run | vs public repro | vs paper | gap | gap ≤ 1.8 | gap < baseline's |",
        "|---|---|---|---|---|---|",
    ]
    names = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}

    def delta(ours: float, reference: float | None) -> str:
        if reference is None:
            return "–"
        return f"{ours - reference:+.2f} ({'met' if ours >= reference else '**not met**'})"

    for row in TABLE1:
        if row.mode == "plain":
            continue
        for index, dataset in enumerate(datasets):
            result = loaded.get((row.id, dataset))
            if result is None:
                continue
            base = loaded.get((f"{row.model}-baseline", dataset))
            gap = result["train_acc"] - result["test_acc"]
            base_gap = None if base is None else base["train_acc"] - base["test_acc"]
            figures = index < 2 and dataset in names
            public = row.public[index] if figures else None
            paper = row.paper[index] if figures else None
            below = "–" if base_gap is None else ("yes" if gap < base_gap else "**no**")
            if base_gap is not None:
                below += f" ({base_gap:.2f})"
            lines.append(
                f"| {row.model.upper()} {row.label}, {names.get(dataset, dataset)} | "
                f"{delta(result['test_acc'], public)} | {delta(result['test_acc'], paper)} | "
                f"{gap:.2f} | {'yes' if gap <= 1.8 else '**no**'} | {below} |"
            )
    lines += [
        "",
        "What was tried to close the distance, with the validation figures that decided it:",
        "[tuning.md](tuning.md) (ten-epoch runs, validation split only) and",
        "[../method.md](../method.md#how-the-defaults-were-chosen) (one-epoch sweeps).",
    ]
    return lines


def tuning_report(
    root: Path = TUNING_DIR,
    out: Path = Path("docs/results/tuning.md"),
    datasets: tuple[str, ...] = DATASETS,
) -> str:
    """Markdown table from results/tuning/*.json: validation accuracy of each variant."""
    lines = [
        f"# What the Table 1 recipe was checked against (validation accuracy %, "
        f"{' / '.join(datasets)})",
        "",
        "Generated by `mapnet repro tuning --report` from `results/tuning/*.json`; the runs come",
        "from `mapnet repro tuning` (resumable). Every run: CNN2, single latent d = 2048, the",
        "structured projection, batch 128, 5,000 validation images carved from the",
        f"training set, {EPOCHS} epochs unless the row says otherwise, cosine schedule; each row",
        "changes one thing from the recipe. These runs never evaluate the test split. 'final' =",
        "after the last epoch, 'best' = the best epoch, 'train − val' = running training accuracy",
        "of the last epoch minus the final validation accuracy, 'Δ recipe' = final minus the",
        "final of the recipe with the same seed (seed 0 unless the row names one), 'minutes' =",
        "wall time, including any time the run was paused for a benchmark.",
        "",
        "| variant | final | best | train − val | Δ recipe | epochs | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    loaded = _load_results(TUNING, root, datasets)
    for row in TUNING:
        results = [loaded.get((row.id, dataset)) for dataset in datasets]
        reference = "recipe" if row.seed == 0 else f"recipe-seed-{row.seed}"  # same draw
        recipe = [loaded.get((reference, dataset)) for dataset in datasets]

        delta = " / ".join(
            f"{r['val_acc'] - base['val_acc']:+.2f}" if r and base else "–"
            for r, base in zip(results, recipe)
        )
        final = _per_dataset(results, lambda r: _cell(r["val_acc"]))
        best = _per_dataset(results, lambda r: _cell(r["best_val_acc"]))
        gap = _per_dataset(results, lambda r: _cell(r["train_acc"] - r["val_acc"]))
        epochs = _per_dataset(results, lambda r: str(r["epochs"]))
        minutes = _per_dataset(results, lambda r: f"{r['wall_seconds'] / 60:.1f}")
        lines.append(f"| {row.label} | {final} | {best} | {gap} | {delta} | {epochs} | {minutes} |")
    return _write(lines + _seed_spread(loaded, datasets), out)


def _seed_spread(loaded: Results, datasets: tuple[str, ...]) -> list[str]:
    """Mean and range over seeds 0, 1, 2 of the recipe and of its closest rival."""
    groups = {
        "the recipe": ["recipe", "recipe-seed-1", "recipe-seed-2"],
        "α = 0 and no gains": ["intrinsic", "intrinsic-seed-1", "intrinsic-seed-2"],
    }
    lines = ["", "Over seeds 0, 1, 2 (final validation accuracy, mean [min, max]):", ""]
    for name, ids in groups.items():
        cells = []
        for dataset in datasets:
            values = [loaded[(i, dataset)]["val_acc"] for i in ids if (i, dataset) in loaded]
            if len(values) < len(ids):
                cells.append(f"{len(values)} of {len(ids)} seeds run")
            else:
                mean = sum(values) / len(values)
                cells.append(f"{mean:.2f} [{min(values):.2f}, {max(values):.2f}]")
        lines.append(f"- {name}: {' / '.join(cells)}")
    return lines
