"""The shared table runner: a table is rows (`TableRow`, one TrainConfig each), and
`run_table` runs every (row, data set) not finished yet through the recipe (recipe.run.train),
resuming partial ones.

Each run trains in <root>/runs/<name>/ (config, metrics.jsonl and, while it is unfinished, the
per-epoch resume state: small enough to commit, so a later session on a fresh machine picks up
where this one stopped) and, when finished, leaves <root>/<name>.json; its folder then keeps
results.json, metrics.jsonl and the final checkpoint, not the resume state (recipe/run.py's
docstring lists the folder). Reports are generated from those files only (studies.report).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mapnet import MappingConfig, files
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import train
from mapnet_experiments.studies.study import Options, Study

# Choices for every row, made on the validation split (docs/method.md), never on test.
EPOCHS = 10
MAPPED = {"optimizer": "adam", "lr": 0.1, "schedule": "cosine"}
PLAIN = {"optimizer": "adam", "lr": 1e-3, "schedule": "cosine"}
DATASETS = ("mnist", "fashion-mnist")


@dataclass(frozen=True)
class TableRow:
    """One row of a table (Table 1 and the studies run like it), with the paper's and the public
    reproduction's figures where the paper has the row."""

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


def run_name(row_id: str, dataset: str) -> str:
    """A run's name: its result file <root>/<name>.json, its folder <root>/runs/<name>/."""
    return f"{row_id}-{dataset}"


def run_id(row: TableRow, dataset: str) -> str:
    return run_name(row.id, dataset)


def run_table(
    rows: list[TableRow],
    *,
    root: Path,
    datasets: tuple[str, ...] = DATASETS,
    epochs: int = EPOCHS,
    deadline: float | None = None,
    progress: bool = True,
    data_dir: str | None = None,
    val_size: int = 5000,
    evaluate_test: bool = True,
    plan: list[tuple[TableRow, tuple[str, ...]]] | None = None,
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
                    files.write_json(result_file, result)
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
    """True while another process trains the run in <out> (holds its lock)."""
    with _run_lock(out) as mine:
        return not mine


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[bool]:
    """The run folder's lock (mapnet.files.lock, what recipe.run.train holds too), without
    waiting: yields False if another process holds it."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(files.lock(out))
        except files.InUseError:
            yield False
            return
        yield True


def chosen_rows(rows: list[TableRow], wanted: tuple[str, ...] | None) -> list[TableRow]:
    """The rows `--rows` names (None: all), in the table's order; an unknown id is an error
    listing the known ones."""
    if wanted is None:
        return list(rows)
    known = {row.id: row for row in rows}
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; rows: {', '.join(known)}")
    return [row for row in rows if row.id in wanted]


def run_one_dataset(
    rows: list[TableRow],
    dataset: str,
    reference: Callable[[Path, str | None], Any],
    root: Path,
    data_dir: str | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> list[Path]:
    """Every row on `dataset` not finished yet (resumable, shareable between processes), then
    the table's reference without training, `reference(root, data_dir)` (persistence, all
    background)."""
    written = run_table(
        rows, root=root, datasets=(dataset,), progress=progress, data_dir=data_dir, **kwargs
    )
    reference(root, data_dir)
    return written


def run_chosen(
    rows: list[TableRow], root: Path, options: Options, *, evaluate_test: bool = True
) -> None:
    """`run_table` over the rows `--rows` names, with the command's options."""
    run_table(
        chosen_rows(rows, options.rows),
        root=root,
        datasets=options.datasets,
        epochs=options.epochs or EPOCHS,
        deadline=options.deadline,
        progress=options.progress,
        data_dir=options.data_dir,
        val_size=options.val_size,
        evaluate_test=evaluate_test,
    )


def task_study(table: ModuleType, *, name: str, summary: str, example: str) -> Study:
    """The Study of a one-data-set table of the recipe with an example figure (forecasting,
    segmentation), from the module `table`, which defines ROOT (its results), REPORT (its
    page), FIGURE (its example), `run(root, data_dir, progress, deadline, epochs)`,
    `report(root, out, data_dir)`, `figure(root, out, data_dir)` and `facts(results)`."""
    root, page, figure_name = table.ROOT, table.REPORT, table.FIGURE.name
    run, report, figure = table.run, table.report, table.figure

    def run_stages(options: Options, stages: tuple[str, ...]) -> None:
        run(options.root_or(root), data_dir=options.data_dir, progress=options.progress,
            deadline=options.deadline, epochs=options.epochs or EPOCHS)  # fmt: skip

    def write(options: Options) -> str:
        folder, out = options.root_or(root), options.report_or(page)
        text = report(folder, out, data_dir=options.data_dir)
        if not options.figures:
            return text
        drawn = figure(folder, out.with_name(figure_name), data_dir=options.data_dir)
        return text + "\n" + str(drawn or "(the example figure needs the seed-0 runs)")

    return Study(name=name, summary=summary, stages=("train",), default=("train",),
                 run=run_stages, report=write, example=example, page=page.name,
                 facts=table.facts)  # fmt: skip
