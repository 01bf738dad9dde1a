"""`mapnet bench …`: what a mapping costs on this machine (bench/), and its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from mapnet_experiments.data.mnist import DATASETS

BENCH_DESCRIPTION = """\
Measure what a mapping costs on this machine. Every figure comes from a fresh Python process
(nothing is warm from the previous measurement, and a peak of memory belongs to that
measurement alone); processes that are compared run interleaved in rounds of alternating order,
so slow drift of a shared machine hits every variant alike. Results go to
results/bench/<name>.json with the machine, the load (`uptime`) at start and end, and the
command that reproduces them; `mapnet bench report` turns them into docs/results/bench.md,
whose first table judges the v0.2 targets.

Each measurement has its own --help; --smoke runs any of them on a tiny model in seconds (what
the tests run). The machine has 2 cores shared with other work: run the full benchmarks when it
is quiet.
"""

BENCH_EPILOG = """\
the v0.2 targets and the runs that measure them (times on a quiet 2-core EPYC):
  (a) training step mapped / plain ≤ 1.05, CNN1 and CNN2, batch 128, at 1 and 2 threads (~5 min)
        mapnet bench step --models cnn2 cnn1 --variants plain mapped-structured --threads 1 2 \\
            --out results/bench/step-v02.json
  (b) peak training memory mapped / plain ≤ 1.0, ResNet-50, batch 8, 224×224 (also 64×64)
  (c) wrap() peak ≤ weights + buffers + W + one θ₀, factory and instance       (both: ~2 min)
        mapnet bench memory
  (d) eval forward mapped / plain ≤ 1.02, CNN1 and CNN2 at batch 128, ResNet-50 224×224 at
      batch 8, at 1 and 2 threads (~5 min)
        mapnet bench inference
the fine-tuning targets (step and peak RSS against LoRA and full fine-tuning, ~1 hour)
        mapnet bench finetune --malloc-tuned
GPT-2 small: full, LoRA, mapnet L = 1 and row (~10 min); loss curves (~75 min, splittable)
        mapnet bench gpt2
        mapnet bench gpt2 --loss-curve
  then
        mapnet bench report
"""


def _add_malloc_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--malloc-tuned",
        action="store_true",
        help=(
            "measure with glibc's mmap/trim thresholds at 1 GiB, so freed activations are "
            "reused instead of re-faulted page by page every step"
        ),
    )


def _add_models_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    models = ["cnn2", "cnn1", "resnet50"]
    parser.add_argument("--models", nargs="+", choices=models, default=models, help=help_text)


def _add_report_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", type=Path, default=None, help=f"results file (default: {default_out})")
    p.add_argument(
        "--smoke", action="store_true", help="a tiny model, a few seconds, in this process"
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="measure nothing: write the report from the JSON files beside --out",
    )
    p.add_argument(
        "--report-out",
        type=Path,
        default=Path("docs/results/bench.md"),
        help="where --report writes (default: %(default)s)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "bench",
        help="measure what a mapping costs on this machine",
        description=BENCH_DESCRIPTION,
        epilog=BENCH_EPILOG,
        formatter_class=raw,
    )
    whats = p.add_subparsers(title="measurements", dest="what", required=True, metavar="WHAT")

    q = whats.add_parser(
        "step",
        help="training-step time: plain vs mapped vs intrinsic dim., per-phase breakdown",
        formatter_class=raw,
        description="""\
