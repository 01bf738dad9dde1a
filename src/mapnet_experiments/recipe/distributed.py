"""Multi-process training: `mapnet train --nproc N`, or `torchrun --nproc-per-node N -m
mapnet_experiments.cli train …`, with DistributedDataParallel over gloo: the recipe trains on
the CPU. A training loop of one's own on GPUs uses NCCL the same way
(docs/examples/ddp_torchrun.py picks it when CUDA is there).

A mapped model trains only its latent, so each step all-reduces d floats (CNN2 at d = 2048:
8 KiB) instead of P (108,618: 424 KiB); the fixed mapping is never sent (paper §2.2: W is
regenerated from its seed on every rank).

- Data: every rank holds the data set and trains on its own contiguous 1/N of each global
  batch (the batch order is the same seeded permutation on every rank), so N processes at
  batch B take the steps one process takes at batch B. Each rank's loss is weighted by its
  share of the batch, which makes DDP's gradient average equal the one-process gradient of
  the batch mean (exact up to float rounding; BatchNorm layers normalise with each rank's
  own slice, as in any DDP run without SyncBatchNorm).
- Saving: rank 0 evaluates, writes checkpoints and metrics, and sends each epoch's figures to
  the other ranks; an interrupted run resumes from its atomic checkpoint on any N.
- Failure: when one rank dies, the launcher stops the others and says which rank failed and
  which checkpoint is intact; a rank that loses its peers mid-step says so instead of a gloo
  traceback.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from mapnet import exclude_fixed_from_ddp

# A peer that has died makes gloo fail at once (its socket closes); the timeout covers a peer
# that hangs. Rank 0 evaluates while the others wait in the next step's all-reduce.
TIMEOUT = datetime.timedelta(minutes=10)
# After one rank fails, the others get this long to notice and exit with their own message.
GRACE_SECONDS = 10.0
# A rank that stops only because it lost its peers exits with this code, so the launcher names
# the rank that failed first, not the ones that followed it.
LOST_PEERS_EXIT = 75


class RankLostError(RuntimeError):
    """A collective failed because another rank stopped: names this rank and what to do."""


@dataclass
class Traffic:
    """Bytes the gradient all-reduce sends per step, counted by a DDP communication hook."""

    steps: int = 0
    allreduce_bytes: int = 0  # since the start
    last_step_bytes: int = 0
    max_step_bytes: int = 0
    _at_last_step: int = 0

    def step_done(self) -> None:
        self.last_step_bytes = self.allreduce_bytes - self._at_last_step
        self.max_step_bytes = max(self.max_step_bytes, self.last_step_bytes)
        self._at_last_step = self.allreduce_bytes
        self.steps += 1


def _counting_allreduce(traffic, bucket):  # type: ignore[no-untyped-def]
    # Unannotated on purpose: DDP checks the hook's annotations against dist.GradBucket and
    # Future[Tensor], and postponed annotations would be strings.
    buffer = bucket.buffer()
    traffic.allreduce_bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)  # None: the default (WORLD) group


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; Ranks() is the one-process run."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls) -> Ranks:
        """RANK / WORLD_SIZE as torchrun (or `mapnet train --nproc`) sets them; joins the
        process group when there are several ranks."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        if not dist.is_initialized():  # gloo: the recipe's tensors live on the CPU
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
        return cls(rank, world_size)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch's sample indices."""
        if not self.distributed:
            return indices
        return indices.tensor_split(self.world_size)[self.rank]

    def wrap(self, module: nn.Module, traffic: Traffic) -> nn.Module:
        """DDP over `module`, fixed mapping tensors excluded, all-reduced bytes counted."""
        exclude_fixed_from_ddp(module)
        ddp = DistributedDataParallel(module)
        ddp.register_comm_hook(traffic, _counting_allreduce)
        return ddp

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, in place."""
        if self.distributed:
            self.collective(dist.all_reduce, values)
        return values

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (JSON-like values: the epoch's figures)."""
        if not self.distributed:
            return obj
        box = [obj]
        self.collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            self.collective(dist.barrier)

    def collective(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """A collective whose failure (a peer died or hung) is a RankLostError."""
        try:
            return call(*args, **kwargs)
        except (RuntimeError, dist.DistError) as error:
            raise self.lost(error) or RankLostError(
                f"rank {self.rank} of {self.world_size}: a collective failed ({error})"
            ) from None

    def lost(self, error: BaseException) -> RankLostError | None:
        """The RankLostError an error from a step means, or None if it is not about the peers
        (a shape error, say: that one is raised as it is)."""
        text = str(error)
        if isinstance(error, dist.DistError) or "Connection" in text or "peer" in text:
            cause = "a peer closed its connection: another rank stopped"
        elif "gloo" in text.lower() and ("timed out" in text.lower() or "timeout" in text.lower()):
            cause = f"no answer from a peer within {TIMEOUT}"
        else:
            return None
        return RankLostError(
            f"rank {self.rank} of {self.world_size} lost the other ranks ({cause})"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == LOST_PEERS_EXIT:
        return f"exited with code {code} (it lost its peers)"
    return f"exited with code {code}"


def launch(
    argv: list[str],
    nproc: int,
    resume_hint: Callable[[], str] | None = None,
    module: str = "mapnet_experiments.cli",
) -> int:
    """Run `python -m <module> <argv>` (by default `mapnet <argv>`) as `nproc` ranks on this
    machine (what torchrun does, without its agent): each child gets RANK, WORLD_SIZE,
    MASTER_ADDR/PORT, and its share of the CPU threads unless OMP_NUM_THREADS is set. Returns 0
    when every rank finished; otherwise stops the remaining ranks, says which failed (and
    `resume_hint()`), and returns 1."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    port = str(free_port())
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for rank in range(nproc):
        env = os.environ | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": threads,
        }
        command = [sys.executable, "-m", module, *argv]
        procs.append(subprocess.Popen(command, env=env))

    def stop_on_signal(signum: int, frame: Any) -> None:  # SIGTERM / SIGHUP: take the ranks along
        _stop(procs)
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()  # signals: main only
    signals = (signal.SIGTERM, signal.SIGHUP) if main_thread else ()
    handlers = {sig: signal.signal(sig, stop_on_signal) for sig in signals}
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            if any(code not in (None, 0) for code in codes):
                return _stop_after_failure(procs, resume_hint)
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _stop(procs: list[subprocess.Popen], grace: float = GRACE_SECONDS) -> set[int]:
    """Terminate every rank still running; kill those that outlive `grace` seconds. Returns
    the ranks stopped here (their exit codes are this launcher's doing, not a failure)."""
    stopped = {rank for rank, proc in enumerate(procs) if proc.poll() is None}
    for rank in stopped:
        procs[rank].terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return stopped


def _stop_after_failure(
    procs: list[subprocess.Popen], resume_hint: Callable[[], str] | None
) -> int:
    """Give the other ranks GRACE_SECONDS to stop on their own, stop the rest, and name the
    rank that failed: never one this launcher stopped (a rank still busy when the grace ran
    out, say finishing an evaluation, is not the cause), and not one that only lost its peers
    unless every failure is that."""
    deadline = time.monotonic() + GRACE_SECONDS
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            break
    stopped = _stop(procs)
    failed = [
        (rank, proc.returncode)
        for rank, proc in enumerate(procs)
        if proc.returncode != 0 and rank not in stopped
    ]
    causes = [(rank, code) for rank, code in failed if code != LOST_PEERS_EXIT] or failed
    rank, code = causes[0]
    message = f"mapnet: rank {rank} of {len(procs)} {_exit_text(code)}; all stopped."
    if resume_hint is not None:
        message += f" {resume_hint()}"
    print(message, file=sys.stderr)
    return 1
