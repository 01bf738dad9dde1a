"""Figures for the docs, drawn from results files (never from numbers typed in)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mapnet_experiments.figures import line_chart, pyplot, save


@dataclass(frozen=True)
class Point:
    series: str  # one line per series (a method)
    x: float  # trainable numbers
    y: float  # accuracy, %
    label: str = ""  # written beside the marker (e.g. "L = 250")


def accuracy_vs_budget(
    points: Sequence[Point],
    out: Path,
    title: str,
    baselines: dict[str, float] | None = None,
    xlabel: str = "trainable numbers besides the new head (log scale)",
) -> Path:
    """Test accuracy against trainable numbers (log scale), one line per series; `baselines`
    (name -> accuracy) are drawn as horizontal lines (e.g. full fine-tuning)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.2), dpi=120)
    for series in dict.fromkeys(p.series for p in points):
        mine = sorted((p for p in points if p.series == series), key=lambda p: p.x)
        ax.plot([p.x for p in mine], [p.y for p in mine], marker="o", label=series)
        for p in mine:
            if p.label:
                ax.annotate(
                    p.label, (p.x, p.y), textcoords="offset points", xytext=(4, -10), fontsize=7
                )
    for (name, value), style in zip((baselines or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, linestyle=style, linewidth=1, color="grey", label=name)
    ax.set_xscale("log")
    # Plain numbers at 1, 2 and 5 × 10^k: matplotlib's own labels overlapped within a decade.
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    # Beside the axes, not on them: inside, it hid lines and points (the MobileNetV2 fine-tune).
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    return save(plt, fig, out)


@dataclass(frozen=True)
class Curve:
    """One run's accuracy per epoch, drawn in a panel."""

    label: str  # e.g. "Fashion-MNIST"
    train: Sequence[float]
    val: Sequence[float]


def training_curves(panels: dict[str, Sequence[Curve]], out: Path, title: str) -> Path:
    """A grid of panels, one per table row: training (dashed) and validation (solid) accuracy
    per epoch for each curve of the row."""
    plt = pyplot()
    count = max(len(panels), 1)
    columns = min(4, count)
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 2.5 * rows), dpi=110, squeeze=False
    )
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # A colour per label (data set), the same in every panel: a panel holding only some of the
    # labels (Fashion-MNIST-only rows) must not take the first label's colour.
    labels = list(dict.fromkeys(c.label for curves in panels.values() for c in curves))
    colour = {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}
    for ax, (name, curves) in zip(axes.flat, panels.items()):
        for curve in curves:
            epochs = range(1, len(curve.val) + 1)
            ax.plot(epochs, curve.val, color=colour[curve.label])
            ax.plot(epochs, curve.train, color=colour[curve.label], linestyle="--")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colour[label], linestyle=style, label=f"{label} {split}")
        for label in labels
        for style, split in (("-", "val"), ("--", "train"))
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(title, fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=7)
    fig.supylabel("accuracy (%)", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return save(plt, fig, out)


@dataclass(frozen=True)
class Panel:
    """One 2-D panel: a title, its axis labels, and points per series."""

    title: str
    xlabel: str
    ylabel: str
    lines: dict[str, Sequence[Sequence[float]]]


def trajectories(panels: Sequence[Panel], out: Path, title: str) -> Path:
    """Weight-space trajectories in 2-D (paper Figure 2): one panel each (the whole weight
    vector, then each layer), one line per method, start marked with a circle, end with a cross;
    the legend, below the panels, names the methods and the two markers."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    count = len(panels)
    fig, axes = plt.subplots(1, count, figsize=(3.0 * count, 3.4), dpi=110, squeeze=False)
    colours: dict[str, str] = {}
    for ax, panel in zip(axes.flat, panels):
        for method, points in panel.lines.items():
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            (line,) = ax.plot(xs, ys, marker=".", markersize=2, linewidth=0.8)
            colours.setdefault(method, line.get_color())
            ax.plot(xs[0], ys[0], "o", color=line.get_color(), markersize=5)
            ax.plot(xs[-1], ys[-1], "x", color=line.get_color(), markersize=6)
        ax.set_title(panel.title, fontsize=8)
        ax.set_xlabel(panel.xlabel, fontsize=7)
        ax.set_ylabel(panel.ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
    handles = [Line2D([], [], color=c, linewidth=0.8, label=m) for m, c in colours.items()] + [
        Line2D([], [], color="grey", marker="o", linestyle="", label="start (θ₀)"),
        Line2D([], [], color="grey", marker="x", linestyle="", label="end of training"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save(plt, fig, out)


def forecast_example(lines: dict[str, Sequence[float]], out: Path, title: str) -> Path:
    """Hourly series over the same hours, one line each (the truth first)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=110)
    for index, (name, values) in enumerate(lines.items()):
        ax.plot(values, linewidth=1.6 if index == 0 else 0.9, label=name,
                color="black" if index == 0 else None)  # fmt: skip
    xlabel = "scored test hour (hours whose PM2.5 was not measured are skipped)"
    return line_chart(plt, fig, ax, out, (xlabel, "PM2.5 (µg/m³)", title), 9)


