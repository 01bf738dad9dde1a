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
    tables_page,
    trainable_text,
)
from mapnet_experiments.studies.facts import Facts, Pick, better, points, times
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
            results = int8_runs(root, name, dataset)
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
    return tables_page(
        "compression",
        "# Compression add-ons (Table 8), reproduced",
        root,
        out,
        _table8(root),
        TABLE7[:2] + TABLE8,
        figures,
    )


# The checkpoint the index measures: a trained Ours* 2048, as committed with its run.
CHECKPOINT_RUN = "ours-2048-s0-mnist"


def checkpoint_bytes(folder: Path) -> dict[str, int]:
    """A committed mapnet checkpoint's size: its files' bytes (not `du -b`, which adds the
    folder's own entry, a size that depends on the file system), the format it was written in,
    and the bytes of the same model saved by this version of mapnet.save."""
    import tempfile

    import mapnet
    from mapnet_experiments.models.networks import CNN2

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file())

    with tempfile.TemporaryDirectory() as scratch:
        resaved = Path(scratch) / "checkpoint"
        mapnet.save(mapnet.load(folder, CNN2), resaved)
        now = size(resaved)
    version = json.loads((folder / "mapnet.json").read_text())["version"]
    return {"committed": size(folder), "version": version, "saved_now": now}


def int8_runs(root: Path, name: str, dataset: str) -> list[dict[str, Any]]:
    """The int8 results of one model on one data set, one per finished seed."""
    runs = (load_run(root / "int8", f"{name}-s{seed}-{dataset}") for seed in SEEDS)
    return [run for run in runs if run is not None]


def facts(results: Path) -> Facts | None:
    """The index's Table 8 paragraph (pruning, low rank, int8, QAT on Fashion-MNIST, seeds
    0–2) and the checkpoint row of the when-to-pick table."""
    root = results / "ablations"
    ids = (
        *("ours-2048", "ours-lw-2688", "cnn2", "ours-lrd-1456", "ours-lw-lrd-2688"),
        *("ours-2048-prune", "ours-lw-2688-prune", "cnn2-prune"),
    )
    value = {i: seed_values(root, i, "fashion-mnist", "test_acc") for i in ids}
    int8 = {(n, d): int8_runs(root, n, d) for n in INT8_OF for d in DATASETS}
    folder = root / "runs" / CHECKPOINT_RUN / "checkpoint"
    if any(len(v) != len(SEEDS) for v in value.values()) or not all(int8.values()):
        return None
    if not folder.is_dir():
        return None
    fmnist = {i: statistics.mean(v) for i, v in value.items()}
    nonzero = seed_values(root, "ours-2048-prune", "fashion-mnist", "nonzero_weights")[0]
    lrd = seed_values(root, "cnn2-lrd", "fashion-mnist", "trainable_parameters")[0]

    def moved(after: str, before: str) -> str:
        change = points(fmnist[after] - fmnist[before])
        return f"from {fmnist[before]:.2f} to {fmnist[after]:.2f} ({change})"

    def change(run: dict[str, Any]) -> float:
        return run["test_acc_int8"] - run["test_acc_float"]

    seed_mean = max(abs(statistics.mean(map(change, runs))) for runs in int8.values())
    single = max(abs(change(run)) for runs in int8.values() for run in runs)
    one_thread = {  # the page's figure: the median over seeds of each model and data set
        kind: [statistics.median(r["inference_ms"]["threads1"][kind] for r in runs)
               for runs in int8.values()]
        for kind in ("float", "int8")
    }  # fmt: skip
    first = next(iter(int8.values()))[0]
    qat = []
    for spec_id, base in (("ours-2048-qat", "ours-2048"), ("ours-lw-2688-qat", "ours-lw-2688")):
        for dataset in DATASETS:
            before = seed_values(root, base, dataset, "test_acc")
            after = statistics.mean(seed_values(root, spec_id, dataset, "test_acc"))
            qat.append((after - statistics.mean(before), statistics.stdev(before)))
    beyond = sum(abs(d) > s for d, s in qat)
    qat_verdict = (
        "each within the seed std of the run it continues"
        if not beyond
        else f"{beyond} of {len(qat)} beyond the seed std of the run it continues"
    )
    size = checkpoint_bytes(folder)
    weights = first["float_bytes"]
    paragraph = (
        f"Table 8 on CNN2, seeds {', '.join(map(str, SEEDS))}, mean Fashion-MNIST test accuracy "
        f"%. 90 % magnitude pruning with fixed masks ({nonzero:,} nonzero weights) moves Ours* "
        f"2048 {moved('ours-2048-prune', 'ours-2048')} and Ours† 2688 "
        f"{moved('ours-lw-2688-prune', 'ours-lw-2688')}, CNN2 trained directly "
        f"{moved('cnn2-prune', 'cnn2')}. With FC1 factorised (rank 32, {lrd:,} numbers) the "
        f"mapping reaches {fmnist['ours-lrd-1456']:.2f} from 1,456 numbers and "
        f"{fmnist['ours-lw-lrd-2688']:.2f} from 2,688 layer-wise ({fmnist['ours-lw-2688']:.2f} "
        "without the factorisation). Post-training int8 moves each model's seed-mean accuracy "
        f"by at most {seed_mean:.2f} points (single runs by up to {single:.2f}), stores "
        f"{first['int8_bytes']:,} bytes instead of {weights:,} and runs a 256-image batch in "
        f"{min(one_thread['int8']):.2f}–{max(one_thread['int8']):.2f} ms instead of "
        f"{min(one_thread['float']):.2f}–{max(one_thread['float']):.2f} ms on one thread. "
        "Quantisation-aware training through the mapping (3 more epochs) moves the mapped rows "
        f"by {', '.join(points(d) for d, _ in qat)} points (Ours* 2048, then Ours† 2688; MNIST, "
        f"then Fashion-MNIST), {qat_verdict}. The committed checkpoint of a trained Ours* 2048 "
        f"(results/ablations/runs/{CHECKPOINT_RUN}/checkpoint, format {size['version']}) holds "
        f"{size['committed']:,} bytes in its files (`du -b` adds the folder's own entry, whose "
        "size depends on the file system); saved by this version of mapnet it is "
        f"{size['saved_now']:,} bytes, against {weights:,} for CNN2's float32 weights."
    )
    pick = Pick(
        "Checkpoint of a trained CNN2 (Ours* 2048)",
        f"{size['saved_now']:,} B (`mapnet.save`)",
        f"{weights:,} B (CNN2's float32 weights; int8: {first['int8_bytes']:,})",
        f"{better(-size['saved_now'], -weights)}: {times(weights, size['saved_now'])} smaller",
    )
    return Facts(
        "Compression (Table 8)", "compression.md", "mapnet repro compression", paragraph, (pick,)
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
    facts=facts,
)
