"""`mapnet export`: a trained run's model as an ordinary network file (mapnet.export).

The run folder of `mapnet train --out DIR` holds config.json and checkpoint/: the model is
rebuilt from the config (`build`), the checkpoint loaded into it (`load_model`), and its
generated weights exported; formats that trace the model get a random example input of the
shape the recipe feeds it (`example_inputs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch import nn

from mapnet.export import (
    INSTALL_HINT,
    ExportError,
    export_onnx,
    export_program,
    export_safetensors,
)
from mapnet_experiments.data.scenes import SCENE_SIZE
from mapnet_experiments.recipe.config import TrainConfig, stored_config
from mapnet_experiments.recipe.state import load_model
from mapnet_experiments.recipe.tasks import task_of
from mapnet_experiments.recipe.trainer import SINGLE_SITE_FEATURES, build

FORMATS = ("safetensors", "onnx", "program")

DESCRIPTION = f"""\
Export the model of a `mapnet train --out DIR` run as an ordinary network: the weights its
latent generates are computed once and written out, so the file runs without mapnet, the
mapping or its seed (plain runs export their own weights; an unfinished run, its last finished
epoch).

formats:
  safetensors  the network's state dict (weights and BatchNorm statistics) plus a JSON
               description in the header; load it into a fresh model with
               model.load_state_dict(safetensors.torch.load_file(PATH)). No pickle.
  onnx         an ONNX graph with the weights, any batch size; checked before it is written:
               onnxruntime must reproduce torch's outputs (same argmax, max abs error <= --atol)
               on a random example input. Needs onnx, onnxscript and onnxruntime
               ({INSTALL_HINT}). No pickle.
  program      torch.export's ExportedProgram as a .pt2 archive (torch.export.load reads it;
               AOTInductor and ExecuTorch take it). The archive holds pickled data: load only
               files you made, with the torch version that wrote them.

The example input (traced, and compared on) is random, of the shape the recipe feeds the
model: a 1×28×28 image for the MNIST models, a window of `window` hours ×
{SINGLE_SITE_FEATURES} features for the LSTM forecaster, a 1×{SCENE_SIZE}×{SCENE_SIZE} scene for
the U-Net.
"""

EXAMPLES = """\
examples:
  mapnet train --out runs/cnn2                          # train first (1 epoch, CNN2, MNIST)
  mapnet export runs/cnn2 --format onnx --out export/cnn2.onnx
  mapnet export runs/cnn2/checkpoint --format safetensors --out export/cnn2.safetensors
  mapnet export runs/cnn2 --format onnx --static-batch --out cnn2-b1.onnx   # batch 1 only
  mapnet export runs/lstm --format program --out export/lstm.pt2
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `export` command on `mapnet`'s subcommands."""
    p = sub.add_parser(
        "export",
        help="write a trained run's model as safetensors, ONNX or a torch.export program",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_OR_CHECKPOINT",
        help="a run folder of `mapnet train --out` (config.json, checkpoint/) or its checkpoint/",
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, type=Path, help="the file to write (folder created)")
    p.add_argument(
        "--static-batch",
        action="store_true",
        help="onnx, program: fix the batch size to the example's (1) instead of any size",
    )
    p.add_argument("--no-check", action="store_true", help="onnx: skip the onnxruntime comparison")
    p.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="onnx: largest allowed |onnxruntime - torch| (default: %(default)s)",
    )
    p.set_defaults(run=run_export)


def find_run(path: Path) -> tuple[Path, Path]:
    """The run folder and the model folder to load: checkpoint/, or for an unfinished run the
    last finished epoch's state/model."""
    run = path.parent if path.name == "checkpoint" else path
    if not (run / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a run folder of `mapnet train --out` (no config.json in {run})"
        )
    for model in (run / "checkpoint", run / "state" / "model"):
        if model.is_dir():
            return run, model
    raise FileNotFoundError(f"{run} holds no checkpoint/ yet: no epoch of the run has finished")


def load_run(path: Path) -> tuple[TrainConfig, nn.Module]:
    """The run's config and its trained model, as `mapnet train` built it."""
    run, model_dir = find_run(path)
    config = TrainConfig.from_dict(stored_config(json.loads((run / "config.json").read_text())))
    # The checkpoint holds every tensor (a pruned run's masks too): the run a pruning or QAT
    # run started from is not needed, and may since have moved.
    module = build(dataclasses.replace(config, start_from=None))
    load_model(module, model_dir)
    return config, module


def example_inputs(config: TrainConfig, batch: int = 1) -> torch.Tensor:
    """A random input of the shape train.py's data pipelines give the config's model (values
    in their range: standardised images, min-max scaled windows, scenes in [0, 1])."""
    generator = torch.Generator().manual_seed(0)
    kind = task_of(config.dataset).kind
    if kind == "regression":  # forecasting_splits: (N, window, features)
        return torch.rand(batch, config.window, SINGLE_SITE_FEATURES, generator=generator)
    if kind == "segmentation":  # scene_splits: one channel, SCENE_SIZE square
        return torch.rand(batch, 1, SCENE_SIZE, SCENE_SIZE, generator=generator)
    return torch.randn(batch, 1, 28, 28, generator=generator)  # IMAGE_MODELS: 1×28×28


def run_export(args: argparse.Namespace) -> int:
    config, module = load_run(args.run_dir)
    what = f"{config.model} ({config.mode}) from {args.run_dir}"
    if args.format == "safetensors":
        export_safetensors(module, args.out)
        print(
            f"wrote {args.out}: the state dict of {what}; load it with "
            "model.load_state_dict(safetensors.torch.load_file(path))"
        )
        return 0
    x = example_inputs(config)
    batch = "batch 1 only" if args.static_batch else "any batch size"
    if args.format == "program":
        try:
            export_program(module, x, args.out, dynamic_batch=not args.static_batch)
        except ExportError as error:
            print(f"mapnet export: error: {error}", file=sys.stderr)
            return 1
        print(
            f"wrote {args.out}: torch.export program of {what}, {batch}, input "
            f"{tuple(x.shape)}; it holds pickled data: load only your own files"
        )
        return 0
    try:
        result = export_onnx(
            module,
            x,
            args.out,
            dynamic_batch=not args.static_batch,
            check=not args.no_check,
            atol=args.atol,
        )
    except (ExportError, ImportError) as error:
        print(f"mapnet export: error: {error}", file=sys.stderr)
        return 1
    checked = (
        "not checked"
        if result.max_abs_error is None
        else f"onnxruntime matches torch at batch sizes "
        f"{', '.join(map(str, result.checked_batch_sizes))} (max abs error "
        f"{result.max_abs_error:.2g}, argmax differs at {result.argmax_mismatches})"
    )
    print(f"wrote {args.out}: ONNX opset {result.opset} of {what}, {batch}; {checked}")
    return 0
