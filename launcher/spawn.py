"""Start ranks on this machine with torch's elastic agent (``torch.distributed.run``).

The agent picks a free rendezvous port (``--standalone``), starts ``python -m trainer`` per
rank, and tears the group down if one rank dies. ``run_torchrun`` maps how the ranks
ended to an ``ExitCode`` for ``zerotune train`` and ``zerotune doctor`` alike, and its last
lines say why (``explain_failure``): 130 interrupted (Ctrl-C), 124 a rank was stuck (named
by the ranks' watchdog), 75 preempted (checkpoint saved), 2 a config error found inside a
rank, else 1 naming the rank that died, its signal and phase. Every one of them ends with
the last committed checkpoint and that the same command resumes from it.

Ctrl-C: the agent starts each rank in a session of its own, so a terminal's SIGINT reaches
only this process. The first one is passed on (each rank stops at once, without a save:
``trainer.preemption.install_interrupt_handler``), a second one kills the ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from trainer.process import ExitCode
from trainer.watchdog import STATUS_DIR_ENV, describe_phase, read_status, resume_hint


def trainer_args(config: str | None, overrides: list[str], run_dir: Path, resume: str) -> list[str]:
    args = [config] if config else []
    for o in overrides:
        args += ["--set", o]
    return args + ["--run-dir", str(run_dir), "--resume", resume]


# SIGTERM and SIGUSR1 are forwarded to the training ranks by forward_preemption_signals: the
# ranks checkpoint and exit 75 rather than the agent tearing them down; SIGINT (Ctrl-C) is
# handled by Interrupts, not by the agent (whose way ends in a SignalException traceback)
TRAIN_SIGNALS = "SIGHUP,SIGQUIT"
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


class Interrupts:
    """Ctrl-C at the launcher: the first passes SIGINT on to the ranks, the second kills them
    (and their loader workers) at once. While ``held`` (the ranks wait at the pre-flight's
    gate, launcher/overlap.py: nothing written, nothing to stop cleanly) the first kills them
    too: a rank still starting its interpreter would print a fatal error on SIGINT."""

    def __init__(self) -> None:
        self.count = 0
        self.held = False

    def __call__(self, signum, frame) -> None:
        import psutil

        self.count += 1
        kill = self.count > 1 or self.held
        sig = signal.SIGKILL if kill else signal.SIGINT
        for child in psutil.Process().children(recursive=kill):
            with contextlib.suppress(psutil.Error):
                child.send_signal(sig)

    def install(self) -> None:
        """Handle Ctrl-C, unless it is ignored (``nohup``, a shell's background job)."""
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self)


INTERRUPTS = Interrupts()


