"""Heartbeats and a watchdog: a stuck rank is named, and the job ends, within
``launch.timeout_minutes`` (plus one publishing interval or two).

Why our own: gloo's timeout does not fire for a stopped peer in some collectives, NCCL's
fires without naming the rank that caused it, and a stopped process (SIGSTOP, a swapped-out
node, an I/O deadlock) cannot report anything itself. So the detection comes from outside
the stuck rank:

* each rank keeps a heartbeat — its phase (set-up, step N, evaluation, checkpoint save /
  load, export) and when it last moved — by plain attribute writes from the loop
  (``beat``; no syscall per step);
* a daemon thread in every rank publishes that record to the rendezvous store every few
  seconds and reads every other rank's. The store is torchrun's agent store, or rank 0's
  under srun / mpirun, so the watchdog works under every launcher.

A rank is stuck when its record has not changed for ``timeout`` (the process no longer
runs: stopped, or frozen), or when it runs but its phase has not moved for the phase's
allowance: ``timeout`` for a training step, ``LONG_WAIT_TIMEOUT`` for phases that may
legitimately take hours (set-up with tokenisation, evaluation, checkpoint save / load,
export). The first rank to see it names the rank, its host and phase, kills a stuck rank on
its own host (a stopped process ignores SIGTERM), and exits ``ExitCode.STUCK``; its launcher
then ends the rest. Clocks of different hosts are never compared: ages are measured on the
publishing rank's monotonic clock and staleness on the reader's.

Under ``zerotune train`` (``STATUS_DIR_ENV`` set) ranks also write their record to a file
there, and the launcher's last lines (``launcher.spawn``) come from those files: the phase
a dead rank was in, the verdict of a watchdog, the last committed checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUS_DIR_ENV = "ZEROTUNE_STATUS_DIR"  # set by `zerotune train` for its ranks
HEARTBEAT_KEY = "zerotune/heartbeat/"
REPORTED_KEY = "zerotune/stuck-reported"
# phases that may take as long as the data or the files are large: they get the long
# allowance while their process keeps publishing (a stopped process is caught after timeout)
LONG_PHASES = frozenset(
    {"set-up", "checkpoint load", "evaluation", "final evaluation", "checkpoint save", "export"}
)
FINISHED = "finished"  # a rank that is done publishing: never stuck
PHASE_PUBLISH_S = 1.0


class Heartbeat:
    """This rank's phase and when it last moved (``time.monotonic``, no syscall on Linux)."""

    def __init__(self) -> None:
        self.phase, self.step, self.since = "set-up", 0, time.monotonic()

    def beat(self, phase: str, step: int = 0) -> None:
        self.phase, self.step, self.since = phase, step, time.monotonic()

    def record(self, rank: int, seq: int) -> dict[str, Any]:
        return {
            "rank": rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "phase": self.phase,
            "step": self.step,
            "seq": seq,
            "progress_age": time.monotonic() - self.since,
            "waiting": in_collective(),
        }


def in_collective(thread_id: int | None = None) -> bool:
    """Whether the main thread is blocked inside a torch.distributed call (read from its
    innermost Python frames, at publishing time only): a rank that waits there is usually
    not the cause of a hang but waits for it."""
    frame = sys._current_frames().get(thread_id or threading.main_thread().ident)
    for _ in range(4):
        if frame is None:
            return False
        if "torch/distributed/" in frame.f_code.co_filename.replace(os.sep, "/"):
            return True
        frame = frame.f_back
    return False


HEARTBEAT = Heartbeat()


def beat(phase: str, step: int = 0) -> None:
    """Mark the phase this rank enters (``step``: the training step it belongs to)."""
    HEARTBEAT.beat(phase, step)


def describe_phase(phase: str, step: int) -> str:
    """'step 31', 'checkpoint save at step 30', 'set-up'."""
    if phase == "step":
        return f"step {step}"
    return f"{phase} at step {step}" if step else phase


