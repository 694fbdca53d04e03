"""Start ranks on this machine with torch's elastic agent (``torch.distributed.run``).

The agent picks a free rendezvous port (``--standalone``), starts ``python -m trainer`` per
rank, and tears the group down if one rank dies. ``run_torchrun`` maps how the ranks
ended to an ``ExitCode`` for ``zerotune train`` and ``zerotune doctor`` alike: 75 if the
ranks were preempted (checkpoint saved), 2 for a config error found inside a rank, else 1
on failure.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from trainer.process import ExitCode


def trainer_args(config: str | None, overrides: list[str], run_dir: Path, resume: str) -> list[str]:
    args = [config] if config else []
    for o in overrides:
        args += ["--set", o]
    return args + ["--run-dir", str(run_dir), "--resume", resume]


# SIGTERM and SIGUSR1 are forwarded to the training ranks by forward_preemption_signals: the
# ranks checkpoint and exit 75 rather than the agent tearing them down
TRAIN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
# torch's default: the agent tears its ranks down on any of these (``zerotune doctor``)
AGENT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


def torchrun_args(
    nproc: int, module: str, args: list[str], signals_to_handle: str = TRAIN_SIGNALS
) -> list[str]:
    """``torch.distributed.run`` arguments: ``nproc`` local ranks of ``python -m module *args``."""
    return [
        "--standalone",
        "--signals-to-handle",
        signals_to_handle,
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        "0",
        "--module",
        module,
        *args,
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


def run_torchrun(
    torchrun_argv: list[str], run_dir: Path | None = None, prog: str = "zerotune"
) -> ExitCode:
    """``torch.distributed.run`` in this process; how the ranks ended, as one exit code.

    75 from any rank: preempted (the resume hint names ``run_dir``'s checkpoints); 2 from
    every failed rank: a config error the rank has already printed; else failed.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_argv))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if ExitCode.PREEMPTED in codes:
            saved = f"; checkpoint saved in {run_dir}/checkpoints" if run_dir is not None else ""
            print(
                f"{prog}: preempted{saved} — run the same command to resume",
                file=sys.stderr,
            )
            return ExitCode.PREEMPTED
        if codes == [ExitCode.CONFIG]:
            return ExitCode.CONFIG
        print(
            f"{prog}: rank(s) failed with exit code(s) {codes}; see the output above",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    return ExitCode.DONE


def spawn(
    config: str | None,
    overrides: list[str],
    nproc: int,
    run_dir: Path,
    resume: str,
    preemption_signals: list[str] = ("SIGTERM", "SIGUSR1"),
) -> ExitCode:
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads_per_rank(nproc)))
    forward_preemption_signals(preemption_signals)
    return run_torchrun(
        torchrun_args(nproc, "trainer", trainer_args(config, overrides, run_dir, resume)), run_dir
    )
