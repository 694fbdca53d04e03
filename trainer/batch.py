"""Batch arithmetic: ``global = micro × accum × world``, with accumulation derived.

One answer for every user of it — the DeepSpeed config, the DDP engine, the data plan and
the pre-flight — so a batch that does not divide is refused once, with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError, RunConfig


@dataclass(frozen=True)
class BatchPlan:
    micro: int
    accum: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world


def resolve_batch(cfg: RunConfig, world_size: int) -> BatchPlan:
    """``global = micro × accum × world``; accumulation is derived, never guessed."""
    micro = cfg.train.micro_batch_size
    g = cfg.train.global_batch_size or micro * world_size
    per_step = micro * world_size
    if g % per_step:
        lower = (g // per_step) * per_step
        options = [x for x in (lower, lower + per_step) if x > 0]
        raise ConfigError(
            f"train.global_batch_size={g} is not divisible by train.micro_batch_size={micro} × world size {world_size} "
            f"= {per_step}: choose a multiple of {per_step} (e.g. {' or '.join(map(str, options))}) or change the micro batch"
        )
    return BatchPlan(micro=micro, accum=g // per_step, world=world_size)
