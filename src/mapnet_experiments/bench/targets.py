"""The v0.2 targets (speed and memory of the v0.2 library), each judged from the newest run of
this bench that measured it, and their section of the bench report.

Only runs that record the library's version count: older results measured other code. The
earlier targets of issue 4 are judged by step.py from each step run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mapnet_experiments.bench.harness import DEFAULT_THREADS, row_threads, threads_text
from mapnet_experiments.bench.inference import INFERENCE_MODELS
from mapnet_experiments.bench.memory import peak_place
from mapnet_experiments.bench.peak_memory import TRACKERS
from mapnet_experiments.bench.text import ms

RELEASE_STEP_RATIO = 1.05  # (a) mapped-structured / plain training step, batch 128
RELEASE_STEP_BATCH = 128
RELEASE_MEMORY_RATIO = 1.0  # (b) peak training memory mapped / plain, ResNet-50, batch 8
RELEASE_MEMORY_BATCH = 8
MEMORY_TARGET_INPUT = 224  # ResNet-50's own input (ImageNet's 224×224), where (b) is judged
RELEASE_WRAP_RATIO = 1.0  # (c) wrap()'s peak / (weights + buffers + W + θ₀)
RELEASE_INFERENCE_RATIO = 1.02  # (d) eval forward under no_grad, mapped / plain
MIN_PROCESSES = 5
TRACKER_LABELS = {"allocator": "tracked torch allocations", "rss": "peak RSS increase"}

# The commands whose results the v0.2 targets read (what `--help` and the report suggest).
RELEASE_COMMANDS = {
    "(a)": "mapnet bench step --models cnn2 cnn1 --variants plain mapped-structured "
    "--threads 1 2 --out results/bench/step-v02.json",
    "(b)": "mapnet bench memory",
    "(c)": "mapnet bench memory",
    "(d)": "mapnet bench inference",
}


def _newest_first(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        (r for r in runs if r.get("machine", {}).get("mapnet")),
        key=lambda r: r.get("date", ""),
        reverse=True,
    )


def _judged_threads(runs: list[dict[str, Any]]) -> list[int]:
    """1 and the machine's default thread count (as the newest run recorded it)."""
    newest = _newest_first(runs)
    default = newest[0]["machine"].get("default_threads") if newest else None
    return sorted({1, default or DEFAULT_THREADS})


