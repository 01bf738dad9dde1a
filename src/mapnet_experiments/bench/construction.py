"""`mapnet bench construction`: the time, projection memory and peak RSS of building a mapping,
each `wrap()` in a fresh process, and its section of the bench report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mapnet import MappingConfig, wrap
from mapnet.files import write_json
from mapnet_experiments.bench.harness import (
    in_subprocess,
    load,
    machine,
    now,
    peak_rss_bytes,
    set_threads,
)
from mapnet_experiments.bench.text import gib, machine_line
from mapnet_experiments.models.networks import MODELS


def measure_construction(
    model: str,
    latent_dim: int,
    strategy: str,
    projection: str = "dense",
    threads: int | None = None,
) -> dict[str, Any]:
    """Time and memory to build the mapping for one of the paper's models (run in a subprocess)."""
    set_threads(threads)
    torch.manual_seed(0)
    target = MODELS[model]()
    baseline_rss = peak_rss_bytes()
    started = time.perf_counter()
    config = MappingConfig(latent_dim=latent_dim, strategy=strategy, projection=projection)
    mapped = wrap(target, config)
    seconds = time.perf_counter() - started
    return {
        "model": model,
        "strategy": strategy,
        "projection": projection,
        "threads": torch.get_num_threads(),
        "latent_dim": latent_dim,
        "trainable_parameters": mapped.num_trainable_parameters(),
        "target_parameters": mapped.num_target_parameters(),
        "construction_seconds": seconds,
        "projection_bytes": mapped.projection_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": baseline_rss,
    }


def construction_table(
    cases: list[tuple[str, int, str] | tuple[str, int, str, str]],
    out: Path | None,
    command: str = "mapnet bench construction",
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Each case (model, latent_dim, strategy[, projection]) built in a fresh process, with
    `threads` torch threads (None: torch's default)."""
    rows = []
    started = load()
    for case in cases:
        model, latent_dim, strategy = case[:3]
        projection = case[3] if len(case) > 3 else "dense"
        row = in_subprocess(
            measure_construction,
            model=model,
            latent_dim=latent_dim,
            strategy=strategy,
            projection=projection,
            threads=threads,
        )
        rows.append(row)
        print(
            f"{model} {strategy} d={latent_dim}: built in {row['construction_seconds']:.1f} s, "
            f"projection {row['projection_bytes'] / 2**30:.2f} GiB, "
            f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB"
            + (f" ({projection})" if projection != "dense" else ""),
            flush=True,
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "what": "construction",
            "command": command,
            "date": now(),
            "machine": machine() | {"threads": rows[0]["threads"] if rows else None},
            "load": {"start": started, "end": load()},
            "rows": rows,
        }
        write_json(out, data)
        print(f"wrote {out}")
    return rows


# ------------------------------------------------------------------------- report


def report_section(construction: dict[str, Any]) -> list[str]:
    lines = [
        f"## Construction: `{construction.get('command', 'mapnet bench construction')}`",
        "",
        f"Results `{construction['file']}`"
        + (f" · measured {construction['date']}" if "date" in construction else "")
        + (
            f" · load at start `{construction['load']['start']['uptime']}`"
            if "load" in construction
            else ""
        ),
        "",
        f"Machine: {machine_line(construction)}.",
        "",
        "`wrap()` in a fresh process; torch threads: "
        f"{construction['rows'][0].get('threads', 'default') if construction['rows'] else '–'}.",
        "",
        "| model | strategy | projection | d | P | build (s) | W (GiB) | W bytes / param "
        "| peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in construction["rows"]:
        lines.append(
            f"| {row['model']} | {row['strategy']} | {row.get('projection', 'dense')} "
            f"| {row['latent_dim']} | {row['target_parameters']:,} "
            f"| {row['construction_seconds']:.2f} | {gib(row['projection_bytes'])} "
            f"| {row['projection_bytes'] / row['target_parameters']:.2f} "
            f"| {gib(row['peak_rss_bytes'])} |"
        )
    return [*lines, ""]
