"""`mapnet repro compression`: the paper's Table 8 (§2.2.5) on CNN2, whose runs are specified
with the other ablations (studies.ablations), plus the int8 post-training stage and its page."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mapnet.files import write_json
from mapnet_experiments.studies.ablations import (
    CONTINUE_EPOCHS,
    DATASETS,
    INT8_OF,
    PRUNE_SCOPE,
    ROOT,
    SEEDS,
    TABLE7,
    TABLE8,
    load_run,
    pair_text,
    seed_values,
    trainable_text,
    write_page,
)
from mapnet_experiments.studies.report import mean_std
from mapnet_experiments.studies.runner import run_name
from mapnet_experiments.studies.study import Options, Study


def int8_results(
    root: Path = ROOT, seeds: Iterable[int] = SEEDS, progress: bool = True
) -> list[Path]:
    """For every finished run named in INT8_OF: accuracy of its int8 version (static PTQ,
    calibrated on 8 training batches of 128), the bytes stored, and the float and int8
    models' inference time on the test split, side by side in this process at 1 thread and at
    the default count. Writes <root>/int8/<run>.json; finished files are kept."""
    from mapnet.compress import quantize_int8, save_quantized
    from mapnet_experiments.recipe.config import TrainConfig
    from mapnet_experiments.recipe.splits import load_splits
    from mapnet_experiments.recipe.state import load_model
    from mapnet_experiments.recipe.trainer import build, evaluate, plain_view

    written = []
    for seed in seeds:
        for name in INT8_OF:
            for dataset in DATASETS:
                run = run_name(f"{name}-s{seed}", dataset)
                out = root / "int8" / f"{run}.json"
                if out.exists():
                    written.append(out)
                    continue
                folder = root / "runs" / run
                if not (folder / "results.json").exists():
                    continue
                config = TrainConfig.from_dict(json.loads((folder / "config.json").read_text()))
                module = build(replace(config, start_from=None))
                load_model(module, folder / "checkpoint")
                float_model = plain_view(module).eval()
                splits = load_splits(config)
                calibration = [splits["train"].images[i * 128 : (i + 1) * 128] for i in range(8)]
                int8 = quantize_int8(float_model, calibration)
                staging = root / "int8" / f".{run}"
                stored = save_quantized(int8, staging)
                for file in staging.iterdir():
                    file.unlink()
                staging.rmdir()
                result = {
                    "run": run,
                    "float_bytes": 4 * sum(p.numel() for p in float_model.parameters()),
                    "int8_bytes": stored,
                    "val_acc_float": evaluate(float_model, splits["val"])["acc"],
                    "val_acc_int8": evaluate(int8, splits["val"])["acc"],
                    "test_acc_float": evaluate(float_model, splits["test"])["acc"],
                    "test_acc_int8": evaluate(int8, splits["test"])["acc"],
                    "inference_ms": _inference_times(float_model, int8, splits["test"].images),
                }
                write_json(out, result)
                written.append(out)
                if progress:
                    print(f"int8 {run}: test {result['test_acc_float']:.2f} -> "
                          f"{result['test_acc_int8']:.2f}", flush=True)  # fmt: skip
    return written


def _inference_times(
    float_model: torch.nn.Module, int8: torch.nn.Module, images: torch.Tensor, rounds: int = 7
) -> dict[str, dict[str, float]]:
    """Median ms per batch of 256 test images, float and int8 alternating in one process."""
    batch = images[:256]
    default = torch.get_num_threads()
    times: dict[str, dict[str, float]] = {}
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        samples: dict[str, list[float]] = {"float": [], "int8": []}
        with torch.no_grad():
            for model in (float_model, int8):
                model(batch)  # warm-up
            for _ in range(rounds):
                for key, model in (("float", float_model), ("int8", int8)):
                    started = time.perf_counter()
                    model(batch)
                    samples[key].append(1e3 * (time.perf_counter() - started))
        times[f"threads{threads}"] = {k: statistics.median(v) for k, v in samples.items()}
    torch.set_num_threads(default)
    return times


def _table8(root: Path) -> list[str]:
    lines = [
        "## Table 8: compression (paper §2.2.5)",
        "",
        f"Pruning and QAT rows continue the seed's finished 10-epoch run for {CONTINUE_EPOCHS} "
        "epochs (cosine from the lr in 'Choices'); pruning keeps the ⌈10 %⌉ largest |θ| "
        + (
            "of all weights ranked together (global)"
            if PRUNE_SCOPE == "global"
            else "of every tensor"
        )
        + ", the masks fixed. 'nonzero' counts the parameters the final network runs with.",
        "",
        "| row | trainable | nonzero | paper MNIST / FMNIST | public repro | ours MNIST "
        "| ours FMNIST |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in TABLE7[:2] + TABLE8:
        nonzero = [v for d in DATASETS for v in seed_values(root, spec.id, d, "nonzero_weights")]
        mnist = mean_std(seed_values(root, spec.id, "mnist", "test_acc"))
        fmnist = mean_std(seed_values(root, spec.id, "fashion-mnist", "test_acc"))
        lines.append(
            f"| {spec.label} | {trainable_text(root, spec.id)} | "
            f"{f'{int(nonzero[0]):,}' if nonzero else '–'} | {pair_text(spec.paper)} | "
            f"{pair_text(spec.public)} | {mnist} | {fmnist} |"
        )
    return lines + _int8_section(root)


def _int8_section(root: Path) -> list[str]:
    lines = [
        "",
        "## int8",
        "",
        "`mapnet repro compression --stages int8`: static post-training quantisation of the",
        "materialised network (weights int8 per output channel, activations per tensor, x86",
        "kernels, calibrated on 8 training batches of 128). QAT rows were trained through",
        "int8-rounded weights first. Bytes: the saved int8 model",
        "(`mapnet.compress.save_quantized`, safetensors + JSON) against float32 weights.",
        "Time: median ms per batch of 256 test images, float and int8 alternating in one",
        "process.",
        "",
        "| model | data set | test float | test int8 | bytes float → int8 | ms float → int8, "
        "1 thread | ms, default threads |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in INT8_OF:
        for dataset in DATASETS:
            results = [
                r
                for seed in SEEDS
                if (r := load_run(root / "int8", f"{name}-s{seed}-{dataset}")) is not None
            ]
            if not results:
                continue

            def pick(key: str, results: list[dict[str, Any]] = results) -> list[float]:
                return [r[key] for r in results]

            times = [r["inference_ms"] for r in results]
            threads = sorted(times[0], key=lambda k: int(k.removeprefix("threads")))

            def ms(key: str, times: list[dict[str, Any]] = times) -> str:
                f = statistics.median(t[key]["float"] for t in times)
                q = statistics.median(t[key]["int8"] for t in times)
                return f"{f:.2f} → {q:.2f}"

            lines.append(
                f"| {name} | {dataset} | {mean_std(pick('test_acc_float'))} | "
                f"{mean_std(pick('test_acc_int8'))} | {results[0]['float_bytes']:,} → "
                f"{results[0]['int8_bytes']:,} | {ms(threads[0])} | "
                f"{ms(threads[-1]) + ' (' + threads[-1].removeprefix('threads') + ')'} |"
            )
    return lines


def report(root: Path = ROOT, out: Path | None = None, figures: bool = True) -> str:
    """docs/results/compression.md (Table 8 and int8) from root's files."""
    return write_page(
        "compression",
        "# Compression add-ons (Table 8), reproduced",
        root,
        out,
        _table8(root),
        TABLE7[:2] + TABLE8,
        figures,
    )


def _run(options: Options, stages: tuple[str, ...]) -> None:
    from mapnet_experiments.studies.ablations import run_stages

    run_stages("compression", options, stages)
    if "int8" in stages:
        int8_results(options.root_or(ROOT), options.seeds, progress=options.progress)


STUDY = Study(
    name="compression",
    summary="the paper's Table 8 (low-rank FC1, 90 % pruning with fixed masks, int8 "
    "post-training and quantisation-aware); writes docs/results/compression.md",
    stages=("train", "int8"),
    default=("train", "int8"),
    run=_run,
    report=lambda options: report(options.root_or(ROOT), options.report_to, options.figures),
    example="mapnet repro compression --stages int8 --seeds 0",
    page="compression.md",
)
