"""`mapnet bench step`: one training step (fixed batch, cross-entropy, Adam) of the plain target
and of four ways of training it through a latent of d numbers, with the earlier targets (issue 4)
judged from it, and its sections of the bench report.

Each (model, variant) runs in a fresh process, in rounds whose order alternates, so slow drift of
the machine (other jobs on a 2-core box) hits every variant alike; ratios are to the plain step
of the same run. A per-phase breakdown of a mapped step follows (breakdown.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet import MappedModule, wrap
from mapnet_experiments.bench import harness
from mapnet_experiments.bench.breakdown import measure_breakdown
from mapnet_experiments.bench.subjects import (
    STEP_MODELS,
    STEP_VARIANTS,
    VARIANTS_BY_NAME,
    StepVariant,
    fixed_batch,
    target_parameter_count,
    tensor_bytes,
    variant_config,
)
from mapnet_experiments.bench.text import gib, machine_line, ms, run_name


def measure_step(
    model: str,
    variant: str,
    latent_dim: int,
    batch: int,
    warmup: int,
    steps: int,
    threads: int | None,
) -> dict[str, Any]:
    """Build one variant and time `warmup + steps` training steps on a fixed batch (subprocess)."""
    from mapnet.projections import fused

    conditions = harness.start_measurement(threads)
    spec, kind = STEP_MODELS[model], VARIANTS_BY_NAME[variant]
    fused.set_fusion(kind.fusion)
    torch.manual_seed(0)
    target = spec.factory()
    x, y = fixed_batch(spec, batch)
    rss_before = harness.peak_rss_bytes()
    construction: float | None = None
    module: nn.Module = target
    lr = spec.lr_plain
    if kind.kind != "plain":
        started = time.perf_counter()
        module = wrap(target, variant_config(kind, latent_dim))
        construction = time.perf_counter() - started
        lr = spec.lr_mapped if kind.kind == "mapped" else spec.lr_intrinsic
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    seconds, losses, faults = [], [], []
    for _ in range(warmup + steps):
        faults_before = harness.minor_faults()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        faults.append(harness.minor_faults() - faults_before)
        losses.append(loss.item())
    with torch.no_grad():
        loss_after = nn.functional.cross_entropy(module(x), y).item()
    optimizer_state = [t for state in optimizer.state.values() for t in state.values()]
    is_mapped = isinstance(module, MappedModule)
    return {
        "model": model,
        "variant": variant,
        **conditions,
        "input_shape": list(spec.input_shape),
        "batch": batch,
        "latent_dim": latent_dim if is_mapped else None,
        "lr": lr,
        "target_parameters": sum(p.numel() for p in target.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "construction_seconds": construction,
        "projection_bytes": module.projection_bytes() if isinstance(module, MappedModule) else 0,
        # Everything the module holds (mapped: latents, W, θ₀ and the target's buffers).
        "module_bytes": tensor_bytes(module.parameters()) + tensor_bytes(module.buffers()),
        "optimizer_state_bytes": tensor_bytes(optimizer_state),
        "warmup_seconds": seconds[:warmup],
        "step_seconds": seconds[warmup:],
        "minor_faults_per_step": harness.median(faults[warmup:]),
        "malloc_env": harness.malloc_env(),
        "fusion": fused.fusion_mode(),
        "compiled_kernels": len(fused._compiled),
        "losses": losses,
        "loss_after": loss_after,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": harness.peak_rss_bytes(),
    }


def _summarise(
    model: str,
    runs: dict[str, list[dict[str, Any]]],
    skipped: dict[str, str],
    variants: Sequence[StepVariant] = STEP_VARIANTS,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One row per variant (of one thread count): pooled median step, ratio to plain (pooled
    and per round)."""
    plain_runs = runs.get("plain", [])
    rows = []
    for variant in variants:
        row: dict[str, Any] = {"model": model, "variant": variant.name, "label": variant.label}
        done_any = runs.get(variant.name) or []
        row["threads"] = done_any[0]["threads"] if done_any else threads
        if variant.name in skipped:
            rows.append(row | {"skipped": True, "reason": skipped[variant.name]})
            continue
        done = runs[variant.name]
        first = done[0]
        builds = [r["construction_seconds"] for r in done if r["construction_seconds"] is not None]
        row |= {
            "skipped": False,
            "processes": len(done),
            **harness.compared_to_plain(done, plain_runs, "step_seconds", "step"),
            "construction_seconds": harness.median(builds) if builds else None,
            "minor_faults_per_step": harness.median([r["minor_faults_per_step"] for r in done]),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in done),
            "rss_before_bytes": first["rss_before_bytes"],
            "projection_bytes": first["projection_bytes"],
            "projection_bytes_per_parameter": first["projection_bytes"]
            / first["target_parameters"],
            "module_bytes": first["module_bytes"],
            "optimizer_state_bytes": first["optimizer_state_bytes"],
            "target_parameters": first["target_parameters"],
            "trainable_parameters": first["trainable_parameters"],
            "lr": first["lr"],
            "loss_first": first["losses"][0],
            "loss_after": first["loss_after"],
            "losses": first["losses"],
            "runs": done,
        }
        rows.append(row)
    return rows


