"""`mapnet bench gpt2`: what fine-tuning GPT-2 small (124M parameters, random weights) costs
with full fine-tuning, peft LoRA and mapnet at about 4,096 trainable numbers, each variant in
its own fresh process; and, apart (`--loss-curve`), the loss per step of mapnet row and LoRA
over a few hundred steps of causal-LM training on the tweets. Its section of the bench report.

The model is `models.text.gpt2_small` (GPT2Config's defaults, GPT-2's own random init); the
batch is `data.tweets.causal_lm_batches` of the tweets' training split (MiniLM WordPiece ids,
see there: GPT-2's shapes and work per step, not GPT-2's language). One step = zero_grad +
forward with labels (the causal-LM loss) + backward + Adam. `--smoke` runs a tiny GPT2Config on
random token ids in this process (seconds, no files needed).

The variants:

    full        every parameter trains
    lora        peft LoRA on GPT-2's Conv1D projections (fan_in_fan_out), the rank and the
                layers whose count comes nearest the budget (`lora_plan`): for GPT-2 small at
                4,096, rank 1 on the last layer's mlp.c_fc (768 -> 3,072), 3,840 numbers; no
                rank or layer set of these projections reaches 4,096 exactly (every count is a
                multiple of 768 = 3 · 256, and 4,096 is not)
    mapnet-l1   mapnet θ = θ_pre ⊙ (1 + m), base="model", d = budget, L = 1, every parameter
                generated (the weight path)
    mapnet-row  the same with group_size="row": GPT-2's projections (transformers' Conv1D,
                one element per output feature), the token embedding (tied to lm_head) and
                the position embedding take the activation path; the LayerNorms fall back to
                the weight path (mapnet warns). The result records which modules took which
                path (`row_path`).

Bytes per generated parameter = the bytes on disk of what the method's library saves to reload
the fine-tune onto the same pretrained model (mapnet.save, peft's save_pretrained, the trained
tensors as safetensors for full fine-tuning) divided by the parameters of the model that
checkpoint reproduces (124,439,808 for GPT-2 small). The trained numbers' own bytes (float32)
and their Adam state are recorded beside it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet import files
from mapnet_experiments.bench import harness
from mapnet_experiments.bench.peak_memory import current_rss_bytes, reset_peak_rss
from mapnet_experiments.bench.text import mib
from mapnet_experiments.models.peft_adapters import quiet_peft

BUDGET = 4096
VARIANTS = ("full", "lora", "mapnet-l1", "mapnet-row")
LOSS_VARIANTS = ("mapnet-row", "lora")
LABELS = {
    "full": "full fine-tuning",
    "lora": "peft LoRA",
    "mapnet-l1": "mapnet θ_pre ⊙ (1 + m), L = 1",
    "mapnet-row": 'mapnet θ_pre ⊙ (1 + m), group_size="row"',
}
# A GPT2Config small enough for --smoke: 2 layers of width 32, 128 tokens.
SMOKE_SHAPE = {
    "vocab_size": 128,
    "n_positions": 64,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "bos_token_id": 127,
    "eos_token_id": 127,
}
LORA_FAMILIES = (
    ("attn.c_attn",),
    ("attn.c_proj",),
    ("mlp.c_fc",),
    ("mlp.c_proj",),
    ("attn.c_attn", "attn.c_proj"),
    ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
)
LORA_ALPHA = 8


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one measurement trains on: the batch and the steps."""

    batch: int = 4
    seq_len: int = 128
    warmup: int = 1
    steps: int = 3
    rounds: int = 2


SMOKE = Shape(batch=2, seq_len=16, warmup=1, steps=2, rounds=1)


# ------------------------------------------------------------------------------ model and data


def build_model(smoke: bool) -> nn.Module:
    """GPT-2 small (or the smoke shape), seeded: every variant starts from the same θ_pre."""
    torch.manual_seed(0)
    if not smoke:
        from mapnet_experiments.models.text import gpt2_small

        return gpt2_small()
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**SMOKE_SHAPE))
    model.loss_type = "ForCausalLM"
    return model.train()


