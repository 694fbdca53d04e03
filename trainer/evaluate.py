"""Evaluation: when to run it, running it over whole splits, and tracking the best step.

The task decides what a batch contributes (``Task.evaluation``: ``update`` / ``compute``);
this module owns the cadence, the sharding over ranks (every sample counted exactly once,
ZeRO-3 ranks in lock step), early stopping and the stop at a target (``eval.stop_at``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .config import RunConfig
from .data import eval_loader
from .startup import CLOCK
from .tasks import EvalResult, LabelInfo, Task


def track_best(
    state, value: float, step: int, mode: str, patience: int | None, final: bool = False
) -> None:
    """Record the best evaluation on ``state``; after ``patience`` evaluations without
    improvement set ``stopped_early`` (the final evaluation updates the best but never
    counts against it)."""
    better = state.best_metric is None or (
        value > state.best_metric if mode == "max" else value < state.best_metric
    )
    if better:
        state.best_metric, state.best_step, state.bad_evals = value, step, 0
    elif not final:
        state.bad_evals += 1
        if patience and state.bad_evals >= patience:
            state.stopped_early = True


def reaches(value: float, target: float, mode: str) -> bool:
    """Whether ``value`` is at or past ``target`` in the metric's direction."""
    return value >= target if mode == "max" else value <= target


class Evaluator:
    def __init__(
        self,
        cfg: RunConfig,
        task: Task,
        engine,
        splits: dict[str, Any],
        labels: LabelInfo | None,
        rank: int,
        world: int,
        collate,
        loader_options: dict[str, Any],
    ):
        self.task, self.engine, self.labels = task, engine, labels
        self.every = cfg.eval.every_steps
        self.patience = cfg.eval.early_stopping_patience
        self.stop_at = cfg.eval.stop_at
        self.metric, self.mode = cfg.eval_metric()
        # an eval forward keeps no activations for backward: the training micro batch fits
        micro = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
        self.loaders = {
            split: eval_loader(ds, rank, world, micro, collate, loader_options)
            for split, ds in splits.items()
        }

    def should_evaluate(self, step: int, last: bool, preempted: bool = False) -> bool:
        """Periodic evaluations; the last step's is the final one, run by the finish; none
        when preempted (the signal's lead time is for the checkpoint)."""
        return bool(self.every) and step % self.every == 0 and not last and not preempted

    def has_split(self, split: str) -> bool:
        return split in self.loaders

    @torch.no_grad()
    def evaluate(self, split: str) -> EvalResult:
        """Metrics over exactly the whole split across ranks (placeholders never counted)."""
        loader, valid = self.loaders[split]
        self.engine.eval()
        acc = self.task.evaluation(self.engine.device, self.labels)
        # labels and the task's evaluation-only columns stay out of the forward: the model
        # would otherwise compute its own loss (for a causal LM a second fp32 copy of the
        # [batch, seq, vocab] logits); the task's evaluation computes it from the logits
        hidden = {"labels", *self.task.eval_columns}
        for batch, keep in zip(loader, valid):
            out = self.engine.forward({k: v for k, v in batch.items() if k not in hidden})
            acc.update(out.logits, batch, keep.to(out.logits.device))
        self.engine.train()
        return acc.compute()

    def track(self, state, result: EvalResult, step: int, final: bool = False) -> None:
        """The best step, early stopping, and the first evaluation at ``eval.stop_at``: its
        step, seconds since launch (the clock of ``trainer.startup``: the launcher's start
        under ``zerotune train``) and value, kept on ``state`` (a checkpoint carries it)."""
        value = result.metrics[self.metric]
        track_best(state, value, step, self.mode, self.patience, final)
        if (
            self.stop_at is not None
            and state.target_reached is None
            and reaches(value, self.stop_at, self.mode)
        ):
            seconds = round(time.time() - CLOCK.launched, 3)
            state.target_reached = {"step": step, "seconds_since_launch": seconds, "value": value}
