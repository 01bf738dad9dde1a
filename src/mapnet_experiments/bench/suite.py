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

from mapnet import MappedModule, MappingConfig, wrap
from mapnet_experiments.bench import breakdown, construction, step
from mapnet_experiments.bench import comm as comm_bench
from mapnet_experiments.bench.harness import (
    DEFAULT_THREADS,
    MALLOC_TUNED_ENV,
    announce,
    finish,
    malloc_env,
    median,
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
    fixed_batch,
    tensor_bytes,
    with_input_size,
)
from mapnet_experiments.bench.text import (
    machine_line,
    mib,
    ms,
    ratio_text,
    run_header,
    run_name,
    shape_text,
)

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
        *(step.targets_section(found["step"]) if found["step"] else []),
        *(
            line
            for index, run in enumerate(found["step"])
            for line in (
                *step.report_section(run, run_name(index)),
                *breakdown.report_section(run, run_name(index)),
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