One training step (zero_grad, forward, cross-entropy, backward, Adam) on a fixed synthetic batch,
for each variant: plain (all P weights), mapped with dense or structured W (single latent of d
numbers; structured W with its passes as mapnet chooses them, compiled where a C++ compiler is
found, and with the eager passes: mapped-eager), and intrinsic-dimension training θ₀ + W z
(dense / structured). Every (variant, thread
count) runs in its own fresh process, 5 rounds for CNN2 and CNN1 (warm-up steps, then 20 / 10
measured), in alternating order; the ratio is the median mapped step / the median plain step at
the same thread count, with the per-process ratios beside it. With several --threads the thread
counts are measured side by side in the same rounds. A per-phase breakdown of a mapped step
(structured W: mapped.generate(), target forward, backward to θ, θ → z, Adam; its latent
gradient is checked against mapped(x)'s), a profiler table and the mapping loss's terms follow,
per model and thread count.

Dense W is built once per variant (minutes for CNN1) and skipped when P·d floats do not fit.""",
        epilog="""\
examples:
  mapnet bench step --smoke                     # seconds: a 1,498-parameter model
  mapnet bench step --models cnn2 cnn1 --variants plain mapped-structured --threads 1 2 \\
      --out results/bench/step-v02.json          # target (a), ~5 min
  mapnet bench step                             # every variant, 1 thread, ~15 min""",
    )
    _add_report_options(q, "results/bench/step.json")
    _add_models_option(q, "targets to measure (default: all; resnet50 at 3×64×64)")
    q.add_argument(
        "--variants",
        nargs="+",
        choices=[
            "plain",
            "mapped-dense",
            "mapped-structured",
            "mapped-eager",
            "id-dense",
            "id-structured",
        ],
        default=None,
        help="variants to measure (default: all; plain is always measured: ratios are to it)",
    )
    q.add_argument("--latent-dim", type=int, default=2048, help="d (default: %(default)s)")
    q.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    q.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help=(
            "torch thread count(s) per measurement, e.g. 1 2 for both side by side (default: "
            "1: on a 2-core machine shared with other jobs 2 threads stall at every parallel "
            "region)"
        ),
    )
    _add_malloc_option(q)

    q = whats.add_parser(
        "memory",
        help="peak memory of ResNet-50 training (plain vs mapped) and of wrap() itself",
        formatter_class=raw,
        description="""\
Peak memory, each figure from a fresh process, with two trackers (each case runs once per
tracker, in its own process):
  allocator  the bytes torch's CPU allocator holds, followed through every allocation and free
             torch.profiler records (profile_memory=True); tensors only, exact, and it names
             the Python frames where the peak happens
  rss        the peak resident set (VmHWM, reset at the block's start through
             /proc/self/clear_refs) minus the resident set at the start; everything the process
             touched, freed blocks glibc keeps included
Each process first runs one plain and one mapped step of a tiny model, so no figure carries a
first use of the code.

training  ResNet-50 (25,557,032 parameters, 1000 classes) at batch 8: build the model, then
          --steps Adam steps on a fixed batch. plain: the model and Adam on its weights; mapped:
          wrap(ResNet50, MappingConfig(latent_dim=2048, projection="structured")) and Adam on
          the latent. Measured at every --input-sizes (224: ResNet-50's own input, where target
          (b) is judged; 64: the step bench's). Ratio = mapped peak / plain peak.
wrap      wrap(ResNet50, cfg) (factory) and wrap(ResNet50(), cfg) (instance), from before the
          model exists, against weights + buffers + mapped.projection_bytes() + one θ₀
          (float32, the size of the generated weights): target (c).""",
        epilog="""\
examples:
  mapnet bench memory --smoke                   # seconds: the tiny model, in this process
  mapnet bench memory                           # targets (b) and (c), ~2 min, ~2–3 GiB peak""",
    )
    _add_report_options(q, "results/bench/memory.json")
    q.add_argument(
        "--input-sizes",
        type=int,
        nargs="+",
        default=[224, 64],
        metavar="PIXELS",
        help="square input sizes for the training case (default: 224 64)",
    )
    q.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    q.add_argument("--steps", type=int, default=3, help="Adam steps (default: %(default)s)")
    q.add_argument("--latent-dim", type=int, default=2048, help="d (default: %(default)s)")
    q.add_argument(
        "--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)"
    )

    q = whats.add_parser(
        "inference",
        help="eval-mode forward time under no_grad, plain vs mapped (the eval cache)",
        formatter_class=raw,
        description="""\
Eval-mode inference: module.eval(), then `with torch.no_grad(): module(x)` on a fixed batch,
plain (the model itself) vs mapped (wrap(factory, MappingConfig(latent_dim=2048,
projection="structured"))). In eval mode under no_grad the mapped model generates its weights
on the first call and reuses them until a latent changes, so the first call is timed apart and
the figure is the median of the calls after a warm-up; every process also checks that the
second call returns exactly the first's output. Every (variant, thread count) runs in its own
fresh process, 5 rounds, in alternating order; ratio = median mapped / median plain at the same
thread count. CNN2 and CNN1 at batch 128 (1×28×28), ResNet-50 at batch 8 (3×224×224): target
(d).""",
        epilog="""\
examples:
  mapnet bench inference --smoke                # seconds
  mapnet bench inference                        # target (d): 1 and 2 threads, ~5 min
  mapnet bench inference --models cnn2 cnn1     # without ResNet-50, ~2.5 min""",
    )
    _add_report_options(q, "results/bench/inference.json")
    _add_models_option(q, "targets to measure (default: all)")
    q.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="one batch size for every model (default: 128 for the CNNs, 8 for ResNet-50)",
    )
    q.add_argument("--latent-dim", type=int, default=2048, help="d (default: %(default)s)")
    _add_malloc_option(q)
    q.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="torch thread counts, side by side (default: 1 and torch's default here)",
    )

    q = whats.add_parser(
        "finetune",
        help="fine-tuning step time and peak RSS of every method (LoRA, VeRA, IA3, mapnet, ...)",
        formatter_class=raw,
        description="""\
One fine-tuning step (zero_grad, forward, cross-entropy, backward, Adam on what trains) on a
fixed synthetic batch, for every method: head only, BitFit (biases + head), full fine-tuning,
peft LoRA, peft VeRA, peft IA3, mapnet θ_pre ⊙ (1 + m) with L = 1 and L = 250 (the weight
path), and mapnet group_size="row" (the activation path; skipped, with the reason, where this
mapnet refuses that config). Trainable numbers besides the head are 2,048 where a method can be
set to it, else its natural count (the report says which). Models: ResNet-50 (Keras layout,
random weights, a 10-class head) at batch 32 of 3×64×64, and a BERT of all-MiniLM-L6-v2's
shape (random weights, mean pooling, a 384 -> 3 head) at batch 32 × 48 tokens. Every (model,
method, thread count) runs in its own fresh process, 5 rounds in alternating order, 2 warm-up
+ 5 measured steps each; step = the median of all measured steps, with its ratio to LoRA's
and to full fine-tuning's; peak RSS = each process's VmHWM (median over the processes). The
fine-tuning targets are judged from these figures.""",
        epilog="""\
examples:
  mapnet bench finetune --smoke                 # seconds: a tiny CNN and a tiny BERT
  mapnet bench finetune --malloc-tuned          # both models, 1 and 2 threads, ~1 hour
  mapnet bench report""",
    )
    _add_report_options(q, "results/bench/finetune.json")
    q.add_argument(
        "--models",
        nargs="+",
        choices=["resnet50", "minilm"],
        default=["resnet50", "minilm"],
        help="models to fine-tune (default: both)",
    )
    q.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="methods to measure (default: head bitfit full lora vera ia3 mapnet-l1 "
        "mapnet-l250 mapnet-row; also mapnet-l1-eager mapnet-l250-eager: mapnet with "
        "MAPNET_FUSION=eager; mapnet-row-last1, mapnet-row-last2, minilm only: rows of the "
        "last 1 or 2 layers)",
    )
    q.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        metavar="N",
        help="torch thread counts, side by side (default: 1 2)",
    )
    _add_malloc_option(q)

    q = whats.add_parser(
        "gpt2",
        help="GPT-2 small fine-tuning: full, LoRA, mapnet L = 1 and row at ~4,096 numbers",
        formatter_class=raw,
        description="""\
GPT-2 small (124,439,808 parameters, random init, transformers' GPT2LMHeadModel) fine-tuned on
causal-LM batches of the tweets (batch 4 × 128 tokens): full fine-tuning, peft LoRA (the rank
and Conv1D projections nearest the budget: rank 1 on the last mlp.c_fc, 3,840 numbers), mapnet
θ_pre ⊙ (1 + m) with d = 4,096 at L = 1 (the weight path) and with group_size="row" (the
activation path for the Conv1D projections and the embeddings; the LayerNorms fall back to the
weight path, and the results say which modules took which). Every variant runs in its own fresh
process, --rounds rounds in alternating order: build time (wrap / get_peft_model), the median
step (zero_grad, forward with labels, backward, Adam) over --steps steps after --warmup, peak
RSS (VmHWM), trainable count, checkpoint bytes per generated parameter. A variant that runs out
of memory is recorded as failed, with the peak it reached.

--loss-curve instead trains mapnet row and LoRA for --loss-steps steps each (one fresh process
each) and records the loss of every step in results/bench/gpt2-loss.json; the state is committed
every 10 steps beside it, so a cut run goes on where it stopped, and --variants splits it.""",
        epilog="""\
examples:
  mapnet bench gpt2 --smoke                     # seconds: a tiny GPT2Config, in this process
  mapnet bench gpt2                             # 4 variants × 2 rounds, 2 threads, ~10 min
  mapnet bench gpt2 --loss-curve --variants lora          # 200 steps, tens of minutes
  mapnet bench gpt2 --loss-curve --variants mapnet-row    # 200 steps, tens of minutes
  mapnet bench report""",
    )
    _add_report_options(q, "results/bench/gpt2.json; --loss-curve: results/bench/gpt2-loss.json")
    q.add_argument(
        "--variants",
        nargs="+",
        choices=["full", "lora", "mapnet-l1", "mapnet-row"],
        default=None,
        help="(default: all four; --loss-curve: mapnet-row lora)",
    )
    q.add_argument("--threads", type=int, default=2, metavar="N", help="(default: %(default)s)")
    q.add_argument("--rounds", type=int, default=2, help="(default: %(default)s)")
    q.add_argument("--warmup", type=int, default=1, help="(default: %(default)s)")
    q.add_argument("--steps", type=int, default=3, help="measured steps (default: %(default)s)")
    q.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    q.add_argument("--seq-len", type=int, default=128, help="tokens (default: %(default)s)")
    q.add_argument("--loss-curve", action="store_true", help="record loss curves instead")
    q.add_argument("--loss-steps", type=int, default=None, help="(default: 200; --smoke: 4)")
    q.add_argument("--lr", type=float, default=1e-3, help="loss curve's Adam lr (default: 1e-3)")

    q = whats.add_parser(
        "comm",
        help="bytes all-reduced per step over 2 processes, plain vs mapped CNN2",
        formatter_class=raw,
        description="""\
Multi-process training's exchange: CNN2 plain (108,618 weights) and mapped (d = 2048,
structured projection) each train a few Adam steps on a fixed synthetic batch of 128, in fresh
processes started as `mapnet train --nproc N` starts them: 1 process, then 2 gloo ranks with 64
samples each. A DDP communication hook counts the bytes of every gradient all-reduce; rank 0's
median step time is recorded (1 torch thread per process). 50 steps per process, 5 rounds in
alternating order.""",
        epilog="""\
examples:
  mapnet bench comm --smoke                     # seconds: 2 steps, one round
  mapnet bench comm                             # ~2 min
  mapnet bench report                           # adds the table to docs/results/bench.md""",
    )
    _add_report_options(q, "results/bench/comm.json")

    q = whats.add_parser(
        "construction",
        help="time and memory of building a mapping (dense and structured W)",
        description=(
            "Time, projection memory and peak RSS to build the mapping of CNN2 and CNN1 (single, "
            "d=2048, dense and structured), CNN2 layer-wise (4 × 468) and the ResNet-50-sized "
            "target (structured), each wrap() of an instance in a fresh process."
        ),
    )
    q.add_argument(
        "--out", type=Path, default=None, help="default: results/bench/construction.json"
    )
    q.add_argument("--smoke", action="store_true", help="one tiny case")
    q.add_argument(
        "--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)"
    )

    q = whats.add_parser(
        "defaults",
        help="the runs behind the defaults (one CNN2 epoch per setting)",
        description=(
            "One epoch of CNN2 single d=2048 per candidate setting, scored on the validation "
            "split (resumable; the runs behind the defaults in docs/method.md). --report writes "
            "docs/results/defaults.md."
        ),
    )
    q.add_argument("--dataset", choices=DATASETS, default="mnist")
    q.add_argument(
        "--out", type=Path, default=None, help="default: results/bench/defaults-<dataset>.jsonl"
    )
    q.add_argument("--smoke", action="store_true", help="the first setting only")
    q.add_argument("--report", action="store_true", help="only write docs/results/defaults.md")

    q = whats.add_parser(
        "report",
        help="docs/results/bench.md from results/bench/*.json, measuring nothing",
        description=(
            "Write the report from every results file in --results (measuring nothing): the "
            "v0.2 targets, each met / not met with the figures behind it, then the step, "
            "memory, inference and construction runs. Smoke results are used only for a kind "
            "that has no other."
        ),
    )
    q.add_argument(
        "--results", type=Path, default=Path("results/bench"), help="(default: %(default)s)"
    )
    q.add_argument(
        "--report-out",
        type=Path,
        default=Path("docs/results/bench.md"),
        help="(default: %(default)s)",
    )
    p.set_defaults(run=run)


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def run(args: argparse.Namespace) -> int:
    from mapnet_experiments.bench import comm, inference, memory, step
    from mapnet_experiments.bench.harness import DEFAULT_THREADS
    from mapnet_experiments.bench.report import write_report

    what = args.what
    if what == "report":
        write_report(args.results, args.report_out)
        return 0
    if what == "defaults":
        return _run_defaults(args)
    if what == "construction":
        return _run_construction(args)
    suffix = "-smoke" if args.smoke else ""
    out = args.out or Path(f"results/bench/{what}{suffix}.json")
    if what == "gpt2" and args.loss_curve:
        out = args.out or Path(f"results/bench/gpt2-loss{suffix}.json")
    if args.report:
        write_report(out.parent, args.report_out)
        return 0
    if what == "gpt2":
        return _run_gpt2(args, out)
    if what == "finetune":
        return _run_finetune(args, out)
    if what == "comm":
        command = (
            "mapnet bench comm"
            + (" --smoke" if args.smoke else "")
            + (f" --out {out}" if args.out else "")
        )
        comm.communication_bench(out, command, smoke=args.smoke)
        return 0
    threads = args.threads if isinstance(args.threads, list) else [args.threads]
    _positive(latent_dim=args.latent_dim, batch_size=args.batch_size)
    for count in threads:
        _positive(threads=count)
    smoke = " --smoke" if args.smoke else ""
    given_out = f" --out {out}" if args.out else ""
    if what == "step":
        models = ["tiny"] if args.smoke else args.models
        latent_dim = 64 if args.smoke else args.latent_dim  # tiny: 1,498 parameters
        variants = f" --variants {' '.join(args.variants)}" if args.variants else ""
        # The command that reproduces this run, every setting spelled out.
        command = (
            f"mapnet bench step{smoke} --models {' '.join(models)}{variants} "
            f"--latent-dim {latent_dim} --batch-size {args.batch_size} "
            f"--threads {' '.join(map(str, threads))}"
            + (" --malloc-tuned" if args.malloc_tuned else "")
            + given_out
        )
        step.step_bench(
            models,
            out,
            latent_dim=latent_dim,
            batch=args.batch_size,
            threads=threads,
            variants=args.variants,
            breakdown=[m for m in models if m in ("cnn2", "cnn1", "tiny")],
            command=command,
            smoke=args.smoke,
            malloc_tuned=args.malloc_tuned,
        )
        return 0
    if what == "memory":
        _positive(steps=args.steps)
        for size in args.input_sizes:
            if size < 32:
                raise ValueError(f"--input-sizes: ResNet-50 needs at least 32 pixels, got {size}")
        plan = (
            memory.MEMORY_SMOKE
            if args.smoke
            else memory.MemoryPlan(
                "resnet50", args.latent_dim, args.batch_size, args.steps, tuple(args.input_sizes)
            )
        )
        command = (
            f"mapnet bench memory{smoke}"
            + (
                ""
                if args.smoke
                else f" --input-sizes {' '.join(map(str, plan.input_sizes))} "
                f"--batch-size {plan.batch} --steps {plan.steps} --latent-dim {plan.latent_dim}"
            )
            + (f" --threads {args.threads}" if args.threads else "")
            + given_out
        )
        memory.memory_bench(out, plan, threads=args.threads, command=command, smoke=args.smoke)
        return 0
    # inference
    counts = args.threads or sorted({1, DEFAULT_THREADS})
    models = ["tiny"] if args.smoke else args.models
    latent_dim = 64 if args.smoke else args.latent_dim
    command = (
        f"mapnet bench inference{smoke} --models {' '.join(models)} --latent-dim {latent_dim}"
        + (f" --batch-size {args.batch_size}" if args.batch_size else "")
        + f" --threads {' '.join(map(str, counts))}"
        + (" --malloc-tuned" if args.malloc_tuned else "")
        + given_out
    )
    inference.inference_bench(
        models,
        out,
        threads=counts,
        latent_dim=latent_dim,
        batch=args.batch_size,
        command=command,
        smoke=args.smoke,
        malloc_tuned=args.malloc_tuned,
    )
    return 0


