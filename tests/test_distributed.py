"""`mapnet train --nproc N` and torchrun: DDP over gloo through the one training loop.

Checked: two processes reach the one-process latent at the same global batch (float rounding
only) and all-reduce exactly d float32s per step; torchrun gives the same run as --nproc;
killing one rank ends the job with a message naming it, leaves the last checkpoint loadable,
and --resume finishes the run; the shard, loss-weighting and error paths.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mapnet.config import MappingConfig
from mapnet_experiments.cli.main import main
from mapnet_experiments.cli.train import _without_nproc
from mapnet_experiments.recipe import distributed
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.distributed import Ranks, _exit_text
from mapnet_experiments.recipe.state import load_model, load_state, saved_epoch
from mapnet_experiments.recipe.tasks import Task
from mapnet_experiments.recipe.trainer import Trainer
from test_train_cli import write_tiny_dataset

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)
# SGD keeps the last-bit differences between DDP's average of the ranks' weighted gradients
# and the one-process gradient at ~1e-7 (Adam would amplify them where a gradient is near
# zero). At batch 47 the shards are uneven (24 / 23) and the last batch of the epoch (1 sample)
# leaves rank 1 empty: without the loss weighting the latents differ by ~1e-2.
ATOL = 1e-5
SGD = ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.5"]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_args(data: Path, out: Path, epochs: int = 1, batch: int = 100) -> list[str]:
    return [
        "train", "--data-dir", str(data), "--dataset", "tiny", "--epochs", str(epochs),
        "--val-size", "200", "--batch-size", str(batch), "--latent-dim", "64", "--quiet",
        "--out", str(out),
    ]  # fmt: skip


def mapnet(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mapnet_experiments.cli", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def latent(out: Path) -> torch.Tensor:
    return load_file(str(out / "checkpoint" / "tensors.safetensors"))["latents.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))  # 800 train: 8 steps of 100


@pytest.fixture(scope="module")
def two_processes(
    data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess]:
    """`mapnet train --nproc 2` at batch 47 with SGD, run once: the one-process comparison and
    the torchrun comparison both check it (each launch costs interpreter startups)."""
    folder = tmp_path_factory.mktemp("nproc")
    two = folder / "two"
    return two, launched_here([*run_args(data, two, batch=47), *SGD, "--nproc", "2"], folder)


def launched_here(args: list[str], logs: Path) -> subprocess.CompletedProcess:
    """`mapnet *args` with this process as the launcher (an interpreter startup less than a
    `mapnet` subprocess): its exit code, and what it and its ranks wrote to stdout and stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    own = {1: io.StringIO(), 2: io.StringIO()}
    try:
        with (
            open(logs / "stdout", "w+") as out,
            open(logs / "stderr", "w+") as err,
            pytest.MonkeyPatch.context() as patch,
            contextlib.redirect_stdout(own[1]),
            contextlib.redirect_stderr(own[2]),
        ):
            patch.setenv("PYTHONUNBUFFERED", "1")
            os.dup2(out.fileno(), 1)  # the ranks inherit these
            os.dup2(err.fileno(), 2)
            code = main(args)
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
    stdout = own[1].getvalue() + (logs / "stdout").read_text()
    stderr = own[2].getvalue() + (logs / "stderr").read_text()
    return subprocess.CompletedProcess(["mapnet", *args], code, stdout, stderr)


