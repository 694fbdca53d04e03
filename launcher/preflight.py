"""Pre-flight: every check that can fail before ranks exist, reported together.

A bad path, a missing column, labels out of range, a batch that does not divide, fp16 on a
CPU: each is found here, in one process, in seconds — not after N ranks have started and
half-written a run directory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from trainer.batch import BatchPlan, resolve_batch
from trainer.config import ConfigError, RunConfig, load_config
from trainer.deepspeed_config import accumulation_note, build_deepspeed_config
from trainer.devices import (
    accelerator_warning,
    backend_problem,
    fp16_problem,
    too_many_ranks_problem,
    visible_gpu_count,
)
from trainer.ops import detect_build_env, optimizer_plan, remote


@dataclass
class Preflight:
    cfg: RunConfig
    world_size: int
    nproc_per_node: int
    plan: BatchPlan | None
    train_rows: int | None
    problems: list[str]
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong (e.g. slow optimizer)
    optimizer: str = ""  # which AdamW the ranks will build (trainer/ops.py)

    @property
    def ok(self) -> bool:
        return not self.problems

    def print_notes(self) -> None:
        for note in self.notes:
            print(f"zerotune: note: {note}", file=sys.stderr)


def resolve_nproc(cli_value: str | int | None, cfg: RunConfig) -> int:
    """CLI > config > auto; auto = number of GPUs, or 1 on a CPU-only machine."""
    value = cli_value if cli_value is not None else cfg.launch.nproc_per_node
    if value == "auto":
        return max(visible_gpu_count(), 1)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--nproc-per-node={value!r}: expected a positive integer or 'auto'"
        ) from None
    if n < 1:
        raise ConfigError(f"--nproc-per-node={n}: expected at least 1")
    return n


def check(
    config: str | None,
    overrides: list[str],
    nproc: str | int | None = None,
    nnodes: int = 1,
    check_data: bool = True,
    job_gpus: int | None = None,
) -> Preflight:
    """Raises ConfigError for an unreadable/invalid config; collects every other problem.

    ``job_gpus``: GPUs per node of a job that runs elsewhere (``zerotune submit``): the
    device checks then use the job's GPUs, not this machine's.
    """
    cfg = load_config(config, overrides)
    if check_data:
        from trainer.process import quiet_libraries

        quiet_libraries()
    n = resolve_nproc(nproc, cfg)
    world = n * nnodes
    problems: list[str] = []
    gpus = visible_gpu_count() if job_gpus is None else job_gpus
    # Every rank a launcher starts here (or srun starts on a node of the job) sees the same
    # GPUs: more ranks than GPUs would share them (trainer/devices.py has the rank's rule).
    problems += filter(
        None,
        [
            too_many_ranks_problem(
                n, gpus, "this machine has" if job_gpus is None else "the job asks for"
            ),
            backend_problem(cfg.launch.backend, on_gpu=bool(gpus)),
        ],
    )
    # DeepSpeed ops: pre-built or not is a fact of this install; for a job elsewhere the
    # compute nodes' compilers are unknown here, so only what is certain is refused.
    build = detect_build_env() if job_gpus is None else remote(detect_build_env())
    optimizer = optimizer_plan(cfg, bool(gpus), build)
    if optimizer.problem:
        problems.append(optimizer.problem)
    notes = [optimizer.note] if optimizer.note else []
    if job_gpus is None:  # the ranks inherit this environment
        notes += filter(None, [accelerator_warning(os.environ, bool(gpus))])
    problems += filter(None, [fp16_problem(cfg.precision, bool(gpus))])
    plan = None
    try:
        plan = resolve_batch(cfg, world)
        if cfg.engine == "deepspeed":
            ds = build_deepspeed_config(cfg, plan, on_gpu=bool(gpus), build=build, opt=optimizer)
            notes += filter(None, [accumulation_note(cfg, ds)])
    except ConfigError as e:
        problems.extend(e.problems)
    train_rows = None
    if check_data:
        try:
            train_rows = _check_data(cfg)
        except ConfigError as e:
            problems.extend(e.problems)
        if train_rows is not None and plan is not None and train_rows < plan.global_batch:
            problems.append(
                f"train.global_batch_size={plan.global_batch} is larger than the training set ({train_rows} rows "
                "after the validation carve-out): lower the batch size or add data"
            )
    return Preflight(
        cfg=cfg,
        world_size=world,
        nproc_per_node=n,
        plan=plan,
        train_rows=train_rows,
        problems=list(dict.fromkeys(problems)),  # the optimizer's problem may come twice
        notes=notes,
        optimizer=optimizer.description,
    )


def _check_data(cfg: RunConfig) -> int:
    from trainer.data import check_splits, load_raw_splits
    from trainer.models import build_tokenizer, builtin_problem, is_builtin
    from trainer.tasks import build_task

    task = build_task(cfg)
    problems: list[str] = []
    num_labels = None
    try:
        num_labels = task.model_num_labels(cfg)
    except ConfigError as e:
        problems.extend(e.problems)
    from trainer.adapters import preflight_problem

    problems += filter(None, [preflight_problem(cfg)])
    if not is_builtin(cfg.model.tokenizer or cfg.model.name_or_path):
        try:
            build_tokenizer(cfg, task)
        except ConfigError as e:
            problems.extend(e.problems)
    elif is_builtin(cfg.model.name_or_path) and builtin_problem(cfg.model.name_or_path):
        problems.append(builtin_problem(cfg.model.name_or_path))
    splits = None
    try:
        splits = load_raw_splits(cfg)
    except ConfigError as e:
        problems.extend(e.problems)
    if splits is not None:
        try:
            check_splits(cfg, splits, num_labels)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return len(splits["train"])
