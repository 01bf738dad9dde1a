"""`mapnet bench finetune`: one fine-tuning step of every fine-tuning method at about equal
trainable budgets, on ResNet-50 and on a BERT-shaped encoder of all-MiniLM-L6-v2's shape, at 1
and 2 threads: step time and peak RSS, each measurement in a fresh process, processes in rounds
of alternating order; the fine-tuning targets judged from them; its section of the bench report.

Weights are random (the architectures are what costs time and memory, not the values): the
experiments' `KerasResNet50` with a new 10-class head, and `SentenceClassifier` around
`minilm_shaped_encoder()` (mean pooling, a 384 -> 3 head).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet_experiments.bench import harness
from mapnet_experiments.bench.peak_memory import current_rss_bytes, reset_peak_rss
from mapnet_experiments.bench.text import mib, ms, run_header

BUDGET = 2048  # trainable numbers besides the head, where a method can be set to it
SMOKE_BUDGET = 64


# ------------------------------------------------------------------------------ the models


class TinyConvNet(nn.Module):
    """What `--smoke` fine-tunes as its CNN: a 3×3 and a 1×1 conv with BatchNorm, a head `fc`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 10)
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(h))).mean((2, 3)))


def _resnet50() -> nn.Module:
    from mapnet_experiments.models.pretrained import KerasResNet50, replace_head

    model = KerasResNet50()
    replace_head(model, "resnet50", 10)
    return model


def _minilm() -> nn.Module:
    from mapnet_experiments.models.text import SentenceClassifier, minilm_shaped_encoder

    return SentenceClassifier(minilm_shaped_encoder(), 3)


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    from mapnet_experiments.models.text import SentenceClassifier

    shape = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = BertConfig(vocab_size=100, intermediate_size=32, max_position_embeddings=32, **shape)
    return SentenceClassifier(BertModel(config, add_pooling_layer=False), 3)


@dataclass(frozen=True)
class FinetuneModel:
    label: str
    kind: str  # "cnn" or "text": how the adapters are placed
    head: str
    build: Callable[[], nn.Module]
    batch: int
    input_size: int  # pixels (cnn) or tokens (text)
    classes: int
    warmup: int
    steps: int
    rounds: int


FINETUNE_MODELS: dict[str, FinetuneModel] = {
    "resnet50": FinetuneModel(
        "ResNet-50 (Keras layout), 3×64×64", "cnn", "fc", _resnet50, 32, 64, 10, 2, 5, 5
    ),
    "minilm": FinetuneModel(
        "BERT of all-MiniLM-L6-v2's shape, 48 tokens", "text", "head", _minilm, 32, 48, 3, 2, 5, 5
    ),
    "tiny-cnn": FinetuneModel("tiny CNN (smoke)", "cnn", "fc", TinyConvNet, 4, 8, 10, 0, 2, 1),
    "tiny-bert": FinetuneModel("tiny BERT (smoke)", "text", "head", _tiny_bert, 4, 8, 3, 0, 2, 1),
}


