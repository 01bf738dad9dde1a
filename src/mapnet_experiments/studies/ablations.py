"""`mapnet repro ablations`: the paper's Tables 6–8 on CNN2, what runs (the specs, the
choices, the plan), and the Tables 6–7 page; `studies.compression` reports Table 8 and adds the
int8 stage.

    Table 7 (§3.4)   what trains: Ours*, Ours* − WM (α = 0), LV + WMAP, Full DNN, LV + FullDNN
    Table 6 (§3.5)   the mapping loss: the task loss alone, + one term, all terms (Fashion-MNIST)
    Table 8 (§2.2.5) compression: low-rank FC1 (LRD), 90 % magnitude pruning with fixed masks
                     (3 more epochs from a trained run), int8: post-training (PTQ) and
                     quantisation-aware through the mapping (QAT, 3 more epochs)

Every row runs with seeds 0, 1 and 2 (another W, θ₀, batch order and validation split) and is
reported as mean ± std over the seeds; runs are ordered seed by seed, so a table is complete for
seed 0 before seed 1 starts. All runs live in results/ablations/ (pruning and QAT continue runs
of Table 7); each is resumable by epoch (repro.run_table). Choices (the learning rates of the new
variants and of the continued runs) come from the `select` rows: seed 0, Fashion-MNIST, scored on
the validation split only.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mapnet.compress import PRUNE_SCOPES
from mapnet_experiments.studies.facts import Facts, mean, pair, points
from mapnet_experiments.studies.report import (
    PUBLIC_REPRODUCTION,
    cell,
    draw_curves,
    mean_std,
    write_page,
)
from mapnet_experiments.studies.runner import TableRow, run_name, run_table
from mapnet_experiments.studies.study import Options, Study

ROOT = Path("results/ablations")
SEEDS = (0, 1, 2)
DATASETS = ("mnist", "fashion-mnist")
CONTINUE_EPOCHS = 3  # pruning and QAT continue a finished 10-epoch run for this many epochs

S1024 = {"latent_dim": 1024, "projection": "structured"}
S2048 = {"latent_dim": 2048, "projection": "structured"}
LW2688 = {
    "strategy": "layerwise",
    "latent_dim": 2688,
    "layer_split": "equal",  # 4 × 672, as the paper's Ours 2688
    "projection": "structured",
}
ALL_TERMS = {"stability": True, "smoothness": True, "alignment": True}

# Learning rates chosen by the select rows (validation accuracy, seed 0, Fashion-MNIST; the
# report prints the figures). A trained W moves every weight at once: Adam at the latent's 0.1
# diverges, so it gets its own grid.
FULL_DNN_LR = 1e-3
# Pruning: global magnitude (all weights together) beat tensor by tensor at every rate tried,
# for the mapping and for CNN2 alike; the best rates are at or next to the grid's top.
PRUNE_SCOPE = "global"
PRUNE_MAPPED_LR = 0.3
PRUNE_PLAIN_LR = 1e-2
QAT_MAPPED_LR = 0.1
QAT_PLAIN_LR = 1e-2


@dataclass(frozen=True)
class Spec:
    """One table row before it is expanded per seed."""

    id: str
    label: str
    mode: str
    mapping: dict[str, Any]
    paper: tuple[float | None, float | None]  # (MNIST, Fashion-MNIST) test accuracy %
    public: tuple[float | None, float | None] = (None, None)
    train: dict[str, Any] | None = None
    start_from: str | None = None
    model: str = "cnn2"

    def row(self, seed: int) -> TableRow:
        return TableRow(
            f"{self.id}-s{seed}",
            self.model,
            self.label,
            self.mode,
            self.mapping,
            self.paper,
            self.public,
            dict(self.train or {}),
            seed,
            f"{self.start_from}-s{seed}" if self.start_from else None,
        )


def _variant(name: str, **train: Any) -> dict[str, Any]:
    return {"variant": name} | train


# ---------------------------------------------------------------- Table 7: what trains

TABLE7 = [
    Spec("cnn2", "CNN2 (trained directly)", "plain", {}, (98.69, 90.40), (99.06, 91.19)),
    Spec("ours-2048", "Ours* 2048", "mapped", S2048, (98.66, 91.88), (98.08, 86.82)),
    Spec("ours-1024", "Ours* 1024", "mapped", S1024, (97.88, 89.49), (97.10, 85.04)),
    Spec(
        "wm-1024",
        "Ours* − WM 1024 (α = 0)",
        "mapped",
        S1024 | {"alpha": 0.0},
        (95.62, 86.51),
    ),
    Spec(
        "wm-2048",
        "Ours* − WM 2048 (α = 0)",
        "mapped",
        S2048 | {"alpha": 0.0},
        (96.55, 87.66),
        (98.29, 86.43),
    ),
    Spec(
        "wmap-2048",
        "LV + WMAP 2048 (z 1024 + s 1024)",
        "mapped",
        S1024,
        (97.90, 89.30),
        (97.33, 84.52),
        _variant("lv-wmap"),
    ),
    Spec(
        "wmap-4096",
        "LV + WMAP 4096 (z 2048 + s 2048)",
        "mapped",
        S2048,
        (98.48, 91.93),
        train=_variant("lv-wmap"),
    ),
    # The paper's Full DNN has 6,753,104 trainable numbers, which no P×d matrix of CNN2 gives
    # (108,618 × 62 = 6,734,316 is the nearest); d = 62 is used.
    Spec(
        "full-dnn",
        "Full DNN (W 108,618 × 62 trains, z fixed)",
        "mapped",
        {"latent_dim": 62, "projection": "dense"},
        (97.12, 90.11),
        train=_variant("full-dnn", lr=FULL_DNN_LR),
    ),
    Spec(
        "lv-full-dnn-5",
        "LV + FullDNN (z 5 and W)",
        "mapped",
        {"latent_dim": 5, "projection": "dense"},
        (96.16, 90.11),
        train=_variant("lv-full-dnn", lr=FULL_DNN_LR),
    ),
    Spec(
        "lv-full-dnn-15",
        "LV + FullDNN (z 15 and W)",
        "mapped",
        {"latent_dim": 15, "projection": "dense"},
        (97.60, 90.67),
        train=_variant("lv-full-dnn", lr=FULL_DNN_LR),
    ),
]

# ---------------------------------------------------------------- Table 6: the mapping loss
# (paper: Fashion-MNIST only). The task-loss column is Table 7's Ours* 2048 and Table 8's Ours
# 2688 run; each other column switches terms on, with trainable (uncertainty) coefficients.
LOSS_TERMS = {
    "stab": ("+ stab", {"stability": True, "smoothness": False, "alignment": False}),
    "smooth": ("+ smooth", {"stability": False, "smoothness": True, "alignment": False}),
    "align": ("+ align", {"stability": False, "smoothness": False, "alignment": True}),
    "all": ("all terms", ALL_TERMS),
}
TABLE6_MODELS = {  # id -> (label, mapping, the task-loss row, paper's figures per column)
    "2048": (
        "Ours* 2048",
        S2048,
        "ours-2048",
        {"task": 87.88, "stab": 89.91, "smooth": 90.23, "align": 90.11, "all": 91.88},
    ),
    "lw-2688": (
        "Ours† 2688",
        LW2688,
        "ours-lw-2688",
        {"task": 91.11, "stab": 91.89, "smooth": 91.50, "align": 91.67, "all": 94.08},
    ),
}
TABLE6 = [
    Spec(f"loss-{term}-{key}", f"{label}, {name}", "mapped", mapping, (None, paper[term]),
         train={"loss": terms})
    for key, (label, mapping, _, paper) in TABLE6_MODELS.items()
    for term, (name, terms) in LOSS_TERMS.items()
]  # fmt: skip

# ---------------------------------------------------------------- Table 8: compression

_PRUNE = {"sparsity": 0.9, "prune_scope": PRUNE_SCOPE, "epochs": CONTINUE_EPOCHS}
_PRUNE_MAPPED = _PRUNE | {"lr": PRUNE_MAPPED_LR}
_PRUNE_PLAIN = _PRUNE | {"lr": PRUNE_PLAIN_LR}
_QAT_MAPPED = {"fake_quant": True, "epochs": CONTINUE_EPOCHS, "lr": QAT_MAPPED_LR}
_QAT_PLAIN = {"fake_quant": True, "epochs": CONTINUE_EPOCHS, "lr": QAT_PLAIN_LR}
TABLE8 = [
    # Table 8's own figures for Ours 2688; the public reproduction's are its Table 1 row.
    Spec("ours-lw-2688", "Ours† 2688", "mapped", LW2688, (99.28, 94.08), (98.35, 87.38)),
    Spec(
        "cnn2-lrd",
        "CNN2 + LRD (FC1 rank 32, trained directly)",
        "plain",
        {},
        (98.12, 89.67),
        (99.11, 90.43),
        model="cnn2-lrd",
    ),
    Spec(
        "ours-lrd-1456",
        "Ours* + LRD 1456",
        "mapped",
        {"latent_dim": 1456, "projection": "structured"},
        (97.80, 90.67),
        model="cnn2-lrd",
    ),
    Spec(
        "ours-lw-lrd-2688", "Ours† + LRD 2688", "mapped", LW2688, (98.81, 93.55), model="cnn2-lrd"
    ),
    Spec(
        "cnn2-prune",
        "CNN2 + Prune 90 %",
        "plain",
        {},
        (95.87, 87.91),
        (97.90, 86.44),
        _PRUNE_PLAIN,
        "cnn2",
    ),
    Spec(
        "ours-2048-prune",
        "Ours* 2048 + Prune 90 %",
        "mapped",
        S2048,
        (95.93, 88.70),
        train=_PRUNE_MAPPED,
        start_from="ours-2048",
    ),
    Spec(
        "ours-lw-2688-prune",
        "Ours† 2688 + Prune 90 %",
        "mapped",
        LW2688,
        (97.15, 91.79),
        train=_PRUNE_MAPPED,
        start_from="ours-lw-2688",
    ),
    Spec(
        "cnn2-qat",
        "CNN2 + int8 QAT",
        "plain",
        {},
        (None, None),
        train=_QAT_PLAIN,
        start_from="cnn2",
    ),
    Spec(
        "ours-2048-qat",
        "Ours* 2048 + int8 QAT",
        "mapped",
        S2048,
        (None, None),
        train=_QAT_MAPPED,
        start_from="ours-2048",
    ),
    Spec(
        "ours-lw-2688-qat",
        "Ours† 2688 + int8 QAT",
        "mapped",
        LW2688,
        (None, None),
        train=_QAT_MAPPED,
        start_from="ours-lw-2688",
    ),
]
# Post-training int8 of these finished runs (and of every QAT run), no training.
INT8_OF = ("cnn2", "ours-2048", "ours-lw-2688", "cnn2-qat", "ours-2048-qat", "ours-lw-2688-qat")

# ---------------------------------------------------------------- selection (validation only)


def _select(spec: Spec, lr: float, epochs: int) -> Spec:
    train = dict(spec.train or {}) | {"lr": lr, "epochs": epochs}
    scope = train.get("prune_scope", "tensor")
    tag = "" if scope == "tensor" or not train.get("sparsity") else f"-{scope}"
    return replace(spec, id=f"select-{spec.id}{tag}-lr{lr:g}", train=train)


_BY_ID = {spec.id: spec for spec in TABLE7 + TABLE8}


def _with(spec: Spec, **train: Any) -> Spec:
    return replace(spec, train=dict(spec.train or {}) | train)


SELECT = (
    [
        _select(_BY_ID[name], lr, epochs=3)
        for name in ("full-dnn", "lv-full-dnn-5")
        for lr in (1e-4, 1e-3, 1e-2)
    ]
    + [
        _select(_with(_BY_ID[name], prune_scope=scope), lr, epochs=CONTINUE_EPOCHS)
        for name, grid in (
            ("ours-2048-prune", (1e-2, 1e-1, 3e-1, 1.0)),
            ("cnn2-prune", (1e-4, 1e-3, 3e-3, 1e-2)),
        )
        for scope in PRUNE_SCOPES
        for lr in grid
    ]
    + [
        _select(_BY_ID[name], lr, epochs=CONTINUE_EPOCHS)
        for name, grid in (("ours-2048-qat", (1e-2, 1e-1, 3e-1)), ("cnn2-qat", (1e-4, 1e-3, 1e-2)))
        for lr in grid
    ]
)


def choices(root: Path = ROOT) -> dict[str, Any]:
    """What the select runs choose (best final validation accuracy; ties: the smaller lr), per
    setting; a setting whose candidates have not all finished is left out."""

    def best(prefix: str, scopes: tuple[str, ...] = ("",)) -> tuple[str, float] | None:
        found = []
        for spec in SELECT:
            rest = spec.id.removeprefix(f"select-{prefix}")
            if rest == spec.id or not rest.startswith(tuple(f"{s}-lr" for s in scopes)):
                continue
            result = load_run(root, run_name(f"{spec.id}-s0", "fashion-mnist"))
            if result is None:
                return None
            train = spec.train or {}
            found.append(
                (result["val_acc"], -train["lr"], train.get("prune_scope", ""), train["lr"])
            )
        if not found:
            return None
        top = max(found)
        return top[2], top[3]

    out: dict[str, Any] = {}
    full, lv = best("full-dnn"), best("lv-full-dnn-5")
    if full and lv and full[1] == lv[1]:
        out["FULL_DNN_LR"] = full[1]
    for key, prefix in (("MAPPED", "ours-2048"), ("PLAIN", "cnn2")):
        prune = best(f"{prefix}-prune", ("", "-global"))
        if prune:
            out[f"PRUNE_{key}_LR"] = prune[1]
            out[f"PRUNE_{key}_SCOPE"] = prune[0] or "tensor"
        qat = best(f"{prefix}-qat")
        if qat:
            out[f"QAT_{key}_LR"] = qat[1]
    return out


def rows(specs: Iterable[Spec], seeds: Iterable[int] = SEEDS) -> list[TableRow]:
    """Seed-major: every spec at seed 0, then seed 1, …; specs keep their order, which puts
    the runs a row continues before it."""
    specs = list(specs)
    return [spec.row(seed) for seed in seeds for spec in specs]


def plan(table: str, seeds: Iterable[int] = SEEDS) -> list[tuple[TableRow, tuple[str, ...]]]:
    """The runs of one command, with the data sets each row runs on."""
    seeds = tuple(seeds)
    if table == "ablations":
        runs = [(row, DATASETS) for row in rows(TABLE7 + TABLE8[:1], seeds)]
        # Table 6 is Fashion-MNIST only (the paper's), after Table 7's runs.
        return runs + [(row, ("fashion-mnist",)) for row in rows(TABLE6, seeds)]
    if table == "compression":
        return [(row, DATASETS) for row in rows(TABLE7[:2] + TABLE8, seeds)]
    if table == "select-bases":  # the runs the continued candidates start from
        return [(_BY_ID[name].row(0), ("fashion-mnist",)) for name in ("cnn2", "ours-2048")]
    if table == "select":
        return [(spec.row(0), ("fashion-mnist",)) for spec in SELECT]
    raise ValueError(f"unknown table {table!r}: ablations, compression, select-bases or select")


# ---------------------------------------------------------------- reports


def load_run(root: Path, run: str) -> dict[str, Any] | None:
    file = root / f"{run}.json"
    return json.loads(file.read_text()) if file.exists() else None


def seed_values(root: Path, spec_id: str, dataset: str, key: str) -> list[float]:
    out = []
    for seed in SEEDS:
        result = load_run(root, f"{spec_id}-s{seed}-{dataset}")
        if result is not None and result.get(key) is not None:
            out.append(result[key])
    return out


def seed_gaps(root: Path, spec_id: str, dataset: str) -> list[float]:
    out = []
    for seed in SEEDS:
        result = load_run(root, f"{spec_id}-s{seed}-{dataset}")
        if result is not None:
            out.append(result["train_acc"] - result["test_acc"])
    return out


def trainable_text(root: Path, spec_id: str) -> str:
    for seed in SEEDS:
        for dataset in DATASETS:
            result = load_run(root, f"{spec_id}-s{seed}-{dataset}")
            if result is not None:
                return f"{result['trainable_parameters']:,}"
    return "–"


def pair_text(values: tuple[float | None, float | None]) -> str:
    return f"{cell(values[0])} / {cell(values[1])}"


HEADER = (
    "Every run: CNN2, seeds 0, 1, 2 (each seed draws its own W, θ₀, batch order and 5,000-image "
    "validation split), batch 128, 10 epochs, cosine learning rate; mapped rows Adam lr 0.1 "
    "with the structured projection unless the row says otherwise, rows trained directly Adam "
    "lr 1e-3. Figures: test accuracy % after the last epoch, mean ± std over the seeds "
    "(sample std); 'gap' = the last epoch's running training accuracy minus test accuracy."
)


def select_section(root: Path) -> list[str]:
    lines = [
        "",
        "## Choices (validation accuracy %, seed 0, Fashion-MNIST; never the test split)",
        "",
        "| candidate | epochs | final val |",
        "|---|---|---|",
    ]
    for spec in SELECT:
        result = load_run(root, run_name(f"{spec.id}-s0", "fashion-mnist"))
        value = "–" if result is None else cell(result["val_acc"])
        lines.append(
            f"| {spec.id.removeprefix('select-')} | {(spec.train or {})['epochs']} | {value} |"
        )
    lines += [
        "",
        f"Used: trained W (Full DNN, LV + FullDNN) lr {FULL_DNN_LR:g}; pruning {PRUNE_SCOPE} "
        f"magnitude, continued at lr {PRUNE_MAPPED_LR:g} (mapped) and {PRUNE_PLAIN_LR:g} (CNN2); "
        f"QAT continued at lr {QAT_MAPPED_LR:g} (mapped) and {QAT_PLAIN_LR:g} (CNN2).",
    ]
    return lines


def _table7(root: Path) -> list[str]:
    lines = [
        "## Table 7: what trains (paper §3.4)",
        "",
        "| row | trainable | paper MNIST / FMNIST | public repro | ours MNIST | ours FMNIST "
        "| gap FMNIST |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in TABLE7:
        mnist = mean_std(seed_values(root, spec.id, "mnist", "test_acc"))
        fmnist = mean_std(seed_values(root, spec.id, "fashion-mnist", "test_acc"))
        gap = mean_std(seed_gaps(root, spec.id, "fashion-mnist"))
        lines.append(
            f"| {spec.label} | {trainable_text(root, spec.id)} | {pair_text(spec.paper)} | "
            f"{pair_text(spec.public)} | {mnist} | {fmnist} | {gap} |"
        )
    return lines


def _table6(root: Path) -> list[str]:
    columns = ["task", *LOSS_TERMS]
    names = ["task loss"] + [name for name, _ in LOSS_TERMS.values()]
    lines = [
        "",
        "## Table 6: the mapping loss (paper §3.5; Fashion-MNIST)",
        "",
        "Each cell: ours (mean ± std over seeds), then the paper's figure in brackets. The",
        "task-loss column is the Table 7 / Table 8 run of the same mapping.",
        "",
        "| mapping | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, (label, _, task_row, paper) in TABLE6_MODELS.items():
        cells = []
        for column in columns:
            spec_id = task_row if column == "task" else f"loss-{column}-{key}"
            ours = mean_std(seed_values(root, spec_id, "fashion-mnist", "test_acc"))
            cells.append(f"{ours} [{cell(paper[column])}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def report(root: Path = ROOT, out: Path | None = None, figures: bool = True) -> str:
    """docs/results/ablations.md (Tables 6–7) from root's files."""
    return tables_page(
        "ablations",
        "# The paper's ablations (Tables 6–7), reproduced",
        root,
        out,
        _table7(root) + _table6(root),
        TABLE7 + TABLE8[:1] + TABLE6,
        figures,
    )


