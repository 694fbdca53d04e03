"""Faults around a running job (issue 10, lines 2-4): a stuck rank, a dead rank, Ctrl-C.

The fast tests check the watchdog's decision on hand-made heartbeats, the watchdog thread
over a real TCPStore, and the launcher's last lines from real ``ProcessFailure`` records.
The slow ones launch the real ``zerotune train`` (torch.distributed.run, DeepSpeed, gloo)
and fault a real rank: ``kill -STOP``, ``kill -9``, SIGINT to the process group. NCCL cannot
run here: its settings are checked as values (``test_nccl_aborts_a_timed_out_collective``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, TINY, base_env, check_ok, results, train_losses, zerotune

# ---- the watchdog's decision ---------------------------------------------------------------


def _rec(phase: str = "step", step: int = 31, age: float = 0.5, host: str = "n1", pid: int = 10):
    return {"host": host, "pid": pid, "phase": phase, "step": step, "progress_age": age}


def test_find_stuck_names_the_stopped_rank_not_the_ranks_waiting_for_it():
    from trainer.watchdog import find_stuck

    # rank 1 was stopped 61 s ago in step 31; rank 0 waits in step 31's all-reduce
    records = {0: _rec(age=58.0), 1: _rec(age=0.3, host="n2", pid=22)}
    stuck = find_stuck(records, {0: 0.0, 1: 61.0}, timeout_s=60, long_s=3600)
    assert (stuck.rank, stuck.host, stuck.pid, stuck.phase, stuck.step) == (1, "n2", 22, "step", 31)
    assert "no heartbeat for 61 s" in stuck.why
    assert stuck.message(60).startswith("rank 1 on host n2 (pid 22) is stuck in step 31: ")
    assert "(launch.timeout_minutes: 1)" in stuck.message(60)
    # 59 s: not yet — and rank 0, which waits for it (no progress for 61 s), is not named
    assert find_stuck({0: _rec(age=61.0), 1: _rec()}, {1: 59.0}, 60, 3600) is None


def test_find_stuck_gives_long_phases_their_allowance_but_not_a_stopped_process():
    from trainer.watchdog import find_stuck

    saving = {0: _rec("checkpoint save", 30, age=900.0), 1: _rec("checkpoint save", 30, 950.0)}
    assert find_stuck(saving, {1: 2.0}, timeout_s=60, long_s=3600) is None  # still publishing
    stuck = find_stuck(saving, {1: 2.0}, timeout_s=60, long_s=900)
    assert stuck.rank == 1 and "no progress for 952 s, still running" in stuck.why  # the older
    # a stopped process is caught after the timeout whatever its phase
    stopped = find_stuck(saving, {1: 60.0}, timeout_s=60, long_s=3600)
    assert (
        stopped.rank == 1 and stopped.phase == "checkpoint save" and "no heartbeat" in stopped.why
    )
    # a training step gets the plain timeout; a rank that finished is never stuck
    assert find_stuck({0: _rec(age=61.0)}, {}, 60, 3600).rank == 0
    assert find_stuck({0: _rec("finished", age=500.0)}, {0: 500.0}, 60, 3600) is None


def test_a_rank_waiting_in_a_collective_is_not_named_while_another_is_outside_one():
    """An I/O deadlock in rank 1 after step 15: both ranks last moved at the start of step 15,
    rank 0 a little earlier, but rank 0 waits in a collective and rank 1 does not."""
    from trainer.watchdog import find_stuck

    waiting = {**_rec(step=15, age=60.5), "waiting": True}
    outside = {**_rec(step=15, age=59.9, pid=11), "waiting": False}
    assert find_stuck({0: waiting, 1: outside}, {}, 60, 3600) is None
    outside["progress_age"] = 60.1
    assert find_stuck({0: waiting, 1: outside}, {}, 60, 3600).pid == 11
    # all in collectives (mismatched ones): the oldest
    both = {0: waiting, 1: {**outside, "waiting": True}}
    assert find_stuck(both, {}, 60, 3600).rank == 0


def test_in_collective_reads_a_thread_blocked_in_torch_distributed():
    import datetime
    import threading

    import torch.distributed as dist
    from torch.distributed.elastic.utils.store import barrier

    from trainer.watchdog import in_collective

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=3))

    def wait_for_a_second_member():
        with contextlib.suppress(dist.DistStoreError):  # none comes: it times out
            barrier(store, 2, "t", barrier_timeout=3)

    waiter = threading.Thread(target=wait_for_a_second_member, daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert in_collective(waiter.ident) and not in_collective()
    waiter.join()


def test_watchdog_thread_over_a_real_store_names_the_rank_that_went_quiet():
    """Two watchdogs share a real TCPStore; 'rank 1' publishes twice and then goes quiet (as
    a stopped process): rank 0's thread names it, with its host, pid and phase, after the
    timeout and not before."""
    import datetime

    import torch.distributed as dist

    from trainer.watchdog import HEARTBEAT, Watchdog, beat

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=5))
    quiet = Watchdog(1, 2, timeout_s=1.5, long_s=100, run_dir=None, store=store)
    beat("step", 7)
    quiet.tick()
    quiet.tick()
    found = []
    watcher = Watchdog(
        0, 2, 1.5, 100, None, store=store, interval=0.1, on_stuck=lambda s: found.append(s)
    )
    t0 = time.monotonic()
    watcher.start()
    while watcher.is_alive() and time.monotonic() - t0 < 10:
        beat("step", 8)  # rank 0 itself keeps moving
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    assert len(found) == 1, found
    s = found[0]
    assert (s.rank, s.host, s.pid, s.phase, s.step) == (
        1,
        socket.gethostname(),
        os.getpid(),
        "step",
        7,
    )
    assert 1.5 <= elapsed < 3.0, elapsed
    HEARTBEAT.beat("set-up")


def test_a_dead_neighbour_is_seen_at_once_and_a_finished_one_is_not():
    """The survivors do not wait for gloo (which waits for the dead rank's loader workers to
    close their copies of its sockets): a peer on this host whose process is gone is named
    within a second — unless it said it finished."""
    import datetime

    import torch.distributed as dist

    from trainer.watchdog import FINISHED, HEARTBEAT_KEY, Watchdog

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=5))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    watcher = Watchdog(0, 2, 60, 100, None, store=store)
    record = {**_rec(host=socket.gethostname(), pid=gone.pid), "rank": 1, "seq": 1}
    store.set(f"{HEARTBEAT_KEY}1", json.dumps(record))
    watcher.records[1] = record
    assert watcher.dead_neighbour() == 1
    store.set(f"{HEARTBEAT_KEY}1", json.dumps({**record, "phase": FINISHED}))
    assert watcher.dead_neighbour() is None
    watcher.records[1] = {**record, "pid": os.getpid()}  # alive
    assert watcher.dead_neighbour() is None


def test_nccl_aborts_a_timed_out_collective_after_the_watchdog_named_the_rank():
    """NCCL cannot run here (no GPU): the values it is given are checked instead. Async
    error handling ends a process whose collective timed out rather than leaving it in the
    kernel, and the group's timeout is a minute after the watchdog's, which names the rank."""
    from trainer.distributed import backend_setup

    timeout, nccl = backend_setup("nccl", 30)
    assert nccl == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert timeout.total_seconds() == 31 * 60
    timeout, gloo = backend_setup("gloo", 1)
    assert gloo == {} and timeout.total_seconds() == 120


# ---- the launcher's last lines ---------------------------------------------------------------


def _committed(run_dir: Path, step: int) -> Path:
    """A committed checkpoint as the manifest describes one (one small file)."""
    d = run_dir / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text("{}")
    files = {"trainer_state.json": {"size": 2, "sha256": "-"}}
    (d / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    return d


def test_dead_rank_is_named_with_signal_phase_and_the_checkpoint_to_resume_from(tmp_path):
    from launcher.spawn import explain_failure
    from trainer.process import ExitCode

    ckpt = _committed(tmp_path, 30)
    status = {
        0: {"rank": 0, "host": "n1", "phase": "step", "step": 34, "lost_peer": "Connection closed"},
        1: {"rank": 1, "host": "n2", "phase": "step", "step": 29},  # its last heartbeat file
    }
    failures = {1: (-signal.SIGKILL, 4242), 0: (ExitCode.PEER_LOST, 4241)}
    code, lines = explain_failure(failures, status, tmp_path)
    assert code == ExitCode.FAILED
    assert lines == [
        "zerotune: rank 1 (host n2, pid 4242) was killed by SIGKILL during step 34",
        f"zerotune: last committed checkpoint: {ckpt} (step 30); run the same command to resume from it",
    ]
    # no survivor's note: the dead rank's own last heartbeat; a code of its own: "above"
    code, lines = explain_failure({0: (1, 7)}, {0: status[1] | {"rank": 0}}, tmp_path / "x")
    assert (
        lines[0]
        == "zerotune: rank 0 (host n2, pid 7) exited with code 1 during step 29; its error is above"
    )
    assert lines[1].endswith(
        "no checkpoint was committed yet; running the same command starts again"
    )


def test_stuck_interrupted_and_preempted_have_their_own_code_and_line(tmp_path):
    from launcher.spawn import explain_failure
    from trainer.process import ExitCode

    _committed(tmp_path, 10)
    verdict = {0: {"rank": 0, "stuck": "rank 1 on host n2 (pid 9) is stuck in step 3: ..."}}
    stuck = explain_failure({0: (124, 8), 1: (-9, 9)}, verdict, tmp_path)
    assert stuck == (
        ExitCode.STUCK,
        ["zerotune: rank 1 on host n2 (pid 9) is stuck in step 3: ..."],
    )
    code, lines = explain_failure({0: (-9, 8)}, {}, tmp_path, interrupted=True)
    assert code == ExitCode.INTERRUPTED == 130 and len(lines) == 1
    assert lines[0].startswith(
        "zerotune: interrupted — all ranks stopped; last committed checkpoint"
    )
    assert explain_failure({0: (75, 8)}, {}, tmp_path)[0] == ExitCode.PREEMPTED
    assert explain_failure({0: (2, 8), 1: (2, 9)}, {}, tmp_path) == (ExitCode.CONFIG, [])


def test_second_ctrl_c_kills_a_child_that_ignores_the_first():
    from launcher.spawn import Interrupts

    child = subprocess.Popen(
        [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
         "print(1, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    child.stdout.readline()
    ctrl_c = Interrupts()
    ctrl_c(signal.SIGINT, None)
    time.sleep(0.5)
    assert child.poll() is None  # ignored the first
    ctrl_c(signal.SIGINT, None)
    assert child.wait(timeout=10) == -signal.SIGKILL


# ---- real launches ---------------------------------------------------------------------------


class Launch:
    """``zerotune train`` in its own session (as a terminal's foreground job), with its ranks."""

    def __init__(self, run_dir: Path, cache: Path, *overrides: str, **env: str):
        self.run_dir = run_dir
        args = [sys.executable, "-m", "launcher", "train", str(TINY), "--run-dir", str(run_dir)]
        self.args = args + [x for o in overrides for x in ("--set", o)]
        self.err = open(run_dir.parent / "stderr.txt", "w+")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=base_env(cache, **env),
            stdout=subprocess.DEVNULL,
            stderr=self.err,
            start_new_session=True,
            # as from a terminal: a test runner started in the background ignores SIGINT
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def rank_pid(self, rank: int) -> int:
        for child in psutil.Process(self.proc.pid).children():
            if child.environ().get("RANK") == str(rank):
                return child.pid
        raise AssertionError(f"no rank {rank} among {psutil.Process(self.proc.pid).children()}")

    def wait_for_published_phase(self, pid: int, phase: str, timeout: float = 30) -> None:
        """Until the rank ``pid`` has published a heartbeat in ``phase``: its status file is
        written just before its record goes to the store (and a moment for that)."""
        from trainer.watchdog import STATUS_DIR_ENV

        status = Path(psutil.Process(pid).environ()[STATUS_DIR_ENV])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in status.glob("rank_*.json"):
                with contextlib.suppress(OSError, ValueError):
                    rec = json.loads(path.read_text())
                    if rec.get("pid") == pid and rec.get("phase") == phase:
                        time.sleep(0.3)
                        return
            time.sleep(0.05)
        raise AssertionError(f"pid {pid} published no {phase!r} heartbeat in {timeout} s")

    def wait_for_step(self, step: int, timeout: float = 300) -> int:
        """Wait until the metrics show ``step`` (and a checkpoint committed before it)."""
        deadline = time.monotonic() + timeout
        metrics = self.run_dir / "metrics.jsonl"
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            if metrics.exists():
                steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x]
                if steps and max(steps) >= step:
                    return max(steps)
            time.sleep(0.1)
        raise AssertionError(f"step {step} not reached\n{self.stderr()}")

    def wait(self, timeout: float) -> tuple[int, float]:
        t0 = time.monotonic()
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - t0

    def stderr(self) -> str:
        self.err.flush()
        self.err.seek(0)
        return self.err.read()

    def last_lines(self, n: int) -> list[str]:
        return [x for x in self.stderr().splitlines() if x.strip()][-n:]

    def kill(self) -> None:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.proc.kill()


