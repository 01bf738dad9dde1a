"""`mapnet train`'s training mode: a paper network (CNN1/CNN2, the LSTM forecaster, the U-Net),
plain or through a latent, on the config's data set, by the one loop (recipe.loop).

`build` makes the module (seeded), `Trainer` holds the module, the mapping loss, the optimiser
and the batch order, and gives the loop its step, its epoch row and its state.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet import MappedModule
from mapnet.compress import CompressedWeights
from mapnet.loss import MappingLoss
from mapnet_experiments.data.air_quality import SINGLE_SITE_NUMERIC, SINGLE_SITE_WIND
from mapnet_experiments.models.networks import LSTMForecaster, UNet, model_factory
from mapnet_experiments.models.variants import build_variant
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.distributed import Ranks, Traffic
from mapnet_experiments.recipe.loop import Loop
from mapnet_experiments.recipe.splits import Split
from mapnet_experiments.recipe.state import Saved, load_model, save_model, take
from mapnet_experiments.recipe.tasks import CLASSIFICATION, Meter, Task, task_of

SINGLE_SITE_FEATURES = len(SINGLE_SITE_NUMERIC) + len(SINGLE_SITE_WIND)


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, task: Task = CLASSIFICATION, batch_size: int = 1000
) -> dict[str, float]:
    """The task's metrics of `model` (plain, put in eval mode) on `split`, e.g. {"loss": mean
    cross-entropy, "acc": accuracy %}; NaN for an empty split."""
    model.eval()
    meter = task.meter()
    for start in range(0, len(split), batch_size):
        meter.update(
            model(split.inputs[start : start + batch_size]),
            split.targets[start : start + batch_size],
        )
    return meter.result()


def build(config: TrainConfig) -> nn.Module:
    """The module to train: the target itself, or the target wrapped; seeded. A mapped model is
    built from the class as a factory, so θ₀ is its own initialisation under the mapping's seed
    (for CNN1, CNN2 and ResNet-50 the same values reset_parameters() regenerates)."""
    torch.manual_seed(config.seed if config.init_seed is None else config.init_seed)
    factory = target_factory(config)
    if config.mode == "plain":
        module = factory()
    else:
        module = build_variant(config.variant, factory, config.mapping)
    if config.start_from is not None:
        load_model(module, Path(config.start_from) / "checkpoint")
    if config.sparsity > 0 or config.fake_quant:
        module = CompressedWeights.pruned(
            module, config.sparsity, config.fake_quant, config.prune_scope
        )
    return module


def target_factory(config: TrainConfig) -> Callable[[], nn.Module]:
    """The target network's zero-argument factory, shaped for the config's data."""
    if config.model == "lstm":
        return functools.partial(LSTMForecaster, num_features=SINGLE_SITE_FEATURES)
    if config.model == "unet":
        task = task_of(config.dataset)
        return functools.partial(UNet, num_classes=task.num_classes, in_channels=1)
    return model_factory(config.model)


def plain_view(module: nn.Module) -> nn.Module:
    """The module to evaluate: a mapped model (any variant, compressed or not) generates its
    weights once, not once per batch."""
    materialize = getattr(module, "materialize", None)
    return materialize() if callable(materialize) else module


class Trainer:
    """Model, loss, optimiser and batch order of one run, trained by `fit` through the loop."""

    def __init__(self, config: TrainConfig, ranks: Ranks | None = None):
        self.config = config
        self.ranks = ranks or Ranks()
        self.task = task_of(config.dataset)
        started = time.perf_counter()
        self.module = build(config)
        self.build_seconds = time.perf_counter() - started  # the model and its mapping alone
        self.loss_fn = None
        self.traffic = Traffic()
        self.forward_module = self.module  # what the training forward runs through
        if self.ranks.distributed:
            if config.loss:
                raise ValueError(
                    f"the mapping loss terms {sorted(config.loss)} are not supported across "
                    "processes (their extra forwards and coefficients are not synchronised); "
                    "train them with one process"
                )
            self.forward_module = self.ranks.wrap(self.module, self.traffic)
        if isinstance(self.module, MappedModule):
            # The recipe's loss is the task loss alone unless config.loss switches terms on.
            # Across processes it only carries its state, so a run's checkpoints are the same
            # for any number of processes and resume on any.
            terms = {"stability": False, "smoothness": False, "alignment": False}
            self.loss_fn = MappingLoss(self.module, self.task.loss, **(terms | config.loss))
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.loss_fn is not None:
            params += list(self.loss_fn.parameters())
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=config.lr, weight_decay=config.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
        self.batch_order = torch.Generator().manual_seed(config.seed)
        self.loop: Loop | None = None
        self._epoch: _Epoch | None = None

    @property
    def epoch(self) -> int:
        """Epochs finished."""
        return self.loop.epoch if self.loop is not None else 0

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.loop.history if self.loop is not None else []

    def trainable_parameters(self) -> int:
        """What every table reports: latents (or weights) plus trainable loss coefficients."""
        count = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        return count + (self.loss_fn.num_trainable_parameters() if self.loss_fn else 0)

    def lr_at(self, step: int, total: int) -> float:
        if self.config.schedule == "cosine":
            return self.config.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
        return self.config.lr

    def make_loop(
        self, train_size: int, state_dir: Path | None = None, progress: bool = True
    ) -> Loop:
        """The loop over a training split of `train_size` samples (committing its state to
        `state_dir` after every epoch)."""
        config = self.config
        steps = math.ceil(train_size / config.batch_size)
        total = config.epochs * steps
        self.loop = Loop(
            self.optimizer,
            epochs=config.epochs,
            steps=steps,
            config=json.loads(json.dumps(config.to_dict())),
            state_dir=state_dir,
            show_progress=progress,
            main=self.ranks.is_main,
            lr_at=lambda step: self.lr_at(step, total),
        )
        return self.loop

    def resume(self) -> bool:
        """Continue from the loop's committed state, if any (make_loop first)."""
        assert self.loop is not None, "make_loop() first"
        return self.loop.resume(self.restore)

    def fit(
        self,
        splits: dict[str, Split],
        evaluate_test: bool = True,
        after_step: Callable[[], None] | None = None,
        started: float | None = None,
        after_epoch: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Train to the last epoch (make_loop first); returns the history. The validation and
        (with `evaluate_test`) test figures are recorded after each epoch by rank 0."""
        assert self.loop is not None, "make_loop() first"
        started = time.perf_counter() if started is None else started
        elapsed_before = self.history[-1]["seconds"] if self.history else 0.0
        train = splits["train"]

        def step(i: int) -> dict[str, float]:
            if i == 0:
                self.start_epoch(train)
            return self.step(i)

        def end_epoch(epoch: int) -> dict[str, Any]:
            row = self.end_epoch(epoch)
            if self.ranks.is_main:
                view = plain_view(self.module)
                for name, value in evaluate(view, splits["val"], self.task).items():
                    row[f"val_{name}"] = value
                tested = evaluate(view, splits["test"], self.task) if evaluate_test else {}
                for name in self.task.metrics:
                    row[f"test_{name}"] = tested.get(name)
                row["epoch"] = epoch
                row["seconds"] = elapsed_before + time.perf_counter() - started
            return self.ranks.from_main(row)

        key = self.task.primary
        return self.loop.run(
            step,
            end_epoch,
            self.state_tensors,
            lambda folder: save_model(self.module, folder),
            after_step=after_step,
            after_epoch=after_epoch,
            describe=lambda row: (
                f"  epoch {row['epoch']}: train {key} {row[f'train_{key}']:.4g}  val {key} "
                f"{row[f'val_{key}']:.4g}  ({row['seconds']:.0f} s)"
            ),
        )

    # ------------------------------------------------------------ one epoch, step by step

    def start_epoch(self, split: Split) -> None:
        order = torch.randperm(len(split), generator=self.batch_order)
        self._epoch = _Epoch(split, order, self.task.meter())

    def step(self, i: int) -> dict[str, float]:
        """Forward and backward of the current epoch's i-th batch (the loop steps)."""
        assert self._epoch is not None, "start_epoch() first"
        epoch, size = self._epoch, self.config.batch_size
        batch = epoch.order[i * size : (i + 1) * size]
        if self.ranks.distributed:
            logits, y, task = self._shared_step(epoch.split, batch)
        else:
            x, y = epoch.split.inputs[batch], epoch.split.targets[batch]
            if self.loss_fn is not None:
                out = self.loss_fn(x, y)
                loss, logits = out.total, out.outputs
                for key, value in out.values.items():
                    epoch.terms[key] = epoch.terms.get(key, 0.0) + value * len(y)
                task = out.values.get("task", loss.item())
            else:
                logits = self.module(x)
                loss = self.task.loss(logits, y)
                task = loss.item()
            loss.backward()
        if len(y):
            epoch.meter.update(logits.detach(), y, loss_mean=task)  # the training-mode loss
        epoch.seen += len(y)
        return epoch.meter.result()

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """The finished epoch's training figures (summed over ranks) and learning rate."""
        assert self._epoch is not None
        current, self._epoch = self._epoch, None
        current.meter.sum_over(self.ranks)
        lr = self.optimizer.param_groups[0]["lr"]
        row = {f"train_{k}": v for k, v in current.meter.result().items()} | {"lr": lr}
        row.update({f"loss_{k}": v / current.seen for k, v in current.terms.items() if k != "task"})
        return row

    def _shared_step(
        self, split: Split, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Forward and backward of a multi-process run on this rank's share of `batch`. Its mean
        loss is weighted by its share of the batch, so DDP's average over ranks is the gradient
        of the whole batch's mean. A rank whose share is empty (a last batch smaller than the
        number of ranks) takes part with one sample at weight 0 (BatchNorm statistics see it).
        Returns this rank's outputs, targets and mean loss."""
        idx = self.ranks.shard(batch)
        empty = len(idx) == 0
        x, y = (
            split.inputs[idx if not empty else batch[:1]],
            split.targets[idx if not empty else batch[:1]],
        )
        whole = self.task.scored(split.targets[batch])
        share = 0.0 if empty or whole == 0 else self.task.scored(y) / whole
        try:
            logits = self.forward_module(x)  # DDP may broadcast buffers here
            loss = self.task.loss(logits, y)
            (loss * (share * self.ranks.world_size)).backward()  # the all-reduce runs here
        except RuntimeError as error:
            lost = self.ranks.lost(error)
            if lost is None:
                raise
            raise lost from None
        self.traffic.step_done()
        if empty:
            return logits[:0], y[:0], 0.0
        return logits, y, loss.item()

    # ------------------------------------------------------------ what the state holds

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "rng.batch_order": self.batch_order.get_state(),
            "rng.torch": torch.get_rng_state(),
        }
        if self.loss_fn is not None:
            for key, value in self.loss_fn.state_dict().items():
                tensors[f"loss.{key}"] = value.detach().clone()
        return tensors

    def restore(self, saved: Saved) -> None:
        load_model(self.module, saved.model)
        where = saved.model.parent
        self.batch_order.set_state(take(saved.tensors, "rng.batch_order", where))
        torch.set_rng_state(take(saved.tensors, "rng.torch", where))
        if self.loss_fn is not None:
            prefix = "loss."
            self.loss_fn.load_state_dict(
                {k[len(prefix) :]: v for k, v in saved.tensors.items() if k.startswith(prefix)}
            )


class _Epoch:
    """What one epoch accumulates: its batch order, its meter, the loss terms, samples seen."""

    def __init__(self, split: Split, order: torch.Tensor, meter: Meter):
        self.split, self.order, self.meter = split, order, meter
        self.terms: dict[str, float] = {}
        self.seen = 0
