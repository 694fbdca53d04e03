"""Per-rank entry point that torchrun, srun and mpirun start.

    python -m trainer CONFIG [--run-dir DIR] [--set KEY=VALUE ...] [--resume auto|never|PATH]

Exit codes (``trainer.process.ExitCode``): 0 done, 2 configuration or input error,
75 preempted (checkpoint saved; start again to resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import ConfigError, load_config
from .process import (
    ExitCode,
    add_run_arguments,
    default_run_dir,
    quiet_libraries,
    report_config_error,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="zerotune rank entry point")
    add_run_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .env import detect_env

    try:
        cfg = load_config(args.config, args.overrides)
        env = detect_env(os.environ)
    except (ConfigError, ValueError) as e:
        return report_config_error(e)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    return run_rank(cfg, env, run_dir, args.resume)


def run_rank(cfg, env, run_dir: Path, resume: str) -> int:
    from .checkpoint import CheckpointError
    from .distributed import AgreedConfigError, configure_cpu_deepspeed, destroy, init_distributed

    quiet_libraries()
    if cfg.engine == "deepspeed":
        configure_cpu_deepspeed()
    try:
        env, device = init_distributed(env, cfg.launch.backend, cfg.launch.timeout_minutes)
    except ConfigError as e:  # device binding or backend: before any rank trains
        # agreed from every rank's record: rank 0 speaks for all; else each for itself
        if not isinstance(e, AgreedConfigError):
            report_config_error(e if env.world_size == 1 else f"rank {env.rank}: {e}")
        elif env.rank == 0:
            report_config_error(e)
        destroy()
        return ExitCode.CONFIG
    try:
        from .loop import Trainer

        return Trainer(cfg, env, device, run_dir, resume).run()
    except (ConfigError, CheckpointError) as e:
        if env.rank == 0:
            report_config_error(e)
        return ExitCode.CONFIG
    finally:
        destroy()