def _dense_skip_reason(parameters: int, latent_dim: int) -> str | None:
    """Why a dense W cannot be built here, or None: it needs P·d float32 numbers in memory."""
    needed = parameters * latent_dim * 4
    memory = harness.memory_total_bytes()
    if memory and needed > memory / 2:
        return (
            f"dense W needs P·d·4 B = {parameters:,} × {latent_dim} × 4 B = {needed / 1e9:.0f} GB; "
            f"this machine has {memory / 2**30:.0f} GiB"
        )
    return None


def step_bench(
    models: list[str],
    out: Path,
    *,
    latent_dim: int = 2048,
    batch: int = 128,
    threads: int | Sequence[int | None] | None = 1,
    variants: Sequence[str] | None = None,
    dense_rounds: int = 1,
    breakdown: list[str] | None = None,
    command: str = "mapnet bench step",
    smoke: bool = False,
    malloc_tuned: bool = False,
) -> dict[str, Any]:
    """Run the step bench for `models` and the phase breakdown for `breakdown`; write `out`.

    `threads`: one count or several; with several, every round runs every (thread count,
    variant) pair in a fresh process, in alternating order, so both counts see the same machine.
    `variants`: names from STEP_VARIANTS (default: all); "plain" is always measured (the ratios
    are to it).
    `smoke` runs every measurement in this process instead of a fresh one: starting Python and
    torch costs seconds per process, which is most of what CI would wait for (the subprocess
    path itself is exercised by the construction smoke test). Its peak RSS is then shared.
    `malloc_tuned` runs the measurements with MALLOC_TUNED_ENV (subprocesses only).
    """
    env = harness.MALLOC_TUNED_ENV if malloc_tuned else None
    counts = harness.thread_counts(threads)
    unknown = sorted(set(variants or ()) - set(VARIANTS_BY_NAME))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS_BY_NAME)}")
    chosen = [
        v for v in STEP_VARIANTS if variants is None or v.name in variants or v.kind == "plain"
    ]
    run = harness.runner(smoke, env)

    data: dict[str, Any] = {
        **harness.results_header("step", command, smoke, counts),
        "settings": {
            "batch": batch,
            "latent_dim": latent_dim,
            "strategy": "single",
            "threads": harness.resolved_threads(counts),
            "variants": [v.name for v in chosen],
            "loss": "cross-entropy, fixed synthetic batch",
            "optimizer": "Adam",
            "dense_rounds": dense_rounds,
            "malloc_env": env or {},
            "models": {
                name: {
                    "input_shape": list(STEP_MODELS[name].input_shape),
                    "warmup": STEP_MODELS[name].warmup,
                    "steps": STEP_MODELS[name].steps,
                    "rounds": STEP_MODELS[name].rounds,
                }
                for name in models
            },
        },
        "rows": [],
        "breakdown": [],
    }
    started = time.perf_counter()
    for model in models:
        spec = STEP_MODELS[model]
        parameters = target_parameter_count(model)
        skipped: dict[str, str] = {}
        for variant in chosen:
            reason = _dense_skip_reason(parameters, latent_dim)
            if variant.projection == "dense" and reason:
                skipped[variant.name] = reason
                print(f"{model} {variant.name}: skipped ({reason})", flush=True)
        runs: dict[int | None, dict[str, list[dict[str, Any]]]] = {
            count: {v.name: [] for v in chosen} for count in counts
        }
        for round_index in range(spec.rounds):
            pairs = [
                (count, v)
                for count in counts
                for v in chosen
                if v.name not in skipped and (v.projection != "dense" or round_index < dense_rounds)
            ]
            for count, variant in harness.in_round_order(pairs, round_index):
                result = harness.measure(
                    run,
                    started,
                    f"{model} {variant.name}"
                    + (f" {harness.threads_text(count)}" if len(counts) > 1 else "")
                    + f" round {round_index + 1}/{spec.rounds}",
                    measure_step,
                    _step_figures,
                    variant=variant.name,
                    threads=count,
                    **_schedule(model, latent_dim, batch),
                )
                result["round"] = round_index
                runs[count][variant.name].append(result)
        for count in counts:
            data["rows"].extend(_summarise(model, runs[count], skipped, chosen, count))
    for model in breakdown or []:
        for count in counts:
            result = harness.measure(
                run,
                started,
                f"{model} breakdown (structured"
                + (f", {harness.threads_text(count)}" if len(counts) > 1 else "")
                + ")",
                measure_breakdown,
                _breakdown_figures,
                threads=count,
                **_schedule(model, latent_dim, batch),
            )
            data["breakdown"].append(result)
    data["targets"] = targets_status(data, None)
    return harness.finish(data, out, started)


