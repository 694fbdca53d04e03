"""Fault injection for tests of crash safety: ``ZEROTUNE_FAULT=<point>@<step>[:rank]``.

Points: ``step`` (die right after optimizer step N), ``save`` (die in the middle of writing
checkpoint N, before its commit), ``commit`` (die after the manifest, before the rename).
The process exits with code 66 via ``os._exit`` — no cleanup runs, as in a real crash.

``hang`` blocks the main thread for good right after optimizer step N, as an I/O deadlock
would; the process stays alive (its heartbeat thread too), so only the watchdog can end it.

Points that do not exit: ``enospc`` (a write of checkpoint N fails as on a full disk: a
partial file, then ``OSError(ENOSPC)``) and ``nan`` (step N's loss is NaN on that rank).
Unset in normal use; it costs one dictionary lookup per call.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

FAULT_ENV = "ZEROTUNE_FAULT"
FAULT_EXIT_CODE = 66


def _parse(spec: str) -> tuple[str, int, int | None]:
    point, _, rest = spec.partition("@")
    step, _, rank = rest.partition(":")
    return point, int(step), int(rank) if rank else None


def maybe_fail(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_point, want_step, want_rank = _parse(spec)
    rank = int(os.environ.get("RANK", "0"))
    if point == "step" and _matches("hang", step):
        print(f"[zerotune] injected fault {spec!r} on rank {rank}", file=sys.stderr, flush=True)
        threading.Event().wait()
    if want_point == point and want_step == step and (want_rank is None or want_rank == rank):
        print(f"[zerotune] injected fault {spec!r} on rank {rank}", file=sys.stderr, flush=True)
        os._exit(FAULT_EXIT_CODE)


def _matches(point: str, step: int | None) -> bool:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    want_point, want_step, want_rank = _parse(spec)
    rank = int(os.environ.get("RANK", "0"))
    return (
        want_point == point
        and (step is None or want_step == step)
        and (want_rank is None or want_rank == rank)
    )


def maybe_fail_write(path: Path) -> None:
    """``enospc@N``: a file of checkpoint N (``step_0000000N``) is cut short by a full disk."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or not _matches("enospc", None):
        return
    if f"step_{_parse(spec)[1]:08d}" not in str(path):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"\0" * 4096)  # what a full disk leaves behind: a partial file
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def nan_loss(step: int) -> bool:
    """``nan@N``: step N's loss is NaN on that rank (all ranks without ``:rank``)."""
    return _matches("nan", step)
