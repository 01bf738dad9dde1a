"""`mapnet bench`: what a mapping costs, measured on this machine.

Every figure is measured in a fresh subprocess, so peak RSS (VmHWM) belongs to that measurement
alone and nothing is warm from the previous one; processes that are compared run interleaved in
rounds of alternating order.

    construction   time and memory to build a mapping (`measure_construction`)
    step           one training step (batch, cross-entropy, Adam) of the plain target, of the
                   mapped target (dense / structured projection) and of intrinsic-dimension
                   training θ₀ + W z (Li et al. 2018), at one or several thread counts side by
                   side, plus a per-phase breakdown of a mapped step (`step_bench`,
                   `measure_step`, `measure_breakdown`)
    memory         peak memory of a few Adam steps, plain vs mapped, and of `wrap()` from a
                   factory and from an instance, tracked through torch's allocations and as
                   peak RSS (`memory_bench`, `measure_training_memory`, `measure_wrap_memory`)
    inference      eval-mode forward under torch.no_grad(), plain vs mapped, the mapped model
                   reusing its generated weights (`inference_bench`, `measure_inference`)
    communication  bytes all-reduced per step and step time over 2 gloo processes, plain vs
                   mapped CNN2 (comm_bench.py)
    report         docs/results/bench.md from results/bench/*.json, with the v0.2 targets
                   judged from the measurements (`write_report`, `release_targets`)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mapnet import MappedModule, MappingConfig, wrap
from mapnet.loss import MappingLoss
from mapnet_experiments.bench import comm as comm_bench
from mapnet_experiments.bench import construction
from mapnet_experiments.bench.harness import (
    DEFAULT_THREADS,
    MALLOC_TUNED_ENV,
    announce,
    finish,
    malloc_env,
    median,
    memory_total_bytes,
    minor_faults,
    peak_rss_bytes,
    resolved_threads,
    results_header,
    row_threads,
    runner,
    set_threads,
    thread_counts,
    threads_text,
)
from mapnet_experiments.bench.subjects import (
    STEP_MODELS,
    STEP_VARIANTS,
    VARIANTS_BY_NAME,
    StepVariant,
    fixed_batch,
    target_parameter_count,
    tensor_bytes,
    variant_config,
    with_input_size,
)
from mapnet_experiments.bench.text import (
    gib,
    machine_line,
    mib,
    ms,
    ms_signed,
    ratio_text,
    run_header,
    run_name,
    shape_text,
)

# ============================================================================ step
#
# One training step (fixed batch, cross-entropy, Adam) of the plain target and of four ways of
# training it through a latent of d numbers. Each (model, variant) runs in a fresh process, in
# rounds whose order alternates, so slow drift of the machine (other jobs on a 2-core box) hits
# every variant alike; ratios are to the plain step of the same run.


# The mapping loss's terms (paper §2.3) timed on the mapped step, each switched on alone and all
# together, against the MappingLoss with every term off (the task loss through the same module).
LOSS_TERM_STEPS: dict[str, dict[str, bool]] = {
    "task only (MappingLoss, every term off)": {},
    "+ stability (one noisy forward)": {"stability": True},
    "+ smoothness (exact, closed form)": {"smoothness": True},
    "+ alignment": {"alignment": True},
    "all three terms": {"stability": True, "smoothness": True, "alignment": True},
}


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
    set_threads(threads)
    loadavg = list(os.getloadavg())
    spec, kind = STEP_MODELS[model], VARIANTS_BY_NAME[variant]
    torch.manual_seed(0)
    target = spec.factory()
    x, y = fixed_batch(spec, batch)
    rss_before = peak_rss_bytes()
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
        faults_before = minor_faults()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        faults.append(minor_faults() - faults_before)
        losses.append(loss.item())
    with torch.no_grad():
        loss_after = nn.functional.cross_entropy(module(x), y).item()
    optimizer_state = [t for state in optimizer.state.values() for t in state.values()]
    is_mapped = isinstance(module, MappedModule)
    return {
        "model": model,
        "variant": variant,
        "threads": torch.get_num_threads(),
        "loadavg": loadavg,
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
        "minor_faults_per_step": median(faults[warmup:]),
        "malloc_env": malloc_env(),
        "losses": losses,
        "loss_after": loss_after,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
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
    plain_median = median([s for r in plain_runs for s in r["step_seconds"]])
    plain_by_round = {r["round"]: median(r["step_seconds"]) for r in plain_runs}
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
        pooled = median([s for r in done for s in r["step_seconds"]])
        builds = [r["construction_seconds"] for r in done if r["construction_seconds"] is not None]
        row |= {
            "skipped": False,
            "processes": len(done),
            "step_ms_median": pooled * 1e3,
            "step_ms_round_medians": [median(r["step_seconds"]) * 1e3 for r in done],
            "ratio_to_plain": pooled / plain_median,
            "ratio_per_round": [
                median(r["step_seconds"]) / plain_by_round[r["round"]]
                for r in done
                if r["round"] in plain_by_round
            ],
            "construction_seconds": median(builds) if builds else None,
            "minor_faults_per_step": median([r["minor_faults_per_step"] for r in done]),
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
    memory = memory_total_bytes()
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
    env = MALLOC_TUNED_ENV if malloc_tuned else None
    counts = thread_counts(threads)
    unknown = sorted(set(variants or ()) - set(VARIANTS_BY_NAME))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS_BY_NAME)}")
    chosen = [
        v for v in STEP_VARIANTS if variants is None or v.name in variants or v.kind == "plain"
    ]
    run = runner(smoke, env)

    data: dict[str, Any] = {
        **results_header("step", command, smoke, counts),
        "settings": {
            "batch": batch,
            "latent_dim": latent_dim,
            "strategy": "single",
            "threads": resolved_threads(counts),
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
            order = [
                (count, v)
                for count in counts
                for v in chosen
                if v.name not in skipped and (v.projection != "dense" or round_index < dense_rounds)
            ]
            if round_index % 2:  # alternate the order: ABC CBA ABC ...
                order.reverse()
            for count, variant in order:
                announce(
                    started,
                    f"{model} {variant.name}"
                    + (f" {threads_text(count)}" if len(counts) > 1 else "")
                    + f" round {round_index + 1}/{spec.rounds}",
                )
                result = run(
                    measure_step,
                    model=model,
                    variant=variant.name,
                    latent_dim=latent_dim,
                    batch=batch,
                    warmup=spec.warmup,
                    steps=spec.steps,
                    threads=count,
                )
                result["round"] = round_index
                runs[count][variant.name].append(result)
                build = result["construction_seconds"]
                print(
                    f"step {median(result['step_seconds']) * 1e3:.1f} ms"
                    + (f", built in {build:.2f} s" if build is not None else "")
                    + f", peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, loss "
                    f"{result['losses'][0]:.3f} -> {result['loss_after']:.3f}, "
                    f"{result['minor_faults_per_step']:.0f} page faults/step, "
                    f"load {result['loadavg'][0]:.1f}",
                    flush=True,
                )
        for count in counts:
            data["rows"].extend(_summarise(model, runs[count], skipped, chosen, count))
    for model in breakdown or []:
        spec = STEP_MODELS[model]
        for count in counts:
            announce(
                started,
                f"{model} breakdown (structured"
                + (f", {threads_text(count)}" if len(counts) > 1 else "")
                + ")",
            )
            result = run(
                measure_breakdown,
                model=model,
                latent_dim=latent_dim,
                batch=batch,
                warmup=spec.warmup,
                steps=spec.steps,
                threads=count,
            )
            data["breakdown"].append(result)
            print(
                f"mapped {result['mapped_step_ms']:.1f} ms, plain {result['plain_step_ms']:.1f} "
                f"ms, gradient check {result['grad_check_max_abs_diff']:.1e}",
                flush=True,
            )
    data["targets"] = targets_status(data, None)
    return finish(data, out, started)


# --------------------------------------------------------------------- breakdown


def _phased_mapped_step(
    mapped: MappedModule, optimizer: torch.optim.Optimizer | None, x: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """One mapped training step cut into timed phases.

    The module's forward is one call, so the step is taken apart through the public pieces:
    `mapped.generate()` (the library's own generation), `functional_call` of the target, the
    backward to θ, then θ → z; `measure_breakdown` checks that the latent gradient equals the one
    of `mapped(x)`. Phases are contiguous, so they add up to the whole step. Without an
    optimiser the step stops after the backward pass (the latent's .grad is left in place).
    """
    clock, marks = time.perf_counter, {}
    t = clock()

    def mark(name: str) -> None:
        nonlocal t
        now = clock()
        marks[name] = now - t
        t = now

    params = mapped.generate()
    tensors = list({id(v): v for v in params.values()}.values())  # tied aliases once
    mark("generation θ₀ + W(z + αz⊙z), split, σ: mapped.generate()")
    output = functional_call(mapped.target, params, (x,), tie_weights=False)
    loss = nn.functional.cross_entropy(output, y)
    mark("target forward (functional_call) + loss")
    grads = torch.autograd.grad(loss, tensors)
    mark("target backward (to θ)")
    torch.autograd.backward(tensors, grads)
    mark("latent gradient (θ → z: Wᵀg, modulation)")
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimiser (Adam on z, zero_grad)")
    return marks


def _adjoint(projector: nn.Module, g: torch.Tensor) -> torch.Tensor:  # (P,) -> (d,)
    """Wᵀ g: the structured projection has its transposed pass, the dense one its matrix."""
    adjoint = getattr(projector, "adjoint", None)
    return adjoint(g) if callable(adjoint) else projector.weight.T @ g


def _profile(step: Callable[[], None], steps: int, top: int = 12) -> list[dict[str, Any]]:
    """torch.profiler's busiest ops (self CPU time) over `steps` calls, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "op": e.key,
            "calls_per_step": e.count / steps,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "total_ms_per_step": e.cpu_time_total / 1e3 / steps,
        }
        for e in events[:top]
    ]


