"""The `mapnet` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mapnet.config import MappingConfig
from mapnet_experiments.data import DATASETS, DataUnavailableError, fetch
from mapnet_experiments.train import TrainConfig, train

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
            "Train CNN1/CNN2 on MNIST or Fashion-MNIST. In 'mapped' mode only the latent vector "
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
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--paper-literal",
        action="store_true",
        help="plain orthonormal mapping, no θ₀ base or gains, z ~ N(0, 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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


def _run_train(args: argparse.Namespace, overrides: list[str]) -> int:
    config = make_train_config(args, overrides)
    mapping = config.mapping
    described = f", strategy={mapping.strategy}, latent={mapping.latent_dim}"
    print(
        f"mapnet train: {config.model} on {config.dataset}, mode={config.mode}"
        + (described if config.mode == "mapped" else ""),
        flush=True,
    )
    result = train(config, progress=not args.quiet, out_dir=args.out, resume=args.resume)
    ratio = result["target_parameters"] / result["trainable_parameters"]
    print(
        f"trainable parameters: {result['trainable_parameters']:,} "
        f"(target network: {result['target_parameters']:,}, {ratio:.0f}x fewer)"
    )
    print(
        f"test accuracy: {result['test_acc']:.2f}%  (train {result['train_acc']:.2f}%, "
        f"{result['epochs']} epoch(s), test loss {result['test_loss']:.4f})"
    )
    print(
        f"wall time: {result['wall_seconds']:.1f} s  (building the mapping: "
        f"{result['build_seconds']:.1f} s; {result['threads']} threads)"
    )
    if args.out is not None:
        print(f"wrote {args.out}/results.json, metrics.jsonl and checkpoint/")
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


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure what a mapping costs on this machine",
        description=(
            "construction: time, projection memory and peak RSS to build the mapping of CNN2 and "
            "CNN1 (single, d=2048, dense and structured), CNN2 layer-wise (4 × 468) and the "
            "ResNet-50-sized target (structured), each in a fresh process. "
            "defaults: one epoch of CNN2 single d=2048 per candidate setting, scored on the "
            "validation split (resumable; the runs behind the defaults in docs/method.md). "
            "step: one training step (batch 128, cross-entropy, Adam) of CNN2, CNN1 (1×28×28) and "
            "ResNet-50 (3×64×64), plain vs mapped (dense / structured W) vs intrinsic-dimension "
            "θ₀ + W z, each variant in fresh processes, interleaved; plus a per-phase breakdown of "
            "a mapped step (about 15 min). step --report: write docs/results/bench.md from "
            "results/bench/*.json without measuring."
        ),
    )
    p.add_argument("what", choices=["construction", "defaults", "step"])
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="for 'defaults'")
    p.add_argument("--out", type=Path, default=None, help="default: results/bench/<what>...")
    p.add_argument("--smoke", action="store_true", help="a tiny case, a few seconds (what CI runs)")
    p.add_argument(
        "--report",
        action="store_true",
        help="step: write the report from the JSON files beside --out (default results/bench/)",
    )
    p.add_argument(
        "--report-out",
        type=Path,
        default=Path("docs/results/bench.md"),
        help="step --report: where to write it (default: %(default)s)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=["cnn2", "cnn1", "resnet50"],
        default=["cnn2", "cnn1", "resnet50"],
        help="step: targets to measure (default: all)",
    )
    p.add_argument("--latent-dim", type=int, default=2048, help="step: d (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="step (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=(
            "torch threads per measurement (step default: 1, since on a 2-core machine shared "
            "with other jobs 2 threads stall at every parallel region; construction default: "
            "torch's own)"
        ),
    )
    p.add_argument(
        "--malloc-tuned",
        action="store_true",
        help=(
            "step: measure with glibc's mmap/trim thresholds at 1 GiB, so freed activations are "
            "reused instead of re-faulted page by page every step"
        ),
    )
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from mapnet_experiments.bench import (
        DEFAULT_VARIANTS,
        construction_table,
        defaults_report,
        defaults_sweep,
        step_bench,
        write_report,
    )

    if args.what == "defaults" and args.report:
        print(defaults_report(Path("results/bench"), Path("docs/results/defaults.md")))
        return 0
    if args.what == "defaults":
        out = args.out or Path(f"results/bench/defaults-{args.dataset}.jsonl")
        defaults_sweep(args.dataset, out, DEFAULT_VARIANTS[:1] if args.smoke else DEFAULT_VARIANTS)
        return 0
    if args.what == "step":
        default = "results/bench/step-smoke.json" if args.smoke else "results/bench/step.json"
        out = args.out or Path(default)
        if args.report:
            write_report(out.parent, args.report_out)
            return 0
        threads = 1 if args.threads is None else args.threads
        for name, value in (
            ("latent-dim", args.latent_dim),
            ("batch-size", args.batch_size),
            ("threads", threads),
        ):
            if value <= 0:
                raise ValueError(f"--{name} must be > 0, got {value}")
        models = ["tiny"] if args.smoke else args.models
        # The command that reproduces this run, every setting spelled out.
        command = (
            f"mapnet bench step{' --smoke' if args.smoke else ''} --models {' '.join(models)} "
            f"--latent-dim {args.latent_dim if not args.smoke else 64} "
            f"--batch-size {args.batch_size} --threads {threads}"
            + (" --malloc-tuned" if args.malloc_tuned else "")
            + (f" --out {out}" if args.out else "")
        )
        step_bench(
            models,
            out,
            # The tiny smoke target has 1,498 parameters: d must stay below that.
            latent_dim=64 if args.smoke else args.latent_dim,
            batch=args.batch_size,
            threads=threads,
            breakdown=[m for m in models if m in ("cnn2", "cnn1", "tiny")],
            command=command,
            smoke=args.smoke,
            malloc_tuned=args.malloc_tuned,
        )
        return 0
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
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be > 0, got {args.threads}")
    command = "mapnet bench construction" + (" --smoke" if args.smoke else "")
    command += (f" --threads {args.threads}" if args.threads else "") + (
        f" --out {args.out}" if args.out else ""
    )
    construction_table(
        cases, args.out or Path("results/bench/construction.json"), command, args.threads
    )
    return 0


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
            "         split only; --report writes docs/results/tuning.md.\n\n"
            "Finished runs are skipped and interrupted ones resume from their last epoch, so\n"
            "the same command carries a long table across sessions (see --hours)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("table", choices=["table1", "tuning"])
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
    p.set_defaults(run=_run_repro)


def _run_repro(args: argparse.Namespace) -> int:
    from mapnet_experiments import repro

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
    args, extra = parser.parse_known_args(argv)
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