def fixed_inputs(model: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Seeded synthetic inputs and labels: N(0, 1) images, or uniform token ids with every
    token real (attention mask of ones)."""
    spec = FINETUNE_MODELS[model]
    generator = torch.Generator().manual_seed(1234)
    if spec.kind == "cnn":
        size = spec.input_size
        inputs: tuple[torch.Tensor, ...] = (
            torch.randn(spec.batch, 3, size, size, generator=generator),
        )
    else:
        ids = torch.randint(0, 100, (spec.batch, spec.input_size), generator=generator)
        inputs = (ids, torch.ones_like(ids))
    labels = torch.randint(0, spec.classes, (spec.batch,), generator=generator)
    return inputs, labels


# ------------------------------------------------------------------------------ the methods


@dataclass(frozen=True)
class FinetuneMethod:
    name: str
    label: str
    group_size: int | str | None = None  # mapnet's L (None: not mapnet)
    fusion: str | None = None  # mapnet.projections.fused's mode (None: the default, "auto")
    default: bool = True  # measured unless --methods names others
    last_layers: int | None = None  # text models: mapnet on the encoder's last k layers only


FINETUNE_METHODS: tuple[FinetuneMethod, ...] = (
    FinetuneMethod("head", "head only"),
    FinetuneMethod("bitfit", "BitFit (biases + head)"),
    FinetuneMethod("full", "full fine-tuning"),
    FinetuneMethod("lora", "peft LoRA"),
    FinetuneMethod("vera", "peft VeRA"),
    FinetuneMethod("ia3", "peft IA3"),
    FinetuneMethod("mapnet-l1", "mapnet θ_pre ⊙ (1 + m), L = 1", 1),
    FinetuneMethod("mapnet-l250", "mapnet θ_pre ⊙ (1 + m), L = 250", 250),
    FinetuneMethod("mapnet-l1-eager", "mapnet L = 1, eager passes", 1, "eager", False),
    FinetuneMethod("mapnet-l250-eager", "mapnet L = 250, eager passes", 250, "eager", False),
    FinetuneMethod("mapnet-row", 'mapnet, group_size="row" (activation path)', "row"),
    FinetuneMethod(
        "mapnet-row-last1",
        'mapnet, group_size="row", the last layer (where LoRA sits at ~2k)',
        "row",
        default=False,
        last_layers=1,
    ),
    FinetuneMethod(
        "mapnet-row-last2",
        'mapnet, group_size="row", the last 2 layers',
        "row",
        default=False,
        last_layers=2,
    ),
)
METHODS_BY_NAME = {m.name: m for m in FINETUNE_METHODS}


def mapnet_config(method: FinetuneMethod, head: str, budget: int) -> Any:
    """The MappingConfig of a mapnet method (raises where this mapnet refuses it)."""
    from mapnet import MappingConfig

    return MappingConfig(
        latent_dim=budget,
        update="multiplicative",
        group_size=method.group_size,  # type: ignore[arg-type]
        train_directly=[head],
    )


def refusal(method: FinetuneMethod, budget: int) -> str | None:
    """Why this mapnet cannot build `method` (a config it refuses), or None."""
    if method.group_size is None:
        return None
    try:
        mapnet_config(method, "head", budget)
    except (TypeError, ValueError) as error:
        return f"MappingConfig(group_size={method.group_size!r}) is refused here: {error}"
    return None


def _last_convs(model: nn.Module, budget: int, head: str) -> list[str]:
    """IA3 on a CNN: the last convs (registration order) whose output channels come nearest
    the budget, as `targets_for_budget` picks LoRA's."""
    convs = [
        (n, m.out_channels)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not n.startswith(head)
    ]
    chosen: list[str] = []
    total = 0
    for name, channels in reversed(convs):
        if chosen and abs(total + channels - budget) >= abs(total - budget):
            break
        chosen.append(name)
        total += channels
    return chosen[::-1]


def prepare(model: str, method: str, budget: int) -> tuple[nn.Module, dict[str, Any]]:
    """The model built (seeded) and made ready for `method`, and how its count was set."""
    from mapnet_experiments.models import peft_adapters as pa

    spec, chosen = FINETUNE_MODELS[model], METHODS_BY_NAME[method]
    torch.manual_seed(0)
    net = spec.build()
    head = spec.head
    if spec.kind == "text":
        return _text_method(net, chosen, budget)
    if chosen.group_size is not None:
        import mapnet

        config = mapnet_config(chosen, head, budget)
        with warnings.catch_warnings():  # a tiny model's groups may be fewer than the latent
            warnings.filterwarnings("ignore", "latent larger than")
            # Rows of a conv that a BatchNorm follows get ~0 gradient (wrap warns): timed
            # anyway, since what it costs is the question here; the note says so.
            warned = warnings.catch_warnings(record=True)
            with warned as caught:
                warnings.simplefilter("always")
                # A factory hands the network over: its weights become θ_pre, not copied twice.
                mapped = mapnet.wrap(lambda: net, config)
        note = f"latent d = {budget}, head trained directly"
        if any("normalises away" in str(w.message) for w in caught):
            note += "; most rows feed a BatchNorm, which normalises their scale away"
        return mapped, {"count": note}
    if method in ("head", "full", "bitfit"):
        if method == "bitfit":
            pa.train_biases(net, head)
            return net, {"count": "every bias (its natural count)"}
        for name, param in net.named_parameters():
            param.requires_grad_(method == "full" or name.startswith(head + "."))
        return net, {"count": "all weights" if method == "full" else "the head alone"}
    if method == "ia3":
        targets = _last_convs(net, budget, head)
        note = f"output channels of the last conv(s) nearest {budget}: {', '.join(targets)}"
        return pa.apply_ia3(net, targets, [], head), {"count": note}
    if method == "vera":  # peft's VeRA adapts nn.Linear only: 1×1 convs become Linear
        pa.pointwise_convs_as_linear(net, exclude=head)
    plan = pa.plan_for_budget(net, budget, method, head=head)  # type: ignore[arg-type]
    apply = pa.apply_lora if method == "lora" else pa.apply_vera
    note = (
        f"rank {plan.rank} on the {len(plan.targets)} layer(s) nearest {budget} (plan_for_budget)"
    )
    return apply(net, plan.rank, plan.targets, head), {"count": note}


def _text_method(
    net: nn.Module, chosen: FinetuneMethod, budget: int
) -> tuple[nn.Module, dict[str, Any]]:
    """A BERT classifier built exactly as the text study builds its rows (models.text_methods),
    so the study's table can quote these times."""
    from mapnet_experiments.models.text_methods import Method, build

    if chosen.group_size is not None:
        built = build(net, Method("mapnet", budget, chosen.group_size,
                                  last_layers=chosen.last_layers))  # fmt: skip
        last = chosen.last_layers
        where = (
            "the encoder's"
            if not last
            else "the last layer's"
            if last == 1
            else f"the last {last} layers'"
        )
        return built.model, {"count": f"latent d = {budget} over {where} Linear weights"}
    natural = chosen.name in ("head", "full", "bitfit", "ia3")
    built = build(net, Method(chosen.name, None if natural else budget))
    if "targets" in built.details:
        layers = len(built.details["targets"])
        note = (
            f"rank {built.details['rank']} on the {layers} query / value layer(s) nearest {budget}"
        )
    elif chosen.name == "ia3":
        note = "peft's BERT defaults: key, value, output.dense (its natural count)"
    else:
        note = {"head": "the head alone", "full": "all weights"}.get(
            chosen.name, "every bias and LayerNorm shift (its natural count)"
        )
    return built.model, {"count": note}


# ------------------------------------------------------------------------------ one process


def measure_finetune(
    model: str,
    method: str,
    warmup: int,
    steps: int,
    budget: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """Build `model` for `method` and time `warmup + steps` Adam steps on a fixed batch; the
    process's peak RSS, and the peak since the first step (subprocess)."""
    conditions = harness.start_measurement(threads)
    import peft  # noqa: F401  every process loads the same libraries, used or not
    import transformers  # noqa: F401

    from mapnet.projections import fused

    fused.set_fusion(METHODS_BY_NAME[method].fusion)
    spec = FINETUNE_MODELS[model]
    inputs, labels = fixed_inputs(model)
    started = time.perf_counter()
    module, info = prepare(model, method, budget)
    build_seconds = time.perf_counter() - started
    module.train()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-3)
    rss_before = current_rss_bytes()
    build_peak = harness.peak_rss_bytes()  # imports and building: before VmHWM is reset
    peak_reset = reset_peak_rss()
    seconds, losses = [], []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(module(*inputs), labels)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
    generation = _generation_alone(module) if METHODS_BY_NAME[method].group_size else {}
    # The head's trainable numbers, under whatever prefix the method wraps it in.
    head_numbers = sum(p.numel() for n, p in trainable.items() if f".{spec.head}." in f".{n}")
    return {
        "model": model,
        "method": method,
        **conditions,
        "trainable": sum(p.numel() for p in trainable.values()),
        "head_numbers": head_numbers,
        "count": info["count"],
        "build_seconds": build_seconds,
        "warmup_seconds": seconds[:warmup],
        "step_seconds": seconds[warmup:],
        "losses": losses,
        "rss_before_training_bytes": rss_before,
        "training_peak_rss_bytes": harness.peak_rss_bytes() if peak_reset else None,
        "peak_rss_bytes": max(build_peak, harness.peak_rss_bytes()),
        "malloc_env": harness.malloc_env(),
        "fusion": fused.fusion_mode(),
        "compiled_kernels": len(fused._compiled),
        **generation,
    }


def _generation_alone(mapped: Any, repeats: int = 3) -> dict[str, Any]:
    """The generator alone, on the trained latent: `generate()` without grad, and generate()
    then the backward from fixed cotangents to the latent (the adjoint pass), median ms."""
    params = mapped.generate()
    generator = torch.Generator().manual_seed(0)
    unique = list({id(t): t for t in params.values()}.values())
    cotangents = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in unique]
    alone, with_adjoint = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.no_grad():
            mapped.generate()
        alone.append(time.perf_counter() - started)
        started = time.perf_counter()
        made = list({id(t): t for t in mapped.generate().values()}.values())
        torch.autograd.backward(made, cotangents, inputs=list(mapped.latents))
        with_adjoint.append(time.perf_counter() - started)
        del made
    mapped.zero_grad(set_to_none=True)
    return {
        "generation_ms": harness.median(alone) * 1e3,
        "generation_and_adjoint_ms": harness.median(with_adjoint) * 1e3,
    }