def tables_page(
    table: str,
    title: str,
    root: Path,
    out: Path | None,
    sections: list[str],
    specs: list[Spec],
    figures: bool = True,
) -> str:
    """A Tables 6–8 page: the title, how every run trained, `sections`, the choices, and the
    seed-0 training curves of `specs` (drawn unless `figures` is False)."""
    out = out or Path(f"docs/results/{table}.md")
    lines = [
        title,
        "",
        f"Generated by `mapnet repro {table} --report` from `{root}/*.json`; the runs come from "
        f"`mapnet repro {table}` (resumable). " + HEADER,
        "",
        PUBLIC_REPRODUCTION,
        "",
    ]
    lines += sections
    lines += select_section(root)
    figure = out.with_name(f"curves-{table}.png")
    panels = {
        spec.label: {
            dataset: result
            for dataset in DATASETS
            if (result := load_run(root, f"{spec.id}-s0-{dataset}")) is not None
        }
        for spec in specs
    }
    if any(panels.values()):
        if figures:
            draw_curves(panels, figure, f"{table}: accuracy per epoch, seed 0")
        lines += [
            "",
            f"Training (dashed) and validation (solid) accuracy per epoch, seed 0: "
            f"[{figure.name}]({figure.name}).",
        ]
    return write_page(lines, out)


