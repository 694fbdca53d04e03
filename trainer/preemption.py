"""Preemption: a signal only sets a flag; the loop agrees on it across ranks at the next
step boundary, saves a checkpoint and exits with ``ExitCode.PREEMPTED`` (75)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


class PreemptionFlag:
    def __init__(self, signals: list[str]):
        self.received: str | None = None
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    @property
    def set(self) -> bool:
        return self.received is not None

    def ignore(self) -> None:
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_interrupted = False


def install_interrupt_handler() -> None:
    """Ctrl-C in a rank stops it at once, without a save: a user expects seconds, and every
    committed checkpoint is already safe on disk (a save in progress stays a ``.tmp``
    directory that the next start removes). The first SIGINT raises KeyboardInterrupt; later
    ones are ignored, so the stop itself is not interrupted (``zerotune train`` kills its
    ranks on a second Ctrl-C)."""

    def handler(signum, frame):
        global _interrupted
        _interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def interrupted() -> bool:
    """Whether this rank got Ctrl-C (a collective that failed afterwards is its echo)."""
    return _interrupted


def requeue_slurm_job(env: dict[str, str] | None = None) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` (the job then starts again and resumes)."""
    env = dict(os.environ if env is None else env)
    job = (
        env.get("SLURM_ARRAY_JOB_ID")
        and f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID')}"
        or env.get("SLURM_JOB_ID")
    )
    if not job:
        return False
    try:
        subprocess.run(
            ["scontrol", "requeue", job], check=True, timeout=60, capture_output=True, text=True
        )
        print(f"[zerotune] requeued Slurm job {job}", file=sys.stderr, flush=True)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        print(f"[zerotune] could not requeue Slurm job {job}: {e}", file=sys.stderr, flush=True)
        return False