def _run_finetune(args: argparse.Namespace, out: Path) -> int:
    from mapnet_experiments.bench import finetune

    known = [m.name for m in finetune.FINETUNE_METHODS]
    unknown = sorted(set(args.methods or ()) - set(known))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; known: {', '.join(known)}")
    for count in args.threads:
        _positive(threads=count)
    models = ["tiny-cnn", "tiny-bert"] if args.smoke else args.models
    budget = finetune.SMOKE_BUDGET if args.smoke else finetune.BUDGET
    command = (
        "mapnet bench finetune"
        + (" --smoke" if args.smoke else f" --models {' '.join(models)}")
        + (f" --methods {' '.join(args.methods)}" if args.methods else "")
        + f" --threads {' '.join(map(str, args.threads))}"
        + (" --malloc-tuned" if args.malloc_tuned else "")
        + (f" --out {args.out}" if args.out else "")
    )
    finetune.finetune_bench(
        models,
        out,
        methods=args.methods,
        threads=args.threads,
        budget=budget,
        command=command,
        smoke=args.smoke,
        malloc_tuned=args.malloc_tuned,
    )
    return 0


def _run_gpt2(args: argparse.Namespace, out: Path) -> int:
    from mapnet_experiments.bench import gpt2

    sizes = {"batch_size": args.batch_size, "seq_len": args.seq_len, "loss_steps": args.loss_steps}
    _positive(threads=args.threads, rounds=args.rounds, steps=args.steps, **sizes)
    if args.warmup < 0:
        raise ValueError(f"--warmup must be ≥ 0, got {args.warmup}")
    shape = (
        gpt2.SMOKE
        if args.smoke
        else gpt2.Shape(args.batch_size, args.seq_len, args.warmup, args.steps, args.rounds)
    )
    loss = args.loss_curve
    variants = args.variants or list(gpt2.LOSS_VARIANTS if loss else gpt2.VARIANTS)
    steps = args.loss_steps or (4 if args.smoke else 200)
    command = (
        "mapnet bench gpt2"
        + (" --smoke" if args.smoke else "")
        + (f" --loss-curve --loss-steps {steps} --lr {args.lr:g}" if loss else "")
        + f" --variants {' '.join(variants)} --threads {args.threads}"
        + (
            ""
            if args.smoke
            else f" --batch-size {shape.batch} --seq-len {shape.seq_len}"
            + (
                ""
                if loss
                else f" --warmup {shape.warmup} --steps {shape.steps} --rounds {shape.rounds}"
            )
        )
        + (f" --out {args.out}" if args.out else "")
    )
    if loss:
        gpt2.gpt2_loss_bench(out, variants=variants, steps=steps, lr=args.lr, threads=args.threads,
                             shape=shape, command=command, smoke=args.smoke)  # fmt: skip
    else:
        gpt2.gpt2_bench(out, variants=variants, threads=args.threads, shape=shape,
                        command=command, smoke=args.smoke)  # fmt: skip
    return 0