def _resnet50_memory_runs(memories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The memory runs of ResNet-50, the model targets (b) and (c) are set for, newest first."""
    return [d for d in _newest_first(memories) if d["settings"].get("model") == "resnet50"]


def _unmeasured(target: str) -> dict[str, Any]:
    """A target as no run of this bench has measured it yet."""
    return {"target": target, "value": None, "met": None, "detail": "", "source": ""}


def _source(data: dict[str, Any]) -> str:
    return f"`{Path(data.get('file', '?')).name}` ({data.get('date', '?')})"


def _find(runs: list[dict[str, Any]], match: Callable[[dict, dict], bool]) -> tuple | None:
    """The newest (run, row) of `runs` whose row satisfies `match(run, row)`."""
    for data in _newest_first(runs):
        for row in data.get("rows", []):
            if not row.get("skipped") and match(data, row):
                return data, row
    return None


def _ratio_target(
    target: str, limit: float, found: tuple | None, unit: str, key: str
) -> dict[str, Any]:
    if found is None:
        return _unmeasured(target)
    data, row = found
    plain = next(
        r
        for r in data["rows"]
        if r["model"] == row["model"]
        and r["variant"] == "plain"
        and row_threads(data, r) == row_threads(data, row)
    )
    processes = row.get("processes", len(row.get("runs", [])))
    rounds = ", ".join(f"{r:.3f}" for r in row["ratio_per_round"])
    detail = f"mapped {ms(row[key])} / plain {ms(plain[key])} {unit}; per process {rounds}" + (
        f" (only {processes} processes)" if processes < MIN_PROCESSES else ""
    )
    if "first_call_ms_median" in row:
        detail += f"; first call {ms(row['first_call_ms_median'])} ms (generates θ)"
        if not row.get("repeat_output_equal", True):
            detail += "; **a repeated call gave a different output**"
    value = row["ratio_to_plain"]
    return {
        "target": target,
        "value": value,
        "met": value <= limit,
        "detail": detail,
        "source": _source(data),
    }


def release_targets(
    steps: list[dict[str, Any]],
    memories: list[dict[str, Any]],
    inferences: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The v0.2 targets (a)–(d), each with its measured value, met / not met (None: not
    measured by this bench yet), the run it comes from and the figures behind it."""
    out: list[dict[str, Any]] = []
    for model in ("cnn2", "cnn1"):
        for threads in _judged_threads(steps):

            def step_row(data: dict, row: dict, model: str = model, threads: int = threads) -> bool:
                return (
                    row["model"] == model
                    and row["variant"] == "mapped-structured"
                    and data["settings"]["batch"] == RELEASE_STEP_BATCH
                    and row_threads(data, row) == threads
                )

            out.append(
                _ratio_target(
                    f"(a) training step mapped / plain ≤ {RELEASE_STEP_RATIO:.2f}: {model}, "
                    f"batch {RELEASE_STEP_BATCH}, {threads_text(threads)}",
                    RELEASE_STEP_RATIO,
                    _find(steps, step_row),
                    "ms",
                    "step_ms_median",
                )
            )
    for tracker in TRACKERS:
        entry = _unmeasured(
            f"(b) peak training memory mapped / plain ≤ {RELEASE_MEMORY_RATIO:.2f}: "
            f"ResNet-50, batch {RELEASE_MEMORY_BATCH}, 3×{MEMORY_TARGET_INPUT}×"
            f"{MEMORY_TARGET_INPUT}, Adam ({TRACKER_LABELS[tracker]})"
        )
        for data in _resnet50_memory_runs(memories):
            case = next(
                (
                    c
                    for c in data["summary"]["training"]
                    if c["tracker"] == tracker
                    and c["ratio"] is not None
                    and c["batch"] == RELEASE_MEMORY_BATCH
                    and c["input_shape"][-2:] == [MEMORY_TARGET_INPUT] * 2
                ),
                None,
            )
            if case is not None:
                entry |= {
                    "value": case["ratio"],
                    "met": case["ratio"] <= RELEASE_MEMORY_RATIO,
                    "detail": f"mapped {case['mapped_peak_bytes']:,} B / plain "
                    f"{case['plain_peak_bytes']:,} B",
                    "source": _source(data),
                }
                break
        out.append(entry)
    for source in ("factory", "instance"):
        call = "wrap(ResNet50, cfg)" if source == "factory" else "wrap(ResNet50(), cfg)"
        for tracker in TRACKERS:
            entry = _unmeasured(
                f"(c) `{call}` peak ≤ weights + buffers + W + one θ₀ ({TRACKER_LABELS[tracker]})"
            )
            for data in _resnet50_memory_runs(memories):
                row = next(
                    (r for r in data["wrap"] if r["source"] == source and r["tracker"] == tracker),
                    None,
                )
                if row is not None:
                    ratio = row["peak_bytes"] / row["budget_bytes"]
                    entry |= {
                        "value": ratio,
                        "met": ratio <= RELEASE_WRAP_RATIO,
                        "detail": f"peak {row['peak_bytes']:,} B of {row['budget_bytes']:,} B"
                        + peak_place(row),
                        "source": _source(data),
                    }
                    break
            out.append(entry)
    models = ["cnn2", "cnn1"]
    if any(r["model"] == "resnet50" for d in _newest_first(inferences) for r in d["rows"]):
        models.append("resnet50")
    for model in models:
        for threads in _judged_threads(inferences):

            def eval_row(data: dict, row: dict, model: str = model, threads: int = threads) -> bool:
                return (
                    row["model"] == model
                    and row["variant"] == "mapped"
                    and row["batch"] == INFERENCE_MODELS[model].batch
                    and row_threads(data, row) == threads
                )

            plan = INFERENCE_MODELS[model]
            out.append(
                _ratio_target(
                    f"(d) eval forward (no_grad) mapped / plain ≤ {RELEASE_INFERENCE_RATIO:.2f}: "
                    f"{model}, batch {plan.batch}, {threads_text(threads)}",
                    RELEASE_INFERENCE_RATIO,
                    _find(inferences, eval_row),
                    "ms",
                    "forward_ms_median",
                )
            )
    return out


def report_section(
    steps: list[dict[str, Any]],
    memories: list[dict[str, Any]],
    inferences: list[dict[str, Any]],
) -> list[str]:
    targets = release_targets(steps, memories, inferences)
    lines = [
        "## Targets (v0.2)",
        "",
        "Read from the newest run of this bench that measured each (older results, measured on "
        "earlier code, are not used); met / not met is decided by the figures, never by hand. "
        "Memory is judged twice: on the tracked torch allocations (tensors only, exact) and on "
        "the peak RSS increase (everything the process touched); see the Memory section.",
        "",
        "| target | measured | met? | from | detail |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        value = "–" if t["value"] is None else f"{t['value']:.3f}"
        met = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {value} | {met} | {t['source']} | {t['detail']} |")
    missing = sorted(
        {
            command
            for t in targets
            if t["met"] is None
            for prefix, command in RELEASE_COMMANDS.items()
            if t["target"].startswith(prefix)
        }
    )
    if missing:
        lines += ["", "Not yet measured; run: " + "; ".join(f"`{c}`" for c in missing) + "."]
    return [*lines, ""]
