"""The `mapnet` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mapnet.config import MappingConfig
from mapnet_experiments.cli import export as export_cli
from mapnet_experiments.data.mnist import DATASETS, DataUnavailableError, fetch
from mapnet_experiments.recipe import distributed
from mapnet_experiments.recipe.train import TrainConfig, train

EXAMPLES = """\
examples:
  mapnet train                                    # CNN2 on MNIST from a 2048-number latent, 1 epoch
  mapnet train --dataset fashion-mnist --epochs 5 --out runs/fmnist
  mapnet train --out runs/fmnist --resume         # continue an interrupted run where it stopped
  mapnet train --strategy layerwise --latent-dim 468   # the paper's CNN2 "Ours† 1872" (4 × 468)
  mapnet train --mode plain --lr 0.001            # the ordinary 108,618-parameter baseline
  mapnet train --config run.toml --loss.stability true --mapping.alpha 0.05
  mapnet data fetch fashion-mnist                 # download / verify data into the cache

Data come from $MAPNET_DATA_DIR (a folder with mnist/ and fashion-mnist/) when it is set, else
from a cache (~/.cache/mapnet/data) filled on first use.
"""

# Short flags for the settings people change most; every other setting is --<field> or
# --mapping.<field> / --loss.<option>.
ALIASES = {
    "latent_dim": "mapping.latent_dim",
    "strategy": "mapping.strategy",
    "alpha": "mapping.alpha",
    "activation": "mapping.activation",
    "projection": "mapping.projection",
}


def _settings_help() -> str:
    defaults = TrainConfig()
    lines = ["settings (config-file keys; override any with --KEY VALUE, '-' or '_' alike):"]
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("mapping", "loss"):
            lines.append(f"  {f.name} = {json.dumps(getattr(defaults, f.name))}")
    for f in dataclasses.fields(MappingConfig):
        lines.append(f"  mapping.{f.name} = {json.dumps(getattr(defaults.mapping, f.name))}")
    lines.append(
        '  loss.{stability,smoothness,alignment} = false, loss.coefficients = "uncertainty", '
        "… (any MappingLoss option; see docs/method.md)"
    )
    lines.append(
        "short flags: " + ", ".join(f"--{k.replace('_', '-')} = --{v}" for k, v in ALIASES.items())
    )
    return "\n".join(lines)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        allow_abbrev=False,  # unknown --KEYs are settings, never abbreviations of options
        help="train a paper model, plainly or through a latent vector",
        description=(
            "Train CNN1/CNN2 on MNIST or Fashion-MNIST (or --dataset beijing-pm25 --model lstm: "
            "forecasting; --dataset scenes --model unet: segmentation). In 'mapped' mode only "
            "the latent vector "
            "(and the mapping loss's coefficients, when its terms are on) is trained: every "
            "weight of the network is generated from it by a fixed, seeded mapping. A validation "
            "split is carved from the training set for choices; the test set is only reported. "
            "With --out, each epoch is checkpointed atomically and metrics go to metrics.jsonl."
        ),
        epilog=_settings_help() + "\n\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="a .toml or .json file of settings")
    p.add_argument("--out", type=Path, help="run folder (checkpoints, metrics, results)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (a finished one is left as it is and its results shown)",
    )
    p.add_argument(
        "--paper-literal",
        action="store_true",
        help="plain orthonormal mapping, no θ₀ base or gains, z ~ N(0, 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        help=(
            "train with N processes on this machine (DistributedDataParallel over gloo, on "
            "the CPU): each trains on its own 1/N of every batch of --batch-size; the trainable "
            "tensors' gradients are all-reduced (in mapped mode the latent's: d numbers) and "
            "BatchNorm statistics broadcast from rank 0. Same as torchrun --nproc-per-node N "
            "-m mapnet_experiments.cli train …"
        ),
    )
    p.set_defaults(run=_run_train)


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """['--mapping.alpha', '0.2', '--epochs', '3'] -> {'mapping': {'alpha': 0.2}, 'epochs': 3}."""
    settings: dict[str, Any] = {}
    if len(tokens) % 2:
        raise ValueError(f"settings come in --KEY VALUE pairs; got {' '.join(tokens)!r}")
    for key, raw in zip(tokens[::2], tokens[1::2]):
        if not key.startswith("--"):
            raise ValueError(f"expected --KEY before {raw!r}, got {key!r}")
        path = key[2:].replace("-", "_")
        path = ALIASES.get(path, path)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare word: a string setting such as --dataset mnist
        *parents, leaf = path.split(".")
        node = settings
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return settings


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    raise ValueError(f"config file {path} must end in .toml or .json")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_train_config(args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    settings = read_config_file(args.config) if args.config else {}
    settings = _merge(settings, parse_overrides(overrides))
    mapping = settings.pop("mapping", {})
    if not isinstance(mapping, dict):
        raise ValueError(f"mapping must be a table of MappingConfig fields, got {mapping!r}")
    make = MappingConfig.paper_literal if args.paper_literal else MappingConfig
    mapping = make(**mapping)
    return TrainConfig.from_dict({**settings, "mapping": mapping})


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            kept.append(token)
    return kept


def _resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted `mapnet train` left behind, read when it stopped."""
    if args.out is None:
        return "Nothing was saved (no --out)."
    if (args.out / "results.json").exists():
        return f"The run had finished: {args.out} holds its results.json and checkpoint/."
    from mapnet_experiments.recipe.train import saved_epoch

    epoch = saved_epoch(args.out)
    if epoch is None:
        return f"No epoch had finished, so {args.out} holds nothing to resume from."
    return (
        f"The checkpoint after epoch {epoch} in {args.out}/state is intact: run the same "
        "command with --resume to continue."
    )


