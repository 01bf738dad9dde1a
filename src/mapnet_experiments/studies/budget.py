"""`mapnet repro budget`: accuracy against trainable numbers on Fashion-MNIST (CNN2 target).

    mapnet single and layer-wise, d ∈ {256, …, 8192}     (structured projection, the recipe)
    intrinsic-dimension training at the same d            (Li et al. 2018: θ₀ + W z)
    small CNNs trained directly at about the same counts  (two shapes, chosen on validation)
    CNN2 trained directly                                 (108,618 numbers)

Seed 0, the Table 1 recipe (10 epochs, cosine); the test split is recorded, choices use the
validation split only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mapnet_experiments.models.networks import small_cnn_widths
from mapnet_experiments.studies.facts import Facts, Pick, listing, points
from mapnet_experiments.studies.report import write_page
from mapnet_experiments.studies.runner import TableRow, run_table
from mapnet_experiments.studies.study import Options, Study

ROOT = Path("results/budget")
REPORT = Path("docs/results/budget.md")
FIGURE = Path("docs/results/budget.png")
DATASET = "fashion-mnist"
BUDGETS = (256, 512, 1024, 2048, 4096, 8192)
SHAPES = ("flat", "growing")
# The small CNNs' learning rate: every (shape, lr) pair is tried at the 2048 budget and the lr
# of the best on validation is used for every budget (select rows; ties: the smaller lr).
SMALL_CNN_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SmallCNNDoc = (
    "three conv3×3 + BatchNorm + ReLU blocks, max-pooling after the first two, global average "
    "pooling, a linear classifier; widths (w, w, w) 'flat' or (w, 2w, 4w) 'growing'"
)


def _none() -> tuple[None, None]:
    return (None, None)


def _mapped(id: str, label: str, mapping: dict) -> TableRow:
    return TableRow(id, "cnn2", label, "mapped", mapping, _none(), _none())


def small_cnn_name(budget: int, shape: str) -> str:
    return "smallcnn-" + "-".join(str(w) for w in small_cnn_widths(budget, shape))


def _small(budget: int, shape: str, lr: float, tag: str = "") -> TableRow:
    name = small_cnn_name(budget, shape)
    return TableRow(
        f"{tag}small-{shape}-{budget}-lr{lr:g}",
        name,
        f"small CNN {name.removeprefix('smallcnn-')}",
        "plain",
        {},
        _none(),
        _none(),
        {"lr": lr},
    )


SELECT = [_small(2048, shape, lr, "select-") for shape in SHAPES for lr in SMALL_CNN_LRS]
MAPPED_ROWS = (
    [
        _mapped(f"single-{d}", f"mapnet single {d}", {"latent_dim": d, "projection": "structured"})
        for d in BUDGETS
    ]
    + [
        _mapped(
            f"layerwise-{d}",
            f"mapnet layer-wise {d}",
            {
                "strategy": "layerwise",
                "latent_dim": d,
                "layer_split": "equal",
                "projection": "structured",
            },
        )
        for d in BUDGETS
    ]
    + [
        _mapped(
            f"intrinsic-{d}",
            f"intrinsic dimension {d}",
            {"preset": "intrinsic_dimension", "latent_dim": d, "projection": "structured"},
        )
        for d in BUDGETS
    ]
)


def chosen_lr(root: Path) -> float | None:
    """The small CNNs' lr chosen on validation; None until every select run has finished."""
    results = [(row, _load(root, row.id)) for row in SELECT]
    if any(result is None for _, result in results):
        return None
    best = max(results, key=lambda pair: (pair[1]["val_acc"], -pair[0].train["lr"]))  # type: ignore[index]
    return best[0].train["lr"]


def small_rows(lr: float) -> list[TableRow]:
    return [_small(d, shape, lr) for d in BUDGETS for shape in SHAPES]


def plan(root: Path = ROOT) -> list[tuple[TableRow, tuple[str, ...]]]:
    """The select runs and the mapped rows, then the small CNNs once their lr is chosen."""
    lr = chosen_lr(root)
    rows = SELECT + MAPPED_ROWS + (small_rows(lr) if lr is not None else [])
    return [(row, (DATASET,)) for row in rows]


def _load(root: Path, row_id: str) -> dict | None:
    file = root / f"{row_id}-{DATASET}.json"
    return json.loads(file.read_text()) if file.exists() else None