@pytest.fixture
def launches():
    started: list[Launch] = []
    yield started
    for launch in started:
        if launch.proc.poll() is None:
            launch.kill()
        launch.err.close()


@pytest.mark.slow
def test_stopped_rank_ends_the_job_within_the_timeout_naming_rank_host_and_phase(
    tmp_path, cache_dir, launches
):
    """``kill -STOP`` of rank 1 mid-training with launch.timeout_minutes 1: the job exits 124
    within the minute plus a small margin, and its last line names rank 1, this host and the
    step it stopped in (before: it waited until the rank was continued)."""
    launch = Launch(
        tmp_path / "run", cache_dir, "train.max_steps=100000", "launch.timeout_minutes=1"
    )
    launches.append(launch)
    launch.wait_for_step(12)
    pid = launch.rank_pid(1)
    # stopped once its heartbeat has said it is in a step (published within a second of
    # entering one): the watchdog can only name a phase that the rank has published
    launch.wait_for_published_phase(pid, "step")
    os.kill(pid, signal.SIGSTOP)
    code, seconds = launch.wait(timeout=240)
    print(f"\nstopped rank 1: job ended after {seconds:.1f} s (timeout 60 s), exit {code}")
    last = launch.last_lines(1)[0]
    assert code == 124, launch.stderr()[-3000:]
    assert seconds < 60 + 25, seconds
    assert f"rank 1 on host {socket.gethostname()} (pid {pid}) is stuck in step " in last, last
    assert "no heartbeat for" in last and "launch.timeout_minutes: 1" in last
    assert "last committed checkpoint: " in last and "run the same command to resume" in last
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "Traceback" not in launch.stderr()


