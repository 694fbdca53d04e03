"""The gate between ``zerotune train``'s pre-flight and its ranks (issue 9, line 4).

The launcher checks the settings (no rank starts if they are wrong), starts the ranks at
once, and decides while they import and join the process group. The data check — the data
files and cells, the tokenizer, the model's config — runs in rank 0, right after its own
imports of datasets and transformers (which the launcher would otherwise pay for a second
time, competing with the ranks for the CPU), and is handed to the launcher as a record
(``DATA_CHECK``, ``publish_data_check``). From it and the run directory's lock the launcher
gives its verdict. Every rank waits at the gate right before it builds its ``Trainer`` —
nothing written — until that verdict:

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
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

GATE_ENV = "ZEROTUNE_GATE"
GO, STOP = "go", "stop"
LAUNCHER_FILE = "launcher.pid"
DATA_CHECK = "data-check.json"  # rank 0's findings on the data, for the launcher's verdict
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

    def wait_for_data_check(self, given_up) -> dict | None:
        """Rank 0's data-check record (``publish_data_check``), once it is there; None once
        ``given_up()`` (the ranks have ended without one: a crash, Ctrl-C)."""
        while not given_up():
            with contextlib.suppress(OSError, ValueError):
                return json.loads((self.path / DATA_CHECK).read_text())
            time.sleep(POLL_S)
        return None

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


_PUBLISHED = False


def publish_data_check(findings: dict, environ=os.environ) -> bool:
    """Rank 0 hands the pre-flight's data check (``trainer.datacheck.data_findings``) to the
    launcher, whose verdict follows from it; written whole (a temporary name, then renamed)
    so that the launcher never reads half of it. False without a gate (nothing to hand)."""
    global _PUBLISHED
    path = environ.get(GATE_ENV)
    if not path:
        return False
    if _PUBLISHED:  # once: the verdict may already follow from the first record
        return True
    _PUBLISHED = True
    with contextlib.suppress(OSError):  # a removed gate: the watch reads stop at once
        tmp = Path(path) / f".{DATA_CHECK}.{os.getpid()}"
        tmp.write_text(json.dumps(findings))
        os.replace(tmp, Path(path) / DATA_CHECK)
    return True


_WATCH: GateWatch | None = None


def watch_gate(environ=os.environ) -> GateWatch:
    """Start watching this rank's gate (once per process; no gate: always open)."""
    global _WATCH
    if _WATCH is None:
        _WATCH = GateWatch(environ.get(GATE_ENV))
    return _WATCH
