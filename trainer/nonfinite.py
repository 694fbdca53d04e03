"""Non-finite losses and a collapsing fp16 loss scale: named events, not silent NaN weights.

A NaN or inf loss on one rank makes the reduced gradients non-finite on every rank, so every
engine skips that update alike (DeepSpeed's optimizers on an invalid gradient norm; zerotune
itself for ZeRO-0 fp32 and DDP, trainer/engine.py). The loop then agrees on the event with
one all-reduce, so all ranks count, warn and stop at the same step. Under fp16 an overflow
of the *gradients* is the loss scaler's business (skipped and counted by DeepSpeed, the scale
halves); only a non-finite *loss* counts here, and ``LossScaleWatch`` warns before the scale
reaches the floor where DeepSpeed gives up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# warn when the fp16 scale is at most this (DeepSpeed stops at min_loss_scale, default 1) ...
SCALE_FLOOR = 8.0
# ... or after this many halvings in a row once training has applied an update
HALVINGS_IN_A_ROW = 5

HINT = (
    "try a lower train.lr or a longer warm-up, keep train.max_grad_norm set, precision=bf16 "
    "instead of fp16, and check this step's data"
)


class NonFiniteError(RuntimeError):
    """Training stops: the loss or gradients were not finite (every rank raises it alike)."""


def _losses(losses: list[float]) -> str:
    bad = [f"rank {r}: {v}" for r, v in enumerate(losses) if not math.isfinite(v)]
    return ", ".join(bad) if bad else "finite losses, non-finite gradients"


def abort_message(step: int, losses: list[float], newest: Path | None) -> str:
    return (
        f"step {step}: the loss was not finite ({_losses(losses)}); train.on_nonfinite=abort "
        f"stops here without applying it. {_resume(newest)}; {HINT}, or set "
        "train.on_nonfinite=skip to skip such steps"
    )


def too_many_message(step: int, in_a_row: int, losses: list[float], newest: Path | None) -> str:
    return (
        f"step {step}: {in_a_row} steps in a row had a non-finite loss or gradients (last: "
        f"{_losses(losses)}; train.max_nonfinite_in_a_row={in_a_row}), each skipped: the run is "
        f"diverging. {_resume(newest)}; {HINT}"
    )


def skip_warning(step: int, losses: list[float], in_a_row: int, total: int) -> str:
    return (
        f"warning: step {step}: loss not finite ({_losses(losses)}): its update was skipped on "
        f"every rank ({in_a_row} in a row, {total} in this run)"
    )


def _resume(newest: Path | None) -> str:
    return (
        f"The last committed checkpoint is {newest} (running the same command resumes from it)"
        if newest
        else "No checkpoint was committed yet"
    )


@dataclass
class LossScaleWatch:
    """fp16: one warning before the loss scale collapses (at or below ``floor``, or halved
    ``halvings`` times in a row after the first applied update — the start-up calibration,
    when DeepSpeed halves from 2^16 down to a scale that fits, does not count)."""

    floor: float = SCALE_FLOOR
    halvings: int = HALVINGS_IN_A_ROW
    last: float | None = None
    in_a_row: int = 0
    calibrated: bool = False
    warned: bool = False

    def update(
        self, step: int, scale: float | None, skipped: bool, total_skipped: int
    ) -> str | None:
        if scale is None:
            return None
        if self.last is not None and scale < self.last:
            self.in_a_row += 1 if self.calibrated else 0
        elif self.last is not None and scale >= self.last:
            self.in_a_row = 0
        self.calibrated = self.calibrated or not skipped
        self.last = scale
        falling = scale <= self.floor or self.in_a_row >= self.halvings
        if not falling:
            self.warned = False  # recovered: warn again next time
            return None
        if self.warned:
            return None
        self.warned = True
        why = (
            f"at or below {self.floor:g}"
            if scale <= self.floor
            else f"halved {self.in_a_row} times in a row"
        )
        return (
            f"warning: step {step}: the fp16 loss scale is {scale:g} ({why}; {total_skipped} "
            "steps skipped on overflow so far): the gradients overflow fp16 and DeepSpeed stops "
            f"at its minimum scale; {HINT}"
        )
