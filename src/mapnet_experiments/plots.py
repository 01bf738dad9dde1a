"""Figures for the docs, drawn from results files (never from numbers typed in)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    series: str  # one line per series (a method)
    x: float  # trainable numbers
    y: float  # accuracy, %
    label: str = ""  # written beside the marker (e.g. "L = 250")


def accuracy_vs_budget(
    points: Sequence[Point], out: Path, title: str, baselines: dict[str, float] | None = None
) -> Path:
    """Test accuracy against trainable numbers (log scale), one line per series; `baselines`
    (name -> accuracy) are drawn as horizontal lines (e.g. full fine-tuning)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
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
    ax.set_xlabel("trainable numbers besides the new head (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
