"""The `mapnet` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mapnet.core import ACTIVATIONS, STRATEGIES, MappingConfig
from mapnet.data import DATASETS, DataUnavailableError, fetch
from mapnet.models import MODELS
from mapnet.train import MODES, TrainConfig, train

EXAMPLES = """\
examples:
  mapnet train                                   # CNN2 on MNIST from a 2048-number latent, 1 epoch
  mapnet train --dataset fashion-mnist --epochs 5 --out runs/fmnist
  mapnet train --strategy layerwise --latent-dim 468   # the paper's CNN2 "Ours† 1872" (4 × 468)
  mapnet train --mode plain                      # the ordinary 108,618-parameter baseline
  mapnet data fetch fashion-mnist                # download / verify data into the cache

Data come from $MAPNET_DATA_DIR (a folder with mnist/ and fashion-mnist/) when it is set, else
from a cache (~/.cache/mapnet/data) filled on first use.
"""


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a paper model, plainly or through a latent vector",
        description=(
            "Train CNN1/CNN2 on MNIST or Fashion-MNIST. In 'mapped' mode only the latent vector "
            "is trained: every weight of the network is generated from it by a fixed, seeded, "
            "orthonormal mapping. A validation split is carved from the training set; the test "
            "set is evaluated once, after training."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = TrainConfig()
    mapping = defaults.mapping
    p.add_argument("--model", choices=sorted(MODELS), default=defaults.model)
    p.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    p.add_argument(
        "--mode",
        choices=MODES,
        default=defaults.mode,
        help="mapped: train the latent only; plain: train all weights (baseline)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=mapping.strategy,
        help="single: one latent for all weights; layerwise: one latent per layer",
    )
    p.add_argument(
        "--latent-dim",
        type=int,
        default=mapping.latent_dim,
        help="latent size (layerwise: per layer) (default: %(default)s)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=mapping.alpha,
        help="modulation scale α in W_i(1+αz_i) (default: %(default)s)",
    )
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default=mapping.activation)
    p.add_argument(
        "--paper-literal",
        action="store_true",
        help="plain orthonormal mapping, no θ₀ base or gains, z ~ N(0, 1)",
    )
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    p.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seeds the mapping, the split, the init and the batch order",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results.json and the checkpoint (default: none written)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    overrides = {"latent_dim": args.latent_dim, "strategy": args.strategy, "seed": args.seed,
                 "alpha": args.alpha, "activation": args.activation}  # fmt: skip
    mapping = (MappingConfig.paper_literal if args.paper_literal else MappingConfig)(**overrides)
    config = TrainConfig(
        model=args.model, dataset=args.dataset, mode=args.mode, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, mapping=mapping,
    )  # fmt: skip
    print(f"mapnet train: {config.model} on {config.dataset}, mode={config.mode}"
          + (f", strategy={mapping.strategy}, latent={mapping.latent_dim}"
             if config.mode == "mapped" else ""), flush=True)  # fmt: skip
    result = train(config, progress=not args.quiet, out_dir=args.out)
    for row in result["history"]:
        print(f"  epoch {row['epoch']}: train acc {row['train_acc']:.2f}%  "
              f"val acc {row['val_acc']:.2f}%  ({row['seconds']:.0f} s)")  # fmt: skip
    ratio = result["target_parameters"] / result["trainable_parameters"]
    print(f"trainable parameters: {result['trainable_parameters']:,} "
          f"(target network: {result['target_parameters']:,}, {ratio:.0f}x fewer)")  # fmt: skip
    print(f"test accuracy: {result['test_acc']:.2f}%  (test loss {result['test_loss']:.4f})")
    print(f"wall time: {result['wall_seconds']:.1f} s  (building the mapping: "
          f"{result['build_seconds']:.1f} s; {result['threads']} threads)")  # fmt: skip
    if args.out is not None:
        print(f"wrote {args.out / 'results.json'} and {args.out / 'checkpoint'}")
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
            "CNN1 (single, d=2048) and CNN2 layer-wise (4 × 468), each in a fresh process. "
            "defaults: one epoch of CNN2 single d=2048 per candidate setting, scored on the "
            "validation split (resumable; the runs behind the defaults in docs/method.md)."
        ),
    )
    p.add_argument("what", choices=["construction", "defaults"])
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="for 'defaults'")
    p.add_argument("--out", type=Path, default=None, help="default: results/bench/<what>...")
    p.add_argument("--smoke", action="store_true", help="one tiny case (what CI runs)")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from mapnet.bench import DEFAULT_VARIANTS, construction_table, defaults_sweep

    if args.what == "defaults":
        out = args.out or Path(f"results/bench/defaults-{args.dataset}.jsonl")
        defaults_sweep(args.dataset, out, DEFAULT_VARIANTS[:1] if args.smoke else DEFAULT_VARIANTS)
        return 0
    cases = [("cnn2", 64, "single")] if args.smoke else [
        ("cnn2", 2048, "single"), ("cnn2", 468, "layerwise"), ("cnn1", 2048, "single"),
    ]  # fmt: skip
    construction_table(cases, args.out or Path("results/bench/construction.json"))
    return 0


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, DataUnavailableError, FileNotFoundError) as error:
        print(f"mapnet: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mapnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
