"""How bench figures read, in progress lines and in docs/results/bench.md: times, sizes, shapes
and ratios, and the lines that say where and how a run was measured."""

from __future__ import annotations

from typing import Any


def ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def ms_signed(value: float) -> str:
    return ("+" if value >= 0 else "−") + ms(abs(value))


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}" if abs(value) >= 2**20 else f"{value / 2**20:.3f}"


def ratio_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def shape_text(dims: list[int]) -> str:
    return "×".join(map(str, dims))


def run_name(index: int) -> str:
    return f"run {chr(ord('A') + index)}"


def machine_line(data: dict[str, Any]) -> str:
    m = data["machine"]
    memory = f", {m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else ""
    threads = m["threads"]
    threads = " and ".join(map(str, threads)) if isinstance(threads, list) else threads
    return (
        f"{m.get('cpu', m['processor'])} ({m.get('logical_cpus', '?')} logical CPUs{memory}), "
        f"{m['platform']}, torch {m['torch']}, Python {m['python']}"
        + (f", mapnet {m['mapnet']}" if m.get("mapnet") else "")
        + f", {threads} torch thread(s)"
    )


def run_header(data: dict[str, Any], title: str) -> list[str]:
    """A run's section title, its command, when, where and under which load it was measured."""
    where = (
        "each figure from a fresh process"
        if data.get("fresh_process_per_measurement")
        else "every figure in the calling process (smoke)"
    )
    return [
        f"## {title}: `{data['command']}`",
        "",
        f"Measured {data['date']} in {data['wall_seconds'] / 60:.1f} min, {where}; results "
        f"`{data['file']}`.",
        "",
        f"Machine: {machine_line(data)}.",
        "",
        f"Load (`uptime`) at start: `{data['load']['start']['uptime']}`; at end: "
        f"`{data['load']['end']['uptime']}`.",
        "",
    ]
