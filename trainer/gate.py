"""The gate between ``zerotune train``'s pre-flight and its ranks (issue 9, line 4).

The launcher starts the ranks at once and runs its slower checks (the data, the tokenizer,
the model config, the run directory's lock) while they import and join the process group:
the two take seconds each, so doing them side by side rather than one after the other
shortens launch → first step. A rank waits at the gate right before it builds its
``Trainer`` — nothing written, no data read — until the launcher's verdict:

* ``go``: the pre-flight passed and the launcher holds the run directory's lock;
* ``stop``: it failed; the launcher prints its one message and every rank exits
  ``ExitCode.CONFIG`` at once and silently (``launcher.spawn.explain_failure`` adds nothing
  when all ranks exit 2), also a rank still importing.

The verdict is a file, ``go`` or ``stop``, in a private directory named by ``GATE_ENV``
(created empty, so a file appearing there is the whole protocol; a directory that is gone
reads as ``stop``). A daemon thread polls it from the rank's first line of Python
(``trainer/__main__.py``) every ``POLL_S``: three system calls per poll, none once the
rank has passed. A rank whose launcher is gone before a verdict (``kill -9`` of ``zerotune
train``: the ranks run in sessions of their own, no signal reaches them) stops too, rather
than waiting for one forever: its parent is no longer the launcher, whose pid the gate
directory holds (``LAUNCHER_FILE``).

Without ``GATE_ENV`` (a bare torchrun, srun or mpirun, ``zerotune submit``) there is no gate
and ``wait`` returns at once. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

GATE_ENV = "ZEROTUNE_GATE"
GO, STOP = "go", "stop"
LAUNCHER_FILE = "launcher.pid"
ARRIVED = "arrived."  # + the rank's pid: it has started and watches the gate
POLL_S = 0.01
STOPPED_CODE = 2  # ExitCode.CONFIG (not imported: trainer.process is not needed this early)
ORPHANED_CODE = 1  # ExitCode.FAILED: the launcher is gone; no one reads it


class Gate:
    """The launcher's side: a private directory the ranks watch, and its two verdicts."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls) -> Gate:
        """A new gate, closed to none yet, held by this process (the ranks' parent)."""
        gate = cls(Path(tempfile.mkdtemp(prefix="zerotune-gate-")))
        (gate.path / LAUNCHER_FILE).write_text(str(os.getpid()))
        return gate

    def open(self) -> None:
        (self.path / GO).touch()

    def close(self) -> None:
        (self.path / STOP).touch()

    def wait_for_ranks(self, n: int, timeout: float) -> int:
        """Until ``n`` ranks watch the gate (or ``timeout``): the launcher's checks then no
        longer compete with its own agent for starting them. How many arrived."""
        deadline = time.monotonic() + timeout
        while True:
            arrived = sum(name.startswith(ARRIVED) for name in os.listdir(self.path))
            if arrived >= n or time.monotonic() >= deadline:
                return arrived
            time.sleep(POLL_S)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def read_verdict(path: Path) -> str | None:
    """``go``, ``stop``, or None while the launcher is still checking."""
    if (path / GO).exists():
        return GO
    if (path / STOP).exists() or not path.is_dir():
        return STOP
    return None


def _launcher_pid(path: Path) -> int | None:
    try:
        return int((path / LAUNCHER_FILE).read_text())
    except (OSError, ValueError):
        return None  # a removed gate: the watch reads stop at once


class GateWatch:
    """The rank's side: a thread that waits for the verdict and ends this process on
    ``stop`` (or when the launcher is gone); ``wait`` returns once the gate is open."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.opened = threading.Event()
        if self.path is None:
            self.opened.set()
            return
        self.launcher = _launcher_pid(self.path)
        with contextlib.suppress(OSError):  # a removed gate: the watch reads stop at once
            os.close(os.open(self.path / f"{ARRIVED}{os.getpid()}", os.O_CREAT | os.O_WRONLY))
        threading.Thread(target=self._watch, name="zerotune-gate", daemon=True).start()

    def _watch(self) -> None:
        while True:
            verdict = read_verdict(self.path)
            if verdict == GO:
                self.opened.set()
                return
            if verdict == STOP:
                os._exit(STOPPED_CODE)  # nothing written yet: nothing to clean up or say
            if self.launcher is not None and os.getppid() != self.launcher:
                os._exit(ORPHANED_CODE)
            time.sleep(POLL_S)

    def wait(self) -> None:
        """Block until the gate opens (a stop ends the process from the watching thread);
        in short waits, so that Ctrl-C (KeyboardInterrupt) still reaches the caller."""
        while not self.opened.wait(0.1):
            pass


_WATCH: GateWatch | None = None


def watch_gate(environ=os.environ) -> GateWatch:
    """Start watching this rank's gate (once per process; no gate: always open)."""
    global _WATCH
    if _WATCH is None:
        _WATCH = GateWatch(environ.get(GATE_ENV))
    return _WATCH
