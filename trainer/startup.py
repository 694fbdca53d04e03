"""Where the seconds from launch to the first optimizer step go (issue 9): ``env.json``'s
``startup_s``.

A rank marks the end of each start-up phase on one process-wide clock; a phase is the time
since the previous mark, so the phases add up to the rank's whole start-up. The clock starts
when this process was created (not when this module was imported), so the interpreter's own
start is counted too; ``zerotune train`` passes the moment its launcher process was created
(``ZEROTUNE_LAUNCHED_AT``), so launcher start → this rank's process created shows as
``launcher`` (its settings checks and the agent's start). Rank 0 then runs the pre-flight's
data check for the launcher after its imports (``data_check``, ``launcher/overlap.py``); what
a rank still waits for the launcher's verdict at its gate, after its rendezvous, is
``preflight_wait`` (``trainer/gate.py``).
Under a bare torchrun / srun / mpirun the rank's own creation is the launch.

Nothing here imports more than the standard library: it is imported first thing in a rank.
"""

from __future__ import annotations

import os
import time

LAUNCHED_AT = "ZEROTUNE_LAUNCHED_AT"


def process_created() -> float:
    """This process's creation time (epoch seconds), from ``/proc`` where there is one; else
    now (the phase before it then reads 0)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class StartupClock:
    """Phases in order of their end: ``mark(name)`` closes the phase running since the
    previous mark (a name marked twice adds up)."""

    def __init__(self, environ=os.environ):
        self.created = process_created()
        launched = environ.get(LAUNCHED_AT)
        self.launched = float(launched) if launched else self.created
        self.phases: dict[str, float] = {}
        if self.created > self.launched:
            self.phases["launcher"] = self.created - self.launched
        self.last = self.created

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + max(0.0, now - self.last)
        self.last = now

    def summary(self) -> dict[str, float]:
        """The phases so far and ``total`` (launch → the last mark), rounded to milliseconds."""
        out = {k: round(v, 3) for k, v in self.phases.items()}
        out["total"] = round(self.last - self.launched, 3)
        return out


CLOCK = StartupClock()