def token_batches(smoke: bool, batch: int, seq_len: int, count: int | None) -> torch.Tensor:
    """(batches, batch, seq_len) token ids: random ids of the smoke vocabulary, or the tweets'
    training split through `causal_lm_batches` (only as many texts as `count` batches need,
    None: all of them)."""
    if smoke:
        generator = torch.Generator().manual_seed(1234)
        shape = (count or 8, batch, seq_len)
        return torch.randint(0, SMOKE_SHAPE["vocab_size"], shape, generator=generator)
    from mapnet_experiments.data.tweets import causal_lm_batches, load_tweet_splits
    from mapnet_experiments.models.text import load_minilm_tokenizer

    texts = load_tweet_splits(progress=False).train.texts
    tokenizer = load_minilm_tokenizer(progress=False)
    if count is not None:  # a tweet is ≥ 1 token: 1 text per needed token is always enough
        texts = texts[: count * batch * seq_len]
    return causal_lm_batches(texts, tokenizer, batch, seq_len)


def _conv1d_sizes(model: nn.Module, name: str) -> int:
    weight = model.get_submodule(name).weight  # transformers' Conv1D: (in, out)
    return int(weight.shape[0] + weight.shape[1])


def lora_plan(model: nn.Module, budget: int) -> tuple[list[str], int, int]:
    """(targets, rank, count) of the LoRA nearest `budget`: one of LORA_FAMILIES in the last k
    blocks (k = 1..all) at rank 1..64, counting r · (in + out) per Conv1D; ties go to fewer
    numbers, then to the earlier candidate (fewer families and layers)."""
    blocks = len(model.transformer.h)  # type: ignore[union-attr]
    candidates: list[tuple[int, list[str], int]] = []
    for family in LORA_FAMILIES:
        for k in range(1, blocks + 1):
            names = [
                f"transformer.h.{i}.{leaf}" for i in range(blocks - k, blocks) for leaf in family
            ]
            per_rank = sum(_conv1d_sizes(model, n) for n in names)
            candidates += [(per_rank * r, names, r) for r in range(1, 65)]
    count, names, rank = min(candidates, key=lambda c: (abs(c[0] - budget), c[0]))
    return names, rank, count


