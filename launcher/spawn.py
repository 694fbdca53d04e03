"""Start ranks on this machine with torch's elastic agent (``torch.distributed.run``).

The agent picks a free rendezvous port (``--standalone``), starts ``python -m trainer`` per
rank, and tears the group down if one rank dies. Exit code: 75 if the ranks were
preempted (checkpoint saved), 2 for a config error found inside a rank, else 1 on failure.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from trainer.preemption import PREEMPTED_EXIT_CODE


def trainer_args(config: str | None, overrides: list[str], run_dir: Path, resume: str) -> list[str]:
    args = [config] if config else []
    for o in overrides:
        args += ["--set", o]
    return args + ["--run-dir", str(run_dir), "--resume", resume]


def torchrun_args(
    nproc: int, config: str | None, overrides: list[str], run_dir: Path, resume: str
) -> list[str]:
    return [
        "--standalone",
        # SIGTERM and SIGUSR1 are forwarded to the ranks by forward_preemption_signals: the
        # ranks checkpoint and exit 75 rather than the agent tearing them down
        "--signals-to-handle",
        "SIGINT,SIGHUP,SIGQUIT",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        "0",
        "--module",
        "trainer",
        *trainer_args(config, overrides, run_dir, resume),
    ]


def _threads_per_rank(nproc: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cpus = os.cpu_count() or 1
    return max(1, cpus // nproc)


def forward_preemption_signals(signals: list[str]) -> None:
    """Pass preemption signals on to the rank processes (the agent's children)."""
    import signal

    import psutil

    def forward(signum, frame):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)

    for name in signals:
        signal.signal(getattr(signal, name), forward)


def spawn(
    config: str | None,
    overrides: list[str],
    nproc: int,
    run_dir: Path,
    resume: str,
    preemption_signals: list[str] = ("SIGTERM", "SIGUSR1"),
) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(_threads_per_rank(nproc)))
    forward_preemption_signals(preemption_signals)
    args = parse_args(torchrun_args(nproc, config, overrides, run_dir, resume))
    try:
        run(args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if PREEMPTED_EXIT_CODE in codes:
            print(
                f"zerotune: preempted; checkpoint saved in {run_dir}/checkpoints — run the same command to resume",
                file=sys.stderr,
            )
            return PREEMPTED_EXIT_CODE
        if codes == [2]:
            return 2
        print(
            f"zerotune: rank(s) failed with exit code(s) {codes}; see the output above",
            file=sys.stderr,
        )
        return 1
    return 0
