"""``zerotune train`` starts its ranks beside its pre-flight (issue 9, line 4): rank 0 runs the
data check and hands it to the launcher; the ranks wait at a gate (trainer/gate.py) and go
when the pre-flight passed, or stop — silently, nothing written — when it failed
(launcher/overlap.py).

The rank's side runs in forked children of this process (a stop ends a rank with
``os._exit``): the real gate directory, the real watching thread, the rank's real
``trainer.main`` code. The launcher's side runs ``zerotune train`` in this process with real
ranks under torch's real elastic agent; the slow tests launch the real CLI.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from launcher.cli import main
from trainer import checkpoint as ck
from trainer import gate as gate_mod
from trainer.config import dump_config, load_config
from trainer.gate import GATE_ENV, Gate, GateWatch, read_verdict

from conftest import ROOT, TINY, base_env


def _fork(fn, gate: Gate | None, err: Path) -> int:
    """``fn()`` in a forked child that is a rank under ``gate``: its stderr goes to ``err``,
    its exit code is ``fn``'s.

    This pytest process has run in-process ranks (gloo groups, torch threads) before: the
    objects it holds are frozen out of the garbage collector across the fork and the child
    collects nothing, so the child never finalises a native object it inherited half-copied
    (CI once saw such a child abort while garbage-collecting)."""
    import gc

    gc.freeze()
    pid = os.fork()
    if pid != 0:
        gc.unfreeze()
    if pid == 0:  # the child
        gc.disable()
        code = 1
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            sys.stderr = open(os.dup(2), "w", buffering=1)  # noqa: SIM115 (pytest's is elsewhere)
            if gate is not None:
                os.environ[GATE_ENV] = str(gate.path)
            else:
                os.environ.pop(GATE_ENV, None)
            gate_mod._WATCH = None  # this process's watch, not the parent's
            gate_mod._PUBLISHED = False
            code = fn()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def _exit_code(pid: int, timeout: float = 30) -> tuple[int, float]:
    """The child's exit code and when it ended (``time.monotonic``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic()
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} still running after {timeout} s")


def test_a_rank_passes_the_gate_only_when_it_opens_and_counts_the_wait(tmp_path):
    import trainer.main
    from trainer.startup import StartupClock

    gate, passed = Gate.create(), tmp_path / "passed"

    def rank() -> int:
        trainer.main.CLOCK = clock = StartupClock({})  # the child's own, from its creation
        clock.mark("imports")
        trainer.main.wait_for_preflight()
        passed.write_text(json.dumps(clock.summary()))
        return 0

    try:
        pid = _fork(rank, gate, tmp_path / "err")
        time.sleep(0.5)
        assert not passed.exists(), "a rank went past a gate that was not open"
        gate.open()
        code, _ = _exit_code(pid)
    finally:
        gate.remove()
    assert code == 0, (tmp_path / "err").read_text()
    s = json.loads(passed.read_text())
    assert 0.4 <= s["preflight_wait"] < 5, s  # its own phase, after the rank's imports
    assert list(s) == ["imports", "preflight_wait", "total"]
    assert s["total"] == pytest.approx(sum(v for k, v in s.items() if k != "total"), abs=0.005)


def test_stop_ends_a_rank_still_importing_at_once_silently_with_nothing_written(tmp_path):
    """The stop reaches a rank wherever it is (here: still 'importing', long before its
    gate), it exits 2 (ExitCode.CONFIG: the launcher's explain_failure adds no line) and
    writes nothing."""
    gate, written = Gate.create(), tmp_path / "run"

    def rank() -> int:
        gate_mod.watch_gate()  # as trainer/__main__.py, first thing
        time.sleep(30)  # imports
        written.mkdir()
        return 0

    try:
        pid = _fork(rank, gate, tmp_path / "err")
        time.sleep(0.3)
        stopped = time.monotonic()
        gate.close()
        code, ended = _exit_code(pid)
    finally:
        gate.remove()
    print(f"\nrank stopped {1000 * (ended - stopped):.0f} ms after the verdict")
    assert code == 2 and ended - stopped < 1.0
    assert not written.exists() and (tmp_path / "err").read_text() == ""
    assert read_verdict(gate.path) == "stop"  # a removed gate reads as stop too


