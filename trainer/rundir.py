"""One owner per run directory, and a resume that trains what the run was training.

Two runs writing the same checkpoints corrupt each other's resume silently, and a run
resumed with another model, task or batch fails deep inside DeepSpeed (or, worse, trains
on). Both are refused before anything is written, with a message naming the owner or the
differing keys.

The lock is ``fcntl.flock`` on ``RUN_DIR/.zerotune.lock``: the kernel releases it when the
holder dies, however it dies, so a lock left by a ``kill -9`` is simply free again (the file
still names the dead owner: the next run says it took over). The file holds the owner's
host, pid, start time and command, for the message a second run prints.

Who holds it: ``zerotune train`` takes it before it spawns ranks and tells them
(``ZEROTUNE_RUN_LOCK_PID``); under torchrun / srun / mpirun by hand, global rank 0 takes it.
Global rank 0 also holds ``.zerotune.ranks.lock`` while it runs, under any launcher, so ranks
orphaned by a killed launcher still keep a second run out.

Shared file systems: on NFS (v4, or v3 with lockd) Linux emulates ``flock`` with POSIX
byte-range locks, which the server arbitrates between hosts, so two jobs on two nodes still
exclude each other; a lock held by a node that crashed is released when the server's lease
expires (NFSv4: ~90 s). Lustre honours ``flock`` only when mounted with ``-o flock``
(``localflock`` makes it per-node); BeeGFS and GPFS support it. Where the file system refuses
locks (``ENOLCK`` / ``EOPNOTSUPP``) the run warns that it cannot exclude a second run and
continues: the owner's record is still written, for people to read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, config_from_dict, dotted_keys

LOCK_FILE = ".zerotune.lock"
RANKS_LOCK_FILE = ".zerotune.ranks.lock"
# set by `zerotune train` for the ranks it spawns: the pid that holds LOCK_FILE for them
HELD_ENV = "ZEROTUNE_RUN_LOCK_PID"
CONFIG_FILE = "config.yaml"
FORCE = "force"  # --resume force: resume although the config changes the run

# Keys whose change does not change what is trained: where and how often it is logged,
# evaluated and saved, how batches are loaded, how far it goes, and the non-finite policy.
HARMLESS = (
    "logging.",
    "launch.",
    "checkpoint.",
    "eval.every_steps",
    "eval.micro_batch_size",
    "eval.early_stopping_patience",
    "eval.stop_at",
    "train.max_steps",
    "train.epochs",
    "train.on_nonfinite",
    "train.max_nonfinite_in_a_row",
    "data.num_workers",
    "data.prefetch_factor",
    "data.pin_memory",
    "data.cache_dir",
    "data.test",
    "data.test_split",
    "data.max_eval_samples",
)

_UNLOCKABLE = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirInUse(ConfigError):
    """Another live process owns the run directory."""


@dataclass
class RunLock:
    path: Path
    fd: int
    previous: dict[str, Any] | None  # the record a dead owner left (None: a clean hand-over)
    locked: bool = True  # False where the file system refuses locks

    def release(self, refused: bool = False) -> None:
        """Clear the record (a clean exit leaves nothing to take over) and unlock; a run
        ``refused`` after taking the lock puts back the record it found (a dead owner's)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            if refused and self.previous:
                os.pwrite(self.fd, json.dumps(self.previous).encode(), 0)
        os.close(self.fd)
        self.fd = -1

    def takeover_note(self) -> str | None:
        if not self.previous:
            return None
        return (
            f"took over {self.path.parent}: its lock named {describe_owner(self.previous)}, "
            "which no longer runs (a crash or kill -9); resuming from its newest valid checkpoint"
        )


def owner_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:300],
    }