def _run_train(args: argparse.Namespace, overrides: list[str]) -> int:
    config = make_train_config(args, overrides)  # a bad setting fails here, before any launch
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.nproc > 1 and launched:
        raise ValueError("--nproc starts the processes itself; under torchrun leave it out")
    if args.nproc > 1:
        argv = _without_nproc(args.argv)
        return distributed.launch(argv, args.nproc, lambda: _resume_hint(args))
    ranks = distributed.Ranks.from_environment()
    try:
        return _train_and_report(args, config, ranks)
    except distributed.RankLostError as error:
        print(f"mapnet: error: {error}. {_resume_hint(args)}", file=sys.stderr)
        return distributed.LOST_PEERS_EXIT
    finally:
        ranks.close()


def _train_and_report(
    args: argparse.Namespace, config: TrainConfig, ranks: distributed.Ranks
) -> int:
    say = ranks.is_main  # the other ranks train silently
    mapping = config.mapping
    described = (
        f", strategy={mapping.strategy}, latent={mapping.latent_dim}, "
        f"projection={mapping.projection}"
    )
    if say:
        print(
            f"mapnet train: {config.model} on {config.dataset}, mode={config.mode}"
            + (described if config.mode == "mapped" else "")
            + (f", {ranks.world_size} processes" if ranks.distributed else ""),
            flush=True,
        )
    finished = args.resume and args.out is not None and (args.out / "results.json").exists()
    result = train(
        config, progress=not args.quiet, out_dir=args.out, resume=args.resume, ranks=ranks
    )
    if not say:
        return 0
    ratio = result["target_parameters"] / result["trainable_parameters"]
    print(
        f"trainable parameters: {result['trainable_parameters']:,} "
        f"(target network: {result['target_parameters']:,}, {ratio:.0f}x fewer)"
    )
    if result.get("task", "classification") == "classification":
        print(
            f"test accuracy: {result['test_acc']:.2f}%  (train {result['train_acc']:.2f}%, "
            f"{result['epochs']} epoch(s), test loss {result['test_loss']:.4f})"
        )
    else:
        metrics = [k.removeprefix("test_") for k in result if k.startswith("test_")]
        shown = ", ".join(f"{name} {result[f'test_{name}']:.6g}" for name in metrics)
        print(f"test {shown}  ({result['epochs']} epoch(s))")
    mapping = result["config"]["mapping"]
    what = f"{mapping['projection']} projection" if config.mode == "mapped" else "model"
    data = result.get("data_seconds")
    print(
        f"wall time: {result['wall_seconds']:.1f} s  (building the {what}: "
        f"{result['build_seconds']:.2f} s"
        + (f"; data: {data:.1f} s" if data is not None else "")
        + f"; {result['threads']} threads)"
    )
    if result.get("processes"):
        print(
            f"processes: {result['processes']}, all-reducing "
            f"{result['allreduce_bytes_per_step']:,} bytes per step"
        )
    if args.out is not None:
        done = "kept the finished run's" if finished else "wrote"
        print(f"{done} {args.out}/results.json, metrics.jsonl and checkpoint/")
    return 0