def _run_defaults(args: argparse.Namespace) -> int:
    from mapnet_experiments.bench import defaults

    if args.report:
        print(defaults.defaults_report(Path("results/bench"), Path("docs/results/defaults.md")))
        return 0
    out = args.out or Path(f"results/bench/defaults-{args.dataset}.jsonl")
    variants = defaults.DEFAULT_VARIANTS
    defaults.defaults_sweep(args.dataset, out, variants[:1] if args.smoke else variants)
    return 0


def _run_construction(args: argparse.Namespace) -> int:
    from mapnet_experiments.bench.construction import construction_table

    cases = (
        [("cnn2", 64, "single")]
        if args.smoke
        else [
            ("cnn2", 2048, "single"),
            ("cnn2", 468, "layerwise"),
            ("cnn1", 2048, "single"),
            ("cnn2", 2048, "single", "structured"),
            ("cnn1", 2048, "single", "structured"),
            ("resnet50", 2048, "single", "structured"),
        ]
    )
    _positive(threads=args.threads)
    command = "mapnet bench construction" + (" --smoke" if args.smoke else "")
    command += (f" --threads {args.threads}" if args.threads else "") + (
        f" --out {args.out}" if args.out else ""
    )
    construction_table(
        cases, args.out or Path("results/bench/construction.json"), command, args.threads
    )
    return 0
