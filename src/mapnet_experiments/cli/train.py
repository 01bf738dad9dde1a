"""`mapnet train`: one training run from the command line (settings, launch, the printed result)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mapnet.config import MappingConfig
from mapnet_experiments.cli.arguments import positive_int
from mapnet_experiments.recipe import distributed
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import train

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


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        type=positive_int,
        default=1,
        help=(
            "train with N processes on this machine (DistributedDataParallel over gloo, on "
            "the CPU): each trains on its own 1/N of every batch of --batch-size; the trainable "
            "tensors' gradients are all-reduced (in mapped mode the latent's: d numbers) and "
            "BatchNorm statistics broadcast from rank 0. Same as torchrun --nproc-per-node N "
            "-m mapnet_experiments.cli train …"
        ),
    )
    p.set_defaults(run=run)


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
    from mapnet_experiments.recipe.state import saved_epoch

    epoch = saved_epoch(args.out)
    if epoch is None:
        return f"No epoch had finished, so {args.out} holds nothing to resume from."
    return (
        f"The checkpoint after epoch {epoch} in {args.out}/state is intact: run the same "
        "command with --resume to continue."
    )


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    config = make_train_config(args, overrides)  # a bad setting fails here, before any launch
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.nproc > 1 and launched:
        raise ValueError("--nproc starts the processes itself; under torchrun leave it out")
    if args.nproc > 1:
        argv = _without_nproc(args.argv)
        return distributed.launch(argv, args.nproc, lambda: _resume_hint(args))
    ranks = distributed.Ranks.from_environment()
    try:
        code = _train_and_report(args, config, ranks)
    except distributed.RankLostError as error:
        # Exit at once, without closing the group: gloo's teardown can wait on the lost peers.
        print(f"mapnet: error: {error}. {_resume_hint(args)}", file=sys.stderr)
        return distributed.LOST_PEERS_EXIT
    ranks.close()
    return code


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
