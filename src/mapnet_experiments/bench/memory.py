"""`mapnet bench memory`: the peak memory of (b) a few Adam training steps, plain vs mapped, and
(c) `wrap()` itself, from a factory and from an instance, each figure from a fresh process with
one of the trackers of peak_memory.py; and its section of the bench report."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet import MappedModule, MappingConfig, wrap
from mapnet_experiments.bench.harness import (
    finish,
    malloc_env,
    measure,
    peak_rss_bytes,
    results_header,
    runner,
    start_measurement,
)
from mapnet_experiments.bench.peak_memory import TRACKERS, PeakMemory
from mapnet_experiments.bench.subjects import (
    STEP_MODELS,
    fixed_batch,
    tensor_bytes,
    with_input_size,
)
from mapnet_experiments.bench.text import mib, ratio_text, run_header, shape_text


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
    conditions = start_measurement(threads)
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
        **conditions,
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
    conditions = start_measurement(threads)
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
        **conditions,
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
    shared = {"model": plan.model, "latent_dim": plan.latent_dim, "threads": threads}
    started = time.perf_counter()
    for input_size in plan.input_sizes:
        for tracker in TRACKERS:
            for variant in ("plain", "mapped"):
                row = measure(
                    run,
                    started,
                    f"training {plan.model} {variant} input {input_size or 'default'}, "
                    f"batch {plan.batch}, {tracker}",
                    measure_training_memory,
                    _training_figures,
                    variant=variant,
                    tracker=tracker,
                    batch=plan.batch,
                    steps=plan.steps,
                    input_size=input_size,
                    **shared,
                )
                data["training"].append(row)
    for source in ("factory", "instance"):
        for tracker in TRACKERS:
            row = measure(
                run,
                started,
                f"wrap {plan.model} {source}, {tracker}",
                measure_wrap_memory,
                _wrap_figures,
                source=source,
                tracker=tracker,
                **shared,
            )
            data["wrap"].append(row)
    data["summary"] = memory_summary(data)
    return finish(data, out, started)


def _training_figures(row: dict[str, Any]) -> str:
    losses = " -> ".join(f"{v:.3f}" for v in row["losses"])
    return f"peak {mib(row['peak_bytes'])} MiB, loss {losses} ({row['seconds']:.1f} s)"


def _wrap_figures(row: dict[str, Any]) -> str:
    return (
        f"peak {mib(row['peak_bytes'])} MiB of a budget of "
        f"{mib(row['budget_bytes'])} MiB ({row['seconds']:.1f} s)"
    )


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


# ------------------------------------------------------------------------- report


def peak_place(row: dict[str, Any]) -> str:
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


def report_section(data: dict[str, Any]) -> list[str]:
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
        place = peak_place(row).removeprefix("; peak in ") or "–"
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
            place = peak_place(row).removeprefix("; peak in ") or "–"
            lines.append(
                f"| {row['source']} | {row['tracker']} | {mib(row['peak_bytes'])} "
                f"| {mib(row['wrap_peak_bytes'])} | {mib(row['end_bytes'])} "
                f"| {row['peak_bytes'] / row['budget_bytes']:.3f} | {row['seconds']:.2f} "
                f"| {place} |"
            )
    return [*lines, ""]
