"""`mapnet bench comm`: what multi-process training exchanges, a mapped CNN2 against a plain one.

Each measurement trains on one fixed synthetic batch in fresh processes started like `mapnet
train --nproc N` (distributed.launch): 1 process, then 2 gloo ranks each taking half of every
batch. DDP's gradient all-reduce goes through a communication hook that counts its bytes
(distributed.Traffic). Plain: all 108,618 weights' gradients; mapped (d = 2048, structured
projection): the latent's 2,048 (paper §2.2: W and θ₀ are regenerated from the seed on every
rank, never sent). Rounds alternate the order of the variants.

The step time is the median over measured steps of rank 0, at 1 torch thread per process. On
one machine gloo runs over loopback, so the time shows the exchange's cost on 2 cores, not
what a network link would make of 434 KB against 8 KB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet import MappingConfig, wrap
from mapnet_experiments.bench.harness import announce, finish, in_round_order, results_header
from mapnet_experiments.models.networks import CNN2
from mapnet_experiments.recipe.distributed import Ranks, Traffic, launch

VARIANTS = ("plain", "mapped")
LATENT_DIM = 2048
BATCH = 128
LEARNING_RATES = {"plain": 1e-3, "mapped": 0.1}


def _model(variant: str) -> nn.Module:
    torch.manual_seed(0)
    if variant == "plain":
        return CNN2()
    return wrap(CNN2, MappingConfig(latent_dim=LATENT_DIM, projection="structured"))


def worker(variant: str, out: Path, warmup: int, steps: int) -> None:
    """One rank (or the single process) of a measurement; rank 0 writes `out`."""
    torch.set_num_threads(1)
    ranks = Ranks.from_environment()
    try:
        module = _model(variant)
        traffic = Traffic()
        forward = ranks.wrap(module, traffic) if ranks.distributed else module
        generator = torch.Generator().manual_seed(1234)
        x = torch.randn(BATCH, 1, 28, 28, generator=generator)  # (B, 1, 28, 28)
        y = torch.randint(0, 10, (BATCH,), generator=generator)
        mine = ranks.shard(torch.arange(BATCH))
        x, y = x[mine], y[mine]
        optimizer = torch.optim.Adam(module.parameters(), lr=LEARNING_RATES[variant])
        times, losses = [], []
        for step in range(warmup + steps):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            if step >= warmup:
                times.append(time.perf_counter() - started)
            losses.append(loss.item())
            traffic.step_done()
        if ranks.is_main:
            result = {
                "variant": variant,
                "processes": ranks.world_size,
                "trainable_parameters": sum(
                    p.numel() for p in module.parameters() if p.requires_grad
                ),
                "allreduce_bytes_per_step": traffic.last_step_bytes,
                "step_ms": 1000 * statistics.median(times),
                "losses": [losses[0], losses[-1]],
            }
            out.write_text(json.dumps(result))
        ranks.barrier()  # no rank tears its process group down while another still talks
        del forward  # DDP before its process group: else gloo may abort at exit
    finally:
        ranks.close()


def measure(variant: str, processes: int, warmup: int, steps: int) -> dict[str, Any]:
    """One measurement in fresh processes."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        argv = [variant, str(out), "--warmup", str(warmup), "--steps", str(steps)]
        code = launch(argv, processes, module="mapnet_experiments.bench.comm")
        if code != 0 or not out.exists():
            raise RuntimeError(f"the {variant} measurement on {processes} process(es) failed")
        return json.loads(out.read_text())


def communication_bench(
    out: Path, command: str, smoke: bool = False, rounds: int = 5, steps: int = 50
) -> dict[str, Any]:
    """Every variant on 1 and 2 processes, `rounds` times in alternating order; writes `out`."""
    started = time.perf_counter()
    if smoke:
        rounds, steps = 1, 2
    warmup = 1 if smoke else 3
    data = results_header("communication", command, smoke, [1])
    data |= {"model": "cnn2", "batch": BATCH, "latent_dim": LATENT_DIM, "steps": steps}
    runs: list[dict[str, Any]] = []
    for round_ in range(rounds):
        for variant in in_round_order(VARIANTS, round_):
            for processes in (1, 2):
                announce(started, f"round {round_ + 1}/{rounds}: {variant}, {processes} proc")
                run = measure(variant, processes, warmup, steps) | {"round": round_}
                print(f"{run['step_ms']:.1f} ms/step, {run['allreduce_bytes_per_step']:,} B")
                runs.append(run)
    data["runs"] = runs
    data["rows"] = summarise(runs)
    return finish(data, out, started)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        by_processes = {
            n: [r for r in mine if r["processes"] == n]
            for n in sorted({r["processes"] for r in mine})
        }
        rows.append(
            {
                "variant": variant,
                "trainable_parameters": mine[0]["trainable_parameters"],
                "allreduce_bytes_per_step": max(
                    r["allreduce_bytes_per_step"] for r in by_processes.get(2, mine)
                ),
                "step_ms": {
                    str(n): statistics.median(r["step_ms"] for r in found)
                    for n, found in by_processes.items()
                },
            }
        )
    return rows


def report_section(data: dict[str, Any]) -> list[str]:
    """The bench report's section for one communication run."""
    rows = {row["variant"]: row for row in data["rows"]}
    plain, mapped = (
        rows["plain"]["allreduce_bytes_per_step"],
        rows["mapped"]["allreduce_bytes_per_step"],
    )
    lines = [
        "## Multi-process training: bytes exchanged per step",
        "",
        f"`{data['command']}` on {data['date']}: CNN2, global batch {data['batch']} on a fixed "
        f"synthetic batch, DDP over gloo; 1 torch thread per process; median step time of "
        f"rank 0 over {data['steps']} steps, median over rounds. The all-reduced bytes are "
        "counted by a communication hook on DDP (`mapnet_experiments.recipe.distributed.Traffic`), "
        "which `mapnet train --nproc N` also reports. Both processes share one 2-core machine, "
        "so the 2-process time measures loopback gloo on shared cores, not a network.",
        "",
        "| CNN2 | trainable | all-reduced per step (2 ranks) | step, 1 process "
        "| step, 2 ranks × half batch |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        row = rows[variant]
        times = row["step_ms"]
        lines.append(
            f"| {variant} | {row['trainable_parameters']:,} | "
            f"{row['allreduce_bytes_per_step']:,} B | {times.get('1', float('nan')):.1f} ms | "
            f"{times.get('2', float('nan')):.1f} ms |"
        )
    lines += [
        "",
        f"The mapped model all-reduces {plain / mapped:.0f}× fewer bytes per step "
        f"({mapped:,} B = d × 4 against {plain:,} B = P × 4).",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one rank of `mapnet bench comm`")
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("out", type=Path)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    worker(args.variant, args.out, args.warmup, args.steps)


if __name__ == "__main__":
    sys.exit(main())
