"""matplotlib for the docs' figures, studies and bench alike: pyplot without a display (or a
clear error naming the extra to install), and the steps every line chart ends with."""

from __future__ import annotations

from pathlib import Path


def save(plt, fig, out: Path) -> Path:  # type: ignore[no-untyped-def]
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def line_chart(  # type: ignore[no-untyped-def]
    plt, fig, ax, out: Path, labels: tuple[str, str, str], size: int
) -> Path:
    """A one-axes line chart's (x label, y label, title), grid and legend (the title at `size`
    points, the legend 2 smaller), laid out and saved."""
    xlabel, ylabel, title = labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=size)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=size - 2)
    fig.tight_layout()
    return save(plt, fig, out)


def pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "the figures need matplotlib: pip install 'mapnet[plots]' (make venv installs it)"
        ) from None

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    return plt
