"""`mapnet bench inference`: (d) eval-mode inference, plain vs mapped (structured W), and its
section of the bench report.

`module.eval()` once, then `with torch.no_grad(): module(x)` on a fixed batch. The mapped module
generates its weights on the first call and reuses them while no latent changes (the v0.2 eval
cache), so its first call is timed apart and the steady state is the median of the calls after
the warm-up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet import MappingConfig, wrap
from mapnet_experiments.bench import harness
from mapnet_experiments.bench.subjects import STEP_MODELS, fixed_batch, with_input_size
from mapnet_experiments.bench.text import ms, run_header, shape_text


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
    conditions = harness.start_measurement(threads)
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
        **conditions,
        "input_shape": list(spec.input_shape),
        "batch": batch,
        "latent_dim": latent_dim if variant == "mapped" else None,
        "build_seconds": build,
        "first_call_seconds": first_seconds,
        "call_seconds": seconds,
        "repeat_output_equal": bool(torch.equal(first, second)),
        "peak_rss_bytes": harness.peak_rss_bytes(),
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
    counts = harness.thread_counts(threads)
    run = harness.runner(smoke, harness.MALLOC_TUNED_ENV if malloc_tuned else None)
    data: dict[str, Any] = {
        **harness.results_header("inference", command, smoke, counts),
        "settings": {
            "latent_dim": latent_dim,
            "projection": "structured",
            "malloc_tuned": malloc_tuned,
            "threads": harness.resolved_threads(counts),
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
            for count, variant in harness.in_round_order(list(runs), round_index):
                result = harness.measure(
                    run,
                    started,
                    f"{model} {variant} {harness.threads_text(count)} "
                    f"round {round_index + 1}/{plan.rounds}",
                    measure_inference,
                    _figures,
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
        for count in counts:
            data["rows"].extend(
                _summarise_inference(model, {v: runs[(count, v)] for v in INFERENCE_VARIANTS})
            )
    return harness.finish(data, out, started)


def _figures(result: dict[str, Any]) -> str:
    return (
        f"forward {harness.median(result['call_seconds']) * 1e3:.2f} ms, first call "
        f"{result['first_call_seconds'] * 1e3:.1f} ms, load {result['loadavg'][0]:.1f}"
    )


def _summarise_inference(model: str, runs: dict[str, list[dict[str, Any]]]) -> list[dict]:
    rows = []
    for variant, done in runs.items():
        rows.append(
            {
                "model": model,
                "variant": variant,
                "threads": done[0]["threads"],
                "batch": done[0]["batch"],
                "input_shape": done[0]["input_shape"],
                "processes": len(done),
                **harness.compared_to_plain(done, runs["plain"], "call_seconds", "forward"),
                "first_call_ms_median": harness.median([r["first_call_seconds"] for r in done])
                * 1e3,
                "build_seconds_median": harness.median([r["build_seconds"] for r in done]),
                "repeat_output_equal": all(r["repeat_output_equal"] for r in done),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in done),
                "runs": done,
            }
        )
    return rows


# ------------------------------------------------------------------------- report


def report_section(data: dict[str, Any]) -> list[str]:
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