def test_a_rank_whose_launcher_is_gone_stops_instead_of_waiting(tmp_path):
    """The launcher is killed before its verdict: its ranks (in sessions of their own, so
    no signal reaches them) see that their parent is no longer the launcher and end."""
    read_end, write_end = os.pipe()
    paths_read, paths_write = os.pipe()
    launcher = os.fork()
    if launcher == 0:  # the launcher: makes the gate, starts a rank, dies without a verdict
        try:
            os.close(read_end)
            gate = Gate.create()
            os.write(paths_write, str(gate.path).encode())
            os.close(paths_write)  # the test reads the path to EOF: the rank must not hold it
            if os.fork() == 0:  # the rank: holds the pipe open while it lives
                os.environ[GATE_ENV] = str(gate.path)
                gate_mod._WATCH = None
                gate_mod.watch_gate().wait()
                os._exit(0)
        finally:
            os._exit(0)  # the launcher ends here at once (a rank that got here too)
    os.close(write_end)
    os.close(paths_write)
    with os.fdopen(paths_read) as f:
        gate = Gate(Path(f.read()))
    try:
        os.waitpid(launcher, 0)
        gone = time.monotonic()
        with os.fdopen(read_end, "rb") as pipe:
            assert select.select([pipe], [], [], 10)[0], "the orphaned rank still waits"
            assert pipe.read() == b""  # EOF: the rank has exited
        waited = time.monotonic() - gone
        assert read_verdict(gate.path) is None  # no verdict was ever given
    finally:
        gate.remove()
    print(f"\norphaned rank ended {1000 * waited:.0f} ms after its launcher")
    assert waited < 2.0


def test_without_a_gate_nothing_waits_or_watches(monkeypatch):
    """A bare torchrun / srun / mpirun: no gate variable, no thread, no phase."""
    from trainer.main import wait_for_preflight
    from trainer.startup import CLOCK

    monkeypatch.delenv(GATE_ENV, raising=False)
    threads = threading.active_count()
    t0 = time.perf_counter()
    GateWatch(None).wait()
    wait_for_preflight()
    assert time.perf_counter() - t0 < 0.05 and threading.active_count() == threads
    assert "preflight_wait" not in CLOCK.phases


@pytest.mark.parametrize("verdict", ["stop", "go"])
def test_a_config_error_in_a_rank_before_its_gate_is_said_once(tmp_path, verdict):
    """The rank's own config parse fails (the launcher's pre-flight then fails too): the
    rank prints nothing until the verdict — on stop it exits 2 silently (the launcher says
    it), on go (the launcher found nothing) it prints its error."""
    from trainer.main import main as rank_main

    gate = Gate.create()
    args = [str(TINY), "--set", "train.lrr=1", "--set", "train.foo=2"]
    args += ["--run-dir", str(tmp_path / "run")]
    err = tmp_path / "err"
    try:
        pid = _fork(lambda: int(rank_main(args)), gate, err)
        # the launcher's verdict waits for rank 0's data check: the refusal is handed over
        # as its record (else the two would wait for each other)
        deadline = time.monotonic() + 30
        record = gate.wait_for_data_check(lambda: time.monotonic() > deadline)
        assert record is not None and record["train_rows"] is None
        # one line per problem, as the launcher lists them
        assert [p.split(":")[0] for p in record["problems"]] == ["train.lrr", "train.foo"]
        time.sleep(0.3)
        assert err.read_text() == ""
        gate.open() if verdict == "go" else gate.close()
        code, _ = _exit_code(pid)
    finally:
        gate.remove()
    said = err.read_text()
    assert code == 2
    assert said.count("config error") == (verdict == "go"), said
    if verdict == "go":
        assert "train.lrr: unknown key" in said
    assert not (tmp_path / "run").exists()


def test_rank_0_hands_its_data_check_to_the_launcher_whole_once(tmp_path):
    """The record crosses through the gate directory: the launcher reads it only once it is
    all there (written under another name, then renamed), a rank publishes once, and the
    launcher stops waiting once the ranks are gone without one."""
    gate = Gate.create()
    try:
        assert gate.wait_for_data_check(lambda: True) is None  # given up: no record
        (gate.path / f".{gate_mod.DATA_CHECK}.123").write_text('{"train_rows": 1')  # half
        t0 = time.monotonic()
        assert gate.wait_for_data_check(lambda: time.monotonic() > t0 + 0.2) is None
        first = {"train_rows": 5, "warnings": ["w"], "problems": []}

        def rank() -> int:
            environ = {GATE_ENV: str(gate.path)}
            assert gate_mod.publish_data_check(first, environ)
            gate_mod.publish_data_check({"train_rows": 6, "warnings": [], "problems": []}, environ)
            return 0

        code, _ = _exit_code(_fork(rank, None, tmp_path / "err"))
        assert code == 0, (tmp_path / "err").read_text()
        assert gate.wait_for_data_check(lambda: False) == first  # the first record, whole
    finally:
        gate.remove()
    assert not gate_mod.publish_data_check(first, {})  # no gate: nothing to hand over