def _schedule(model: str, latent_dim: int, batch: int) -> dict[str, Any]:
    """What a step and a breakdown of `model` are measured with, besides the thread count."""
    spec = STEP_MODELS[model]
    return {
        "model": model,
        "latent_dim": latent_dim,
        "batch": batch,
        "warmup": spec.warmup,
        "steps": spec.steps,
    }


def _step_figures(result: dict[str, Any]) -> str:
    build = result["construction_seconds"]
    return (
        f"step {harness.median(result['step_seconds']) * 1e3:.1f} ms"
        + (f", built in {build:.2f} s" if build is not None else "")
        + f", peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, loss "
        f"{result['losses'][0]:.3f} -> {result['loss_after']:.3f}, "
        f"{result['minor_faults_per_step']:.0f} page faults/step, "
        f"load {result['loadavg'][0]:.1f}"
    )


def _breakdown_figures(result: dict[str, Any]) -> str:
    return (
        f"mapped {result['mapped_step_ms']:.1f} ms, plain {result['plain_step_ms']:.1f} "
        f"ms, gradient check {result['grad_check_max_abs_diff']:.1e}"
    )


# -------------------------------------------------------------- targets (issue 4)


STEP_RATIO_TARGET = 1.10  # mapped-structured step / plain step, CNN1 and CNN2
BUILD_TARGETS = {"cnn1": 1.0, "resnet50": 10.0}  # seconds to build the structured mapping
BYTES_PER_PARAMETER_TARGET = 8.0  # projection memory per target parameter


def _row(data: dict[str, Any], model: str, variant: str) -> dict[str, Any] | None:
    for row in data.get("rows", []):
        if row["model"] == model and row["variant"] == variant and not row.get("skipped"):
            return row
    return None


def targets_status(step: dict[str, Any], construction: dict[str, Any] | None) -> list[dict]:
    """The project's targets for issue 4, each with the measured value and whether it is met
    (None: not measured in this run). Read from the measurements, never set by hand."""
    out: list[dict[str, Any]] = []
    for model in ("cnn2", "cnn1"):
        row = _row(step, model, "mapped-structured")
        value = row["ratio_to_plain"] if row else None
        spread = row["ratio_per_round"] if row else []
        out.append(
            {
                "target": f"step time mapped-structured / plain ≤ {STEP_RATIO_TARGET:.2f}, {model}",
                "value": value,
                "detail": "per round " + ", ".join(f"{r:.3f}" for r in spread) if spread else "",
                "met": None if value is None else value <= STEP_RATIO_TARGET,
            }
        )
    for model, limit in BUILD_TARGETS.items():
        row = _row(step, model, "mapped-structured")
        value = row["construction_seconds"] if row else None
        dense = _row(step, model, "mapped-dense")
        detail = "structured W" + (
            f"; dense W: {dense['construction_seconds']:.1f} s" if dense else ""
        )
        out.append(
            {
                "target": f"construction < {limit:g} s, {model}",
                "value": value,
                "detail": detail,
                "met": None if value is None else value < limit,
            }
        )
    per_parameter = {
        row["model"]: row["projection_bytes_per_parameter"]
        for row in step.get("rows", [])
        if row["variant"] == "mapped-structured" and not row.get("skipped")
    }
    worst = max(per_parameter.values()) if per_parameter else None
    out.append(
        {
            "target": f"projection memory ≤ {BYTES_PER_PARAMETER_TARGET:g} B per target parameter",
            "value": worst,
            "detail": "structured W: "
            + ", ".join(f"{m} {v:.2f}" for m, v in per_parameter.items()),
            "met": None if worst is None else worst <= BYTES_PER_PARAMETER_TARGET,
        }
    )
    row = _row(step, "resnet50", "mapped-structured")
    out.append(
        {
            "target": "the 25M target trains from d=2048, single strategy (loss falls)",
            "value": row["loss_after"] - row["loss_first"] if row else None,
            "detail": (
                "loss "
                + " → ".join(f"{v:.3f}" for v in [*row["losses"], row["loss_after"]])
                + f" (lr {row['lr']:g}, fixed batch)"
            )
            if row
            else "",
            "met": None if row is None else row["loss_after"] < row["loss_first"],
        }
    )
    return out


# ------------------------------------------------------------------------- report