def measure_breakdown(
    model: str,
    latent_dim: int,
    batch: int,
    warmup: int,
    steps: int,
    threads: int | None,
    projection: str = "structured",
    profile_steps: int = 3,
) -> dict[str, Any]:
    """Where a mapped step's time goes, next to the plain step of the same target (subprocess).

    Every iteration runs, in rotating order: a whole mapped step (as `measure_step` does), the
    same step cut into phases, a plain step cut into forward / backward / optimiser, and probes
    (plain forward directly vs through functional_call; W u and Wᵀg alone).
    """
    set_threads(threads)
    loadavg = list(os.getloadavg())
    spec = STEP_MODELS[model]
    torch.manual_seed(0)
    target = spec.factory()
    x, y = fixed_batch(spec, batch)
    plain = copy.deepcopy(target)
    mapped = wrap(target, MappingConfig(latent_dim=latent_dim, projection=projection))
    mapped.train()
    plain.train()
    projector = mapped.projections[0]
    mapped_opt = torch.optim.Adam(mapped.parameters(), lr=spec.lr_mapped)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=spec.lr_plain)
    cross_entropy = nn.functional.cross_entropy

    loss_steps: dict[str, Callable[[], None]] = {}
    for name, terms in LOSS_TERM_STEPS.items():
        switches = {t: terms.get(t, False) for t in ("stability", "smoothness", "alignment")}
        module = wrap(target, MappingConfig(latent_dim=latent_dim, projection=projection))
        module.train()
        loss_fn = MappingLoss(module, **switches)
        optimizer = torch.optim.Adam(
            [*module.parameters(), *loss_fn.parameters()], lr=spec.lr_mapped
        )
        loss_steps[name] = _loss_step(loss_fn, optimizer, x, y)

    # The phases must compute what mapped(x) computes: compare the latent gradients once.
    z = mapped.latent
    reference = torch.autograd.grad(cross_entropy(mapped(x), y), z)[0]  # (d,)
    _phased_mapped_step(mapped, None, x, y)
    assert z.grad is not None
    grad_diff = (z.grad - reference).abs().max().item()
    z.grad = None

    samples: dict[str, dict[str, list[float]]] = {"mapped": {}, "plain": {}, "probe": {}}

    def add(kind: str, name: str, seconds: float) -> None:
        samples[kind].setdefault(name, []).append(seconds)

    def whole_mapped() -> None:
        mapped_opt.zero_grad(set_to_none=True)
        cross_entropy(mapped(x), y).backward()
        mapped_opt.step()

    def whole_plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        cross_entropy(plain(x), y).backward()
        plain_opt.step()

    faults: dict[str, list[int]] = {"mapped": [], "plain": []}

    def timed_whole_mapped(record: bool) -> None:
        faults_before = minor_faults()
        started = time.perf_counter()
        whole_mapped()
        if record:
            add("mapped", "whole step", time.perf_counter() - started)
            faults["mapped"].append(minor_faults() - faults_before)

    def timed_phases(record: bool) -> None:
        marks = _phased_mapped_step(mapped, mapped_opt, x, y)
        if record:
            for name, seconds in marks.items():
                add("mapped", name, seconds)

    def timed_plain(record: bool) -> None:
        clock = time.perf_counter
        faults_before = minor_faults()
        t0 = clock()
        loss = cross_entropy(plain(x), y)
        t1 = clock()
        loss.backward()
        t2 = clock()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        t3 = clock()
        if record:
            faults["plain"].append(minor_faults() - faults_before)
            add("plain", "forward + loss", t1 - t0)
            add("plain", "backward", t2 - t1)
            add("plain", "optimiser (Adam on θ, zero_grad)", t3 - t2)

    params = dict(plain.named_parameters())
    u = torch.randn(projector.in_features)  # (d,)
    g = torch.randn(projector.out_features)  # (P,)

    def timed_probes(record: bool) -> None:
        clock = time.perf_counter
        t0 = clock()
        cross_entropy(plain(x), y)
        t1 = clock()
        cross_entropy(functional_call(plain, params, (x,), tie_weights=False), y)
        t2 = clock()
        with torch.no_grad():
            projector(u)
            t3 = clock()
            _adjoint(projector, g)
            t4 = clock()
        if record:
            add("probe", "plain forward + loss, direct", t1 - t0)
            add("probe", "plain forward + loss, via functional_call", t2 - t1)
            add("probe", "W u alone", t3 - t2)
            add("probe", "Wᵀ g alone", t4 - t3)

    def timed_loss_terms(record: bool) -> None:
        for name, step in loss_steps.items():
            started = time.perf_counter()
            step()
            if record:
                add("loss", name, time.perf_counter() - started)

    samples["loss"] = {}
    order = [timed_whole_mapped, timed_phases, timed_plain, timed_probes, timed_loss_terms]
    for index in range(warmup + steps):
        rotation = index % len(order)
        for phase_run in order[rotation:] + order[:rotation]:
            phase_run(index >= warmup)

    def medians(kind: str) -> dict[str, float]:
        return {name: median(values) * 1e3 for name, values in samples[kind].items()}

    mapped_ms, plain_ms = medians("mapped"), medians("plain")
    whole = mapped_ms.pop("whole step")
    return {
        "model": model,
        "projection": projection,
        "latent_dim": latent_dim,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "loadavg": loadavg,
        "steps": steps,
        "target_parameters": mapped.num_target_parameters(),
        "mapped_step_ms": whole,
        "mapped_phases_ms": mapped_ms,
        "mapped_phases_sum_ms": sum(mapped_ms.values()),
        "plain_step_ms": sum(plain_ms.values()),
        "plain_phases_ms": plain_ms,
        "probes_ms": medians("probe"),
        "minor_faults_per_step": {kind: median(values) for kind, values in faults.items()},
        "grad_check_max_abs_diff": grad_diff,
        "profile_mapped": _profile(whole_mapped, profile_steps),
        "profile_plain": _profile(whole_plain, profile_steps),
        "loss_terms_ms": medians("loss"),
        "profile_all_loss_terms": _profile(loss_steps["all three terms"], profile_steps),
    }


