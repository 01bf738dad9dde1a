"""One process of the DDP check (tests/test_ddp.py), or the single-process reference.

    torchrun --nproc_per_node=2 tests/ddp_worker.py --out DIR     # the 2-process gloo run
    python tests/ddp_worker.py --single --out DIR                 # one process, same global batch

--projection takes one or more projections (default: structured); each is run in turn in the
same processes (one process group), its files written under DIR/<projection>/.

The distributed run reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment
(torchrun sets them; the test sets them itself). Every process trains the same seeded mapped CNN
for STEPS Adam steps on one fixed global batch of GLOBAL_BATCH samples, rank r taking the r-th
contiguous slice, and writes to DIR/<projection>:

    rank{r}.safetensors / single.safetensors   the final latents ("latents.0", ...)
    rank{r}.json / single.json                  what was communicated (see `Traffic.report`)

Traffic is counted where DDP sends it:
- all-reduce: a DDP communication hook that adds bucket.buffer()'s bytes, then runs the
  default `allreduce_hook` (so training is unchanged). Python-level dist.all_reduce calls are
  counted as well, to catch any collective outside the gradient buckets.
- broadcast: DDP broadcasts module states through `torch.distributed._broadcast_coalesced`,
  once at construction (`_sync_module_states`: parameters and buffers) and before every forward
  when forward_sync_buffers is on (the default; `_sync_buffers` -> `_sync_module_buffers` ->
  `_default_broadcast_coalesced` -> `_distributed_broadcast_coalesced`), always with the names in
  `module._ddp_params_and_buffers_to_ignore` left out. Both call sites look the function up on
  the `torch.distributed` module at call time, so wrapping that attribute sees every tensor;
  dist.broadcast is wrapped too.

BatchNorm: the model has a persistent BatchNorm (running statistics + num_batches_tracked), the
one kind of buffer DDP should broadcast. In training mode each rank would normalise with its own
half-batch statistics, and the 2-process run could not equal the single process at the same
global batch. The BatchNorm layers therefore run in eval mode on running statistics calibrated
once before wrapping (as when fine-tuning with frozen statistics): the forward is then
per-sample, the mean loss over 16 equals the mean of the two ranks' means over 8, and DDP's
gradient average equals the single-process gradient up to float rounding. DDP still broadcasts
the statistics before every forward (it does so in eval mode too), so the broadcast count is
unaffected.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.modules.batchnorm import _BatchNorm

import mapnet

STEPS = 5
GLOBAL_BATCH = 16
LATENT_DIM = 64
LR = 0.05
SEED = 0
CLASSES = 5


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 5)
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def build(projection: str) -> tuple[nn.Module, mapnet.MappedModule]:
    """The same model on every process: seeded weights, BN statistics calibrated, BN in eval."""
    torch.manual_seed(SEED)
    model = TinyCNN()
    calibration = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        model.train()(calibration)  # running statistics away from their (0, 1) start
    config = mapnet.MappingConfig(latent_dim=LATENT_DIM, projection=projection)
    mapped = mapnet.wrap(model, config)
    for module in mapped.modules():
        if isinstance(module, _BatchNorm):
            module.eval()  # see the module docstring
    return model, mapped


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=generator)
    y = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator)
    return x, y


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _key(tensor: torch.Tensor) -> tuple:
    # DDP's init sync passes .detach()ed copies of the handles: match on storage, not identity.
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)


class Traffic:
    """Bytes DDP all-reduces and broadcasts, by phase ("init", then one entry per step)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.phase: int | str = "init"
        self.hook_allreduce: dict[Any, int] = {}
        self.python_allreduce: dict[Any, int] = {}
        self.broadcast: dict[Any, int] = {}
        self.broadcast_names: dict[Any, list[str]] = {}

    def _names(self) -> dict[tuple, str]:
        # Rebuilt per call: a buffer may be created or reassigned after construction.
        states = [*self.module.named_parameters(), *self.module.named_buffers()]
        return {_key(t): name for name, t in states}

    def add(self, table: dict[Any, int], count: int) -> None:
        table[self.phase] = table.get(self.phase, 0) + count

    def add_broadcast(self, tensors: list[torch.Tensor]) -> None:
        self.add(self.broadcast, sum(_nbytes(t) for t in tensors))
        names = self._names()
        listed = self.broadcast_names.setdefault(self.phase, [])
        listed.extend(names.get(_key(t), f"<unnamed {tuple(t.shape)}>") for t in tensors)

    def install(self) -> None:
        """Wrap the torch.distributed functions DDP broadcasts and all-reduces through."""
        broadcast_coalesced, broadcast, all_reduce = self.originals = (
            dist._broadcast_coalesced,
            dist.broadcast,
            dist.all_reduce,
        )

        def counting_broadcast_coalesced(process_group, tensors, *args, **kwargs):
            tensors = list(tensors)
            self.add_broadcast(tensors)
            try:
                return broadcast_coalesced(process_group, tensors, *args, **kwargs)
            except RuntimeError as error:  # e.g. gloo: "Invalid scalar type" for an int16 buffer
                names = self._names()
                error.add_note(
                    f"while DDP broadcast ({self.phase}): "
                    + ", ".join(
                        f"{names.get(_key(t), '?')} {str(t.dtype).removeprefix('torch.')}"
                        f"{list(t.shape)}"
                        for t in tensors
                    )
                )
                raise

        def counting_broadcast(tensor, *args, **kwargs):
            self.add_broadcast([tensor])
            return broadcast(tensor, *args, **kwargs)

        def counting_all_reduce(tensor, *args, **kwargs):
            self.add(self.python_allreduce, _nbytes(tensor))
            return all_reduce(tensor, *args, **kwargs)

        dist._broadcast_coalesced = counting_broadcast_coalesced
        dist.broadcast = counting_broadcast
        dist.all_reduce = counting_all_reduce

    def uninstall(self) -> None:
        """Put the wrapped functions back (the next projection's run counts afresh)."""
        dist._broadcast_coalesced, dist.broadcast, dist.all_reduce = self.originals

    def per_step(self, table: dict[Any, int], steps: int) -> list[int]:
        return [table.get(step, 0) for step in range(steps)]