# ------------------------------------------------------------------------------ the bench


def finetune_bench(
    models: Sequence[str],
    out: Path,
    *,
    methods: Sequence[str] | None = None,
    threads: Sequence[int | None] = (1, 2),
    budget: int = BUDGET,
    command: str = "mapnet bench finetune",
    smoke: bool = False,
    malloc_tuned: bool = False,
) -> dict[str, Any]:
    """Every (thread count, method) of each model in a fresh process, `rounds` times in
    alternating order; write `out`."""
    counts = harness.thread_counts(list(threads))
    chosen = [m for m in FINETUNE_METHODS if (m.default if methods is None else m.name in methods)]
    run = harness.runner(smoke, harness.MALLOC_TUNED_ENV if malloc_tuned else None)
    skipped = {m.name: reason for m in chosen if (reason := refusal(m, budget))}
    data: dict[str, Any] = {
        **harness.results_header("finetune", command, smoke, counts),
        "settings": {
            "budget": budget,
            "threads": harness.resolved_threads(counts),
            "methods": [m.name for m in chosen],
            "malloc_env": harness.MALLOC_TUNED_ENV if malloc_tuned else {},
            "optimizer": "Adam, lr 1e-3, on what trains",
            "models": {name: dataclasses.asdict(FINETUNE_MODELS[name]) for name in models},
        },
        "rows": [],
    }
    for settings in data["settings"]["models"].values():
        settings.pop("build")
    started = time.perf_counter()
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})", flush=True)
    for model in models:
        spec = FINETUNE_MODELS[model]
        here = skipped | {m.name: "a transformer's last layers: text models only"
                          for m in chosen if m.last_layers and spec.kind != "text"}  # fmt: skip
        pairs = [(c, m.name) for c in counts for m in chosen if m.name not in here]
        runs: dict[tuple[int | None, str], list[dict[str, Any]]] = {p: [] for p in pairs}
        for round_index in range(spec.rounds):
            for count, method in harness.in_round_order(pairs, round_index):
                result = harness.measure(
                    run,
                    started,
                    f"{model} {method} {harness.threads_text(count)} "
                    f"round {round_index + 1}/{spec.rounds}",
                    measure_finetune,
                    _figures,
                    model=model,
                    method=method,
                    warmup=spec.warmup,
                    steps=spec.steps,
                    budget=budget,
                    threads=count,
                )
                result["round"] = round_index
                runs[(count, method)].append(result)
        for count in counts:
            done = {m.name: runs.get((count, m.name), []) for m in chosen}
            data["rows"] += _summarise(model, count, chosen, done, here)
    return harness.finish(data, out, started)