def _loss_step(
    loss_fn: MappingLoss, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(x, y).total.backward()
        optimizer.step()

    return step


# ============================================================================ memory
#
# Peak memory of (b) a few Adam training steps, plain vs mapped, and (c) `wrap()` itself, from a
# factory and from an instance. Every figure comes from a fresh process, with one of two trackers:
#
#   allocator  the bytes torch's CPU allocator holds, followed through every allocation and free
#              torch.profiler records (profile_memory=True), summed in time order and counted
#              from zero at the start of the measured block: tensors only, exact, and blind to
#              what the allocator (glibc) keeps of freed blocks, to Python objects and to memory
#              that libraries (oneDNN's scratch buffers) take from malloc directly.
#   rss        the process's peak resident set (VmHWM) over the block, reset at its start by
#              writing 5 to /proc/self/clear_refs, minus the resident set at its start:
#              everything the process touched, including freed blocks glibc has not returned.
#
# The profiler records every op, so the allocator tracker runs in its own process and the RSS
# figure is never taken with the profiler on.

TRACKERS = ("allocator", "rss")


def current_rss_bytes() -> int:
    """This process's resident set size now (Linux VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux ≥ 4.0: `echo 5 > /proc/self/clear_refs`); False if
    the kernel refuses, and then a peak is only seen when it exceeds every earlier one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """The peak memory of a block (one of TRACKERS), and of named phases inside it.

    >>> with PeakMemory("rss") as peak:
    ...     with peak.phase("wrap"):
    ...         mapped = wrap(MyNet(), config)
    >>> peak.result()  # {"peak_bytes": …, "end_bytes": …, "phases": {"wrap": {…}}}

    peak_bytes: the most the block held above what the process held when it began; end_bytes:
    what it still holds at its end; per phase: its own peak above its start, and where it
    started (`start_bytes`, above the block's start).
    """

    def __init__(self, tracker: str):
        if tracker not in TRACKERS:
            raise ValueError(f"tracker must be one of {TRACKERS}, got {tracker!r}")
        self.tracker = tracker
        self._phases: dict[str, dict[str, int]] = {}
        self._names: list[str] = []
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> PeakMemory:
        if self.tracker == "allocator":
            from torch.profiler import ProfilerActivity, profile

            # with_stack: the Python frames around the peak name where it happens.
            self._profile = profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True
            )
            self._profile.__enter__()
        else:
            self.rss_reset = reset_peak_rss()
            self._baseline = current_rss_bytes()
            self._highest = self._baseline
        return self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._names.append(name)
        if self.tracker == "allocator":
            from torch.profiler import record_function

            with record_function(f"mapnet-bench:{name}"):
                yield
            return
        self._highest = max(self._highest, peak_rss_bytes())  # the peak before the phase
        reset_peak_rss()
        start = current_rss_bytes()
        yield
        peak = peak_rss_bytes()
        self._highest = max(self._highest, peak)
        self._phases[name] = {
            "peak_bytes": peak - start,
            "start_bytes": start - self._baseline,
        }

    def __exit__(self, *exc: Any) -> None:
        if self.tracker == "allocator":
            self._profile.__exit__(*exc)
            if exc[0] is None:
                self._result = self._allocator_result()
            return
        if exc[0] is None:
            peak = max(self._highest, peak_rss_bytes())
            self._result = {
                "peak_bytes": peak - self._baseline,
                "end_bytes": current_rss_bytes() - self._baseline,
                "phases": self._phases,
                "rss_before_bytes": self._baseline,
                "rss_peak_reset": self.rss_reset,
            }

    def _allocator_result(self) -> dict[str, Any]:
        events = self._profile.profiler.kineto_results.events()  # type: ignore[union-attr]
        changes = sorted(  # (time, +bytes allocated / −bytes freed), CPU memory only
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        )
        ranges = {
            e.name().removeprefix("mapnet-bench:"): (e.start_ns(), e.end_ns())
            for e in events
            if e.name().startswith("mapnet-bench:")
        }
        held, peak, peak_moment, timeline = 0, 0, None, []
        for moment, change in changes:
            held += change
            if held > peak:
                peak, peak_moment = held, moment
            timeline.append((moment, held))
        phases = {}
        for name in self._names:
            begin, end = ranges[name]
            before = [h for t, h in timeline if t < begin]
            start = before[-1] if before else 0
            inside = [h for t, h in timeline if begin <= t <= end]
            phases[name] = {
                "peak_bytes": max([start, *inside]) - start,
                "start_bytes": start,
            }
        return {
            "peak_bytes": peak,
            "end_bytes": held,
            "phases": phases,
            "allocation_events": len(changes),
            "peak_at": _frames_at(events, peak_moment),
        }

    def result(self) -> dict[str, Any]:
        if self._result is None:
            raise RuntimeError("PeakMemory.result() before the block ended")
        return self._result


def _frames_at(events: Any, moment: int | None, keep: int = 14) -> list[str]:
    """The profiled Python frames and ops running at `moment` (ns), outermost first: where an
    allocation peak happened. Frames outside this project's code are dropped except the
    innermost few (the op that allocated)."""
    if moment is None:
        return []
    around = sorted(
        (e for e in events if e.name() != "[memory]" and e.start_ns() <= moment <= e.end_ns()),
        key=lambda e: (e.start_ns(), -e.end_ns()),
    )
    names = [_short_frame(e.name()) for e in around]
    ours = [n for n in names[:-3] if "mapnet" in n]
    return [*ours, *names[-3:]][-keep:]


def _short_frame(name: str) -> str:
    """'/…/src/mapnet/module.py(123): __init__' -> 'mapnet/module.py(123): __init__'."""
    for marker in ("/src/", "/site-packages/"):
        if marker in name:
            return name.split(marker, 1)[1]
    return name


def _model_tensor_bytes(model: str) -> dict[str, int]:
    """The plain model's parameter and buffer bytes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        target = STEP_MODELS[model].factory()
    return {
        "weights_bytes": tensor_bytes(target.parameters()),
        "buffers_bytes": tensor_bytes(target.buffers()),
    }


def _theta0_bytes(mapped: MappedModule) -> int:
    """θ₀: one base tensor per generated parameter (views into the groups' flat vectors)."""
    views = (mapped.base_tensor(spec.name) for spec in mapped.specs)
    return tensor_bytes(v for v in views if v is not None)


def _warm_up(latent_dim: int) -> None:
    """Load every code path (lazy imports, kernels) a measurement uses, on the tiny model, so
    neither variant's figure carries a first use: one plain and one mapped training step."""
    spec = STEP_MODELS["tiny"]
    x, y = fixed_batch(spec, 4)
    torch.manual_seed(0)
    for module in (
        spec.factory(),
        wrap(spec.factory, MappingConfig(latent_dim=min(latent_dim, 64))),
    ):
        module.train()
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad])
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
        module.eval()
        with torch.no_grad():
            module(x)
    wrap(spec.factory(), MappingConfig(latent_dim=min(latent_dim, 64)))  # the instance path