def report_section(step: dict[str, Any], name: str) -> list[str]:
    settings = step["settings"]
    shapes = ", ".join(
        f"{name} {'×'.join(map(str, s['input_shape']))}" for name, s in settings["models"].items()
    )
    fresh = step.get("fresh_process_per_measurement")
    where = "a fresh process" if fresh else "the calling process (smoke)"
    plans = ", ".join(
        f"{name} {s['warmup']}+{s['steps']} × {s['rounds']}"
        for name, s in settings["models"].items()
    )
    malloc = settings.get("malloc_env") or {}
    allocator = (
        "glibc malloc tuned: " + ", ".join(f"{k}={v}" for k, v in malloc.items())
        if malloc
        else (
            "glibc malloc defaults (what a training loop of your own gets; the `mapnet` "
            "command sets the tuned values)"
        )
    )
    lines = [
        f"## Training step, {name}: `{step['command']}`",
        "",
        f"Measured {step['date']} in {step['wall_seconds'] / 60:.1f} min; {allocator}; "
        f"results `{step['file']}`.",
        "",
        f"Machine: {machine_line(step)}.",
        "",
        f"Load (`uptime`) at start: `{step['load']['start']['uptime']}`; at end: "
        f"`{step['load']['end']['uptime']}`.",
        "",
        f"One step = zero_grad + forward + cross-entropy + backward + Adam, batch "
        f"{settings['batch']}, on one fixed synthetic batch (N(0, 1) images, uniform labels). "
        f"Inputs: {shapes}. Latent d = {settings['latent_dim']}, single strategy. Each variant "
        f"runs in {where}: "
        f"warm-up + measured steps × processes = {plans}; the processes "
        f"are interleaved in rounds of alternating order (ABC CBA …), dense variants in "
        f"{settings['dense_rounds']} round(s) only (building a dense W takes minutes). "
        "Step = median of all measured steps; ratio = that median / plain's median in the same "
        "run, with the per-round ratios in brackets. Build = `wrap()` time; peak RSS = VmHWM "
        "of the process (torch itself ≈ 0.3 GiB); faults = minor page faults per step "
        "(median); loss = first step → one forward after the last update.",
        "",
        "| model | threads | variant | trainable / P | build (s) | W bytes / param "
        "| peak RSS (GiB) | step (ms) | ratio to plain | faults / step "
        "| loss first → after (lr) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in step["rows"]:
        threads = harness.row_threads(step, row) or "–"
        if row.get("skipped"):
            lines.append(
                f"| {row['model']} | {threads} | {row['label']} | – | – | – | – | – | – | – "
                f"| skipped: {row['reason']} |"
            )
            continue
        faults = row.get("minor_faults_per_step")
        build = row["construction_seconds"]
        rounds = ", ".join(f"{r:.2f}" for r in row["ratio_per_round"])
        per_parameter = f"{row['projection_bytes_per_parameter']:.2f}"
        lines.append(
            f"| {row['model']} | {threads} | {row['label']} "
            f"| {row['trainable_parameters']:,} / {row['target_parameters']:,} "
            f"| {'–' if build is None else f'{build:.2f}'} "
            f"| {per_parameter if row['projection_bytes'] else '–'} "
            f"| {gib(row['peak_rss_bytes'])} | {ms(row['step_ms_median'])} "
            f"| {row['ratio_to_plain']:.3f} [{rounds}] "
            f"| {'–' if faults is None else f'{faults:,.0f}'} "
            f"| {row['loss_first']:.3f} → {row['loss_after']:.3f} ({row['lr']:g}) |"
        )
    return [*lines, ""]


def targets_section(steps: list[dict[str, Any]]) -> list[str]:
    """One (measured, met?) column pair per step run; the detail column is run A's."""
    statuses = [targets_status(step, None) for step in steps]
    head = " | ".join(f"{run_name(i)} | met?" for i in range(len(steps)))
    lines = ["## Earlier targets (issue 4)", "", f"| target | {head} | detail ({run_name(0)}) |"]
    lines.append("|---|" + "---|---|" * len(steps) + "---|")
    for index, target in enumerate(statuses[0]):
        cells = []
        for status in statuses:
            t = status[index]
            cells.append("–" if t["value"] is None else f"{t['value']:.3f}")
            cells.append({True: "yes", False: "**no**", None: "not measured"}[t["met"]])
        lines.append(f"| {target['target']} | {' | '.join(cells)} | {target['detail']} |")
    runs = "; ".join(f"{run_name(i)} = `{s['command']}` ({s['date']})" for i, s in enumerate(steps))
    note = (
        "Construction here is `wrap()` inside the step runs (their thread count); the "
        "Construction sections below also give it with torch's default thread count."
    )
    return [*lines, "", f"Runs: {runs}.", "", note, ""]