def counting_allreduce_hook(traffic, bucket):
    # Unannotated on purpose: DDP compares the annotations with dist.GradBucket and
    # Future[Tensor], and `from __future__ import annotations` would make them strings.
    traffic.add(traffic.hook_allreduce, _nbytes(bucket.buffer()))
    return default_hooks.allreduce_hook(None, bucket)  # None: the default (WORLD) group


def _summary(model: nn.Module, mapped: mapnet.MappedModule, projection: str) -> dict[str, Any]:
    trainable = mapped.num_trainable_parameters()
    return {
        "mapnet_file": mapnet.__file__,
        "torch": torch.__version__,
        "projection": projection,
        "steps": STEPS,
        "global_batch": GLOBAL_BATCH,
        "trainable_parameters": trainable,
        "trainable_bytes": sum(_nbytes(p) for p in mapped.parameters() if p.requires_grad),
        "projection_bytes": mapped.projection_bytes(),
        # The wrapped model's own buffers (BatchNorm statistics): what DDP may legitimately sync.
        "target_buffer_bytes": sum(_nbytes(b) for b in model.buffers()),
        "target_buffer_names": [name for name, _ in model.named_buffers()],
        "mapped_buffer_bytes": sum(_nbytes(b) for b in mapped.buffers()),
        "ddp_ignore": sorted(getattr(mapped, "_ddp_params_and_buffers_to_ignore", None) or []),
    }


def _save_latents(mapped: mapnet.MappedModule, path: Path) -> None:
    tensors = {
        f"latents.{i}": z.detach().clone().contiguous() for i, z in enumerate(mapped.latents)
    }
    save_file(tensors, str(path))


def run_single(out: Path, projection: str) -> None:
    model, mapped = build(projection)
    x, y = global_batch()
    optimizer = torch.optim.Adam(mapped.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(mapped(x), y)  # mean over the global batch
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    _save_latents(mapped, out / "single.safetensors")
    report = _summary(model, mapped, projection) | {"world_size": 1, "losses": losses}
    (out / "single.json").write_text(json.dumps(report, indent=1))


def run_distributed(out: Path, projections: list[str]) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        if GLOBAL_BATCH % world_size:
            raise ValueError(f"global batch {GLOBAL_BATCH} does not split over {world_size}")
        for projection in projections:
            (out / projection).mkdir(parents=True, exist_ok=True)
            run_ranks(out / projection, projection, rank, world_size)
    finally:
        dist.destroy_process_group()


def run_ranks(out: Path, projection: str, rank: int, world_size: int) -> None:
    """One projection's DDP run on this rank (the process group already up)."""
    model, mapped = build(projection)
    traffic = Traffic(mapped)  # names relative to DDP's module, as in the ignore list
    traffic.install()
    ddp = torch.nn.parallel.DistributedDataParallel(mapped)  # CPU: no device_ids
    ddp.register_comm_hook(traffic, counting_allreduce_hook)
    x, y = global_batch()
    local = GLOBAL_BATCH // world_size
    x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
    optimizer = torch.optim.Adam(ddp.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        traffic.phase = step
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(ddp(x), y)  # mean over this rank's slice
        loss.backward()  # DDP averages: = the gradient of the mean over the global batch
        optimizer.step()
        losses.append(loss.item())
    traffic.phase = "end"
    traffic.uninstall()  # the next projection's run counts afresh
    _save_latents(mapped, out / f"rank{rank}.safetensors")
    report = _summary(model, mapped, projection) | {
        "rank": rank,
        "world_size": world_size,
        "losses": losses,
        "allreduce_bytes_per_step": traffic.per_step(traffic.hook_allreduce, STEPS),
        "python_allreduce_bytes_per_step": traffic.per_step(traffic.python_allreduce, STEPS),
        "broadcast_bytes_init": traffic.broadcast.get("init", 0),
        "broadcast_bytes_per_step": traffic.per_step(traffic.broadcast, STEPS),
        "broadcast_names_init": traffic.broadcast_names.get("init", []),
        "broadcast_names_per_step": [
            traffic.broadcast_names.get(step, []) for step in range(STEPS)
        ],
        "other_phases": {
            str(k): v for k, v in traffic.broadcast.items() if k not in ("init", *range(STEPS))
        },
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--single", action="store_true", help="the one-process reference")
    parser.add_argument(
        "--projection",
        nargs="+",
        default=["structured"],
        choices=("structured", "dense"),
        help="one or more projections, run in turn (files under OUT/<projection>/)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.single:
        for projection in args.projection:
            (args.out / projection).mkdir(parents=True, exist_ok=True)
            run_single(args.out / projection, projection)
    else:
        run_distributed(args.out, args.projection)


if __name__ == "__main__":
    sys.exit(main())
