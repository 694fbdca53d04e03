"""Durable files: checksums, fsync, and JSON written so a reader never sees half of it.

A crash between any two calls leaves either the old file or the new one, never a torn
one; the checkpoint commit protocol and the run directory's JSON files are built on this.

A failed write (a full disk, a quota, an I/O error) inside ``guarded_writes()`` is recorded
instead of raised: DeepSpeed's ``save_checkpoint`` ends with a barrier, so a rank that raised
out of it would leave the others waiting there until the collective timeout. The rank
finishes the save's collectives, then the ranks agree on what failed (``trainer.checkpoint``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import faults

# torch.save reports a full disk as "basic_ios::clear: iostream error" or "file write failed",
# without an errno: below this much free space after a failed write, the disk was full
FULL_DISK_BYTES = 1 << 20


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    """Every file and directory under ``root`` on disk (before a rename commits them)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """A directory's entries on disk (a rename inside it survives a crash)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def free_bytes(path: Path) -> int | None:
    """Free space of the file system holding ``path`` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def describe_write_error(err: BaseException, free: int | None) -> str:
    """``ENOSPC (No space left on device)`` for a full disk, whatever layer reported it."""
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and code in errno.errorcode:
        return f"{errno.errorcode[code]} ({os.strerror(code)})"
    if free is not None and free < FULL_DISK_BYTES:
        return f"ENOSPC (No space left on device; the writer said: {str(err).splitlines()[0]})"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


@dataclass
class WriteFailure:
    """What one rank could not write: enough for a message that names what, where and why."""

    rank: int
    host: str
    path: str
    error: str
    free_bytes: int | None


class WriteGuard:
    """The first failed write of this rank's part of a checkpoint; later writes are skipped."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.failure: WriteFailure | None = None

    def record(self, path: Path, err: BaseException) -> None:
        if self.failure is None:
            free = free_bytes(Path(path))
            self.failure = WriteFailure(
                self.rank, socket.gethostname(), str(path), describe_write_error(err, free), free
            )

    def call(self, path: Path, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.failure is not None:
            return None
        try:
            faults.maybe_fail_write(path)
            return write(*args, **kwargs)
        except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError on a full disk
            self.record(path, e)
            return None


_GUARD: WriteGuard | None = None


@contextlib.contextmanager
def guarded_writes(rank: int = 0) -> Iterator[WriteGuard]:
    """Inside: ``guarded`` records a failed write on the returned guard instead of raising."""
    global _GUARD
    previous, _GUARD = _GUARD, WriteGuard(rank)
    try:
        yield _GUARD
    finally:
        _GUARD = previous


def guarded(path: Path, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One checkpoint file write: recorded on failure inside ``guarded_writes()``, else raised."""
    if _GUARD is not None:
        return _GUARD.call(path, write, *args, **kwargs)
    faults.maybe_fail_write(path)
    return write(*args, **kwargs)
