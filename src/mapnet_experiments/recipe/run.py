"""A run folder: `train(config, out_dir=...)`, the recipe behind `mapnet train` and every table.

A run folder holds everything needed to resume it exactly:

    config.json     the TrainConfig (a resumed run must be given the same one)
    metrics.jsonl   one line per finished epoch: train/val/test loss and accuracy, lr, seconds
    state/          while the run is unfinished only: model + optimiser + RNG state after the
                    last finished epoch (recipe.state); removed once results.json is written
    checkpoint/     the final model (a mapnet checkpoint, or model.safetensors for plain runs)
    results.json    written last: its presence means the run is complete

A run holds the folder's lock while it trains, so a second process given the same folder is
refused with the first one's pid. A finished run keeps its result, metrics and final
checkpoint, so results/ stays small; resuming it trains nothing and returns its results.json.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet import files
from mapnet_experiments.recipe.config import TrainConfig, differing, stored_config
from mapnet_experiments.recipe.distributed import RankLostError, Ranks
from mapnet_experiments.recipe.splits import Split, load_splits
from mapnet_experiments.recipe.state import STATE, recover_state, remove_state, save_model
from mapnet_experiments.recipe.trainer import Trainer, plain_view, target_factory

CONFIG = "config.json"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"


def train(
    config: TrainConfig,
    splits: dict[str, Split] | None = None,
    progress: bool = True,
    out_dir: Path | None = None,
    resume: bool = False,
    evaluate_test: bool = True,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Train per `config`; returns its figures. With `out_dir`, every epoch is checkpointed and
    `resume=True` continues from the last finished one, to the same result as an uninterrupted
    run. The test split is evaluated after each epoch for the record; choices use validation.
    `evaluate_test=False` (runs that exist to make a choice) never touches the test split: its
    figures are None. `ranks`: one process of a multi-process run (recipe.distributed); rank 0
    evaluates and writes, every rank returns the same figures."""
    ranks = ranks or Ranks()
    if out_dir is None:
        return _train(config, splits, progress, None, False, evaluate_test, ranks)
    out = Path(out_dir)
    if ranks.is_main:
        _check_out(out)
    holding = files.lock(out) if ranks.is_main else contextlib.nullcontext()
    with holding:
        return _train(config, splits, progress, out, resume, evaluate_test, ranks)


def _train(
    config: TrainConfig,
    splits: dict[str, Split] | None,
    progress: bool,
    out: Path | None,
    resume: bool,
    evaluate_test: bool,
    ranks: Ranks,
) -> dict[str, Any]:
    started = time.perf_counter()
    if out is not None:
        if ranks.is_main:
            _prepare_run_dir(out, config, resume)
        ranks.barrier()
        finished = _finished_result(out, main=ranks.is_main)
        if finished is not None:
            return finished
    splits = splits or load_splits(config)
    data_seconds = time.perf_counter() - started
    trainer = Trainer(config, ranks)
    trainer.make_loop(len(splits["train"]), out / STATE if out is not None else None, progress)
    if resume and trainer.resume() and progress and ranks.is_main:
        print(f"resuming after epoch {trainer.epoch} of {config.epochs}", file=sys.stderr)
    main_epoch = ranks.from_main(trainer.epoch)
    if main_epoch != trainer.epoch:
        raise ValueError(
            f"rank {ranks.rank} resumed after epoch {trainer.epoch}, rank 0 after epoch "
            f"{main_epoch}: every rank must see the same {out} (a shared file system)"
        )
    metrics = out / METRICS if out is not None and ranks.is_main else None

    def after_epoch_saved() -> None:
        if metrics is not None:
            _write_metrics(metrics, trainer.history)

    trainer.fit(splits, evaluate_test, started=started, after_epoch=after_epoch_saved)
    result = _result(config, trainer, data_seconds)
    if out is not None and ranks.is_main:
        save_model(trainer.module, out / CHECKPOINT)
        files.write_json(out / RESULTS, result)
        remove_state(out)  # only after results.json: a crash before it can resume
    try:
        ranks.barrier()  # every rank ends once the results are on disk
    except RankLostError:
        if not ranks.is_main:  # rank 0 has written the results: a peer lost now costs nothing
            raise
    return result


def _result(config: TrainConfig, trainer: Trainer, data_seconds: float) -> dict[str, Any]:
    history, task = trainer.history, trainer.task
    key = task.primary
    best = max(history, key=lambda r: (task.rank(r[f"val_{key}"]), -r["epoch"])) if history else {}
    result = {
        "config": config.to_dict(),
        "task": task.kind,
        "trainable_parameters": trainer.trainable_parameters(),
        "target_parameters": sum(p.numel() for p in target_factory(config)().parameters()),
        "epochs": len(history),
        "history": history,
        **{
            f"{phase}_{name}": history[-1][f"{phase}_{name}"]
            for phase in ("train", "val", "test")
            for name in task.metrics
        },
        f"best_val_{key}": best.get(f"val_{key}"),
        "best_val_epoch": best.get("epoch"),
        f"best_val_test_{key}": best.get(f"test_{key}"),
        "nonzero_weights": _nonzero_weights(trainer.module),
        "build_seconds": trainer.build_seconds,
        "data_seconds": data_seconds,
        "wall_seconds": history[-1]["seconds"],
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
    }
    if trainer.ranks.distributed:
        result["processes"] = trainer.ranks.world_size
        result["allreduce_bytes_per_step"] = trainer.traffic.max_step_bytes
    return result


def _nonzero_weights(module: nn.Module) -> int:
    """Nonzero parameters of the network the trained model runs as (what pruning reduces)."""
    with torch.no_grad():
        return sum(int(p.count_nonzero()) for p in plain_view(module).parameters())


def _check_out(out: Path) -> None:
    """A run folder that cannot be one, named in one line."""
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is a file, not a folder; choose another --out")


def _finished_result(out: Path, main: bool = True) -> dict[str, Any] | None:
    """The stored result of a finished run in `out` (None if unfinished); any resume state left
    by a crash after results.json was written is removed (by rank 0 of several)."""
    results_file = out / RESULTS
    if not results_file.exists():
        return None
    try:
        result = json.loads(results_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{results_file}: unreadable ({error}); remove it to redo the run"
        ) from None
    if not (out / CHECKPOINT).is_dir():
        raise ValueError(
            f"{out} holds a finished run's {RESULTS} but its {CHECKPOINT}/ is missing: the "
            f"results cannot be trusted to match a model; remove {results_file} to redo the run"
        )
    if main:
        remove_state(out)
        print(
            f"mapnet: {out} holds a finished run; nothing to resume, returning its {RESULTS}",
            file=sys.stderr,
        )
    return result


def _prepare_run_dir(out: Path, config: TrainConfig, resume: bool) -> None:
    config_file = out / CONFIG
    if config_file.exists():
        try:
            saved = stored_config(json.loads(config_file.read_text()))
        except (OSError, ValueError) as error:
            raise ValueError(f"{config_file}: unreadable ({error})") from None
        if not resume:
            if (out / RESULTS).exists():
                raise ValueError(f"{out} already holds a finished run; choose another --out")
            raise ValueError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --out"
            )
        wanted = json.loads(json.dumps(config.to_dict()))
        if saved != wanted:
            raise ValueError(
                f"{out} holds a run with a different config (fields {differing(saved, wanted)});"
                " resume it with the same settings or choose another --out"
            )
        recover_state(out)
        return
    files.write_json(config_file, config.to_dict())


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole from the saved state, so after a resume it never holds a lost epoch.
    files.atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in history).encode())