def run_torchrun(
    torchrun_argv: list[str], run_dir: Path | None = None, prog: str = "zerotune"
) -> ExitCode:
    """``torch.distributed.run`` in this process; how the ranks ended, as one exit code and,
    on failure, the last lines the user sees (``explain_failure``). The ranks leave their
    last phase in status files of a temporary directory (``STATUS_DIR_ENV``)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # the agent's own "failed (exitcode: N) local_rank: …" line would follow ours and repeat
    # less: explain_failure names every failed rank, its code or signal, phase and checkpoint
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    status_dir = tempfile.mkdtemp(prefix="zerotune-status-")
    os.environ[STATUS_DIR_ENV] = status_dir
    try:
        run(parse_args(torchrun_argv))
    except ChildFailedError as e:
        failures = {rank: (f.exitcode, f.pid) for rank, f in e.failures.items()}
        _end_sessions([pid for _, pid in failures.values()])
        code, lines = explain_failure(
            failures, read_status(Path(status_dir)), run_dir, prog, INTERRUPTS.count > 0
        )
        for line in lines:
            print(line, file=sys.stderr)
        return code
    finally:
        os.environ.pop(STATUS_DIR_ENV, None)
        shutil.rmtree(status_dir, ignore_errors=True)
    return ExitCode.DONE


def _end_sessions(pids: list[int]) -> None:
    """Kill what is left of failed ranks' sessions (the agent starts each rank as a session
    leader): a dead rank's loader workers would otherwise live on for seconds, holding its
    files, locks and sockets, and a command run again at once would find them."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def explain_failure(
    failures: dict[int, tuple[int, int]],
    status: dict[int, dict],
    run_dir: Path | None,
    prog: str = "zerotune",
    interrupted: bool = False,
) -> tuple[ExitCode, list[str]]:
    """The job's exit code and last lines from how its ranks ended.

    ``failures``: rank → (exit code, negative for a signal; pid), as the agent saw them;
    ``status``: the ranks' status files (their last phase; a watchdog's verdict; a
    collective that failed because a peer was gone).
    """
    codes = {code for code, _ in failures.values()}
    hint = resume_hint(run_dir) if run_dir is not None else "see the output above"
    if interrupted or ExitCode.INTERRUPTED in codes:
        return ExitCode.INTERRUPTED, [f"{prog}: interrupted — all ranks stopped; {hint}"]
    verdicts = [s["stuck"] for _, s in sorted(status.items()) if "stuck" in s]
    if ExitCode.STUCK in codes or verdicts:
        return ExitCode.STUCK, [f"{prog}: {verdicts[0] if verdicts else 'a rank was stuck'}"]
    if ExitCode.PREEMPTED in codes:
        saved = f"; checkpoint saved in {run_dir}/checkpoints" if run_dir is not None else ""
        return ExitCode.PREEMPTED, [f"{prog}: preempted{saved} — run the same command to resume"]
    if ExitCode.CONFIG in codes and all(
        code == ExitCode.CONFIG or _consequence(code) for code in codes
    ):  # said once already (a rank, or the pre-flight that stopped the ranks at its gate);
        # the others lost it as a peer or were ended by the agent once it had exited
        return ExitCode.CONFIG, []
    rank, (code, pid) = min(failures.items(), key=lambda f: (_consequence(f[1][0]), f[0]))
    host = status.get(rank, {}).get("host") or _hostname()
    how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
    where = _phase_at_failure(rank, status)
    lines = [f"{prog}: rank {rank} (host {host}, pid {pid}) {how}{where}"]
    if code > 0:
        lines[0] += "; its error is above"
    return ExitCode.FAILED, [*lines, f"{prog}: {hint}"]


def _consequence(code: int) -> int:
    """0 for a cause, 1 for an echo: a rank that lost its peer, or one the agent terminated."""
    return int(code in (ExitCode.PEER_LOST, -signal.SIGTERM))


def _phase_at_failure(rank: int, status: dict[int, dict]) -> str:
    """Where the job was: the phase in which the others' collectives failed (ranks move in
    step), else the failed rank's last heartbeat."""
    lost = [s for s in status.values() if "lost_peer" in s]
    rec = max(lost, key=lambda s: s["step"]) if lost else status.get(rank)
    return f" during {describe_phase(rec['phase'], rec['step'])}" if rec else ""


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _hostname() -> str:
    import socket

    return socket.gethostname()


def spawn(
    config: str | None,
    overrides: list[str],
    nproc: int,
    run_dir: Path,
    resume: str,
    preemption_signals: list[str] = ("SIGTERM", "SIGUSR1"),
) -> ExitCode:
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads_per_rank(nproc)))
    # this process's own handlers come back once the ranks are gone (a caller that lives on:
    # `zerotune train` refused at the pre-flight's gate inside a test session)
    names = {*preemption_signals, "SIGINT"}
    before = {name: signal.getsignal(getattr(signal, name)) for name in names}
    forward_preemption_signals(preemption_signals)
    if "SIGINT" not in preemption_signals:  # else Ctrl-C saves, as the config asks
        INTERRUPTS.install()
    try:
        return run_torchrun(
            torchrun_args(nproc, "trainer", trainer_args(config, overrides, run_dir, resume)),
            run_dir,
        )
    finally:
        for name, handler in before.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)