def chosen_small_cnns(root: Path) -> dict[int, dict]:
    """For every budget, the small-CNN shape with the better final validation accuracy (at the
    chosen lr)."""
    lr = chosen_lr(root)
    if lr is None:
        return {}
    chosen = {}
    for budget in BUDGETS:
        results = [r for shape in SHAPES if (r := _load(root, f"small-{shape}-{budget}-lr{lr:g}"))]
        if results:
            chosen[budget] = max(results, key=lambda r: r["val_acc"])
    return chosen


def report(
    root: Path = ROOT,
    out: Path = REPORT,
    baseline: Path = Path("results/table1/cnn2-baseline-fashion-mnist.json"),
    figures: bool = True,
) -> str:
    """docs/results/budget.md and budget.png (unless `figures` is False) from root's files
    (and Table 1's CNN2 run)."""
    from mapnet_experiments.studies.plots import Point, accuracy_vs_budget

    lr = chosen_lr(root)
    lines = [
        "# Accuracy against trainable numbers (CNN2 target, Fashion-MNIST)",
        "",
        f"Generated by `mapnet repro budget --report` from `{root}/*.json`; the runs come from "
        "`mapnet repro budget` (resumable). Every run: seed 0, the Table 1 recipe (10 epochs, "
        "batch 128, cosine; mapped Adam lr 0.1, the structured projection; trained directly "
        f"Adam), test accuracy % after the last epoch. Small CNNs: {SmallCNNDoc}; at each "
        "budget the shape with the better validation accuracy is shown (both are listed), at "
        + (
            f"lr {lr:g}, chosen on validation at the 2048 budget."
            if lr is not None
            else "the lr not chosen yet (its select runs are unfinished)."
        ),
        "",
        "| numbers | mapnet single | mapnet layer-wise | intrinsic dim. | small CNN (chosen) "
        "| small CNN flat / growing (val) |",
        "|---|---|---|---|---|---|",
    ]
    points: list[Point] = []
    chosen = chosen_small_cnns(root)
    for budget in BUDGETS:
        cells = []
        for series, prefix in (
            ("mapnet single", "single"),
            ("mapnet layer-wise", "layerwise"),
            ("intrinsic dimension (Li et al.)", "intrinsic"),
        ):
            result = _load(root, f"{prefix}-{budget}")
            cells.append("–" if result is None else f"{result['test_acc']:.2f}")
            if result is not None:
                points.append(Point(series, result["trainable_parameters"], result["test_acc"]))
        small = chosen.get(budget)
        if small is not None:
            points.append(
                Point(
                    "small CNN trained directly", small["trainable_parameters"], small["test_acc"]
                )
            )
            cells.append(f"{small['test_acc']:.2f} ({small['trainable_parameters']:,})")
        else:
            cells.append("–")
        both = [
            _load(root, f"small-{shape}-{budget}-lr{lr:g}") if lr is not None else None
            for shape in SHAPES
        ]
        cells.append(" / ".join("–" if r is None else f"{r['val_acc']:.2f}" for r in both))
        lines.append(f"| {budget:,} | " + " | ".join(cells) + " |")
    select = [(row.id, _load(root, row.id)) for row in SELECT]
    lines += [
        "",
        "Learning rate of the small CNNs (validation accuracy %, budget 2048): "
        + ", ".join(f"{i.removeprefix('select-')} {r['val_acc']:.2f}" for i, r in select if r)
        + ".",
    ]
    baselines = {}
    if baseline.exists():
        full = json.loads(baseline.read_text())
        baselines["CNN2 trained directly (108,618)"] = full["test_acc"]
        lines += ["", f"CNN2 trained directly (108,618 numbers, Table 1): {full['test_acc']:.2f}."]
    lines += _verdict(points)
    figure = out.with_name(FIGURE.name)
    if points:
        if figures:
            accuracy_vs_budget(
                points,
                figure,
                "CNN2 on Fashion-MNIST: test accuracy against trainable numbers (seed 0)",
                baselines,
                xlabel="trainable numbers (log scale)",
            )
        lines += ["", f"![accuracy against trainable numbers]({figure.name})"]
    return write_page(lines, out)


def _verdict(points: list) -> list[str]:
    """Where the mapped curve lies against the small CNNs at about the same count."""
    small = sorted((p for p in points if p.series.startswith("small CNN")), key=lambda p: p.x)
    if not small:
        return []
    lines = ["", "## Against a small CNN trained directly", ""]
    for series in ("mapnet single", "mapnet layer-wise"):
        for point in sorted((p for p in points if p.series == series), key=lambda p: p.x):
            nearest = min(small, key=lambda s: abs(math.log(s.x / point.x)))
            verdict = "above" if point.y > nearest.y else "below"
            lines.append(
                f"- {series} {int(point.x):,}: {point.y:.2f}, {verdict} the small CNN of "
                f"{int(nearest.x):,} ({nearest.y:.2f}, {point.y - nearest.y:+.2f})"
            )
    return lines