def prepare(variant: str, model: nn.Module, budget: int) -> tuple[nn.Module, dict[str, Any]]:
    """`model` made ready for `variant`, and what that took (the plan, mapnet's warnings)."""
    if variant == "full":
        return model, {"count": "every parameter"}
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        targets, rank, count = lora_plan(model, budget)
        config = LoraConfig(
            r=rank, lora_alpha=LORA_ALPHA, target_modules=targets, fan_in_fan_out=True,
            bias="none",
        )  # fmt: skip
        with quiet_peft(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built = get_peft_model(model, config)
        note = f"rank {rank} on {', '.join(targets)} ({count:,}: the nearest {budget:,})"
        return built, {"count": note, "lora_targets": targets, "lora_rank": rank}
    import mapnet
    from mapnet import MappingConfig

    group_size: int | str = 1 if variant == "mapnet-l1" else "row"
    config = MappingConfig(
        latent_dim=budget, base="model", update="multiplicative", group_size=group_size
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = mapnet.wrap(lambda: model, config)  # a factory: θ_pre is not copied
    said = [
        str(w.message) for w in caught if "mapnet" in str(w.message) or "latent" in str(w.message)
    ]
    info: dict[str, Any] = {
        "count": f"latent d = {budget:,}, every parameter generated",
        "mapping": config.to_dict(),
        "mapnet_warnings": said,
        "projection_bytes": mapped.projection_bytes(),
    }
    if group_size == "row":
        info["row_path"] = row_paths(mapped)
    return mapped, info


def row_paths(mapped: Any) -> dict[str, Any]:
    """Which modules of a group_size="row" mapping take the activation path (θ_pre untouched,
    the output scaled) and which fall back to the weight path, by class."""
    target = mapped.target
    activation, weight_path = [], {}
    for unit in (u for layout in mapped._layouts for u in layout):
        if unit.modules:
            activation += [f"{m} ({type(target.get_submodule(m)).__name__})" for m in unit.modules]
            continue
        for piece in unit.pieces:
            owner = piece.name.rpartition(".")[0]
            weight_path.setdefault(owner, type(target.get_submodule(owner)).__name__)
    kinds: dict[str, int] = {}
    for kind in weight_path.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "activation_path": activation,
        "weight_path_modules": len(weight_path),
        "weight_path_by_class": kinds,
        "conv1d_on_activation_path": any("(Conv1D)" in m for m in activation),
    }


def checkpoint_bytes(variant: str, module: nn.Module) -> int:
    """The bytes on disk of what the method's library saves to reload the fine-tune."""
    import mapnet

    with tempfile.TemporaryDirectory() as folder:
        where = Path(folder) / "checkpoint"
        if isinstance(module, mapnet.MappedModule):
            mapnet.save(module, where)
        elif variant == "lora":
            with quiet_peft():
                module.save_pretrained(where)  # type: ignore[operator]
            (where / "README.md").unlink(missing_ok=True)
        else:
            from safetensors.torch import save_file

            where.mkdir()
            trained = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
            save_file(trained, where / "trained.safetensors")
        return sum(f.stat().st_size for f in where.rglob("*") if f.is_file())


def _train_step(module: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = module(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return float(loss.item())


def _imports() -> None:
    import peft  # noqa: F401  every process loads the same libraries, used or not
    import transformers  # noqa: F401

    import mapnet  # noqa: F401


# ------------------------------------------------------------------------------ one process


def measure_gpt2(
    variant: str,
    smoke: bool,
    batch: int,
    seq_len: int,
    warmup: int,
    steps: int,
    budget: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """Build GPT-2 for `variant` and time `warmup + steps` Adam steps on one fixed batch; peak
    RSS (VmHWM) of the process and since the first step; trainable numbers; checkpoint bytes. A
    MemoryError anywhere is a result too: where it happened and the peak reached."""
    conditions = harness.start_measurement(threads)
    _imports()
    result: dict[str, Any] = {"variant": variant, **conditions, "stage": "data"}
    try:
        ids = token_batches(smoke, batch, seq_len, 1)[0]
        result["stage"] = "build"
        started = time.perf_counter()
        net = build_model(smoke)
        generated = sum(p.numel() for p in net.parameters())
        model_seconds = time.perf_counter() - started
        started = time.perf_counter()
        module, info = prepare(variant, net, budget)
        result |= {"model_seconds": model_seconds, "build_seconds": time.perf_counter() - started}
        module.train()
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=1e-3)
        result |= {
            "rss_before_training_bytes": current_rss_bytes(),
            "build_peak_rss_bytes": harness.peak_rss_bytes(),
            "stage": "training",
        }
        peak_reset = reset_peak_rss()
        seconds, losses = [], []
        for _ in range(warmup + steps):
            started = time.perf_counter()
            losses.append(_train_step(module, optimizer, ids))
            seconds.append(time.perf_counter() - started)
        training_peak = harness.peak_rss_bytes() if peak_reset else None
        result["stage"] = "checkpoint"
        saved = checkpoint_bytes(variant, module)
    except MemoryError as error:
        return result | {
            "failed": f"MemoryError while {result['stage']}: {error}",
            "peak_rss_bytes": harness.peak_rss_bytes(),
            "memory_bytes": harness.memory_total_bytes(),
        }
    count = sum(p.numel() for p in trainable)
    adam_bytes = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    return (
        result
        | info
        | {
            "stage": "done",
            "failed": None,
            "generated_parameters": generated,
            "trainable": count,
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "adam_state_bytes": adam_bytes,
            "checkpoint_bytes": saved,
            "bytes_per_generated_parameter": saved / generated,
            "warmup_seconds": seconds[:warmup],
            "step_seconds": seconds[warmup:],
            "losses": losses,
            "training_peak_rss_bytes": training_peak,
            "peak_rss_bytes": harness.peak_rss_bytes(),
            "memory_bytes": harness.memory_total_bytes(),
        }
    )


# ------------------------------------------------------------------------------ the bench


def estimated_training_bytes(variant: str, parameters: int, trainable: int) -> int:
    """A floor for a variant's training memory, to say by how much one that failed missed:
    θ once, plus gradient and two Adam moments of what trains (mapnet also forms θ: twice)."""
    theta = 4 * parameters * (2 if variant == "mapnet-l1" else 1)
    return theta + 4 * 3 * trainable


def gpt2_bench(
    out: Path,
    *,
    variants: Sequence[str] = VARIANTS,
    threads: int | None = 2,
    shape: Shape = Shape(),
    budget: int = BUDGET,
    command: str = "mapnet bench gpt2",
    smoke: bool = False,
) -> dict[str, Any]:
    """Every variant in a fresh process, `shape.rounds` rounds in alternating order; write
    `out`. A process that dies (the kernel's OOM killer) is recorded as failed, with why."""
    counts = harness.thread_counts([threads])
    run = harness.runner(smoke, None)
    data: dict[str, Any] = {
        **harness.results_header("gpt2", command, smoke, counts),
        "settings": {
            "budget": budget,
            "threads": harness.resolved_threads(counts),
            "variants": list(variants),
            "shape": dataclasses.asdict(shape),
            "model": "tiny GPT2Config (smoke)" if smoke else "GPT-2 small, random init",
            "data": "random ids (smoke)" if smoke else "tweets, causal_lm_batches (train split)",
            "optimizer": "Adam, lr 1e-3, on what trains",
        },
        "rows": [],
    }
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for round_index in range(shape.rounds):
        for variant in harness.in_round_order(list(variants), round_index):
            what = f"gpt2 {variant} round {round_index + 1}/{shape.rounds}"
            kwargs = {
                "variant": variant, "smoke": smoke, "batch": shape.batch,
                "seq_len": shape.seq_len, "warmup": shape.warmup, "steps": shape.steps,
                "budget": budget, "threads": counts[0],
            }  # fmt: skip
            try:
                result = harness.measure(run, started, what, measure_gpt2, _figures, **kwargs)
            except RuntimeError as error:  # killed: most likely out of memory
                print(f"failed: {str(error)[-300:]}", flush=True)
                result = {"variant": variant, "failed": str(error)[-2000:], "stage": "unknown"}
            result["round"] = round_index
            runs[variant].append(result)
    data["rows"] = [_summary(v, runs[v], smoke) for v in variants]
    return harness.finish(data, out, started)


def _figures(result: dict[str, Any]) -> str:
    if result.get("failed"):
        return f"failed: {result['failed']}"
    return (
        f"step {harness.median(result['step_seconds']):.2f} s, "
        f"build {result['build_seconds']:.1f} s, peak RSS {mib(result['peak_rss_bytes'])} MiB, "
        f"{result['trainable']:,} trainable"
    )


def _summary(variant: str, done: list[dict[str, Any]], smoke: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": variant, "label": LABELS[variant], "runs": done}
    good = [r for r in done if not r.get("failed")]
    if not good:
        parameters = 124_439_808 if not smoke else 0
        floor = estimated_training_bytes(variant, parameters, parameters)
        failed = done[0] if done else {}
        return row | {
            "failed": failed.get("failed", "not run"),
            "failed_stage": failed.get("stage"),
            "peak_rss_bytes": failed.get("peak_rss_bytes"),
            "memory_bytes": harness.memory_total_bytes(),
            "estimated_floor_bytes": floor if variant == "full" else None,
        }
    first = good[0]
    keys = ("trainable", "generated_parameters", "trainable_bytes", "adam_state_bytes",
            "checkpoint_bytes", "bytes_per_generated_parameter", "count", "lora_targets",
            "lora_rank", "row_path", "mapnet_warnings", "projection_bytes")  # fmt: skip
    return (
        row
        | {k: first[k] for k in keys if k in first}
        | {
            "failed": None,
            "processes": len(good),
            "step_seconds_median": harness.median([s for r in good for s in r["step_seconds"]]),
            "step_seconds_process_medians": [harness.median(r["step_seconds"]) for r in good],
            "build_seconds_median": harness.median([r["build_seconds"] for r in good]),
            "peak_rss_bytes": harness.median([r["peak_rss_bytes"] for r in good]),
            "training_peak_rss_bytes": harness.median(
                [r["training_peak_rss_bytes"] for r in good if r.get("training_peak_rss_bytes")]
            ),
        }
    )


# ------------------------------------------------------------------------------ the loss curve


def train_loss_curve(
    variant: str,
    smoke: bool,
    steps: int,
    batch: int,
    seq_len: int,
    lr: float,
    budget: int,
    state: str,
    save_every: int = 10,
    threads: int | None = None,
) -> dict[str, Any]:
    """`steps` Adam steps of causal-LM training (the tweets' batches in order, cycling), the loss
    of every step, through the one training loop (recipe.loop): an "epoch" is `save_every`
    steps (one step when `steps` is not a multiple of it), after which the trained numbers, Adam's
    state and the losses so far are committed to the run state `state`; a process started again
    with the same settings goes on from there, and one with other settings is refused. The
    folder is locked while this runs: a second process on the same variant fails at once. The
    state stays (a few KB), so a longer run with the same settings extends the curve."""
    from mapnet_experiments.recipe.loop import Loop
    from mapnet_experiments.recipe.state import Saved, take

    conditions = harness.start_measurement(threads)
    _imports()
    settings = {"variant": variant, "smoke": smoke, "batch": batch, "seq_len": seq_len,
                "lr": lr, "budget": budget}  # fmt: skip
    batches = token_batches(smoke, batch, seq_len, steps if smoke else None)
    module, info = prepare(variant, build_model(smoke), budget)
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    chunk = save_every if steps % save_every == 0 else 1
    folder = Path(state)
    config = settings | {"steps_per_epoch": chunk}  # resumed only with the same epochs
    loop = Loop(optimizer, epochs=steps // chunk, steps=chunk, config=config, state_dir=folder,
                label=f"gpt2 {variant}", show_progress=False, loss_key="loss")  # fmt: skip
    losses: list[float] = []
    seconds: list[float] = []
    tick = [0.0]

    def restore(saved: Saved) -> None:
        with torch.no_grad():
            for i, parameter in enumerate(trainable):
                parameter.copy_(take(saved.tensors, f"param.{i}", folder))
        for row in saved.history:
            losses.extend(row["losses"])
            seconds.extend(row["seconds"])

    def step(i: int) -> dict[str, float]:
        tick[0] = time.perf_counter()
        ids = batches[(loop.epoch * chunk + i) % len(batches)]
        loss = module(input_ids=ids, labels=ids).loss  # (B, T) ids; the model shifts labels
        loss.backward()
        losses.append(loss.item())
        return {"loss": losses[-1]}

    def after_step() -> None:  # the optimiser's step included, as in the bench's step
        seconds.append(time.perf_counter() - tick[0])

    def end_epoch(epoch: int) -> dict[str, Any]:
        done = slice((epoch - 1) * chunk, epoch * chunk)
        return {"epoch": epoch, "loss": losses[-1], "losses": losses[done],
                "seconds": seconds[done]}  # fmt: skip

    def state_tensors() -> dict[str, torch.Tensor]:
        return {f"param.{i}": p.detach().contiguous() for i, p in enumerate(trainable)}

    with files.lock(folder):
        resumed = loop.resume(restore)
        resumed_from = len(losses) if resumed else 0
        loop.run(step, end_epoch, state_tensors, lambda model: None, after_step=after_step)
    return {
        **conditions,
        **settings,
        "count": info["count"],
        "trainable": sum(p.numel() for p in trainable),
        "batches": len(batches),
        "resumed_from": resumed_from,
        "losses": losses[:steps],
        "step_seconds": seconds[:steps],
        "peak_rss_bytes": harness.peak_rss_bytes(),
    }


def gpt2_loss_bench(
    out: Path,
    *,
    variants: Sequence[str] = LOSS_VARIANTS,
    steps: int = 200,
    lr: float = 1e-3,
    threads: int | None = 2,
    shape: Shape = Shape(),
    budget: int = BUDGET,
    command: str = "mapnet bench gpt2 --loss-curve",
    smoke: bool = False,
) -> dict[str, Any]:
    """The loss curve of each variant, one fresh process each; `out` is rewritten (atomically)
    after every variant, keeping the curves of earlier runs with the same settings, so the run
    can be split (--variants lora, later --variants mapnet-row) and a cut one goes on from its
    last saved step (the state folders beside `out`)."""
    counts = harness.thread_counts([threads])
    settings = {"budget": budget, "threads": harness.resolved_threads(counts), "batch": shape.batch,
                "seq_len": shape.seq_len, "lr": lr, "steps": steps,
                "optimizer": f"Adam, lr {lr:g}, on what trains",
                "data": "random ids (smoke)" if smoke else "the tweets (train split), in order, "
                "cycling"}  # fmt: skip
    data: dict[str, Any] = {
        **harness.results_header("gpt2-loss", command, smoke, counts),
        "settings": settings,
        "curves": {},
    }
    if out.exists():
        earlier = json.loads(out.read_text())
        if earlier.get("settings") == settings:
            data["curves"] = earlier.get("curves", {})
    run = harness.runner(smoke, None)
    started = time.perf_counter()
    for variant in variants:
        if len(data["curves"].get(variant, {}).get("losses", [])) >= steps:
            print(f"gpt2 loss curve {variant}: done already in {out}", flush=True)
            continue
        state = out.with_name(f"{out.stem}-{variant}.state")
        data["curves"][variant] = harness.measure(
            run, started, f"gpt2 loss curve {variant}, {steps} steps", train_loss_curve,
            _curve_figures, variant=variant, smoke=smoke, steps=steps, batch=shape.batch,
            seq_len=shape.seq_len, lr=lr, budget=budget, state=str(state),
            threads=counts[0],
        )  # fmt: skip
        data["curves"][variant]["command"] = command  # a split run: each curve's own command
        files.write_json(out, data | {"wall_seconds": time.perf_counter() - started})
    return harness.finish(data, out, started)


def _curve_figures(result: dict[str, Any]) -> str:
    losses = result["losses"]
    return (
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, median step "
        f"{harness.median(result['step_seconds']):.2f} s (resumed at step {result['resumed_from']})"
    )