def _figures(result: dict[str, Any]) -> str:
    return (
        f"step {harness.median(result['step_seconds']) * 1e3:.0f} ms, peak RSS "
        f"{mib(result['peak_rss_bytes'])} MiB, {result['trainable']:,} trainable, load "
        f"{result['loadavg'][0]:.1f}"
    )


def _summarise(
    model: str,
    count: int | None,
    methods: Sequence[FinetuneMethod],
    runs: dict[str, list[dict[str, Any]]],
    skipped: dict[str, str],
) -> list[dict[str, Any]]:
    """One row per method at one thread count: pooled median step, ratios to LoRA and to full
    fine-tuning (pooled, and per round against the same round's process), peak RSS."""
    rows = []
    for method in methods:
        row: dict[str, Any] = {"model": model, "method": method.name, "label": method.label}
        done = runs[method.name]
        if method.name in skipped or not done:
            rows.append(row | {"threads": count, "skipped": True, "reason": skipped[method.name]})
            continue
        row |= {
            "threads": done[0]["threads"],
            "skipped": False,
            "processes": len(done),
            "trainable": done[0]["trainable"],
            "head_numbers": done[0]["head_numbers"],
            "count": done[0]["count"],
            "step_ms_median": harness.median([s for r in done for s in r["step_seconds"]]) * 1e3,
            "step_ms_process_medians": [harness.median(r["step_seconds"]) * 1e3 for r in done],
            "peak_rss_bytes": harness.median([r["peak_rss_bytes"] for r in done]),
            "training_peak_rss_bytes": _median_or_none(done, "training_peak_rss_bytes"),
            "generation_ms": _median_or_none(done, "generation_ms"),
            "generation_and_adjoint_ms": _median_or_none(done, "generation_and_adjoint_ms"),
            "runs": done,
        }
        for reference in ("lora", "full"):
            other = runs.get(reference) or []
            if not other:
                continue
            compared = harness.compared_to_plain(done, other, "step_seconds", "step")
            row[f"ratio_to_{reference}"] = compared["ratio_to_plain"]
            row[f"ratio_to_{reference}_per_round"] = compared["ratio_per_round"]
            row[f"rss_ratio_to_{reference}"] = row["peak_rss_bytes"] / harness.median(
                [r["peak_rss_bytes"] for r in other]
            )
        rows.append(row)
    return rows