# --------------------------------------------------------------------------------------
# The launcher's side: zerotune train in this process, real ranks under the real agent
# --------------------------------------------------------------------------------------


def test_ranks_stopped_at_the_gate_add_no_line_to_the_preflights():
    """The agent ends the other ranks (SIGTERM) once the first one exited 2 at a stop, or
    they lose it as a peer: still the pre-flight's message alone, exit 2."""
    from launcher.spawn import explain_failure
    from trainer.process import ExitCode

    for other in (2, -signal.SIGTERM, ExitCode.PEER_LOST):
        assert explain_failure({0: (2, 8), 1: (other, 9)}, {}, None) == (ExitCode.CONFIG, [])
    code, lines = explain_failure({0: (2, 8), 1: (-signal.SIGKILL, 9)}, {}, None)
    assert code == ExitCode.FAILED and "exited with code 2" in lines[0]  # a kill: a cause


def _ranks_seen(marker: str, stop: threading.Event, seen: dict[int, str]) -> None:
    """Every child of this process whose command line holds ``marker`` (the rank processes
    of one launch, started by the agent in this process) → its gate directory, until
    ``stop``. Direct children only: a rank's own short-lived children (DeepSpeed's compiler
    probes) carry its command line until they exec."""
    me = psutil.Process()
    while not stop.is_set():
        for child in me.children():
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if marker in cmd and "-m trainer" in cmd and child.pid not in seen:
                try:
                    seen[child.pid] = child.environ().get(GATE_ENV, "")
                except psutil.Error:
                    seen[child.pid] = ""
        time.sleep(0.002)


def _train_watching_ranks(args: list[str], marker: str) -> tuple[int, dict[int, str], float]:
    seen: dict[int, str] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_ranks_seen, args=(marker, stop, seen), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        code = main(args)
    finally:
        elapsed = time.perf_counter() - t0
        stop.set()
        watcher.join()
    return code, seen, elapsed


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_bad_data_stops_the_started_ranks_one_message_nothing_written(tmp_path, capfd):
    """The ranks start at once (seen), the data check fails: exit 2, one message on the
    whole stderr — the launcher's, the ranks' and the agent's (fd-level capture) — no run
    directory, no rank process left, the gate directory removed."""
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(200)))
    data.write_text(data.read_text() + "\t1\n")  # an empty text cell at line 202
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), "--run-dir", str(run_dir), "--set", f"data.train={data}"]
    args += ["--set", "data.text_column=sentence"]
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    code, ranks, elapsed = _train_watching_ranks(args, str(run_dir))
    err = capfd.readouterr().err
    # the launcher's Ctrl-C and preemption forwarding end with its ranks
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    print(f"\nrefused through the gate in {elapsed:.2f} s (in-process launcher)")
    assert code == 2, err
    assert len(ranks) == 2, ranks  # the ranks were started beside the pre-flight
    assert _alive(ranks) == []
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "1 empty or missing text cell at line 202" in lines[0], err
    assert not run_dir.exists()
    assert GATE_ENV not in os.environ
    gates = set(ranks.values()) - {""}
    assert len(gates) == 1 and not Path(gates.pop()).exists()  # one gate, removed


def test_rank_0s_row_count_is_checked_against_the_global_batch_by_the_launcher(tmp_path, capfd):
    """Rank 0 counts the rows (after the validation carve-out); the launcher, which holds the
    batch plan, refuses fewer than one global batch: one message, exit 2, nothing written."""
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(40)))
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), "--run-dir", str(run_dir), "--set", f"data.train={data}"]
    args += ["--set", "data.text_column=sentence", "--set", "train.global_batch_size=64"]
    code, ranks, _ = _train_watching_ranks(args, str(run_dir))
    err = capfd.readouterr().err
    assert code == 2 and len(ranks) == 2 and _alive(ranks) == [], err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "has 36 rows after the validation carve-out, fewer than one global batch" in lines[0]
    assert "train.global_batch_size=64" in lines[0]
    assert not run_dir.exists()


