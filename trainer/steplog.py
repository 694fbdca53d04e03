"""Per-step timestamps for benchmarks: off unless ``ZEROTUNE_STEP_LOG`` names a folder.

Each rank appends one JSON line per optimizer step to ``$ZEROTUNE_STEP_LOG/rank<R>.jsonl``:
``{"step", "t_end", "seconds", "loss", "tokens"}`` — the wall-clock time the step ended
(``time.time()``, comparable with the launcher's clock), the step's own duration, the rank's
loss and non-padding tokens. ``benchmarks/compare.py`` reads the same format from zerotune,
its hand-written floor loop and transformers' ``Trainer``, so all three are timed alike. A
line costs a few microseconds (line-buffered writes, nothing synchronised), and nothing at
all when the variable is unset.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

STEP_LOG = "ZEROTUNE_STEP_LOG"


class StepLog:
    def __init__(self, rank: int, folder: str | None = None):
        folder = folder if folder is not None else os.environ.get(STEP_LOG)
        self.f = None
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.f = open(Path(folder) / f"rank{rank}.jsonl", "a", buffering=1)  # noqa: SIM115

    @property
    def enabled(self) -> bool:
        return self.f is not None

    def record(self, step: int, seconds: float, loss: float, tokens: int) -> None:
        if self.f is not None:
            self._write(step=step, t_end=time.time(), seconds=seconds, loss=loss, tokens=tokens)

    def event(self, name: str, **values) -> None:
        """A named moment (``start``, ``end``) with the peak host memory so far."""
        if self.f is not None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            self._write(event=name, t=time.time(), peak_rss_gb=rss, **values)

    def _write(self, **record) -> None:
        self.f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
