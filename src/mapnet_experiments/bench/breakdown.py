"""Where a mapped training step's time goes, next to the plain step of the same target: the step
cut into timed phases, probes, the mapping loss's terms and torch.profiler's busiest ops
(`mapnet bench step` runs it after the step bench), and its section of the bench report."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mapnet import MappedModule, MappingConfig, wrap
from mapnet.loss import MappingLoss
from mapnet_experiments.bench.harness import median, minor_faults, start_measurement, threads_text
from mapnet_experiments.bench.subjects import STEP_MODELS, fixed_batch
from mapnet_experiments.bench.text import ms, ms_signed

# The mapping loss's terms (paper §2.3) timed on the mapped step, each switched on alone and all
# together, against the MappingLoss with every term off (the task loss through the same module).
LOSS_TERM_STEPS: dict[str, dict[str, bool]] = {
    "task only (MappingLoss, every term off)": {},
    "+ stability (one noisy forward)": {"stability": True},
    "+ smoothness (exact, closed form)": {"smoothness": True},
    "+ alignment": {"alignment": True},
    "all three terms": {"stability": True, "smoothness": True, "alignment": True},
}


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
    conditions = start_measurement(threads)
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
        **conditions,
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


# ------------------------------------------------------------------------- report


def report_section(step: dict[str, Any], name: str) -> list[str]:
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
