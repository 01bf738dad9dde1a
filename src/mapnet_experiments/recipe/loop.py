"""The experiments' one training loop: epochs of optimiser steps, a row of figures per epoch, and
the run state (recipe.state) committed after every epoch, so that a killed run resumes exactly.

A training mode gives what is its own as functions: `step(i)` runs the forward and backward of
the epoch's i-th step and returns its figures for the bar; `end_epoch(epoch)` evaluates and
returns the epoch's row; `state_tensors()` and `write_model(folder)` say what to save beside the
optimiser and the history; `restore(saved)` takes them back. The loop zeroes the gradients,
steps the optimiser, sets the learning rate by `lr_at(global step)` (one rate, or one per
parameter group), shows progress, checks for divergence and saves. The modes:
`recipe.trainer.Trainer` (classification, forecasting, segmentation; `mapnet train`), the
fine-tuning rows (studies.finetune, studies.finetune_text), a population of latents
(studies.space.training) and the INR meta-learning (studies.space.inr).

Divergence is checked once per epoch, when its row is known (no host sync per step): a
non-finite training loss or trainable tensor stops the run with DivergedError, and the state of
the last good epoch stays as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mapnet import files
from mapnet_experiments import progress
from mapnet_experiments.recipe.state import Saved, load_state, restore_optimizer, save_state


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or trainable tensor."""


@dataclass
class Loop:
    """`epochs` epochs of `steps` optimiser steps each, for a run whose settings are `config`
    (its JSON form, recorded with the state and compared on resume). With `state_dir`, the
    state is committed there after every epoch; `main=False` (a non-zero rank of a
    multi-process run) trains without writing or printing."""

    optimizer: torch.optim.Optimizer
    epochs: int
    steps: int
    config: dict[str, Any]
    state_dir: Path | None = None
    label: str = "epoch"
    show_progress: bool = True
    main: bool = True
    lr_at: Callable[[int], float | list[float]] | None = None
    loss_key: str = "train_loss"

    def __post_init__(self) -> None:
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    def resume(self, restore: Callable[[Saved], None]) -> bool:
        """Continue from the committed state, if there is one: the optimiser and history here,
        the rest through `restore`. Returns whether there was one."""
        if self.state_dir is None or not files.current(self.state_dir).exists():
            return False
        saved = load_state(self.state_dir, config=self.config, epochs=self.epochs)
        restore(saved)
        restore_optimizer(self.optimizer, saved.optimizer, self.state_dir)
        self.epoch, self.history = saved.epoch, saved.history
        return True

    def run(
        self,
        step: Callable[[int], dict[str, float]],
        end_epoch: Callable[[int], dict[str, Any]],
        state_tensors: Callable[[], dict[str, torch.Tensor]],
        write_model: Callable[[Path], None],
        after_step: Callable[[], None] | None = None,
        describe: Callable[[dict[str, Any]], str] | None = None,
        after_epoch: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Train to the last epoch; returns the history (one row per epoch). `after_step` runs
        after every optimiser step, `after_epoch` once an epoch's state is committed."""
        while self.epoch < self.epochs:
            shown = progress.bar(
                range(self.steps),
                enabled=self.show_progress and self.main,
                leave=False,
                desc=f"{self.label} {self.epoch + 1}/{self.epochs}",
            )
            for i in shown:
                if self.lr_at is not None:
                    rates = self.lr_at(self.epoch * self.steps + i)
                    if not isinstance(rates, list):  # one rate for every group
                        rates = [rates] * len(self.optimizer.param_groups)
                    for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
                        group["lr"] = rate
                self.optimizer.zero_grad(set_to_none=True)
                figures = step(i)
                self.optimizer.step()
                if after_step is not None:
                    after_step()
                if figures:
                    shown.set_postfix({k: f"{v:.4g}" for k, v in figures.items()}, refresh=False)
            row = end_epoch(self.epoch + 1)
            self._check_finite(row)
            self.epoch += 1
            self.history.append(row)
            if describe is not None:
                progress.say(describe(row), self.show_progress and self.main)
            if self.state_dir is not None and self.main:
                save_state(
                    self.state_dir,
                    config=self.config,
                    epoch=self.epoch,
                    history=self.history,
                    optimizer=self.optimizer,
                    tensors=state_tensors(),
                    write_model=write_model,
                )
            if after_epoch is not None:
                after_epoch()
        return self.history

    def _check_finite(self, row: dict[str, Any]) -> None:
        loss = row.get(self.loss_key)
        bad = isinstance(loss, float) and not math.isfinite(loss)
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            bad = bad or not all(bool(torch.isfinite(p).all()) for p in tensors)
        if bad:
            kept = (
                f"the state after epoch {self.epoch} is kept in {self.state_dir}"
                if self.state_dir is not None and self.epoch > 0
                else "no state was kept"
            )
            raise DivergedError(
                f"training diverged in {self.label} {self.epoch + 1}: "
                f"{self.loss_key} = {loss}, or a trainable tensor is non-finite (try a smaller "
                f"learning rate); {kept}"
            )