def _median_or_none(done: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in done if r.get(key) is not None]
    return harness.median(values) if values else None


# ------------------------------------------------------------------------------ the targets

# (what, model kind, method, the row's ratio, limit)
FINETUNE_TARGETS: tuple[tuple[str, str, str, str, float], ...] = (
    (
        'row-aligned mapnet (group_size="row") step ≤ 1.10× LoRA\'s',
        "text",
        "mapnet-row",
        "ratio_to_lora",
        1.10,
    ),
    (
        'row-aligned mapnet (group_size="row") peak RSS ≤ 1.1× LoRA\'s',
        "text",
        "mapnet-row",
        "rss_ratio_to_lora",
        1.10,
    ),
    ("mapnet L = 1 step ≤ 0.9× full fine-tuning's", "cnn", "mapnet-l1", "ratio_to_full", 0.9),
    ("mapnet L = 1 step ≤ 0.9× full fine-tuning's", "text", "mapnet-l1", "ratio_to_full", 0.9),
    (
        "mapnet L = 1 peak RSS ≤ 0.8× full fine-tuning's",
        "cnn",
        "mapnet-l1",
        "rss_ratio_to_full",
        0.8,
    ),
    (
        "mapnet L = 1 peak RSS ≤ 0.8× full fine-tuning's",
        "text",
        "mapnet-l1",
        "rss_ratio_to_full",
        0.8,
    ),
)