def measure_training_memory(
    model: str,
    variant: str,
    tracker: str,
    latent_dim: int,
    batch: int,
    steps: int,
    input_size: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Peak memory of building `model` and taking `steps` Adam steps on a fixed batch (subprocess).

    variant "plain": the model itself, Adam on its P weights (lr 1e-3). "mapped":
    `wrap(factory, MappingConfig(latent_dim, projection="structured"))`, Adam on the latent. The
    measured block starts before the model is built, so it holds the model, the mapping, the
    batch, gradients, the optimiser's state and the activations, each at its worst moment.
    """
    if variant not in ("plain", "mapped"):
        raise ValueError(f"variant must be 'plain' or 'mapped', got {variant!r}")
    set_threads(threads)
    loadavg = list(os.getloadavg())
    spec = with_input_size(STEP_MODELS[model], input_size)
    _warm_up(latent_dim)
    started = time.perf_counter()
    losses: list[float] = []
    with PeakMemory(tracker) as peak:
        x, y = fixed_batch(spec, batch)
        if variant == "plain":
            torch.manual_seed(0)
            module: nn.Module = spec.factory()
            lr = spec.lr_plain
        else:
            config = MappingConfig(latent_dim=latent_dim, projection="structured")
            module = wrap(spec.factory, config)
            lr = spec.lr_mapped
        module.train()
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=lr)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(module(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    optimizer_state = [t for state in optimizer.state.values() for t in state.values()]
    mapped = module if isinstance(module, MappedModule) else None
    return {
        "kind": "training",
        "model": model,
        "variant": variant,
        "tracker": tracker,
        "threads": torch.get_num_threads(),
        "loadavg": loadavg,
        "input_shape": list(spec.input_shape),
        "batch": batch,
        "steps": steps,
        "latent_dim": latent_dim if mapped else None,
        "lr": lr,
        "target_parameters": sum(p.numel() for p in module.parameters())
        if mapped is None
        else mapped.num_target_parameters(),
        "trainable_parameters": sum(p.numel() for p in trainable),
        **_model_tensor_bytes(model),
        "projection_bytes": mapped.projection_bytes() if mapped else 0,
        "theta0_bytes": _theta0_bytes(mapped) if mapped else 0,
        "optimizer_state_bytes": tensor_bytes(optimizer_state),
        "losses": losses,
        "seconds": time.perf_counter() - started,
        "malloc_env": malloc_env(),
        "process_peak_rss_bytes": peak_rss_bytes(),
        **peak.result(),
    }


def measure_wrap_memory(
    model: str,
    source: str,
    tracker: str,
    latent_dim: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """Peak memory of `mapnet.wrap(Model, cfg)` ("factory") or `mapnet.wrap(Model(), cfg)`
    ("instance"), structured W (subprocess).

    The block starts before the model exists in both cases, so both build its weights once and
    are held to the same budget: weights + buffers + W + one θ₀. Phase "wrap" is `wrap()` alone
    (for the instance, after `Model()` returned). The instance is not kept after wrap(), as in
    the one-line call.
    """
    if source not in ("factory", "instance"):
        raise ValueError(f"source must be 'factory' or 'instance', got {source!r}")
    set_threads(threads)
    loadavg = list(os.getloadavg())
    factory = STEP_MODELS[model].factory
    config = MappingConfig(latent_dim=latent_dim, projection="structured")
    _warm_up(latent_dim)
    with PeakMemory(tracker) as peak:
        started = time.perf_counter()
        if source == "factory":
            with peak.phase("wrap"):
                mapped = wrap(factory, config)
        else:
            torch.manual_seed(0)
            instance = factory()
            with peak.phase("wrap"):
                mapped = wrap(instance, config)
            del instance
        seconds = time.perf_counter() - started
    sizes = _model_tensor_bytes(model)
    theta0, projection = _theta0_bytes(mapped), mapped.projection_bytes()
    result = peak.result()
    return {
        "kind": "wrap",
        "model": model,
        "source": source,
        "tracker": tracker,
        "threads": torch.get_num_threads(),
        "loadavg": loadavg,
        "latent_dim": latent_dim,
        "projection": config.projection,
        "target_parameters": mapped.num_target_parameters(),
        **sizes,
        "projection_bytes": projection,
        "theta0_bytes": theta0,
        "budget_bytes": sizes["weights_bytes"] + sizes["buffers_bytes"] + projection + theta0,
        "seconds": seconds,
        "wrap_peak_bytes": result["phases"]["wrap"]["peak_bytes"],
        "malloc_env": malloc_env(),
        "process_peak_rss_bytes": peak_rss_bytes(),
        **result,
    }


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    latent_dim: int
    batch: int
    steps: int
    input_sizes: tuple[int | None, ...]


MEMORY_PLAN = MemoryPlan("resnet50", 2048, batch=8, steps=3, input_sizes=(224, 64))
MEMORY_SMOKE = MemoryPlan("tiny", 64, batch=4, steps=2, input_sizes=(None,))
MEMORY_TARGET_INPUT = 224  # ResNet-50's own input (ImageNet's 224×224), where (b) is judged


def memory_bench(
    out: Path,
    plan: MemoryPlan = MEMORY_PLAN,
    *,
    threads: int | None = None,
    command: str = "mapnet bench memory",
    smoke: bool = False,
) -> dict[str, Any]:
    """(b) training memory, plain vs mapped, per input size, and (c) `wrap()`'s memory, factory
    vs instance; each (case, tracker) in a fresh process (smoke: in this one); write `out`."""
    run = runner(smoke, None)
    data: dict[str, Any] = {
        **results_header("memory", command, smoke, [threads]),
        "settings": dataclasses.asdict(plan) | {"trackers": list(TRACKERS), "optimizer": "Adam"},
        "training": [],
        "wrap": [],
    }
    started = time.perf_counter()
    for input_size in plan.input_sizes:
        for tracker in TRACKERS:
            for variant in ("plain", "mapped"):
                announce(
                    started,
                    f"training {plan.model} {variant} input {input_size or 'default'}, "
                    f"batch {plan.batch}, {tracker}",
                )
                row = run(
                    measure_training_memory,
                    model=plan.model,
                    variant=variant,
                    tracker=tracker,
                    latent_dim=plan.latent_dim,
                    batch=plan.batch,
                    steps=plan.steps,
                    input_size=input_size,
                    threads=threads,
                )
                data["training"].append(row)
                print(
                    f"peak {mib(row['peak_bytes'])} MiB, loss "
                    + " -> ".join(f"{v:.3f}" for v in row["losses"])
                    + f" ({row['seconds']:.1f} s)",
                    flush=True,
                )
    for source in ("factory", "instance"):
        for tracker in TRACKERS:
            announce(started, f"wrap {plan.model} {source}, {tracker}")
            row = run(
                measure_wrap_memory,
                model=plan.model,
                source=source,
                tracker=tracker,
                latent_dim=plan.latent_dim,
                threads=threads,
            )
            data["wrap"].append(row)
            print(
                f"peak {mib(row['peak_bytes'])} MiB of a budget of "
                f"{mib(row['budget_bytes'])} MiB ({row['seconds']:.1f} s)",
                flush=True,
            )
    data["summary"] = memory_summary(data)
    return finish(data, out, started)


def memory_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Ratios: training mapped / plain per (input, tracker); wrap peak / budget per (source,
    tracker)."""
    training = []
    by_case: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in data.get("training", []):
        key = (tuple(row["input_shape"]), row["batch"], row["tracker"])
        by_case.setdefault(key, {})[row["variant"]] = row
    for (shape, batch, tracker), pair in by_case.items():
        if "plain" in pair and "mapped" in pair:
            plain, mapped = pair["plain"]["peak_bytes"], pair["mapped"]["peak_bytes"]
            training.append(
                {
                    "input_shape": list(shape),
                    "batch": batch,
                    "tracker": tracker,
                    "plain_peak_bytes": plain,
                    "mapped_peak_bytes": mapped,
                    "ratio": mapped / plain if plain > 0 else None,  # RSS of a tiny model: 0
                }
            )
    wraps = [
        {
            "source": row["source"],
            "tracker": row["tracker"],
            "peak_bytes": row["peak_bytes"],
            "wrap_peak_bytes": row["wrap_peak_bytes"],
            "budget_bytes": row["budget_bytes"],
            "ratio": row["peak_bytes"] / row["budget_bytes"],
        }
        for row in data.get("wrap", [])
    ]
    return {"training": training, "wrap": wraps}


# ========================================================================= inference
#
# (d) Eval-mode inference: `module.eval()` once, then `with torch.no_grad(): module(x)` on a fixed
# batch, plain vs mapped (structured W). The mapped module generates its weights on the first
# call and reuses them while no latent changes (the v0.2 eval cache), so its first call is timed
# apart and the steady state is the median of the calls after the warm-up.


@dataclass(frozen=True)
class InferenceModel:
    batch: int
    input_size: int | None  # square input (None: the step bench's)
    warmup: int  # calls after the first, not timed
    steps: int  # timed calls per process
    rounds: int  # processes per (variant, thread count)


INFERENCE_MODELS: dict[str, InferenceModel] = {
    "cnn2": InferenceModel(128, None, warmup=5, steps=50, rounds=5),
    "cnn1": InferenceModel(128, None, warmup=3, steps=30, rounds=5),
    "resnet50": InferenceModel(8, 224, warmup=1, steps=5, rounds=5),
    "tiny": InferenceModel(8, None, warmup=1, steps=3, rounds=1),
}
INFERENCE_VARIANTS = ("plain", "mapped")


def measure_inference(
    model: str,
    variant: str,
    batch: int,
    warmup: int,
    steps: int,
    latent_dim: int,
    input_size: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time eval-mode forwards under torch.no_grad() of the plain or mapped model (subprocess)."""
    if variant not in INFERENCE_VARIANTS:
        raise ValueError(f"variant must be one of {INFERENCE_VARIANTS}, got {variant!r}")
    set_threads(threads)
    loadavg = list(os.getloadavg())
    spec = with_input_size(STEP_MODELS[model], input_size)
    x, _ = fixed_batch(spec, batch)
    started = time.perf_counter()
    if variant == "plain":
        torch.manual_seed(0)
        module: nn.Module = spec.factory()
    else:
        module = wrap(spec.factory, MappingConfig(latent_dim=latent_dim, projection="structured"))
    build = time.perf_counter() - started
    module.eval()
    clock, seconds = time.perf_counter, []
    with torch.no_grad():
        t0 = clock()
        first = module(x)
        first_seconds = clock() - t0
        second = module(x)  # mapped: from the cache
        for index in range(warmup + steps):
            t0 = clock()
            module(x)
            if index >= warmup:
                seconds.append(clock() - t0)
    return {
        "model": model,
        "variant": variant,
        "threads": torch.get_num_threads(),
        "loadavg": loadavg,
        "input_shape": list(spec.input_shape),
        "batch": batch,
        "latent_dim": latent_dim if variant == "mapped" else None,
        "build_seconds": build,
        "first_call_seconds": first_seconds,
        "call_seconds": seconds,
        "repeat_output_equal": bool(torch.equal(first, second)),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def inference_bench(
    models: list[str],
    out: Path,
    *,
    threads: int | Sequence[int | None] | None = (1, None),
    latent_dim: int = 2048,
    batch: int | None = None,
    command: str = "mapnet bench inference",
    smoke: bool = False,
    malloc_tuned: bool = False,
) -> dict[str, Any]:
    """(d) for `models` at every thread count: rounds of fresh processes, each running one
    (variant, thread count), in alternating order; write `out`. `batch` overrides the models'."""
    counts = thread_counts(threads)
    run = runner(smoke, MALLOC_TUNED_ENV if malloc_tuned else None)
    data: dict[str, Any] = {
        **results_header("inference", command, smoke, counts),
        "settings": {
            "latent_dim": latent_dim,
            "projection": "structured",
            "malloc_tuned": malloc_tuned,
            "threads": resolved_threads(counts),
            "models": {
                name: dataclasses.asdict(INFERENCE_MODELS[name])
                | {
                    "batch": batch or INFERENCE_MODELS[name].batch,
                    "input_shape": list(
                        with_input_size(
                            STEP_MODELS[name], INFERENCE_MODELS[name].input_size
                        ).input_shape
                    ),
                }
                for name in models
            },
        },
        "rows": [],
    }
    started = time.perf_counter()
    for model in models:
        plan = INFERENCE_MODELS[model]
        size = batch or plan.batch
        runs: dict[tuple[int | None, str], list[dict[str, Any]]] = {
            (c, v): [] for c in counts for v in INFERENCE_VARIANTS
        }
        for round_index in range(plan.rounds):
            order = list(runs)
            if round_index % 2:
                order.reverse()
            for count, variant in order:
                announce(
                    started,
                    f"{model} {variant} {threads_text(count)} "
                    f"round {round_index + 1}/{plan.rounds}",
                )
                result = run(
                    measure_inference,
                    model=model,
                    variant=variant,
                    batch=size,
                    warmup=plan.warmup,
                    steps=plan.steps,
                    latent_dim=latent_dim,
                    input_size=plan.input_size,
                    threads=count,
                )
                result["round"] = round_index
                runs[(count, variant)].append(result)
                print(
                    f"forward {median(result['call_seconds']) * 1e3:.2f} ms, first call "
                    f"{result['first_call_seconds'] * 1e3:.1f} ms, load {result['loadavg'][0]:.1f}",
                    flush=True,
                )
        for count in counts:
            data["rows"].extend(
                _summarise_inference(model, {v: runs[(count, v)] for v in INFERENCE_VARIANTS})
            )
    return finish(data, out, started)


def _summarise_inference(model: str, runs: dict[str, list[dict[str, Any]]]) -> list[dict]:
    plain = runs["plain"]
    plain_median = median([s for r in plain for s in r["call_seconds"]])
    plain_by_round = {r["round"]: median(r["call_seconds"]) for r in plain}
    rows = []
    for variant, done in runs.items():
        pooled = median([s for r in done for s in r["call_seconds"]])
        rows.append(
            {
                "model": model,
                "variant": variant,
                "threads": done[0]["threads"],
                "batch": done[0]["batch"],
                "input_shape": done[0]["input_shape"],
                "processes": len(done),
                "forward_ms_median": pooled * 1e3,
                "forward_ms_round_medians": [median(r["call_seconds"]) * 1e3 for r in done],
                "ratio_to_plain": pooled / plain_median,
                "ratio_per_round": [
                    median(r["call_seconds"]) / plain_by_round[r["round"]]
                    for r in done
                    if r["round"] in plain_by_round
                ],
                "first_call_ms_median": median([r["first_call_seconds"] for r in done]) * 1e3,
                "build_seconds_median": median([r["build_seconds"] for r in done]),
                "repeat_output_equal": all(r["repeat_output_equal"] for r in done),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in done),
                "runs": done,
            }
        )
    return rows


# ------------------------------------------------------------------------ targets

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


# The v0.2 targets (speed and memory of the v0.2 library), judged only on runs made by this
# bench (they record the library's version): older results measured other code.
RELEASE_STEP_RATIO = 1.05  # (a) mapped-structured / plain training step, batch 128
RELEASE_STEP_BATCH = 128
RELEASE_MEMORY_RATIO = 1.0  # (b) peak training memory mapped / plain, ResNet-50, batch 8
RELEASE_MEMORY_BATCH = 8
RELEASE_WRAP_RATIO = 1.0  # (c) wrap()'s peak / (weights + buffers + W + θ₀)
RELEASE_INFERENCE_RATIO = 1.02  # (d) eval forward under no_grad, mapped / plain
MIN_PROCESSES = 5
TRACKER_LABELS = {"allocator": "tracked torch allocations", "rss": "peak RSS increase"}


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
        return {"target": target, "value": None, "met": None, "detail": "", "source": ""}
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
        entry: dict[str, Any] = {
            "target": f"(b) peak training memory mapped / plain ≤ {RELEASE_MEMORY_RATIO:.2f}: "
            f"ResNet-50, batch {RELEASE_MEMORY_BATCH}, 3×{MEMORY_TARGET_INPUT}×"
            f"{MEMORY_TARGET_INPUT}, Adam ({TRACKER_LABELS[tracker]})",
            "value": None,
            "met": None,
            "detail": "",
            "source": "",
        }
        for data in _newest_first(memories):
            if data["settings"].get("model") != "resnet50":
                continue
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
            entry = {
                "target": f"(c) `{call}` peak ≤ weights + buffers + W + one θ₀ "
                f"({TRACKER_LABELS[tracker]})",
                "value": None,
                "met": None,
                "detail": "",
                "source": "",
            }
            for data in _newest_first(memories):
                if data["settings"].get("model") != "resnet50":
                    continue
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
                        + _peak_place(row),
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


def _peak_place(row: dict[str, Any]) -> str:
    """'; peak in mapnet/…: f › aten::op' from the allocator tracker's frames, if any."""
    frames = [
        f
        for f in row.get("peak_at", [])
        if not f.startswith(("mapnet_experiments", "mapnet-bench"))
    ]
    if not frames:
        return ""
    ours = [f for f in frames if f.startswith("mapnet/")]
    shown = [*ours[-2:], frames[-1]] if ours and ours[-1] != frames[-1] else frames[-3:]
    return "; peak in " + " › ".join(f"`{f}`" for f in shown)


# ------------------------------------------------------------------------- report


def _load_results(results: Path) -> dict[str, list[dict[str, Any]]]:
    """The runs in `results` by kind: "step" (step.json first, then by date), "construction"
    (by date), "memory" and "inference" (newest first). Smoke runs only when a kind has
    nothing else (the report then says so)."""
    found: dict[str, list[dict[str, Any]]] = {k: [] for k in REPORT_KINDS}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        kind = data.get("what", "construction")
        if kind in found and (kind != "construction" or "rows" in data):
            found[kind].append(data | {"file": str(path)})
    for kind, runs in found.items():
        real = [d for d in runs if not d.get("smoke")]
        found[kind] = real or runs
    found["step"].sort(key=lambda d: (Path(d["file"]).name != "step.json", d["date"]))
    found["construction"].sort(key=lambda d: d.get("date", ""))
    for kind in ("memory", "inference", "communication"):
        found[kind].sort(key=lambda d: d.get("date", ""), reverse=True)
    return found


REPORT_KINDS = ("step", "construction", "memory", "inference", "communication")


def _step_section(step: dict[str, Any], name: str) -> list[str]:
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
        threads = row_threads(step, row) or "–"
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


def _breakdown_section(step: dict[str, Any], name: str) -> list[str]:
    results = step.get("breakdown", [])
    if not results:
        return []
    several = len({r["threads"] for r in results}) > 1
    names = [
        f"{r['model']} ({r['target_parameters']:,})"
        + (f", {threads_text(r['threads'])}" if several else "")
        for r in results
    ]
    library_generate = any("mapped.generate()" in k for k in results[0]["mapped_phases_ms"])
    phases = (
        "the library's own `mapped.generate()`, then `functional_call` of the target, the "
        "backward to θ and θ → z"
        if library_generate
        else "a statement-by-statement copy of `MappedModule.generate` / `forward`"
    )
    lines = [
        f"### Where a mapped step's time goes ({name})",
        "",
        "Structured W, d = {d}, batch {b}; medians (ms) over {s} steps of one process that runs, "
        "in rotating order, the whole mapped step, the same step cut into phases ({phases}; its "
        "latent gradient matches `mapped(x)`'s to {diff}), a plain step cut into phases, and "
        "probes. Interleaving "
        "makes each step run with caches the others left behind, so these absolute times (and "
        "their ratio) differ from the step table's; they attribute the time, the step table "
        "gives the ratio.".format(
            d=results[0]["latent_dim"],
            b=results[0]["batch"],
            s=results[0]["steps"],
            phases=phases,
            diff=", ".join(f"{r['grad_check_max_abs_diff']:.1e}" for r in results),
        ),
        "",
        "| phase | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(results),
    ]
    phases = list(results[0]["mapped_phases_ms"])
    for phase in phases:
        cells = []
        for r in results:
            value = r["mapped_phases_ms"][phase]
            cells.append(f"{ms(value)} ({100 * value / r['mapped_phases_sum_ms']:.0f}%)")
        lines.append(f"| mapped: {phase} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mapped: sum of phases** | "
        + " | ".join(f"**{ms(r['mapped_phases_sum_ms'])}**" for r in results)
        + " |"
    )
    lines.append(
        "| mapped: whole step, unsplit | "
        + " | ".join(ms(r["mapped_step_ms"]) for r in results)
        + " |"
    )
    for phase in results[0]["plain_phases_ms"]:
        lines.append(
            f"| plain: {phase} | "
            + " | ".join(ms(r["plain_phases_ms"][phase]) for r in results)
            + " |"
        )
    lines.append(
        "| **plain: sum** | " + " | ".join(f"**{ms(r['plain_step_ms'])}**" for r in results) + " |"
    )
    if all("minor_faults_per_step" in r for r in results):
        for kind in ("mapped", "plain"):
            cells = [f"{r['minor_faults_per_step'][kind]:,.0f}" for r in results]
            lines.append(f"| {kind}: minor page faults / whole step | " + " | ".join(cells) + " |")
    for probe in results[0]["probes_ms"]:
        lines.append(
            f"| probe: {probe} | " + " | ".join(ms(r["probes_ms"][probe]) for r in results) + " |"
        )
    lines += [
        "",
        "Overhead of the mapped step over the plain one, by cause (ms; from the phase "
        "medians above):",
        "",
        "| cause | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(results),
    ]
    for cause in _overhead_causes(results[0]):
        cells = [ms_signed(_overhead_causes(r)[cause]) for r in results]
        lines.append(f"| {cause} | " + " | ".join(cells) + " |")
    if all("loss_terms_ms" in r for r in results):
        lines += [
            "",
            "The mapping loss's terms (`mapnet.MappingLoss`, trainable coefficients) on the same "
            "mapped step, in the same rotation: median ms per step, and in brackets the cost "
            "over the MappingLoss with every term off:",
            "",
            "| loss | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(results),
        ]
        for term in results[0]["loss_terms_ms"]:
            cells = []
            for r in results:
                times = r["loss_terms_ms"]
                first = next(iter(times))  # every term off: the reference
                extra = "" if term == first else f" ({ms_signed(times[term] - times[first])})"
                cells.append(ms(times[term]) + extra)
            lines.append(f"| {term} | " + " | ".join(cells) + " |")
    for r in results:
        label = r["model"] + (f", {threads_text(r['threads'])}" if several else "")
        profiles = {"mapped step": "profile_mapped", "plain step": "profile_plain"}
        if "profile_all_loss_terms" in r:
            profiles["mapped step with all three loss terms"] = "profile_all_loss_terms"
        for kind, key in profiles.items():
            lines += [
                "",
                f"torch.profiler, {label} {kind}: busiest ops by self CPU time "
                "(ms per step). The profiler adds its own cost to every op it records, and that "
                "cost lands in the self time of the Python-level node issuing the ops: "
                "`_GeneratedTensors` and its backward issue about a hundred small ops each, so "
                "their self time here is several times what the phase table gives them.",
                "",
                "| op | calls | self ms | total ms |",
                "|---|---|---|---|",
            ]
            for e in r[key][:10]:
                lines.append(
                    f"| `{e['op']}` | {e['calls_per_step']:g} "
                    f"| {ms(e['self_ms_per_step'])} | {ms(e['total_ms_per_step'])} |"
                )
    return [*lines, ""]


def _overhead_causes(result: dict[str, Any]) -> dict[str, float]:
    """mapped − plain, split by cause; the causes add up to the difference of the phase sums."""
    m, p, probe = result["mapped_phases_ms"], result["plain_phases_ms"], result["probes_ms"]
    generation = sum(v for k, v in m.items() if not k.startswith(("target", "latent", "optim")))
    forward = m["target forward (functional_call) + loss"] - p["forward + loss"]
    call_overhead = (
        probe["plain forward + loss, via functional_call"] - probe["plain forward + loss, direct"]
    )
    return {
        "generation θ = θ₀ + W u (check, modulation, W u, + θ₀, split, σ)": generation,
        "target forward, mapped − plain": forward,
        "  of which functional_call itself (probe)": call_overhead,
        "target backward to θ, mapped − plain": m["target backward (to θ)"] - p["backward"],
        "latent gradient θ → z (Wᵀg …)": next(
            v for k, v in m.items() if k.startswith("latent gradient")
        ),
        "optimiser: Adam on z − Adam on θ": m["optimiser (Adam on z, zero_grad)"]
        - p["optimiser (Adam on θ, zero_grad)"],
        "**total (sum of phases, mapped − plain)**": result["mapped_phases_sum_ms"]
        - result["plain_step_ms"],
    }


def _release_targets_section(found: dict[str, list[dict[str, Any]]]) -> list[str]:
    targets = release_targets(found["step"], found["memory"], found["inference"])
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


# The commands whose results the v0.2 targets read (what `--help` and the report suggest).
RELEASE_COMMANDS = {
    "(a)": "mapnet bench step --models cnn2 cnn1 --variants plain mapped-structured "
    "--threads 1 2 --out results/bench/step-v02.json",
    "(b)": "mapnet bench memory",
    "(c)": "mapnet bench memory",
    "(d)": "mapnet bench inference",
}


def _targets_section(steps: list[dict[str, Any]]) -> list[str]:
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


def _memory_section(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    lines = [
        *run_header(data, "Memory"),
        "Two trackers, "
        + (
            "each in its own process"
            if data.get("fresh_process_per_measurement")
            else "both in the calling process (smoke)"
        )
        + ": **tracked** = the bytes torch's CPU allocator "
        "holds, followed through every allocation and free that torch.profiler records "
        "(`profile_memory=True`), counted from zero where the measured block begins (tensors "
        "only; blind to what glibc keeps of freed blocks, to Python objects and to buffers "
        "that libraries such as oneDNN take from malloc directly); **RSS** = the peak resident "
        "set (VmHWM, reset at the block's start through `/proc/self/clear_refs`) minus the "
        "resident set at the start (everything the process touched). Before the block each "
        "process runs one plain and one mapped step of a tiny model, so neither figure "
        "carries a first use of the code. Where the tracked peak happens comes from the "
        "profiler's Python frames.",
        "",
        f"### Training (b): {settings['model']}, batch {settings['batch']}, "
        f"{settings['steps']} Adam steps",
        "",
        "The block starts before the model exists: it holds the model (plain: its P weights; "
        "mapped: `wrap(factory, MappingConfig(latent_dim="
        f'{settings["latent_dim"]}, projection="structured"))`, so θ₀ and W), the batch, '
        "the gradients, the optimiser's state and the activations, each at its worst moment.",
        "",
        "| input | tracker | variant | trainable / P | peak (MiB) | held at end (MiB) "
        "| optimiser state (MiB) | loss per step | peak in |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["training"]:
        place = _peak_place(row).removeprefix("; peak in ") or "–"
        lines.append(
            f"| {shape_text(row['input_shape'])} | {row['tracker']} | {row['variant']} "
            f"| {row['trainable_parameters']:,} / {row['target_parameters']:,} "
            f"| {mib(row['peak_bytes'])} | {mib(row['end_bytes'])} "
            f"| {mib(row['optimizer_state_bytes'])} "
            f"| {' → '.join(f'{v:.3f}' for v in row['losses'])} | {place} |"
        )
    lines += [
        "",
        "| input | batch | tracker | plain peak (B) | mapped peak (B) | mapped / plain |",
        "|---|---|---|---|---|---|",
    ]
    for case in data["summary"]["training"]:
        lines.append(
            f"| {shape_text(case['input_shape'])} | {case['batch']} | {case['tracker']} "
            f"| {case['plain_peak_bytes']:,} | {case['mapped_peak_bytes']:,} "
            f"| {ratio_text(case['ratio'])} |"
        )
    wraps = data["wrap"]
    if wraps:
        first = wraps[0]
        lines += [
            "",
            f"### `wrap()` (c): {first['model']}, d = {first['latent_dim']}, "
            f"{first['projection']} W",
            "",
            "factory = `mapnet.wrap(Model, cfg)`, instance = `mapnet.wrap(Model(), cfg)` (the "
            "instance dropped afterwards); the block starts before the model exists, so both "
            "build its weights once and both have the same budget: weights "
            f"{mib(first['weights_bytes'])} MiB + buffers {mib(first['buffers_bytes'])} MiB + "
            f"W {mib(first['projection_bytes'])} MiB (`mapped.projection_bytes()`) + one θ₀ "
            f"{mib(first['theta0_bytes'])} MiB = {first['budget_bytes']:,} B. "
            "wrap() alone = the peak of the call itself above what was held when it began "
            "(the instance's weights).",
            "",
            "| source | tracker | peak (MiB) | wrap() alone (MiB) | held after (MiB) "
            "| peak / budget | seconds | peak in |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in wraps:
            place = _peak_place(row).removeprefix("; peak in ") or "–"
            lines.append(
                f"| {row['source']} | {row['tracker']} | {mib(row['peak_bytes'])} "
                f"| {mib(row['wrap_peak_bytes'])} | {mib(row['end_bytes'])} "
                f"| {row['peak_bytes'] / row['budget_bytes']:.3f} | {row['seconds']:.2f} "
                f"| {place} |"
            )
    return [*lines, ""]


def _inference_section(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    plans = ", ".join(
        f"{name} {shape_text(s['input_shape'])} batch {s['batch']}: 1 + {s['warmup']} + "
        f"{s['steps']} calls × {s['rounds']}"
        for name, s in settings["models"].items()
    )
    lines = [
        *run_header(data, "Inference (d)"),
        "`module.eval()`, then `with torch.no_grad(): module(x)` on one fixed batch; plain = "
        "the model itself, mapped = `wrap(factory, MappingConfig(latent_dim="
        f'{settings["latent_dim"]}, projection="structured"))`, which generates θ on its '
        "first call and reuses it while no latent changes (the eval cache). Per process: the "
        "first call (timed apart), warm-up calls, timed calls; first + warm-up + timed × "
        f"processes = {plans}. Processes run in rounds over every (thread count, variant) "
        "pair, in alternating order. Forward = median of all timed calls; ratio = mapped / "
        "plain at the same thread count, per-process ratios in brackets; repeat equal = the "
        "second call's output equals the first's (bit for bit) in every process.",
        "",
        "| model | input | batch | threads | plain (ms) | mapped (ms) | mapped / plain "
        "| mapped first call (ms) | plain first call (ms) | repeat equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = data["rows"]
    for mapped in (r for r in rows if r["variant"] == "mapped"):
        plain = next(
            r
            for r in rows
            if r["variant"] == "plain"
            and r["model"] == mapped["model"]
            and r["threads"] == mapped["threads"]
        )
        rounds = ", ".join(f"{r:.2f}" for r in mapped["ratio_per_round"])
        lines.append(
            f"| {mapped['model']} | {shape_text(mapped['input_shape'])} | {mapped['batch']} "
            f"| {mapped['threads']} | {ms(plain['forward_ms_median'])} "
            f"| {ms(mapped['forward_ms_median'])} | {mapped['ratio_to_plain']:.3f} [{rounds}] "
            f"| {ms(mapped['first_call_ms_median'])} | {ms(plain['first_call_ms_median'])} "
            f"| {'yes' if mapped['repeat_output_equal'] else '**no**'} |"
        )
    return [*lines, ""]


def write_report(results: Path, out: Path) -> Path:
    """docs/results/bench.md from the JSON files in `results` (smoke runs only when a kind has
    no other)."""
    found = _load_results(results)
    runs = [d for kind in REPORT_KINDS for d in found[kind]]
    if not any(found[k] for k in ("step", "memory", "inference")):
        raise FileNotFoundError(
            f"no step, memory or inference results in {results}: run `mapnet bench step`, "
            "`mapnet bench memory` or `mapnet bench inference` first"
        )
    first = next(d for k in ("step", "memory", "inference") for d in found[k])
    sources = ", ".join(f"`{d['file']}`" for d in runs)
    smoke = any(d.get("smoke") for d in runs)
    # No date of its own: each section says when its run was measured, and the same results
    # give the same page (a regenerated report differs only where the results do).
    lines = [
        "# `mapnet bench`: what a mapping costs",
        "",
        *(
            ["**SMOKE RUN: a tiny model and two steps; these figures measure nothing.**", ""]
            if smoke
            else []
        ),
        f"Generated by `mapnet bench report` from {sources}; do not edit by hand. "
        "Re-measure with `mapnet bench step`, `mapnet bench memory`, `mapnet bench inference` "
        "and `mapnet bench construction` (`mapnet bench --help` says what each measures and "
        "how long it takes).",
        "",
        f"Machine: {machine_line(first)}.",
        "",
        *_release_targets_section(found),
        *(_targets_section(found["step"]) if found["step"] else []),
        *(
            line
            for index, run in enumerate(found["step"])
            for line in (
                *_step_section(run, run_name(index)),
                *_breakdown_section(run, run_name(index)),
            )
        ),
        *(line for run in found["memory"] for line in _memory_section(run)),
        *(line for run in found["inference"] for line in _inference_section(run)),
        *(line for run in found["communication"][:1] for line in comm_bench.report_section(run)),
        *(line for run in found["construction"] for line in construction.report_section(run)),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")
    return out