def facts(results: Path) -> Facts | None:
    """The index's paragraph and when-to-pick row: the single mapping against the small CNN
    of about its size at every budget, each gap against one seed std of Ours* 2048 on
    Fashion-MNIST (Table 7's three seeds); intrinsic dimension against the mapping."""
    from mapnet_experiments.studies.ablations import seed_stats

    root = results / "budget"
    chosen = chosen_small_cnns(root)
    single = {b: _load(root, f"single-{b}") for b in BUDGETS}
    intrinsic = {b: _load(root, f"intrinsic-{b}") for b in BUDGETS}
    spread = seed_stats(results / "ablations", "ours-2048", DATASET)
    if len(chosen) < len(BUDGETS) or spread is None:
        return None
    if any(r is None for r in [*single.values(), *intrinsic.values()]):
        return None
    gaps = {b: single[b]["test_acc"] - chosen[b]["test_acc"] for b in BUDGETS}  # type: ignore[index]
    wins = [f"{b:,}" for b in BUDGETS if gaps[b] > 0]
    losses = [f"{b:,}" for b in BUDGETS if gaps[b] < 0]
    std = spread[1]
    beyond = [f"{b:,}" for b in BUDGETS if abs(gaps[b]) > std]
    within = [f"{b:,}" for b in BUDGETS if abs(gaps[b]) <= std]
    ahead = {b: intrinsic[b]["test_acc"] - single[b]["test_acc"] for b in BUDGETS}  # type: ignore[index]
    paragraph = (
        f"Fashion-MNIST, seed 0, {BUDGETS[0]:,}–{BUDGETS[-1]:,} trainable numbers. The mapped "
        "CNN2 (single latent) beats a small CNN trained directly of about the same size (its "
        f"shape and learning rate chosen on validation) at {listing(wins)} numbers and loses at "
        f"{listing(losses)} (gaps "
        f"{', '.join(points(gaps[b]) for b in BUDGETS)} points, in budget order). The gaps at "
        f"{listing(beyond)} exceed one seed std of Ours* 2048 ({std:.2f} points, Table 7's "
        f"seeds); {'the gap at ' if len(within) == 1 else 'the gaps at '}{listing(within)} "
        f"{'is' if len(within) == 1 else 'are'} within it. "
        "Intrinsic-dimension training is above the single mapping at "
        f"{listing([f'{b:,}' for b in BUDGETS if ahead[b] > 0])} and below at "
        f"{listing([f'{b:,}' for b in BUDGETS if ahead[b] < 0])} "
        f"({', '.join(points(ahead[b]) for b in BUDGETS)})."
    )
    pick = Pick(
        f"Fashion-MNIST accuracy at equal budgets, {BUDGETS[0]:,}–{BUDGETS[-1]:,} numbers",
        f"higher at {listing(wins)}",
        f"a small CNN trained directly: higher at {listing(losses)}",
        f"{'the alternative' if len(losses) > len(wins) else 'mapnet'}, at "
        f"{max(len(losses), len(wins))} of {len(BUDGETS)} budgets",
    )
    return Facts("Accuracy against trainable numbers", "budget.md", "mapnet repro budget",
                 paragraph, (pick,))  # fmt: skip


def _run(options: Options, stages: tuple[str, ...]) -> None:
    root = options.root_or(ROOT)
    done: list[str] = []
    while True:  # a later pass adds the small CNNs once their lr is chosen
        planned = plan(root)
        if [row.id for row, _ in planned] == done:
            return
        done = [row.id for row, _ in planned]
        run_table([], root=root, deadline=options.deadline, progress=options.progress, plan=planned)


STUDY = Study(
    name="budget",
    summary="accuracy against trainable numbers on Fashion-MNIST: mapnet single and "
    "layer-wise, intrinsic dimension, small CNNs trained directly (their shape and lr chosen "
    "on validation); writes docs/results/budget.md and budget.png",
    stages=("train",),
    default=("train",),
    run=_run,
    report=lambda options: report(
        options.root_or(ROOT), options.report_or(REPORT), figures=options.figures
    ),
    example="mapnet repro budget --hours 2 --threads 1",
    page="budget.md",
    facts=facts,
)