def finetune_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target at each thread count of `data`, judged from its rows: met, not met, or not
    measured (the method skipped, with its reason)."""
    out = []
    models = list(data["settings"]["models"])
    for what, kind, method, key, limit in FINETUNE_TARGETS:
        for model in (m for m in models if FINETUNE_MODELS[m].kind == kind):
            for threads in data["settings"]["threads"]:
                row = next(
                    (
                        r
                        for r in data["rows"]
                        if (r["model"], r["method"], r["threads"]) == (model, method, threads)
                    ),
                    None,
                )
                entry = {
                    "target": f"{what}: {FINETUNE_MODELS[model].label}",
                    "threads": threads,
                    "value": None,
                    "met": None,
                    "detail": "",
                }
                if row is None:
                    entry["detail"] = "not in this run"
                elif row["skipped"] or key not in row:
                    entry["detail"] = row.get("reason", f"no {key.split('_to_')[1]} row")
                else:
                    entry |= {"value": row[key], "met": row[key] <= limit}
                    entry["detail"] = _target_detail(data, row, key)
                out.append(entry)
    return out


def _target_detail(data: dict[str, Any], row: dict[str, Any], key: str) -> str:
    reference = key.rsplit("_", 1)[1]
    other = next(
        r
        for r in data["rows"]
        if (r["model"], r["method"], r["threads"]) == (row["model"], reference, row["threads"])
    )
    if key.startswith("rss"):
        return (
            f"{mib(row['peak_rss_bytes'])} / {mib(other['peak_rss_bytes'])} MiB "
            f"(median over {row['processes']} processes)"
        )
    rounds = ", ".join(f"{r:.2f}" for r in row[f"ratio_to_{reference}_per_round"])
    return f"{ms(row['step_ms_median'])} / {ms(other['step_ms_median'])} ms; per round {rounds}"


# ------------------------------------------------------------------------------ the report


def report_section(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    plans = "; ".join(
        f"{s['label']}: batch {s['batch']}, {s['warmup']} + {s['steps']} steps × {s['rounds']}"
        for s in settings["models"].values()
    )
    lines = [
        *run_header(data, "Fine-tuning step"),
        "One step = zero_grad + forward + cross-entropy + backward + Adam (lr 1e-3) on what "
        "trains, on one fixed synthetic batch, random weights (the architectures cost the time "
        "and memory, not the values). Every (method, thread count) runs in its own fresh "
        "process, in rounds of alternating order; every process imports the same libraries "
        f"(torch, transformers, peft, mapnet). {plans}. Step = median of all measured steps "
        "of all processes; × LoRA and × full = that median over LoRA's or full fine-tuning's "
        "at the same thread count; peak RSS = the median over the processes of each one's "
        "VmHWM (imports, building and training). Trainable = the numbers that train "
        f"(besides the head + the head); the budget is {settings['budget']:,} besides the head "
        "where a method can be set to it, else its natural count, as the count column says.",
        "",
        "Targets, judged from these figures:",
        "",
        "| target | threads | measured | met? | detail |",
        "|---|---|---|---|---|",
    ]
    for t in finetune_targets(data):
        value = "–" if t["value"] is None else f"{t['value']:.3f}"
        met = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['threads']} | {value} | {met} | {t['detail']} |")
    lines.append("")
    for model, spec in settings["models"].items():
        for threads in settings["threads"]:
            lines += _model_table(data, model, spec, threads)
    return lines


def _model_table(data: dict[str, Any], model: str, spec: dict[str, Any], threads: int) -> list:
    lines = [
        f"### {spec['label']}, batch {spec['batch']}, {harness.threads_text(threads)}",
        "",
        "| method | trainable | count | step (ms) | × LoRA | × full | generation + adjoint "
        "(ms, share of the step) | peak RSS (MiB) | × LoRA | × full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (r for r in data["rows"] if r["model"] == model and r["threads"] == threads):
        if row["skipped"]:
            skipped = f"| {row['label']} | – | skipped: {row['reason']} |"
            lines.append(skipped + " – |" * 7)
            continue
        besides = row["trainable"] - row["head_numbers"]
        ratios = [
            _ratio(row.get(key))
            for key in ("ratio_to_lora", "ratio_to_full", "rss_ratio_to_lora", "rss_ratio_to_full")
        ]
        generation = row.get("generation_and_adjoint_ms")
        alone = (
            "–"
            if generation is None
            else f"{ms(generation)} ({generation / row['step_ms_median']:.0%}; generation alone "
            f"{ms(row['generation_ms'])})"
        )
        lines.append(
            f"| {row['label']} | {besides:,} + {row['head_numbers']:,} | {row['count']} "
            f"| {ms(row['step_ms_median'])} | {ratios[0]} | {ratios[1]} | {alone} "
            f"| {mib(row['peak_rss_bytes'])} | {ratios[2]} | {ratios[3]} |"
        )
    return [*lines, ""]


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
