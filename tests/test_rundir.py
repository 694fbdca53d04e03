"""One owner per run directory and a resume that keeps the run (issue 10, line 6).

The locks are taken by real processes (a holder started with ``python -c``, killed with
SIGKILL), the config check runs on real config.yaml files and checkpoints written by the
loop, and the slow test starts ``zerotune train`` twice on one run directory."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from trainer import checkpoint as ck
from trainer.config import ConfigError, dump_config, load_config
from trainer.rundir import (
    HELD_ENV,
    LOCK_FILE,
    RANKS_LOCK_FILE,
    RunDirInUse,
    config_changes,
    lock_for_launcher,
    lock_for_rank0,
    resume_config_problem,
)

from conftest import ROOT, TINY, base_env, check_ok, zerotune

HOLD = """
import sys, time
from pathlib import Path
from trainer.rundir import lock_for_launcher, lock_for_rank0
run_dir = Path(sys.argv[1])
lock = lock_for_launcher(run_dir) if sys.argv[2] == "launcher" else lock_for_rank0(run_dir, {})
print("held", flush=True)
time.sleep(600)
"""


def _holder(run_dir: Path, role: str = "launcher") -> subprocess.Popen:
    """A live process that owns ``run_dir`` (as a launcher, or as a by-hand rank 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), role],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_owner_is_refused_naming_the_first_and_a_killed_owner_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        t0 = time.perf_counter()
        with pytest.raises(RunDirInUse) as e:
            lock_for_launcher(run_dir)
        refused_s = time.perf_counter() - t0
        msg = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in msg
        assert "in another --run-dir" in msg
        print(f"\nsecond owner refused in {refused_s * 1000:.1f} ms")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = lock_for_launcher(run_dir)  # the kernel freed the flock with the process
    note = lock.takeover_note()
    assert note and f"pid {holder.pid}" in note and "no longer runs" in note
    record = json.loads((run_dir / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid()
    lock.release()  # a clean exit clears the record: the next owner has nothing to take over
    again = lock_for_launcher(run_dir)
    assert again.takeover_note() is None
    again.release()


def test_ranks_of_a_by_hand_run_and_orphaned_ranks_keep_a_launcher_out(tmp_path):
    run_dir = tmp_path / "run"
    rank0 = _holder(run_dir, "rank0")  # torchrun by hand: global rank 0 holds both locks
    try:
        with pytest.raises(RunDirInUse, match=f"pid {rank0.pid}"):
            lock_for_launcher(run_dir)
        # the lock file alone free (a killed launcher) while its ranks live on: still refused
        os.unlink(run_dir / LOCK_FILE)
        with pytest.raises(RunDirInUse, match=r"its ranks"):
            lock_for_launcher(run_dir)
        assert not (run_dir / LOCK_FILE).read_text()  # the refused launcher left no record
    finally:
        rank0.send_signal(signal.SIGKILL)
        rank0.wait()


def test_rank0_trusts_the_launcher_that_spawned_it_only(tmp_path):
    run_dir = tmp_path / "run"
    launcher = lock_for_launcher(run_dir)
    locks = lock_for_rank0(run_dir, {HELD_ENV: str(os.getpid())})
    assert [lock.path.name for lock in locks] == [RANKS_LOCK_FILE]
    for lock in locks:
        lock.release()
    with pytest.raises(RunDirInUse):  # another launcher's pid: this one is not its child
        lock_for_rank0(run_dir, {HELD_ENV: str(os.getpid() + 1)})
    launcher.release()


# --------------------------------------------------------------------------------------
# A resume that changes the run
# --------------------------------------------------------------------------------------


def _run_dir_with_checkpoint(tmp_path: Path, *sets: str, global_batch: int = 64) -> Path:
    """config.yaml as the loop writes it and one committed checkpoint's trainer state."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / ck.step_dir_name(10)
    ckpt.mkdir(parents=True)
    (ckpt / ck.TRAINER_STATE).write_text(json.dumps({"step": 10, "global_batch": global_batch}))
    (run_dir / "config.yaml").write_text(dump_config(load_config(TINY, list(sets))))
    return run_dir


@pytest.mark.parametrize(
    "sets, expected",
    [
        (
            ["model.name_or_path=builtin:tiny-gpt2"],
            "model.name_or_path: 'builtin:tiny-bert' → 'builtin:tiny-gpt2'",
        ),
        (["data.train=other.tsv"], "data.train: 'builtin:sentiment' → 'other.tsv'"),
        (["zero.stage=3"], "zero.stage: 2 → 3"),
        (["precision=bf16"], "precision: 'fp32' → 'bf16'"),
        (["train.global_batch_size=32"], "train.global_batch_size: 64 → 32"),
        (["train.lr=0.1"], "train.lr: 0.003 → 0.1"),
    ],
)
def test_a_change_of_the_run_is_refused_with_the_keys(tmp_path, sets, expected):
    run_dir = _run_dir_with_checkpoint(tmp_path)
    before = (run_dir / "config.yaml").read_text()
    problem = resume_config_problem(run_dir, load_config(TINY, sets), "auto", 64)
    assert problem and expected in problem and "--resume force" in problem, problem
    assert resume_config_problem(run_dir, load_config(TINY, sets), "force", 64) is None
    assert (run_dir / "config.yaml").read_text() == before


def test_harmless_changes_resume(tmp_path):
    run_dir = _run_dir_with_checkpoint(tmp_path)
    harmless = [
        "logging.every_steps=5",
        "logging.tensorboard=false",
        "eval.every_steps=7",
        "train.max_steps=200",
        "data.num_workers=0",
        "checkpoint.keep_last=3",
        "launch.timeout_minutes=5",
    ]
    assert (
        config_changes(
            yaml.safe_load((run_dir / "config.yaml").read_text()), load_config(TINY, harmless)
        )
        == []
    )
    assert resume_config_problem(run_dir, load_config(TINY, harmless), "auto", 64) is None


def test_another_world_size_that_changes_the_global_batch_is_refused(tmp_path):
    run_dir = _run_dir_with_checkpoint(tmp_path, global_batch=32)
    problem = resume_config_problem(run_dir, load_config(TINY, []), "auto", 64)
    assert problem and "global batch (micro × accumulation × world): 32 → 64" in problem


def test_nothing_to_resume_means_nothing_to_refuse(tmp_path):
    run_dir = _run_dir_with_checkpoint(tmp_path)
    for p in (run_dir / "checkpoints").iterdir():
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    assert resume_config_problem(run_dir, load_config(TINY, ["zero.stage=3"]), "auto", 64) is None
    assert resume_config_problem(tmp_path / "new", load_config(TINY, []), "auto", 64) is None


# --------------------------------------------------------------------------------------
# Real launches
# --------------------------------------------------------------------------------------


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not ck.committed(run_dir / "checkpoints"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, "no checkpoint committed in time"
        time.sleep(0.2)


@pytest.mark.slow
def test_zerotune_train_twice_on_one_run_dir(tmp_path, cache_dir):
    """Start a run; a second ``zerotune train`` on its run directory is refused at once,
    naming it; ``kill -9`` of the first (launcher and ranks) frees the directory and the
    same command takes over and resumes. A resume with another learning rate is refused
    (config.yaml kept) unless ``--resume force``."""
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), "--run-dir", str(run_dir), "--set", "train.max_steps=400"]
    first = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        cwd=ROOT,
        env=base_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_checkpoint(run_dir, first)
        t0 = time.perf_counter()
        second = zerotune(args, cache_dir)
        refused_s = time.perf_counter() - t0
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert second.stderr.count("config error") == 1 and "Traceback" not in second.stderr
        print(f"\nsecond zerotune train refused in {refused_s:.1f}s (process start included)")
    finally:
        # the launcher and its ranks, as a crash of the machine would (the ranks run in
        # sessions of their own: killing the launcher alone leaves them running, holding
        # the ranks' lock — test_ranks_of_a_by_hand_run_and_orphaned_ranks_keep_a_launcher_out)
        ranks = psutil.Process(first.pid).children(recursive=True)
        first.send_signal(signal.SIGKILL)
        for rank in ranks:
            with contextlib.suppress(psutil.Error):
                rank.send_signal(signal.SIGKILL)
        first.wait()
        psutil.wait_procs(ranks, timeout=30)
    saved_config = (run_dir / "config.yaml").read_text()
    changed = zerotune(
        [*args[:-2], "--set", "train.max_steps=40", "--set", "train.lr=0.01"], cache_dir
    )
    assert changed.returncode == 2 and "train.lr: 0.003 → 0.01" in changed.stderr, changed.stderr[
        -2000:
    ]
    assert (run_dir / "config.yaml").read_text() == saved_config  # not overwritten
    t0 = time.perf_counter()
    again = zerotune([*args[:-2], "--set", "train.max_steps=40"], cache_dir)
    check_ok(again)
    assert f"took over {run_dir}" in again.stderr and f"pid {first.pid}" in again.stderr
    assert "resumed from" in again.stderr
    print(f"taken over and finished in {time.perf_counter() - t0:.1f}s")
    forced = zerotune(
        [*args[:-2], "--set", "train.max_steps=50", "--set", "train.lr=0.01", "--resume", "force"],
        cache_dir,
    )
    check_ok(forced)
    assert "lr: 0.01" in (run_dir / "config.yaml").read_text()


def test_config_error_type_is_the_config_exit_code():
    """A refusal prints through the config-error path (exit 2, one line)."""
    assert issubclass(RunDirInUse, ConfigError)
