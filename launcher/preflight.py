"""Pre-flight: every check that can fail before ranks exist, reported together.

A bad path, a missing column, labels out of range, a batch that does not divide, fp16 on a
CPU: each is found here, in one process, in seconds — not after N ranks have started and
half-written a run directory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.batch import BatchPlan, resolve_batch
from trainer.config import ConfigError, RunConfig, load_config
from trainer.deepspeed_config import build_deepspeed_config


@dataclass
class Preflight:
    cfg: RunConfig
    world_size: int
    nproc_per_node: int
    plan: BatchPlan | None
    train_rows: int | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_nproc(cli_value: str | int | None, cfg: RunConfig) -> int:
    """CLI > config > auto; auto = number of GPUs, or 1 on a CPU-only machine."""
    value = cli_value if cli_value is not None else cfg.launch.nproc_per_node
    if value == "auto":
        return max(gpu_count(), 1)
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
    gpus = gpu_count() if job_gpus is None else job_gpus
    if gpus and n > gpus:
        problems.append(
            f"--nproc-per-node={n} but {'this machine has' if job_gpus is None else 'the job asks for'} {gpus} GPU(s): use at most {gpus} (one rank per GPU)"
        )
    if cfg.precision == "fp16" and not gpus:
        problems.append(
            "precision='fp16' is not supported on this device (cpu): use precision=bf16 (or fp32), e.g. --set precision=bf16"
        )
    plan = None
    try:
        plan = resolve_batch(cfg, world)
        if cfg.engine == "deepspeed":
            build_deepspeed_config(cfg, plan, on_gpu=bool(gpus))
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
        problems=problems,
    )


def _check_data(cfg: RunConfig) -> int:
    from trainer.data import check_splits, load_raw_splits
    from trainer.tasks import build_tokenizer, is_builtin, model_num_labels

    problems: list[str] = []
    num_labels = None
    try:
        num_labels = model_num_labels(cfg)
    except ConfigError as e:
        problems.extend(e.problems)
    if not is_builtin(cfg.model.tokenizer or cfg.model.name_or_path):
        try:
            build_tokenizer(cfg)
        except ConfigError as e:
            problems.extend(e.problems)
    elif is_builtin(cfg.model.name_or_path):
        from trainer.tasks import BUILTIN_MODELS

        name = cfg.model.name_or_path.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            problems.append(
                f"model.name_or_path={cfg.model.name_or_path!r}: unknown builtin model; choose one of {sorted(BUILTIN_MODELS)}"
            )
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