@dataclass
class Stuck:
    """A watchdog's verdict: which rank, where, and why."""

    rank: int
    host: str
    pid: int
    phase: str
    step: int
    why: str  # "no heartbeat for 63 s" / "no progress for 6.0 h"

    def message(self, timeout_s: float) -> str:
        if self.rank < 0:  # the store itself: its host cannot be asked
            return self.why
        return (
            f"rank {self.rank} on host {self.host} (pid {self.pid}) is stuck in "
            f"{describe_phase(self.phase, self.step)}: {self.why} "
            f"(launch.timeout_minutes: {timeout_s / 60:g})"
        )


def find_stuck(
    records: dict[int, dict[str, Any]],
    unchanged_for: dict[int, float],
    timeout_s: float,
    long_s: float,
    quiet_grace: float = 15.0,
) -> Stuck | None:
    """The stuck rank, if any (pure: the thread below feeds it).

    ``records``: each rank's last published record; ``unchanged_for``: seconds since this
    reader saw that record change (0 for its own). A rank whose record stopped changing for
    ``timeout_s`` is stopped or frozen; one that still publishes but has not left its phase
    for the phase's allowance is stuck inside it — unless some rank has been silent for
    ``quiet_grace`` (a few publishing intervals): then the running ones are waiting for that
    one in a collective, and it is named when its silence reaches the timeout. Likewise a
    rank blocked in a collective (``waiting``) is not named while another is outside one.
    Among several, the one that moved last longest ago is named.
    """
    live = {r: rec for r, rec in records.items() if rec.get("phase") != FINISHED}
    someone_quiet = any(q >= quiet_grace for r, q in unchanged_for.items() if r in live)
    # ranks blocked in a collective wait for one that is not: only that one can be the cause
    someone_outside = any(not rec.get("waiting") for rec in live.values())
    found: list[tuple[float, Stuck]] = []
    for rank, rec in records.items():
        if rec.get("phase") == FINISHED:
            continue
        quiet = unchanged_for.get(rank, 0.0)
        stalled = rec["progress_age"] + quiet
        allowance = long_s if rec["phase"] in LONG_PHASES else timeout_s
        if quiet >= timeout_s:
            why = f"no heartbeat for {quiet:.0f} s (the process is stopped or frozen)"
        elif (
            stalled >= allowance
            and quiet < quiet_grace
            and not someone_quiet
            and not (rec.get("waiting") and someone_outside)
        ):
            why = f"no progress for {_duration(stalled)}, still running"
        else:
            continue
        found.append(
            (stalled, Stuck(rank, rec["host"], rec["pid"], rec["phase"], rec["step"], why))
        )
    return max(found, key=lambda f: f[0])[1] if found else None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def publish_interval(timeout_s: float) -> float:
    """Often enough to notice within a small margin of the timeout, rarely enough to cost nothing."""
    return min(10.0, max(0.5, timeout_s / 12))


def last_committed(run_dir: Path) -> tuple[Path, int] | None:
    """(path, step) of the newest committed checkpoint whose files have their manifest sizes
    (sizes only, so a failing job names it at once: the resume itself verifies checksums)."""
    from .checkpoint import find_valid

    ckpt = find_valid(run_dir / "checkpoints", "quick", warn=lambda _: None)
    return (ckpt, int(ckpt.name.split("_")[1])) if ckpt is not None else None


def resume_hint(run_dir: Path | None) -> str:
    """Where the last committed checkpoint is and what resumes from it."""
    found = last_committed(run_dir) if run_dir is not None else None
    if found is None:
        return "no checkpoint was committed yet; running the same command starts again"
    path, step = found
    return (
        f"last committed checkpoint: {path} (step {step}); run the same command to resume from it"
    )


# ---- status files for the launcher (zerotune train) ----------------------------------------


