"""Per-rank entry point that torchrun, srun and mpirun start.

    python -m trainer CONFIG [--run-dir DIR] [--set KEY=VALUE ...] [--resume auto|never|PATH]

Exit codes: 0 done, 2 configuration or input error, 75 preempted (checkpoint saved;
start again to resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config

EXIT_CONFIG = 2


def default_run_dir(config_path: str | None) -> Path:
    """``runs/<config stem>``: the same command in the same place resumes."""
    return Path("runs") / (Path(config_path).stem if config_path else "demo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="zerotune rank entry point")
    p.add_argument("config", nargs="?", help="YAML run config (default: the embedded demo)")
    p.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key",
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (newest valid checkpoint in the run dir), never, or a checkpoint path",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .env import detect_env

    try:
        cfg = load_config(args.config, args.overrides)
        env = detect_env(os.environ)
    except (ConfigError, ValueError) as e:
        print(f"zerotune: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    return run_rank(cfg, env, run_dir, args.resume)


def quiet_libraries() -> None:
    """Progress bars and info logs of datasets / transformers / DeepSpeed drown the loop's."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_rank(cfg, env, run_dir: Path, resume: str) -> int:
    from .checkpoint import CheckpointError
    from .distributed import configure_cpu_deepspeed, destroy, init_distributed

    quiet_libraries()
    if cfg.engine == "deepspeed":
        configure_cpu_deepspeed()
    env, device = init_distributed(env, cfg.launch.backend, cfg.launch.timeout_minutes)
    try:
        from .loop import Trainer

        return Trainer(cfg, env, device, run_dir, resume).run()
    except (ConfigError, CheckpointError) as e:
        if env.rank == 0:
            print(f"zerotune: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        destroy()