def seed_stats(root: Path, spec_id: str, dataset: str) -> tuple[float, float] | None:
    """(mean, sample std) of a row's test accuracy over the seeds (None below two seeds)."""
    values = seed_values(root, spec_id, dataset, "test_acc")
    return (statistics.mean(values), statistics.stdev(values)) if len(values) > 1 else None


def facts(results: Path) -> Facts | None:
    """The index's Tables 6–7 paragraph: the headline row against the paper, what dropping the
    modulation and training W do, and each loss term against the task loss and its spread."""
    root = results / "ablations"
    ids = ["ours-2048", "ours-1024", "wm-2048", "wm-1024", "full-dnn"]
    stats = {(i, d): seed_stats(root, i, d) for i in ids for d in DATASETS}
    if any(value is None for value in stats.values()):
        return None

    def means(spec_id: str) -> list[float]:
        return [stats[(spec_id, d)][0] for d in DATASETS]  # type: ignore[index]

    ours = means("ours-2048")
    spread = [stats[("ours-2048", d)][1] for d in DATASETS]  # type: ignore[index]
    drops = {
        size: [a - b for a, b in zip(means(f"wm-{size}"), means(f"ours-{size}"))]
        for size in ("1024", "2048")
    }
    every = [v for values in drops.values() for v in values]
    modulation = (
        "at or above Ours* in every case, so modulating W by z gains nothing here"
        if all(v >= 0 for v in every)
        else "below Ours* in every case, so the modulation helps"
        if all(v < 0 for v in every)
        else "above Ours* in some cases and below in others"
    )
    full = means("full-dnn")
    gaps = [mean(seed_gaps(root, i, "fashion-mnist")) for i in ("full-dnn", "ours-2048")]
    trainable = trainable_text(root, "full-dnn")
    terms, gains = [], []
    for key, (label, _, task_row, _) in TABLE6_MODELS.items():
        task = seed_stats(root, task_row, "fashion-mnist")
        cells = []
        for term, (name, _) in LOSS_TERMS.items():
            value = seed_stats(root, f"loss-{term}-{key}", "fashion-mnist")
            if task is None or value is None:
                return None
            cells.append(f"{name.removeprefix('+ ')} {points(value[0] - task[0])}")
            gains.append((value[0] - task[0], task[1], label))
        terms.append(f"{label} {', '.join(cells)}")
    paper_gains = [
        paper[term] - paper["task"]
        for _, _, _, paper in TABLE6_MODELS.values()
        for term in LOSS_TERMS
    ]
    best, spread_of_best, label = max(gains)
    helps = (
        f"the largest gain ({points(best)}, {label}) is below the task-loss run's seed std "
        f"({spread_of_best:.2f})"
        if best <= spread_of_best
        else f"the largest gain ({points(best)}, {label}) exceeds the task-loss run's seed std "
        f"({spread_of_best:.2f})"
    )
    paragraph = (
        f"Tables 6–7 on CNN2, seeds {', '.join(map(str, SEEDS))}, mean test accuracy % "
        f"(MNIST / Fashion-MNIST). Ours* 2048 reaches {pair(ours)} (seed std {pair(spread)}) "
        f"against the paper's {pair(next(s.paper for s in TABLE7 if s.id == 'ours-2048'))}. "
        f"Without the modulation (α = 0) the mapping ends "
        f"{' / '.join(points(v) for v in drops['1024'])} points against Ours* at "
        f"1,024 and {' / '.join(points(v) for v in drops['2048'])} at 2,048, {modulation}. "
        f"Training W itself (Full DNN, {trainable} numbers) reaches {pair(full)}, "
        f"{' / '.join(points(a - b) for a, b in zip(full, ours))} points against the latent, "
        f"and overfits {'more' if gaps[0] > gaps[1] else 'less'} (Fashion-MNIST train − test "
        f"{gaps[0]:.2f} against {gaps[1]:.2f}). The "
        f"mapping-loss terms against the task loss alone (Fashion-MNIST, points): "
        f"{'; '.join(terms)}; {helps}, where the paper reports gains of "
        f"{points(min(paper_gains))} to {points(max(paper_gains))}."
    )
    return Facts("Ablations (Tables 6–7)", "ablations.md", "mapnet repro ablations", paragraph)


def run_stages(table: str, options: Options, stages: tuple[str, ...]) -> None:
    """The `select` and `train` stages of the ablations or compression table. select: the
    runs the choices continue (table runs, test recorded), then the candidates themselves,
    scored on validation only."""
    for stage in stages:
        if stage not in ("select", "train"):
            continue
        for part in ["select-bases", "select"] if stage == "select" else [table]:
            run_table(
                [],
                root=options.root_or(ROOT),
                deadline=options.deadline,
                progress=options.progress,
                evaluate_test=part != "select",
                plan=plan(part, options.seeds),
            )


STUDY = Study(
    name="ablations",
    summary="the paper's Tables 6-7 on CNN2 (what trains: Ours*, - WM, LV + WMAP, Full DNN, "
    "LV + FullDNN; the mapping loss term by term), seeds 0-2; select chooses learning rates on "
    "validation; writes docs/results/ablations.md",
    stages=("select", "train"),
    default=("select", "train"),
    run=lambda options, stages: run_stages("ablations", options, stages),
    report=lambda options: report(options.root_or(ROOT), options.report_to, options.figures),
    example="mapnet repro ablations --stages train --seeds 0 --threads 1",
    page="ablations.md",
    facts=facts,
)