def test_two_processes_reach_the_one_process_latent_and_send_only_the_latent(
    data: Path, two_processes: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    one = tmp_path / "one"
    two, done = two_processes
    assert main([*run_args(data, one, batch=47), *SGD]) == 0  # 800 = 17 × 47 + 1
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 processes" in done.stdout and "all-reducing 256 bytes per step" in done.stdout
    deviation = (latent(one) - latent(two)).abs().max().item()
    assert latent(one).abs().max().item() > 0  # it trained
    assert deviation <= ATOL, f"2 ranks vs 1 process at global batch 47: {deviation:.2e}"
    result = json.loads((two / "results.json").read_text())
    assert result["processes"] == 2
    assert result["allreduce_bytes_per_step"] == 64 * 4  # the latent's float32 gradient only
    single = json.loads((one / "results.json").read_text())
    # Rank 0 reports the whole epoch: the meters of both ranks are summed.
    assert result["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    assert result["train_acc"] == single["train_acc"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_torchrun_runs_the_same_job_as_nproc(
    data: Path, two_processes: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    (nproc, done), torchrun = two_processes, tmp_path / "torchrun"
    assert done.returncode == 0, done.stderr[-2000:]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mapnet_experiments.cli", *run_args(data, torchrun, batch=47), *SGD,
    ]  # fmt: skip
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(latent(nproc), latent(torchrun))


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children += [int(child) for child in text]
    return children


def _ranks_of(out: Path) -> list[int]:
    """This process's children that run the job writing to `out`, in start order."""
    ranks = []
    for pid in _children(os.getpid()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if str(out).encode() in command:
            ranks.append(pid)
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize(
    ("model", "resume_with"),
    [
        ("cnn2", 1),  # resumed by one process: the state does not depend on the count
        ("smallcnn-4-8-8", 2),  # BatchNorm: DDP broadcasts its statistics in every forward
    ],
)
def test_killing_a_rank_stops_the_job_clearly_and_resume_finishes_it(
    tmp_path: Path,
    model: str,
    resume_with: int,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    data = write_tiny_dataset(tmp_path / "data", train=2000)  # 18 steps of 100 per epoch
    out = tmp_path / "run"
    base = [*run_args(data, out, epochs=3), "--model", model]
    # `mapnet train --nproc 2` runs its launcher in a thread of this process (an interpreter
    # startup less than a launcher process); the ranks are this process's children, and what
    # they and the launcher write to stderr is captured here.
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    codes: list[int] = []
    launcher = threading.Thread(target=lambda: codes.append(main([*base, "--nproc", "2"])))
    launcher.daemon = True
    launcher.start()
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists():  # rank 0 has saved epoch 1
        assert launcher.is_alive() and time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.05)
    ranks = _ranks_of(out)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)  # the children start in rank order
    launcher.join(timeout=60)
    message = capfd.readouterr().err
    assert not launcher.is_alive(), f"the launcher still waits 60 s after the kill: {message}"
    assert codes == [1], message
    # Rank 0 names the loss (not a gloo traceback); the launcher names the rank killed.
    assert "rank 0 of 2 lost the other ranks" in message, message
    assert "Traceback" not in message, message
    assert "mapnet: rank 1 of 2 was killed by SIGKILL; all stopped." in message, message
    epoch = saved_epoch(out)
    assert epoch in (1, 2), message
    assert f"checkpoint after epoch {epoch}" in message and "--resume" in message
    assert not (out / "results.json").exists()

    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    recorded = json.loads(json.dumps(config.to_dict()))
    saved = load_state(out / "state", config=recorded, epochs=config.epochs)  # intact: loads
    load_model(Trainer(config).module, saved.model)
    assert saved.epoch == epoch and len(saved.history) == epoch

    # Resumed from this process (its own launcher for two ranks): one interpreter startup less.
    assert main([*base, "--nproc", str(resume_with), "--resume"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [row["epoch"] for row in result["history"]] == [1, 2, 3]
    assert result["history"][:epoch] == saved.history
    assert not (out / "state").exists()


def test_shards_split_every_batch_without_overlap() -> None:
    batch = torch.arange(10)
    assert torch.equal(Ranks().shard(batch), batch)
    parts = [Ranks(rank, 3).shard(batch) for rank in range(3)]
    assert torch.equal(torch.cat(parts), batch)
    assert [len(p) for p in parts] == [4, 3, 3]


def test_scored_counts_what_the_batch_mean_averages_over() -> None:
    assert Task("classification").scored(torch.tensor([1, 2, 3])) == 3
    masks = torch.tensor([[[0, 255], [3, 255]]])
    assert Task("segmentation", num_classes=4).scored(masks) == 2


def test_mapping_loss_terms_are_refused_across_processes() -> None:
    config = TrainConfig(mapping=MappingConfig(latent_dim=8), loss={"stability": True})
    with pytest.raises(ValueError, match="not supported across processes"):
        Trainer(config, Ranks(0, 2))


def test_nproc_under_torchrun_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--nproc", "2"]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


def test_launcher_helpers() -> None:
    assert _without_nproc(["train", "--nproc", "2", "--epochs", "3", "--nproc=4"]) == [
        "train",
        "--epochs",
        "3",
    ]
    assert _exit_text(-9) == "was killed by SIGKILL"
    assert _exit_text(75) == "exited with code 75 (it lost its peers)"
    assert _exit_text(3) == "exited with code 3"


def test_comm_bench_counts_the_latent_against_every_weight() -> None:
    from mapnet_experiments.bench import comm as comm_bench

    mapped = comm_bench.measure("mapped", 2, warmup=0, steps=1)
    assert mapped["allreduce_bytes_per_step"] == comm_bench.LATENT_DIM * 4
    assert mapped["trainable_parameters"] == comm_bench.LATENT_DIM
    runs = [
        mapped | {"processes": 2},
        mapped | {"processes": 1, "allreduce_bytes_per_step": 0, "step_ms": 10.0},
        {"variant": "plain", "processes": 2, "trainable_parameters": 108_618,
         "allreduce_bytes_per_step": 434_472, "step_ms": 4.0},
        {"variant": "plain", "processes": 1, "trainable_parameters": 108_618,
         "allreduce_bytes_per_step": 0, "step_ms": 6.0},
    ]  # fmt: skip
    rows = {row["variant"]: row for row in comm_bench.summarise(runs)}
    assert rows["plain"]["allreduce_bytes_per_step"] == 434_472  # the 2-rank figure
    assert rows["plain"]["step_ms"] == {"1": 6.0, "2": 4.0}
    data = {"rows": list(rows.values()), "command": "c", "date": "d", "batch": 128, "steps": 1}
    text = "\n".join(comm_bench.report_section(data))
    assert "| plain | 108,618 | 434,472 B | 6.0 ms | 4.0 ms |" in text
    assert "53× fewer bytes" in text


def test_the_torchrun_example_trains_and_sends_only_the_latent(tmp_path: Path) -> None:
    example = Path(__file__).parents[1] / "docs" / "examples" / "ddp_torchrun.py"
    assert len(example.read_text().splitlines()) <= 30
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(example),
    ]  # fmt: skip
    env = ENV | {"OUT": str(tmp_path / "run")}
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 ranks" in done.stdout and "all-reduced 128 bytes per step" in done.stdout  # 32 × 4
    assert (tmp_path / "run" / "tensors.safetensors").is_file()


def test_the_launcher_names_the_rank_that_failed_not_one_it_stopped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kill test once saw rank 0 blamed in CI: rank 0, still finishing its evaluation when
    the grace period ran out, was stopped by the launcher, and a SIGTERM it got from the
    launcher counted as its failure. A rank the launcher stops is never the cause."""
    monkeypatch.setattr(distributed, "GRACE_SECONDS", 0.5)
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed = subprocess.Popen(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    )
    killed.wait()
    assert distributed._stop_after_failure([busy, killed], None) == 1
    assert busy.returncode == -signal.SIGTERM  # the launcher stopped it
    assert capsys.readouterr().err == "mapnet: rank 1 of 2 was killed by SIGKILL; all stopped.\n"