def test_a_resume_that_changes_the_run_is_refused_at_the_gate(tmp_path, capfd):
    """The lock is taken and the resume checked only once the data passed, beside the
    ranks: a changed learning rate stops them; config.yaml and the lock file are as they
    were (no owner left behind)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ck.step_dir_name(10)).mkdir(parents=True)
    state = {"step": 10, "global_batch": 64}
    (run_dir / "checkpoints" / ck.step_dir_name(10) / ck.TRAINER_STATE).write_text(
        json.dumps(state)
    )
    (run_dir / "config.yaml").write_text(dump_config(load_config(TINY, [])))
    before = sorted(p.name for p in run_dir.iterdir())
    args = ["train", str(TINY), "--run-dir", str(run_dir), "--set", "train.lr=0.1"]
    code, ranks, _ = _train_watching_ranks(args, str(run_dir))
    err = capfd.readouterr().err
    assert code == 2 and len(ranks) == 2 and _alive(ranks) == []
    assert err.count("config error") == 1 and "train.lr: 0.003 → 0.1" in err, err
    assert (run_dir / "config.yaml").read_text() == dump_config(load_config(TINY, []))
    after = sorted(p.name for p in run_dir.iterdir())
    assert after in (before, sorted([*before, ".zerotune.lock"]))
    lock = run_dir / ".zerotune.lock"
    assert not lock.exists() or lock.read_text() == ""  # no owner named


def test_a_settings_problem_starts_no_rank_and_reports_the_data_too(tmp_path, capfd):
    """A batch that does not divide is known before any rank starts: none is started, and
    the data's problem comes in the same message."""
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), "--run-dir", str(run_dir), "--set", "train.global_batch_size=100"]
    args += ["--set", "data.train=does/not/exist.tsv"]
    code, ranks, _ = _train_watching_ranks(args, str(run_dir))
    err = capfd.readouterr().err
    assert code == 2 and ranks == {}
    assert err.count("config error") == 1 and "2 problems" in err, err
    assert "global_batch_size=100" in err and "file not found" in err
    assert not run_dir.exists()


# --------------------------------------------------------------------------------------
# Real launches
# --------------------------------------------------------------------------------------


def _big_tsv(path: Path, rows: int) -> Path:
    """A training file whose checks take seconds (the pre-flight still runs when the ranks
    are up)."""
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for i in range(rows):
            f.write(f"a review of some length, number {i}, neither short nor long\t{i % 2}\n")
    return path


def _rank_pids(launcher: psutil.Process) -> list[int]:
    pids = []
    for child in launcher.children(recursive=True):
        try:
            if " -m trainer " in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def _processes_naming(marker: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
            out.append(p.pid)
    return out


@pytest.mark.slow
def test_real_cli_bad_data_with_ranks_importing_exit_2_one_line_nothing_left(tmp_path, cache_dir):
    """The real CLI, a training file whose last row is bad: the ranks are importing when the
    pre-flight fails; one line, exit 2, no run directory, no process of the launch left."""
    data = _big_tsv(tmp_path / "d.tsv", 50_000)
    with open(data, "a") as f:
        f.write("\t1\n")
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), "--run-dir", str(run_dir), "--set", f"data.train={data}"]
    args += ["--set", "data.text_column=sentence"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=ROOT,
        env=base_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - t0
    print(
        f"\nzerotune train, bad row 50 001 with ranks started: exit {proc.returncode} in {elapsed:.1f} s"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "at line 50002" in lines[0], proc.stderr[-3000:]
    assert not run_dir.exists()
    assert _processes_naming(str(run_dir)) == []


@pytest.mark.slow
def test_real_cli_ctrl_c_during_the_preflight_one_line_nothing_written(tmp_path, cache_dir):
    """Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it) while the
    ranks wait for the pre-flight: one line, exit 130, no run directory, no rank left."""
    data = _big_tsv(tmp_path / "d.tsv", 400_000)
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), "--run-dir", str(run_dir), "--set", f"data.train={data}"]
    args += ["--set", "data.text_column=sentence", "--set", "train.max_steps=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        cwd=ROOT,
        env=base_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        launcher = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while len(_rank_pids(launcher)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        ranks = _rank_pids(launcher)
        assert not run_dir.exists(), "the pre-flight ended before the test could interrupt it"
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        stopped = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\nCtrl-C during the pre-flight: exit {proc.returncode} after {stopped:.1f} s")
    assert proc.returncode == 130, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines == [
        "zerotune: interrupted — all ranks stopped; no checkpoint was committed yet; "
        "running the same command starts again"
    ], err[-3000:]
    assert stopped < 10
    assert not run_dir.exists() and _alive(ranks) == []