def _data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="fetch and verify data sets",
        description="Fetch MNIST / Fashion-MNIST into the cache (or check $MAPNET_DATA_DIR).",
    )
    p.add_argument("action", choices=["fetch"])
    p.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(DATASETS)}")
    p.set_defaults(run=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.names) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown data set(s) {unknown}; known: {', '.join(DATASETS)}")
    for name in args.names or DATASETS:
        started = time.perf_counter()
        folder = fetch(name)
        print(f"{name}: verified in {folder} ({time.perf_counter() - started:.1f} s)")
    return 0


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


def _bench_parser(sub: argparse._SubParsersAction) -> None:
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
numbers), and intrinsic-dimension training θ₀ + W z (dense / structured). Every (variant, thread
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
        choices=["plain", "mapped-dense", "mapped-structured", "id-dense", "id-structured"],
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
    p.set_defaults(run=_run_bench)


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def _run_bench(args: argparse.Namespace) -> int:
    from mapnet_experiments.bench import suite as bench

    what = args.what
    if what == "report":
        bench.write_report(args.results, args.report_out)
        return 0
    if what == "defaults":
        if args.report:
            print(bench.defaults_report(Path("results/bench"), Path("docs/results/defaults.md")))
            return 0
        out = args.out or Path(f"results/bench/defaults-{args.dataset}.jsonl")
        variants = bench.DEFAULT_VARIANTS
        bench.defaults_sweep(args.dataset, out, variants[:1] if args.smoke else variants)
        return 0
    if what == "construction":
        return _run_construction(args, bench)
    suffix = "-smoke" if args.smoke else ""
    out = args.out or Path(f"results/bench/{what}{suffix}.json")
    if args.report:
        bench.write_report(out.parent, args.report_out)
        return 0
    if what == "comm":
        from mapnet_experiments.bench import comm as comm_bench

        command = (
            "mapnet bench comm"
            + (" --smoke" if args.smoke else "")
            + (f" --out {out}" if args.out else "")
        )
        comm_bench.communication_bench(out, command, smoke=args.smoke)
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
        bench.step_bench(
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
            bench.MEMORY_SMOKE
            if args.smoke
            else bench.MemoryPlan(
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
        bench.memory_bench(out, plan, threads=args.threads, command=command, smoke=args.smoke)
        return 0
    # inference
    counts = args.threads or sorted({1, bench.DEFAULT_THREADS})
    models = ["tiny"] if args.smoke else args.models
    latent_dim = 64 if args.smoke else args.latent_dim
    command = (
        f"mapnet bench inference{smoke} --models {' '.join(models)} --latent-dim {latent_dim}"
        + (f" --batch-size {args.batch_size}" if args.batch_size else "")
        + f" --threads {' '.join(map(str, counts))}"
        + (" --malloc-tuned" if args.malloc_tuned else "")
        + given_out
    )
    bench.inference_bench(
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


def _run_construction(args: argparse.Namespace, bench: Any) -> int:
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
    bench.construction_table(
        cases, args.out or Path("results/bench/construction.json"), command, args.threads
    )
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _repro_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "repro",
        help="reproduce the paper's tables (resumable; results/<table>/*.json)",
        description=(
            "table1   every row of the paper's Table 1 (CNN1/CNN2 baselines, single and\n"
            "         layer-wise mappings) plus intrinsic-dimension training at 2048, on MNIST\n"
            "         and Fashion-MNIST; --report writes docs/results/table1.md.\n"
            "tuning   the Table 1 recipe against one-change variants (α, gains, learning rate,\n"
            "         σ, loss terms, epochs, seeds) on CNN2 d=2048, scored on the validation\n"
            "         split only; --report writes docs/results/tuning.md.\n"
            "finetune fine-tuning ImageNet ResNet-50 / MobileNetV2 through a latent (eq. 25)\n"
            "         against head-only, full, additive, peft LoRA and VeRA at matched budgets:\n"
            "         --stages select (learning rates on validation), transfer (Fashion-MNIST\n"
            "         64×64), deepfake (real vs face-swapped faces), steps (step time\n"
            "         alone, 1 and 2 threads: run it on a quiet machine); one process per row;\n"
            "         --report writes docs/results/finetune.md.\n"
            "ablations the paper's Tables 6-7 on CNN2 (what trains: Ours*, - WM, LV + WMAP,\n"
            "         Full DNN, LV + FullDNN; the mapping loss term by term), seeds 0-2:\n"
            "         --stages select (learning rates on validation), train; --report writes\n"
            "         docs/results/ablations.md.\n"
            "compression Table 8 (low-rank FC1, 90% pruning with fixed masks, int8 post-training\n"
            "         and quantisation-aware): --stages train, int8; --report writes\n"
            "         docs/results/compression.md.\n"
            "budget   accuracy against trainable numbers on Fashion-MNIST: mapnet single and\n"
            "         layer-wise, intrinsic dimension, small CNNs trained directly;\n"
            "         --report writes docs/results/budget.md and budget.png.\n"
            "forecasting Table 4: the LSTM air-quality forecaster (Beijing PM2.5) trained\n"
            "         directly, through a latent (64, 2048), by intrinsic dimension; persistence;\n"
            "         --report writes docs/results/forecasting.md and an example forecast.\n"
            "segmentation Table 3: the U-Net on scenes composed from MNIST and Fashion-MNIST\n"
            "         (Cityscapes is not reachable here; read_cityscapes reads it);\n"
            "         --report writes docs/results/segmentation.md and example predictions.\n"
            "trajectory paper Figure 2: CNN2 trained directly and through a latent from the same\n"
            "         θ0, weight snapshots projected by PCA (--tsne: also t-SNE, scikit-learn);\n"
            "         writes results/figures/trajectory-<dataset>.json and\n"
            "         docs/results/trajectory.png (first of --datasets).\n"
            "space    a model space: 12 CNN2 classifiers as latents of one mapping, 2 trained\n"
            "         with path flattening, plain controls; --stages train, analyse (paths,\n"
            "         soups, latent optimisation, distillation, PCA; --tsne: t-SNE too),\n"
            "         speed (256 members by vmap vs a loop: run it alone), inr (one SIREN per\n"
            "         image, classified from its latent: the paper's fixed θ₀, a learned θ₀,\n"
            "         and functa-style meta-learning on the full data sets; one process per\n"
            "         data set: --datasets mnist, --datasets fashion-mnist); --report writes\n"
            "         docs/results/space.md and its figures.\n\n"
            "Finished runs are skipped and interrupted ones resume from their last epoch, so\n"
            "the same command carries a long table across sessions (see --hours). A run is\n"
            "locked while it trains: start the same command twice (with --threads 1) and the\n"
            "two processes share the table, each taking the next free run."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "table",
        choices=[
            "table1",
            "tuning",
            "finetune",
            "ablations",
            "compression",
            "budget",
            "trajectory",
            "forecasting",
            "segmentation",
            "space",
        ],
    )
    p.add_argument("--report", action="store_true", help="only write the report")
    p.add_argument("--rows", default=None, help="comma-separated row ids (default: all)")
    p.add_argument("--datasets", default="mnist,fashion-mnist", help="comma-separated")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 10)")
    p.add_argument(
        "--hours",
        type=float,
        default=None,
        help="start no new run after this many hours (a session's budget)",
    )
    p.add_argument("--data-dir", default=None, help="read <data-dir>/<dataset>/ IDX files")
    p.add_argument("--val-size", type=int, default=5000, help="validation images from train")
    p.add_argument("--root", type=Path, default=None, help="results folder (results/<table>)")
    p.add_argument("--report-to", type=Path, default=None, help="docs/results/<table>.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--stages",
        default=None,
        help="comma-separated stages, in order (finetune: select,transfer,deepfake; "
        "ablations: select,train; compression: train,int8)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads (default: torch's own count)",
    )
    p.add_argument("--tsne", action="store_true", help="trajectory: also t-SNE coordinates")
    p.add_argument(
        "--seeds",
        default="0,1,2",
        help="ablations / compression: comma-separated seeds to run (default: %(default)s)",
    )
    p.set_defaults(run=_run_repro)


def _run_finetune(args: argparse.Namespace) -> int:
    from mapnet_experiments.studies import finetune

    root = args.root or finetune.RESULTS_DIR
    if not args.report:
        deadline = time.monotonic() + 3600 * args.hours if args.hours else None
        for stage in (args.stages or "select,transfer,deepfake").split(","):
            if stage not in finetune.STAGES:
                raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(finetune.STAGES)}")
            rows = finetune.STAGES[stage]
            if args.rows:
                known = {row.id: row for row in rows}
                rows = [known[i] for i in args.rows.split(",") if i in known]
            finetune.run_stage(stage, rows, root, deadline, progress=not args.quiet)
    print(finetune.report(root, args.report_to or finetune.REPORT))
    return 0


def _run_repro(args: argparse.Namespace) -> int:
    from mapnet_experiments.studies import table1 as repro

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.table == "finetune":
        return _run_finetune(args)
    if args.table in ("ablations", "compression", "budget"):
        return _run_paper_tables(args)
    if args.table in ("forecasting", "segmentation"):
        from mapnet_experiments.studies import forecasting, segmentation

        recipe = forecasting if args.table == "forecasting" else segmentation
        root = args.root or recipe.ROOT
        if not args.report:
            deadline = time.monotonic() + 3600 * args.hours if args.hours else None
            recipe.run(
                root,
                data_dir=args.data_dir,
                progress=not args.quiet,
                deadline=deadline,
                epochs=args.epochs or repro.EPOCHS,
            )
        out = args.report_to or recipe.REPORT
        if recipe is forecasting:
            print(forecasting.report(root, out, data_dir=args.data_dir))
        else:
            print(segmentation.report(root, out, data_dir=args.data_dir))
        figure = recipe.figure(root, out.with_name(recipe.FIGURE.name), data_dir=args.data_dir)
        print(figure or "(the example figure needs the seed-0 runs)")
        return 0
    if args.table == "space":
        from mapnet_experiments.studies.space import study as space_study

        root = args.root or space_study.ROOT
        if not args.report:
            for stage in (args.stages or "train,analyse").split(","):
                if stage == "train":
                    space_study.train_all(root, args.data_dir, progress=not args.quiet)
                elif stage == "analyse":
                    space_study.analyse(root, args.data_dir, tsne=args.tsne)
                elif stage == "speed":
                    space_study.speed(root)
                elif stage == "inr":
                    from mapnet_experiments.studies.space import inr as inr_study

                    datasets = tuple(args.datasets.split(","))
                    inr_study.run(root / "inr", args.data_dir, datasets)
                else:
                    raise ValueError(
                        f"unknown stage {stage!r} for space (train, analyse, speed, inr)"
                    )
        print(space_study.report(root, args.report_to or space_study.REPORT, args.data_dir))
        return 0
    if args.table == "trajectory":
        from mapnet_experiments.studies import trajectory

        dataset = args.datasets.split(",")[0]
        root = args.root or trajectory.ROOT
        source = root / f"trajectory-{dataset}.json"
        if not args.report:
            source = trajectory.run(
                dataset, tsne=args.tsne, root=root, data_dir=args.data_dir, progress=not args.quiet
            )
        out = args.report_to or trajectory.FIGURE
        print(trajectory.figure(source, out))
        if args.tsne:
            print(trajectory.figure(source, out.with_name(out.stem + "-tsne.png"), "tsne"))
        return 0
    tuning = args.table == "tuning"
    rows = repro.TUNING if tuning else repro.TABLE1
    root = args.root or (repro.TUNING_DIR if tuning else repro.TABLE1_DIR)
    report_to = args.report_to or Path(f"docs/results/{args.table}.md")
    datasets = tuple(args.datasets.split(","))
    if not args.report:
        known = {row.id: row for row in rows}
        wanted = args.rows.split(",") if args.rows else list(known)
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise ValueError(f"unknown row(s) {unknown}; rows: {', '.join(known)}")
        deadline = time.monotonic() + 3600 * args.hours if args.hours else None
        repro.run_table(
            [known[i] for i in wanted],
            datasets,
            root,
            epochs=args.epochs or repro.EPOCHS,
            deadline=deadline,
            progress=not args.quiet,
            data_dir=args.data_dir,
            val_size=args.val_size,
            evaluate_test=not tuning,
        )
    report = repro.tuning_report if tuning else repro.report
    print(report(root, report_to, datasets))
    return 0


def _run_paper_tables(args: argparse.Namespace) -> int:
    from mapnet_experiments.studies import ablations as ablation_tables
    from mapnet_experiments.studies import budget
    from mapnet_experiments.studies.table1 import run_table

    deadline = time.monotonic() + 3600 * args.hours if args.hours else None
    if args.table == "budget":
        root = args.root or budget.ROOT
        if not args.report:
            done: list[str] = []
            while True:  # a later pass adds the small CNNs once their lr is chosen
                plan = budget.plan(root)
                if [row.id for row, _ in plan] == done:
                    break
                done = [row.id for row, _ in plan]
                run_table([], root=root, deadline=deadline, progress=not args.quiet, plan=plan)
        print(budget.report(root, args.report_to or budget.REPORT))
        return 0
    root = args.root or ablation_tables.ROOT
    defaults = {"ablations": "select,train", "compression": "train,int8"}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if not args.report:
        for stage in (args.stages or defaults[args.table]).split(","):
            if stage == "int8" and args.table == "compression":
                ablation_tables.int8_results(root, seeds, progress=not args.quiet)
            elif stage in ("select", "train"):
                # select: the runs the choices continue (table runs, test recorded), then the
                # candidates themselves, scored on validation only.
                tables = ["select-bases", "select"] if stage == "select" else [args.table]
                for table in tables:
                    run_table(
                        [],
                        root=root,
                        deadline=deadline,
                        progress=not args.quiet,
                        evaluate_test=table != "select",
                        plan=ablation_tables.plan(table, seeds),
                    )
            else:
                raise ValueError(f"unknown stage {stage!r} for {args.table}")
    print(ablation_tables.report(args.table, root, args.report_to))
    return 0


def keep_freed_memory() -> None:
    """Stop glibc returning freed activations to the kernel after every step (each step then
    re-faults them page by page: ~3,000 faults per CNN2 step; plain steps 17–33 % faster without,
    see docs/results/bench.md). No-op off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(
        prog="mapnet",
        description="Mapping Networks: train any network through a small latent vector.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _train_parser(sub)
    _data_parser(sub)
    _bench_parser(sub)
    _repro_parser(sub)
    export_cli.add_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    try:
        if args.run is _run_train:
            return _run_train(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.run(args)
    except (ValueError, TypeError, DataUnavailableError, FileNotFoundError) as error:
        print(f"mapnet: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mapnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
