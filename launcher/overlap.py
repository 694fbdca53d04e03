"""``zerotune train``: the ranks start while the pre-flight decides (issue 9, line 4).

The pre-flight's slow half — importing datasets and transformers, reading the training
file, the tokenizer and the model's config — and the ranks' own imports and rendezvous
take seconds each; one after the other they were most of launch → first step's excess over
a hand-written loop, and side by side on a small machine they compete for its cores with the
same imports twice. So ``zerotune train`` checks the settings first (a bad key, batch
arithmetic, devices, run directory: no rank starts), then starts the ranks; rank 0 runs the
data check after its own imports and hands its findings over through the gate
(``trainer/gate.py``), and the launcher decides in a thread of its own. The ranks wait at
the gate before they write anything:

* the data check passed → the launcher prints its notes, takes the run directory's lock
  and refuses a resume that changes the run (``own_run_dir``), then opens the gate;
* it failed (or the lock is refused) → the gate closes, every rank exits 2 silently, and
  the launcher prints the pre-flight's one message: exit 2, nothing written, no rank left.

The torchrun agent stays in the main thread (it installs signal handlers). Ctrl-C during
the pre-flight ends the held ranks at once (``launcher.spawn.Interrupts``: one line, exit
130) and the pre-flight, cancelled, takes no lock and creates nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from trainer.config import ConfigError
from trainer.gate import GATE_ENV, Gate
from trainer.process import ExitCode
from trainer.rundir import HELD_ENV

from .preflight import Preflight, add_data_findings
from .spawn import INTERRUPTS


def own_run_dir(run_dir: Path, pf: Preflight, resume: str):
    """Before ranks pass the gate: the run directory's lock (a second run on it is refused,
    naming this one) and the refusal to resume it with a config that changes the run."""
    from trainer.rundir import check_resume_config, lock_for_launcher

    lock = lock_for_launcher(run_dir)
    try:
        check_resume_config(run_dir, pf.cfg, resume, pf.plan.global_batch if pf.plan else None)
    except ConfigError:
        lock.release(refused=True)
        raise
    note = lock.takeover_note()
    if note:
        print(f"zerotune: note: {note}", file=sys.stderr)
    return lock


class GatedPreflight:
    """The rest of the pre-flight in a thread, then the gate's verdict; ``finish`` after
    the ranks have ended says what the launcher exits with."""

    def __init__(self, pf: Preflight, run_dir: Path, resume: str, gate: Gate):
        self.pf, self.run_dir, self.resume, self.gate = pf, run_dir, resume, gate
        self.lock = None  # the run directory's, once the pre-flight passed
        self.error: BaseException | None = None  # the thread's own (a bug, or ConfigError)
        self.verdict: str | None = None  # "go" | "stop" once decided
        self.cancelled = False
        self._mutex = threading.Lock()  # the verdict and the cancel do not cross
        self._thread = threading.Thread(target=self._run, name="zerotune-preflight", daemon=True)

    def start(self) -> GatedPreflight:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            # rank 0 reads the data after its imports (trainer/main.py); nothing of it here
            findings = self.gate.wait_for_data_check(lambda: self.cancelled)
            if findings is None:  # the ranks ended first
                return
            add_data_findings(self.pf, findings)
            with self._mutex:
                if self.cancelled:  # the ranks have ended already (Ctrl-C, a crash)
                    return
                if self.pf.problems:
                    self._close()
                    return
                self.pf.print_notes()
                self.lock = own_run_dir(self.run_dir, self.pf, self.resume)
                self.verdict = "go"
                INTERRUPTS.held = False  # from now on Ctrl-C stops the ranks, not kills them
                self.gate.open()
        except BaseException as e:  # a refused lock or resume (ConfigError), or a bug
            self.error = e
            with self._mutex:
                self._close()

    def _close(self) -> None:
        self.verdict = "stop"
        self.gate.close()

    def cancel(self) -> str | None:
        """The ranks have ended: no lock is taken from now on, and one taken is released.
        The verdict reached before, if any."""
        with self._mutex:
            self.cancelled = True
        if self.lock is not None:
            self.lock.release()
        return self.verdict

    def finish(self, code: ExitCode) -> ExitCode:
        """The exit code once the ranks ended with ``code``; a stopped gate raises the
        pre-flight's ConfigError instead (the ranks said nothing: the caller says it once)."""
        if self.cancel() != "stop" or code == ExitCode.INTERRUPTED:
            return code
        raise self.error or ConfigError(self.pf.problems)


def train_gated(pf: Preflight, run_dir: Path, resume: str, spawn_ranks) -> ExitCode:
    """Start the ranks (``spawn_ranks()``: the agent, in this thread) with the pre-flight's
    data checks beside them; what the launcher exits with, or the pre-flight's ConfigError."""
    gate = Gate.create()
    os.environ[GATE_ENV] = str(gate.path)
    # the ranks are told at spawn that this process will hold the run directory's lock for
    # them; they look only once the gate is open, i.e. once it does (trainer/rundir.py)
    os.environ[HELD_ENV] = str(os.getpid())
    INTERRUPTS.held = True
    preflight = GatedPreflight(pf, run_dir, resume, gate).start()
    try:
        try:
            code = spawn_ranks()
        except BaseException:
            preflight.cancel()
            raise
        return preflight.finish(code)
    finally:
        INTERRUPTS.held = False
        for name in (GATE_ENV, HELD_ENV):
            os.environ.pop(name, None)
        gate.remove()
