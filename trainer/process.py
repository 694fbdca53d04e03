"""Process plumbing shared by ``zerotune`` (the launcher) and ``python -m trainer`` (a rank).

The exit-code contract, the run arguments both command lines take, the one way a config
error is printed, and the defaults a run starts from. It lives in ``trainer`` because a rank
process needs it and must not import ``launcher``; it imports nothing heavy at module level,
so the launcher can use it before deciding whether to start ranks.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
from pathlib import Path
from typing import NoReturn


class ExitCode(enum.IntEnum):
    """What a zerotune process (launcher or rank) exits with; scripts and Slurm rely on it."""

    DONE = 0
    FAILED = 1
    CONFIG = 2  # configuration or input error: found before any rank starts, nothing written
    PEER_LOST = 3  # a rank whose collective failed because another rank died or stopped;
    # never the job's code: the launcher names the rank that caused it
    PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved, run the same command to resume
    STUCK = 124  # as timeout(1): a rank made no progress for launch.timeout_minutes (named)
    INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C: stopped at once, no save

    __str__ = int.__repr__  # prints as its number (Python 3.10 would print ExitCode.DONE)


def add_run_arguments(
    parser: argparse.ArgumentParser, run_dir: bool = True, resume: bool = True
) -> None:
    """CONFIG, ``--set`` and optionally ``--run-dir`` / ``--resume``: one spelling everywhere."""
    parser.add_argument(
        "config", nargs="?", help="YAML run config (default: the embedded demo, configs/demo.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-5 (repeatable; beats the file)",
    )
    if run_dir:
        parser.add_argument(
            "--run-dir", help="run directory (default runs/<config name>); running again resumes"
        )
    if resume:
        parser.add_argument(
            "--resume",
            default="auto",
            help="auto (newest valid checkpoint in the run dir; refused if the config changes the "
            "run), force (auto despite such a change), never, or a checkpoint path",
        )


def report_config_error(err: Exception | str, prog: str = "zerotune") -> ExitCode:
    """Print the one-line config error every entry point uses; the caller returns the code."""
    print(f"{prog}: config error: {err}", file=sys.stderr)
    return ExitCode.CONFIG


def default_run_dir(config_path: str | None) -> Path:
    """``runs/<config stem>``: the same command in the same place resumes."""
    return Path("runs") / (Path(config_path).stem if config_path else "demo")


def versions() -> dict[str, str]:
    """Interpreter and library versions of this process (manifest, env.json, doctor)."""
    import importlib.metadata as md

    import torch

    out = {
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__,
    }
    for pkg in ("zerotune", "deepspeed", "transformers", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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


def exit_process(code: int) -> NoReturn:
    """End a rank process once its work is done and its files are closed, skipping the
    interpreter's teardown: there, C++ destructors of DeepSpeed's and gloo's threads now and
    then abort a finished rank ("terminate called without an active exception", exit -6),
    turning a success into a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))