def segmentation_examples(
    rows: Sequence[tuple[object, object, object]],
    out: Path,
    title: str,
    key: Sequence[tuple[str, Sequence[int]]] = (),
) -> Path:
    """One row per example: image | truth | prediction (uint8 (H, W, 3) or (H, W) arrays);
    `key` (class name, RGB 0–255), when given, is drawn beside them as the colours' legend."""
    plt = pyplot()
    from matplotlib.patches import Patch

    width = 6 + (1.7 if key else 0)
    fig, axes = plt.subplots(len(rows), 3, figsize=(width, 2 * len(rows)), dpi=110, squeeze=False)
    for row, images in zip(axes, rows):
        for ax, image, name in zip(row, images, ("image", "truth", "prediction")):
            ax.imshow(image, cmap="gray" if getattr(image, "ndim", 3) == 2 else None)
            ax.set_title(name, fontsize=7)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    if key:
        patches = [Patch(color=[c / 255 for c in rgb], label=name) for name, rgb in key]
        fig.legend(handles=patches, loc="center right", fontsize=7, frameon=False,
                   title="class", title_fontsize=7)  # fmt: skip
        fig.tight_layout(rect=(0, 0, 6 / width, 1))
    else:
        fig.tight_layout()
    return save(plt, fig, out)


def interpolation_paths(paths: dict[str, Sequence[float]], out: Path, title: str) -> Path:
    """Accuracy along straight paths between two models, t = 0 … 1, one line per pair."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for name, values in paths.items():
        steps = len(values)
        ax.plot([i / (steps - 1) for i in range(steps)], values, marker="o", label=name)
    labels = ("t (0: first model, 1: second)", "test accuracy (%)", title)
    return line_chart(plt, fig, ax, out, labels, 10)


def latent_scatter(
    panels: Sequence[Panel],
    groups: Sequence[str],
    out: Path,
    title: str,
    shade: Sequence[float] | None = None,
) -> Path:
    """2-D embeddings of points (one panel each: `Panel.lines` holds one series, all points),
    coloured by group (the legend's names, beside the panels); `shade` in [0, 1] per point, if
    given, sets its opacity (e.g. later epochs darker)."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    count = len(panels)
    fig, axes = plt.subplots(1, count, figsize=(4.5 * count + 2.2, 4), dpi=110, squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {g: cycle[i % len(cycle)] for i, g in enumerate(dict.fromkeys(groups))}
    alphas = [0.25 + 0.75 * s for s in shade] if shade is not None else [1.0] * len(groups)
    for ax, panel in zip(axes.flat, panels):
        (points,) = panel.lines.values()
        for group in colour:
            mine = [(p, a) for p, g, a in zip(points, groups, alphas) if g == group]
            ax.scatter([p[0] for p, _ in mine], [p[1] for p, _ in mine], s=14,
                       color=colour[group], alpha=[a for _, a in mine])  # fmt: skip
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=6)
    handles = [
        Line2D([], [], color=c, marker="o", linestyle="", markersize=5, label=g)
        for g, c in colour.items()
    ]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, (4.5 * count) / (4.5 * count + 2.2), 1))
    return save(plt, fig, out)


def image_rows(rows: Sequence[tuple[str, Sequence[object]]], out: Path, title: str) -> Path:
    """One labelled row of grey images per entry (arrays (H, W) with values in [0, 1]), e.g. the
    originals and each variant's reconstructions of them."""
    plt = pyplot()
    width = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(
        len(rows), width, figsize=(1.1 * width + 1, 1.15 * len(rows)), dpi=110, squeeze=False
    )
    for row_axes, (label, images) in zip(axes, rows):
        for index, ax in enumerate(row_axes):
            if index < len(images):
                ax.imshow(images[index], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        row_axes[0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(plt, fig, out)