@pytest.mark.slow
def test_rank_hung_in_a_step_while_alive_is_named_within_the_timeout(tmp_path, cache_dir, launches):
    """Rank 1's main thread blocks for good after step 15 (``ZEROTUNE_FAULT=hang@15:1``, as an
    I/O deadlock would; its process and heartbeat thread live on) while rank 0 waits in step
    16's collective: the job exits 124 within the minute plus a margin, naming rank 1, not
    the rank that waits for it."""
    launch = Launch(
        tmp_path / "run",
        cache_dir,
        "train.max_steps=100000",
        "launch.timeout_minutes=1",
        ZEROTUNE_FAULT="hang@15:1",
    )
    launches.append(launch)
    launch.wait_for_step(14)  # step 15's own log record needs rank 1: it never comes
    code, seconds = launch.wait(timeout=240)
    print(
        f"\nrank 1 hung after step 15: job ended {seconds:.1f} s after step 14's log, exit {code}"
    )
    last = launch.last_lines(1)[0]
    assert code == 124, launch.stderr()[-3000:]
    assert seconds < 60 + 25, seconds
    assert f"rank 1 on host {socket.gethostname()} (pid " in last, last
    assert "is stuck in step 15: no progress for 6" in last and "still running" in last, last
    assert "Traceback" not in launch.stderr()


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_killed_rank_is_named_and_the_same_command_resumes_exactly(
    victim, tmp_path, cache_dir, launches, runs
):
    """``kill -9`` of a rank: the job exits 1 at once; its last lines name the rank, SIGKILL,
    the step and the last committed checkpoint, with no gloo traceback; the same command
    then resumes from that checkpoint and ends as the uninterrupted run (bit for bit)."""
    ref = runs.stage(2)
    run_dir = tmp_path / "run"
    launch = Launch(run_dir, cache_dir)
    launches.append(launch)
    launch.wait_for_step(24)
    pid = launch.rank_pid(victim)
    os.kill(pid, signal.SIGKILL)
    code, seconds = launch.wait(timeout=120)
    print(f"\nkill -9 rank {victim}: job ended after {seconds:.1f} s, exit {code}")
    assert code == 1, launch.stderr()[-3000:]
    assert seconds < 10, seconds
    died, resume = launch.last_lines(2)
    assert died.startswith(f"zerotune: rank {victim} (host {socket.gethostname()}, pid {pid}) ")
    found = re.search(r"was killed by SIGKILL during (step|\w[\w ]+ at step) (\d+)$", died)
    assert found, died
    step = int(found[2])
    committed = sorted(p.name for p in (run_dir / "checkpoints").glob("step_????????"))
    newest = int(committed[-1].split("_")[1])
    assert newest <= step < newest + 10 + 1  # checkpoint.every_steps: 10
    assert resume == (
        f"zerotune: last committed checkpoint: {run_dir / 'checkpoints' / committed[-1]} "
        f"(step {newest}); run the same command to resume from it"
    )
    assert "Traceback" not in launch.stderr() and "Connection closed by peer" not in launch.stderr()

    resumed = zerotune(launch.args[3:], cache_dir)
    check_ok(resumed)
    assert f"at step {newest}" in resumed.stderr
    assert train_losses(run_dir) == train_losses(ref)
    assert results(run_dir)["param_digests"] == results(ref)["param_digests"]


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_in_seconds_with_one_line_and_valid_checkpoints(
    tmp_path, cache_dir, launches
):
    """SIGINT to the launcher's process group, as a terminal sends Ctrl-C: every rank stops
    within seconds without a save, one line (no traceback) names the last committed
    checkpoint, and every committed checkpoint still verifies (checksums)."""
    from trainer.checkpoint import verify

    launch = Launch(tmp_path / "run", cache_dir, "train.max_steps=100000")
    launches.append(launch)
    launch.wait_for_step(25)
    ranks = [launch.rank_pid(r) for r in (0, 1)]
    os.killpg(launch.proc.pid, signal.SIGINT)
    code, seconds = launch.wait(timeout=60)
    print(f"\nCtrl-C: job ended after {seconds:.1f} s, exit {code}")
    assert code == 130, launch.stderr()[-3000:]
    assert seconds < 10, seconds
    assert not any(psutil.pid_exists(p) for p in ranks)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_????????"))
    assert ckpts and all(verify(c) == [] for c in ckpts)
    ours = [x for x in launch.stderr().splitlines() if x.startswith("zerotune")]
    assert ours == [
        f"zerotune: interrupted — all ranks stopped; last committed checkpoint: {ckpts[-1]} "
        f"(step {int(ckpts[-1].name.split('_')[1])}); run the same command to resume from it"
    ], launch.stderr()[-3000:]
    assert launch.last_lines(1)[0] == ours[0]
    assert "Traceback" not in launch.stderr() and "KeyboardInterrupt" not in launch.stderr()