def read_owner(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def describe_owner(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (its record is empty)"
    return (
        f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')} "
        f"({owner.get('command', '?')})"
    )


def _flock(path: Path, what: str, record: bool = True) -> RunLock:
    """Take ``path``'s lock or raise ``RunDirInUse`` naming the holder; ``record``: write
    this process in as the owner."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirInUse(
            f"run directory {path.parent} is in use by {describe_owner(read_owner(path))} ({what}): "
            "wait for it to finish or stop it, or train in another --run-dir"
        ) from None
    except OSError as e:
        if e.errno not in _UNLOCKABLE:
            os.close(fd)
            raise
        print(
            f"zerotune: warning: {path.parent}'s file system does not support locks ({e.strerror}): "
            "a second run on this run directory cannot be refused; see trainer/rundir.py",
            file=sys.stderr,
        )
        return RunLock(path, fd, None, locked=False)
    previous = read_owner(path)
    if not record:
        return RunLock(path, fd, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner_record()).encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd, previous)


def lock_for_launcher(run_dir: Path) -> RunLock:
    """``zerotune train``, before it spawns: the run directory's lock, and no ranks of an
    earlier run still alive in it (orphans of a killed launcher hold the ranks' lock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _flock(run_dir / LOCK_FILE, "zerotune train")
    ranks = run_dir / RANKS_LOCK_FILE
    if ranks.exists():
        try:
            probe = _flock(ranks, "its ranks", record=False)
        except RunDirInUse:
            lock.release()
            raise
        os.close(probe.fd)  # free: leave the record for rank 0 to replace
    return lock


def refuse_if_in_use(run_dir: Path) -> None:
    """Raise ``RunDirInUse`` if a live run owns ``run_dir``, creating nothing: the launcher
    asks this first, so a second run is refused before its pre-flight reads any data."""
    for name, what in ((LOCK_FILE, "zerotune train"), (RANKS_LOCK_FILE, "its ranks")):
        if (run_dir / name).is_file():
            os.close(_flock(run_dir / name, what, record=False).fd)


def lock_for_rank0(run_dir: Path, environ: Mapping[str, str]) -> list[RunLock]:
    """Global rank 0, under any launcher: the run directory's lock unless the launcher that
    spawned it holds it, and the ranks' lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    locks = []
    held_by = environ.get(HELD_ENV)
    owner = read_owner(run_dir / LOCK_FILE)
    spawned = bool(
        held_by
        and owner
        and str(owner.get("pid")) == held_by
        and owner.get("host") == socket.gethostname()
    )
    try:
        if not spawned:
            locks.append(_flock(run_dir / LOCK_FILE, "its rank 0"))
        locks.append(_flock(run_dir / RANKS_LOCK_FILE, "its ranks"))
    except RunDirInUse:
        for lock in locks:
            lock.release()
        raise
    return locks


# --------------------------------------------------------------------------------------
# A resume that changes the run
# --------------------------------------------------------------------------------------


def config_changes(old: Mapping[str, Any], new: RunConfig) -> list[str]:
    """``key: old → new`` for each key that changes what is trained (HARMLESS ones aside).

    ``old`` is the run's config.yaml, completed with today's defaults when it still
    validates, so a key added since is not a difference."""
    with contextlib.suppress(ConfigError):
        old = config_from_dict(dict(old)).model_dump(mode="json")
    before, after = dotted_keys(old), dotted_keys(new.model_dump(mode="json"))
    return [
        f"{key}: {before[key]!r} → {after[key]!r}"
        for key in sorted(before.keys() & after.keys())
        if before[key] != after[key] and not key.startswith(HARMLESS)
    ]


def resume_config_problem(
    run_dir: Path, cfg: RunConfig, resume: str, global_batch: int | None
) -> str | None:
    """Resuming ``run_dir`` (``--resume auto``) with a config that changes the run: what
    differs, and what to do. None when there is nothing to resume or nothing changes."""
    import yaml

    from .checkpoint import TRAINER_STATE, committed

    saved = run_dir / CONFIG_FILE
    ckpts = committed(run_dir / "checkpoints")
    if resume != "auto" or not saved.is_file() or not ckpts:
        return None
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        return f"{saved} cannot be read ({e}): restore it, or resume anyway with --resume force"
    changes = config_changes(old, cfg)
    try:
        state = json.loads((ckpts[0] / TRAINER_STATE).read_text())
        old_batch = state.get("global_batch")
    except (OSError, ValueError):
        old_batch = None
    if global_batch is not None and old_batch is not None and old_batch != global_batch:
        changes.append(
            f"global batch (micro × accumulation × world): {old_batch} → {global_batch} "
            "(set train.global_batch_size to keep it at another world size)"
        )
    if not changes:
        return None
    return (
        f"run directory {run_dir} holds a run with another config; resuming it would change "
        f"the run: {'; '.join(changes)}. Use the run's own config ({saved}), train in another "
        "--run-dir, or resume anyway with --resume force"
    )


def check_resume_config(
    run_dir: Path, cfg: RunConfig, resume: str, global_batch: int | None
) -> None:
    problem = resume_config_problem(run_dir, cfg, resume, global_batch)
    if problem:
        raise ConfigError(problem)
