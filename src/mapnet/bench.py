"""`mapnet bench`: what a mapping costs, measured on this machine.

Every figure is measured in a fresh subprocess, so peak RSS (VmHWM) belongs to that measurement
alone and nothing is warm from the previous one.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mapnet.core import MappingConfig, wrap
from mapnet.models import MODELS


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def measure_construction(model: str, latent_dim: int, strategy: str) -> dict[str, Any]:
    """Time and memory to build the mapping for one of the paper's models (run in a subprocess)."""
    torch.manual_seed(0)
    target = MODELS[model]()
    baseline_rss = peak_rss_bytes()
    started = time.perf_counter()
    mapped = wrap(target, MappingConfig(latent_dim=latent_dim, strategy=strategy))
    seconds = time.perf_counter() - started
    return {
        "model": model,
        "strategy": strategy,
        "latent_dim": latent_dim,
        "trainable_parameters": mapped.num_trainable_parameters(),
        "target_parameters": mapped.num_target_parameters(),
        "construction_seconds": seconds,
        "projection_bytes": mapped.projection_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": baseline_rss,
    }


def in_subprocess(function: str, **kwargs: Any) -> dict[str, Any]:
    code = (
        "import json, sys, mapnet.bench as b; "
        f"print(json.dumps(b.{function}(**json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{function}({kwargs}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def construction_table(cases: list[tuple[str, int, str]], out: Path | None) -> list[dict[str, Any]]:
    rows = []
    for model, latent_dim, strategy in cases:
        row = in_subprocess(
            "measure_construction", model=model, latent_dim=latent_dim, strategy=strategy
        )
        rows.append(row)
        print(
            f"{model} {strategy} d={latent_dim}: built in {row['construction_seconds']:.1f} s, "
            f"projection {row['projection_bytes'] / 2**30:.2f} GiB, "
            f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")
    return rows


# One epoch of CNN2 (single, d=2048) per variant, scored on the validation split only: the runs
# that chose the defaults in docs/method.md. Keys other than lr/literal are MappingConfig fields.
DEFAULT_VARIANTS: list[dict[str, Any]] = [
    {"lr": 0.003}, {"lr": 0.01}, {"lr": 0.03}, {"lr": 0.1}, {"lr": 0.3}, {"lr": 1.0},
    {"lr": 0.1, "alpha": 0.0}, {"lr": 0.1, "alpha": 1.0},
    {"lr": 0.1, "activation": "tanh"},
    {"lr": 0.1, "scaling": "none"}, {"lr": 0.1, "projection": "structured"},
    {"lr": 0.01, "literal": True}, {"lr": 0.1, "literal": True},
]  # fmt: skip


def defaults_sweep(dataset: str, out: Path, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each variant not yet in `out` (JSON lines, appended as each finishes: resumable)."""
    from mapnet.train import TrainConfig, load_splits, train

    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    seen = {json.dumps(row["variant"], sort_keys=True) for row in done}
    splits = None
    for variant in variants:
        if json.dumps(variant, sort_keys=True) in seen:
            continue
        splits = splits or load_splits(dataset, 5000, 0)
        settings = {k: v for k, v in variant.items() if k not in ("lr", "literal")}
        make = MappingConfig.paper_literal if variant.get("literal") else MappingConfig
        config = TrainConfig(dataset=dataset, lr=variant["lr"], mapping=make(**settings))
        result = train(config, splits, progress=False)
        row = {
            "variant": variant,
            "val_acc": result["history"][-1]["val_acc"],
            "train_acc": result["history"][-1]["train_acc"],
            "seconds": result["wall_seconds"],
        }
        print(json.dumps(row), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        done.append(row)
    return done
