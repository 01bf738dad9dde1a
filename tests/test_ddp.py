"""DDP-ready: only the latents travel. Two gloo processes train a mapped CNN with
DistributedDataParallel (tests/ddp_worker.py, also runnable with torchrun) next to a one-process
reference at the same global batch; the workers count what DDP all-reduces and broadcasts. One
launch of the two ranks runs both projections in turn (process startup is most of the time),
the reference runs in the test process; each projection is checked by its own test.

Checked: latents bit-equal on both ranks; equal to the one-process run up to float rounding;
every step all-reduces exactly the trainable count × 4 bytes; no fixed tensor (projection, θ₀,
the target's placeholders) is broadcast, before a forward or at construction.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddp_worker

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

WORKER = Path(__file__).with_name("ddp_worker.py")
WORLD_SIZE = 2
TIMEOUT_S = 120
# Adam amplifies the last-bit differences between DDP's average of two half-batch means and the
# one-process mean where a component's first moment is near zero (measured: 7.5e-7 at most, on a
# latent that moves by up to 0.25 in 5 steps); a wrong data split moves it by ~1e-2.
ATOL = 1e-5
_PIPES = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PROJECTIONS = ("structured", "dense")


def _launch(out: Path, projections: tuple[str, ...]) -> dict[str, subprocess.Popen]:
    base = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(WORKER), "--out", str(out), "--projection", *projections]
    port = str(_free_port())
    procs = {}
    for rank in range(WORLD_SIZE):
        env = base | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
        }
        procs[f"rank{rank}"] = subprocess.Popen(command, env=env, **_PIPES)
    return procs


def _wait(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int | None, str]]:
    """Exit code and output of every process; any still running at the deadline is killed."""
    deadline = time.monotonic() + TIMEOUT_S
    results = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results[name] = (proc.returncode, output)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            results[name] = (None, output + f"\n<killed after {TIMEOUT_S} s>")
    return results


def run_workers(out: Path, projections: tuple[str, ...]) -> None:
    for attempt in range(2):  # the free port can be taken between bind and use: retry once
        results = _wait(_launch(out, projections))
        failed = {name: r for name, r in results.items() if r[0] != 0}
        if not failed:
            return
        port_race = any("address already in use" in r[1].lower() for r in failed.values())
        if not (port_race and attempt == 0):
            break
    report = "\n".join(
        f"--- {name}: exit {code}\n" + "\n".join(output.splitlines()[-25:])
        for name, (code, output) in failed.items()
    )
    projection = " and ".join(projections)
    pytest.fail(f"DDP worker(s) failed ({projection} projection):\n{report}", pytrace=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """Both projections' runs (one launch) and the seconds the launch took."""
    out = tmp_path_factory.mktemp("ddp")
    started = time.perf_counter()
    # The one-process reference runs here (ddp_worker --single does the same in a fresh
    # process): an interpreter startup less, on a global RNG of its own.
    with torch.random.fork_rng():
        for projection in PROJECTIONS:
            (out / projection).mkdir()
            ddp_worker.run_single(out / projection, projection)
    run_workers(out, PROJECTIONS)
    return out, time.perf_counter() - started


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_ddp_two_ranks_match_one_process_and_only_latents_travel(
    runs: tuple[Path, float], projection: str
) -> None:
    out, elapsed = runs
    folder = out / projection
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    latents = [load_file(str(folder / f"rank{r}.safetensors")) for r in range(WORLD_SIZE)]
    single = load_file(str(folder / "single.safetensors"))
    info = ranks[0]
    trainable_bytes = info["trainable_parameters"] * 4  # float32 latents
    target_bytes = info["target_buffer_bytes"]  # the BatchNorm statistics
    legitimate = {f"target.{name}" for name in info["target_buffer_names"]}
    deviation = max((latents[0][k] - single[k]).abs().max().item() for k in single)
    print(
        f"\nDDP[{projection}] mapnet={Path(info['mapnet_file']).parent} "
        f"{WORLD_SIZE} ranks x {info['global_batch'] // WORLD_SIZE} = {info['global_batch']}, "
        f"{info['steps']} Adam steps: all-reduced B/step {info['allreduce_bytes_per_step']} "
        f"(trainable {info['trainable_parameters']} x 4 = {trainable_bytes}); "
        f"broadcast B/forward {info['broadcast_bytes_per_step']}, at init "
        f"{info['broadcast_bytes_init']} (BN buffers {target_bytes}, projection "
        f"{info['projection_bytes']}, all buffers {info['mapped_buffer_bytes']}); "
        f"max |z_ddp - z_single| {deviation:.1e}; {elapsed:.1f} s (both projections)"
    )

    assert sorted(latents[0]) == sorted(latents[1]) == sorted(single)
    for key in single:
        assert torch.equal(latents[0][key], latents[1][key]), f"{key} differs between ranks"
        assert not torch.equal(single[key], torch.zeros_like(single[key])), "nothing trained"
    assert deviation <= ATOL, f"2 ranks vs 1 process at the same global batch: {deviation:.2e}"

    for info in ranks:
        rank = info["rank"]
        assert info["allreduce_bytes_per_step"] == [trainable_bytes] * info["steps"], rank
        # No collective outside the gradient buckets (the hook's own all_reduce is the only one).
        assert info["python_allreduce_bytes_per_step"] == info["allreduce_bytes_per_step"], rank

    for info in ranks:
        rank = info["rank"]
        for step, (sent, names) in enumerate(
            zip(info["broadcast_bytes_per_step"], info["broadcast_names_per_step"])
        ):
            fixed = sorted(set(names) - legitimate)
            assert sent in (0, target_bytes), (
                f"rank {rank} step {step}: DDP broadcast {sent} B before the forward, expected "
                f"the BatchNorm buffers ({target_bytes} B) or nothing; fixed tensors sent: {fixed}"
            )
            assert sent < info["projection_bytes"], (rank, step)
        sent, names = info["broadcast_bytes_init"], info["broadcast_names_init"]
        fixed = sorted(set(names) - legitimate - {n for n in names if n.startswith("latents.")})
        assert sent in (trainable_bytes, trainable_bytes + target_bytes), (
            f"rank {rank}: DDP broadcast {sent} B at construction, expected the latents "
            f"({trainable_bytes} B) and the BatchNorm buffers ({target_bytes} B); fixed: {fixed}"
        )