def write_status(record: dict[str, Any], status_dir: str | None = None) -> None:
    """This rank's record where ``zerotune train`` reads it after the ranks ended."""
    status_dir = status_dir or os.environ.get(STATUS_DIR_ENV)
    if not status_dir:
        return
    path = Path(status_dir) / f"rank_{record['rank']}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)


def note_phase(rank: int) -> None:
    """Leave this rank's phase in its status file now (it fails: the launcher names it)."""
    write_status(HEARTBEAT.record(rank, -1))


def read_status(status_dir: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for p in Path(status_dir).glob("rank_*.json"):
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(p.read_text())
            out[int(rec["rank"])] = rec
    return out


def report_lost_peer(rank: int, error: BaseException) -> None:
    """A collective failed because another rank died or stopped: one line (or, under
    ``zerotune train``, a note in the status file from which the launcher names the cause),
    instead of this rank's traceback."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    record = {**HEARTBEAT.record(rank, -1), "lost_peer": first[:300]}
    if os.environ.get(STATUS_DIR_ENV):
        write_status(record)
        return
    print(
        f"zerotune: rank {rank}: another rank failed during "
        f"{describe_phase(record['phase'], record['step'])} ({first[:200]}); "
        "its own error or the launcher's report names it",
        file=sys.stderr,
        flush=True,
    )


PEER_ERRORS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "gloo",
    "NCCL",
    "Timed out waiting",
    # the launcher's teardown (SIGTERM to the rank's session) reached its loader worker
    "killed by signal: Terminated",
)


def is_peer_failure(error: BaseException | None) -> bool:
    """A communication error (another rank died, stopped or closed its connection), or an
    echo of one raised while it was handled: the whole chain counts."""
    import torch.distributed as dist

    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, dist.DistError) or (
            isinstance(error, RuntimeError) and any(s in str(error) for s in PEER_ERRORS)
        ):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


# ---- the watchdog thread -------------------------------------------------------------------


class Watchdog(threading.Thread):
    """Publishes this rank's heartbeat and ends the job when ``find_stuck`` names a rank."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        long_s: float,
        run_dir: Path | None,
        store: Any = None,
        interval: float | None = None,
        on_stuck=None,
    ):
        super().__init__(name="zerotune-watchdog", daemon=True)
        self.rank, self.world, self.run_dir = rank, world_size, run_dir
        self.timeout_s, self.long_s = timeout_s, long_s
        self.interval = interval or publish_interval(timeout_s)
        self.store = store
        self.on_stuck = on_stuck or self._end_job
        self.halt = threading.Event()
        self.seq = 0
        start = time.monotonic()
        self.last: dict[int, tuple[int, float]] = {r: (-1, start) for r in range(world_size)}
        self.records: dict[int, dict[str, Any]] = {}
        self.store_ok_at = start
        self.calls = BoundedCalls(max(2.0, self.interval))

    def run(self) -> None:
        if self.store is None:
            self.store = _store_client(self.interval)
        # a new phase is published within a second (the loop only writes attributes); the
        # peers are read, and the record republished, every interval. The first record goes
        # out at once: a rank stopped within its first second is then named with its phase,
        # not as one never heard from
        shown, next_check = None, time.monotonic() + self.interval
        with contextlib.suppress(Exception):  # the first tick judges the store
            own = self.publish()
            shown = (own["phase"], own["step"])
        while not self.halt.wait(min(PHASE_PUBLISH_S, self.interval)):
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.interval
                stuck = self.tick()
                if stuck is not None:
                    self.on_stuck(stuck)
                    return
            elif (HEARTBEAT.phase, HEARTBEAT.step) != shown:
                with contextlib.suppress(Exception):  # the next tick judges the store
                    self.publish()
            shown = (HEARTBEAT.phase, HEARTBEAT.step)
            dead = self.dead_neighbour()
            if dead is not None:
                self.on_dead(dead)
                return

    def dead_neighbour(self) -> int | None:
        """A rank on this host whose process is gone. Gloo notices a dead peer only when
        every copy of its sockets is closed, and the loader workers it forked hold them for
        up to 5 s more; the survivors need not wait for that."""
        import psutil

        host = socket.gethostname()
        for r, rec in self.records.items():
            if rec.get("host") != host or rec.get("phase") == FINISHED or not rec.get("pid"):
                continue
            try:
                gone = psutil.Process(rec["pid"]).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            except psutil.Error:
                gone = False
            if gone and not self._finished(r):
                return r
        return None

    def _finished(self, rank: int) -> bool:
        """Whether ``rank`` said it was done (``stop``) since this thread last read its record:
        a rank that ended well is not a dead one."""
        with contextlib.suppress(Exception):
            rec = json.loads(self.calls.run(lambda: self.store.get(f"{HEARTBEAT_KEY}{rank}")))
            self.records[rank] = rec
            return rec.get("phase") == FINISHED
        return False

    def on_dead(self, rank: int) -> None:
        """End this rank as a collective failing on the dead peer would (exit PEER_LOST)."""
        from .process import ExitCode

        report_lost_peer(self.rank, RuntimeError(f"rank {rank}'s process is gone"))
        os._exit(ExitCode.PEER_LOST)

    def stop(self) -> None:
        """This rank is done: say so (peers must not take its silence for a hang), then stop."""
        self.halt.set()
        HEARTBEAT.beat(FINISHED)
        own = json.dumps(self._own())
        with contextlib.suppress(Exception):
            if self.store:
                BoundedCalls(2.0).run(lambda: self.store.set(f"{HEARTBEAT_KEY}{self.rank}", own))

    def _own(self) -> dict[str, Any]:
        self.seq += 1
        return HEARTBEAT.record(self.rank, self.seq)

    def publish(self) -> dict[str, Any]:
        own = self._own()
        write_status(own)
        self.calls.run(lambda: self.store.set(f"{HEARTBEAT_KEY}{self.rank}", json.dumps(own)))
        return own

    def _exchange(self, own: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Publish this rank's record and read the others' (those published so far)."""
        self.store.set(f"{HEARTBEAT_KEY}{self.rank}", json.dumps(own))
        others = [r for r in range(self.world) if r != self.rank]
        keys = [f"{HEARTBEAT_KEY}{r}" for r in others]
        if self.store.check(keys):  # all published: one round trip
            return {r: json.loads(v) for r, v in zip(others, self.store.multi_get(keys))}
        return {
            r: json.loads(self.store.get(k)) for r, k in zip(others, keys) if self.store.check([k])
        }

    def tick(self) -> Stuck | None:
        now = time.monotonic()
        own = self._own()
        write_status(own)
        try:
            for r, rec in self.calls.run(lambda: self._exchange(own)).items():
                if rec["seq"] != self.last[r][0]:
                    self.last[r] = (rec["seq"], now)
                self.records[r] = rec
            self.store_ok_at = now
        except Exception as e:  # the store's host (the agent, or rank 0) is stopped or gone
            silent = now - self.store_ok_at
            if silent < self.timeout_s:
                return None
            return self._store_silent(silent, e)
        records = {**self.records, self.rank: own}
        for r in range(self.world):  # a rank never heard from is as stale as its silence
            records.setdefault(
                r, {"host": "?", "pid": 0, "phase": "set-up", "step": 0, "progress_age": 0.0}
            )
        quiet = {r: now - seen for r, (_, seen) in self.last.items() if r != self.rank}
        stuck = find_stuck(records, quiet, self.timeout_s, self.long_s, 3 * self.interval)
        if stuck is not None and stuck.rank != self.rank:
            self._latest_phase(stuck)
        return stuck

    def _latest_phase(self, stuck: Stuck) -> None:
        """The phase the stuck rank published last (within a second of entering it); this
        thread reads the others only every interval."""
        with contextlib.suppress(Exception):
            rec = json.loads(self.calls.run(lambda: self.store.get(f"{HEARTBEAT_KEY}{stuck.rank}")))
            stuck.phase, stuck.step = rec["phase"], rec["step"]

    def _store_silent(self, silent: float, error: Exception) -> Stuck:
        """The store has not answered for the timeout. Without torchrun's agent it lives in
        rank 0: that rank is the stuck one (named from its last record); else the agent is."""
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        why = f"the rendezvous store at {where} has not answered for {silent:.0f} s"
        rec = self.records.get(0)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rec is not None:
            why += " (it runs in this rank: the process is stopped or frozen)"
            return Stuck(0, rec["host"], rec["pid"], rec["phase"], rec["step"], why)
        return Stuck(-1, "?", 0, "?", 0, f"{why}: its process is stopped or gone ({error})")

    def _end_job(self, stuck: Stuck) -> None:
        """Name the rank once for the job, stop a stuck rank on this host, exit STUCK."""
        from .process import ExitCode

        first = True
        with contextlib.suppress(Exception):
            first = BoundedCalls(2.0).run(lambda: self.store.add(REPORTED_KEY, 1)) == 1
        message = f"{stuck.message(self.timeout_s)}; stopping the job — {resume_hint(self.run_dir)}"
        if os.environ.get(STATUS_DIR_ENV):
            write_status({**HEARTBEAT.record(self.rank, -1), "stuck": message})
        elif first:
            print(f"zerotune: {message}", file=sys.stderr, flush=True)
        if stuck.host == socket.gethostname() and stuck.pid not in (0, os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(stuck.pid, signal.SIGKILL)  # stopped: SIGTERM would wait for SIGCONT
        sys.stderr.flush()
        os._exit(ExitCode.STUCK)


class BoundedCalls:
    """Store calls that give up after ``seconds``: a store whose process is stopped never
    answers, and the client's own timeout does not bound every call. One call at a time: while
    an earlier one still hangs, the next fails at once."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.busy: threading.Thread | None = None

    def run(self, fn):
        if self.busy is not None and self.busy.is_alive():
            raise TimeoutError("an earlier call to the store has not returned")
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:
                box["error"] = e

        self.busy = threading.Thread(target=call, name="zerotune-watchdog-store", daemon=True)
        self.busy.start()
        self.busy.join(self.seconds)
        if self.busy.is_alive():
            raise TimeoutError(f"the store did not answer within {self.seconds:.0f} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")


def _store_client(interval: float) -> Any:
    """A connection of its own to the rendezvous store (torchrun's agent, or rank 0's), with
    a short timeout: the main thread's may be blocked in a collective."""
    import torch.distributed as dist

    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=max(5.0, 2 * interval)),
        wait_for_workers=False,
    )


_running: Watchdog | None = None


def start_watchdog(
    rank: int, world_size: int, timeout_minutes: float, long_s: float, run_dir: Path | None
) -> Watchdog | None:
    """Start this rank's watchdog (a world of more than one rank; or one rank under
    ``zerotune train``, whose status file names the phase if it dies)."""
    global _running
    if world_size == 1 and not os.environ.get(STATUS_DIR_ENV):
        return None
    if world_size == 1:
        _running = _StatusOnly(rank, timeout_minutes * 60, long_s, run_dir)
    else:
        _running = Watchdog(rank, world_size, timeout_minutes * 60, long_s, run_dir)
    _running.start()
    return _running


def stop_watchdog() -> None:
    global _running
    if _running is not None:
        _running.stop()
        _running = None


class _StatusOnly(Watchdog):
    """One rank: no peers to watch, only the status file for the launcher."""

    def __init__(self, rank: int, timeout_s: float, long_s: float, run_dir: Path | None):
        super().__init__(rank, 1, timeout_s, long_s, run_dir, store=False)

    def publish(self) -> dict[str, Any]:
        own = self._own()
        write_status(own)
        return own

    def tick(self) -> Stuck | None:
        self.publish()
        return None
