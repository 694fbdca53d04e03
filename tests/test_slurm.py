"""A real Slurm (CI: one node on localhost, .ci/cluster-setup.sh): the rendered template
trains 2 tasks on CPU/gloo; USR1 makes the job checkpoint, requeue itself and resume;
``zerotune doctor`` passes under srun. Skipped where sbatch/sinfo are absent or the
controller does not answer.

    python -m pytest -m slurm tests/test_slurm.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer.env import detect_env

from conftest import TINY, base_env, check_ok, read_jsonl, results, zerotune

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
CPU_JOB = ["--nodes", "1", "--nproc-per-node", "2", "--cpus-per-task", "1", "--time", "10"]


def _skip_reason() -> str | None:
    for tool in ("sbatch", "sinfo", "srun", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH (no Slurm; CI starts one with .ci/cluster-setup.sh)"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def jobs():
    """Job ids a test submitted; any still queued or running is cancelled afterwards."""
    ids: list[str] = []
    yield ids
    for job in ids:
        if job_state(job) not in TERMINAL:
            subprocess.run(["scancel", job], capture_output=True)


def job_info(job: str) -> dict[str, str]:
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        return {}  # gone (MinJobAge passed) or never existed
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def job_state(job: str) -> str:
    return job_info(job).get("JobState", "GONE")


def wait_for(
    what: str,
    predicate: Callable[[], object],
    timeout: float,
    diagnose: Callable[[], str] = lambda: "",
    job: str | None = None,
) -> object:
    """Poll ``predicate``; fail on timeout, or at once if ``job`` has ended meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if job is not None and job_state(job) in TERMINAL:
            pytest.fail(f"job {job} ended while waiting for {what}\n{diagnose()}")
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}")


def log_text(run_dir: Path, job: str) -> str:
    log = run_dir / f"slurm-{job}.out"
    return log.read_text(errors="replace") if log.is_file() else ""


def diagnose(run_dir: Path, job: str) -> Callable[[], str]:
    def text() -> str:
        info = job_info(job)
        return (
            f"job {job}: {info.get('JobState')} reason={info.get('Reason')} restarts={info.get('Restarts')} "
            f"exit={info.get('ExitCode')}\n--- log\n{log_text(run_dir, job)[-5000:]}"
        )

    return text


def test_submit_trains_evaluates_and_checkpoints(tmp_path, cache_dir, jobs):
    run_dir = tmp_path / "run $1"  # a space and a $: the quoting has to hold in sbatch and in bash
    proc = zerotune(
        ["submit", str(TINY), *CPU_JOB, "--run-dir", str(run_dir), "--job-name", "zt-test-train"],
        cache_dir,
    )
    check_ok(proc)
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    jobs.append(job)
    assert f"log: {run_dir / f'slurm-{job}.out'}" in proc.stdout

    wait_for(
        f"job {job} to finish", lambda: job_state(job) in TERMINAL, 240, diagnose(run_dir, job)
    )
    log = log_text(run_dir, job)
    assert job_state(job) == "COMPLETED", diagnose(run_dir, job)()
    assert "SLURM_RESTART_COUNT=0" in log and "training step exited with code 0" in log, log[-3000:]
    assert "device: CPU — this job has no GPU" in log, log[-3000:]  # said before srun

    r = results(run_dir)
    assert r["steps"] == 60 and r["world_size"] == 2 and r["params_in_sync"], r
    evals = sorted(
        rec["step"] for rec in read_jsonl(run_dir / "metrics.jsonl") if rec["kind"] == "eval"
    )
    assert {30, 60} <= set(evals), evals
    manifests = sorted(p.parent.name for p in run_dir.glob("checkpoints/step_*/manifest.json"))
    assert "step_00000060" in manifests and len(manifests) >= 2, manifests
    env = json.loads((run_dir / "env.json").read_text())
    assert env["launcher"] == "slurm" and env["world_size"] == 2
    assert env["env"]["job_id"] == job and env["env"]["master_port"] == 15000 + int(job) % 17000, (
        env["env"]
    )


def test_job_that_needs_a_gpu_fails_fast_without_one(tmp_path, cache_dir, jobs):
    """ZEROTUNE_REQUIRE_GPU=1 (exported to the job, as a GPU site would) on this CPU-only
    Slurm: the batch script stops with exit 2 before srun starts any rank."""
    run_dir = tmp_path / "run"
    proc = zerotune(
        ["submit", str(TINY), *CPU_JOB, "--run-dir", str(run_dir), "--job-name", "zt-test-gpu"],
        cache_dir,
        ZEROTUNE_REQUIRE_GPU="1",
    )
    check_ok(proc)
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    jobs.append(job)
    wait_for(
        f"job {job} to finish", lambda: job_state(job) in TERMINAL, 120, diagnose(run_dir, job)
    )
    log = log_text(run_dir, job)
    assert job_state(job) == "FAILED" and job_info(job).get("ExitCode") == "2:0", diagnose(
        run_dir, job
    )()
    assert "device: NO GPU" in log and "ZEROTUNE_REQUIRE_GPU=1" in log, log[-3000:]
    assert "not starting the ranks" in log and "training step exited" not in log, log[-3000:]
    assert not (run_dir / "checkpoints").exists()


def test_usr1_checkpoints_requeues_and_resumes(tmp_path, cache_dir, jobs):
    """Render with --dry-run, submit the script by hand with no arguments from elsewhere
    (the resubmit path), USR1 it: checkpoint, exit 75, requeue, restart 1 resumes."""
    run_dir = tmp_path / "run"
    check_ok(
        zerotune(
            [
                "submit",
                str(TINY),
                *CPU_JOB,
                "--run-dir",
                str(run_dir),
                "--job-name",
                "zt-test-requeue",
                "--set",
                "train.max_steps=400",
                "--set",
                "checkpoint.every_steps=1000",
                "--set",
                "eval.every_steps=1000",
                "--dry-run",
            ],
            cache_dir,
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        ["sbatch", "--parsable", str(run_dir / "submit.sbatch")],
        cwd=elsewhere,
        env=base_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    check_ok(proc)
    job = proc.stdout.strip().split(";")[0]
    jobs.append(job)
    why = diagnose(run_dir, job)
    metrics = run_dir / "metrics.jsonl"

    def records() -> list[dict]:
        return read_jsonl(metrics) if metrics.is_file() else []

    wait_for(
        "training to start", lambda: any(r["kind"] == "train" for r in records()), 180, why, job
    )
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    wait_for(
        "the requeue (Restarts=1)",
        lambda: int(job_info(job).get("Restarts", "0")) >= 1,
        120,
        why,
        job,
    )

    def resumed_and_stepped() -> bool:
        recs = records()
        marks = [
            i
            for i, r in enumerate(recs)
            if r["kind"] == "checkpoint" and r.get("restart_count") == 1
        ]
        return bool(marks) and any(
            r["kind"] == "train" and r["step"] > recs[marks[0]]["step"] for r in recs[marks[0] :]
        )

    wait_for("the restarted job to resume and train on", resumed_and_stepped, 150, why, job)
    log = log_text(run_dir, job)
    first, _, second = log.partition("SLURM_RESTART_COUNT=1")
    assert second, log[-4000:]
    assert (
        "USR1" in first
        and "training step exited with code 75" in first
        and "requeueing job" in first
    ), first[-4000:]
    saved = re.search(r"saved step (\d+), exiting 75", first)
    assert saved, first[-4000:]
    step = int(saved.group(1))
    assert (
        0 < step < 400
        and (run_dir / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file()
    )
    assert re.search(rf"resumed from .*step_{step:08d} at step {step}\b", second), second[-4000:]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["env"]["restart_count"] == 1 and env["resumed_from"].endswith(f"step_{step:08d}"), (
        env
    )

    subprocess.run(
        ["scancel", job], check=True, timeout=30
    )  # the rest of the run proves nothing new
    wait_for(f"job {job} to end", lambda: job_state(job) in TERMINAL, 60, why)


def _srun_doctor(cache_dir, *srun_args: str) -> subprocess.CompletedProcess:
    cmd = [
        "srun",
        "-n",
        "2",
        "--time",
        "5",
        "--kill-on-bad-exit=1",
        *srun_args,
        sys.executable,
        "-m",
        "launcher",
        "doctor",
        "--size-mb",
        "4",
    ]
    return subprocess.run(cmd, env=base_env(cache_dir), capture_output=True, text=True, timeout=180)


def test_doctor_under_srun(cache_dir):
    proc = _srun_doctor(cache_dir)
    check_ok(proc)
    assert (
        "launcher slurm, world 2" in proc.stdout and "doctor: all checks passed" in proc.stdout
    ), proc.stdout
    assert re.search(r"^\s+1\s+1\s+\S+\s+cpu$", proc.stdout, re.M), (
        proc.stdout
    )  # rank 1 reported back to rank 0


def _pmix_size_missing() -> bool:
    """``srun --mpi=pmix`` sets PMIX_RANK but no PMIX_SIZE; detection must still see world 2."""
    env = {
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "9",
        "SLURM_JOB_NODELIST": "vm",
        "PMIX_RANK": "1",
    }
    return detect_env(env).world_size != 2


@pytest.mark.xfail(
    _pmix_size_missing(),
    strict=True,
    reason="trainer.env.detect_env takes the missing PMIX_SIZE as world 1 and prefers it to SLURM_NTASKS",
)
def test_doctor_under_srun_mpi_pmix(cache_dir):
    plugins = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, timeout=30)
    if "pmix" not in plugins.stdout + plugins.stderr:
        pytest.skip("Slurm has no mpi/pmix plugin")
    proc = _srun_doctor(cache_dir, "--mpi=pmix")
    check_ok(proc)
    assert "world 2" in proc.stdout and "doctor: all checks passed" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------
# Requests that can never run (issue 10, line 8) and quoting (line 9)
# --------------------------------------------------------------------------------------


def test_pending_reason_of_a_job_that_can_never_start_is_reported(tmp_path, jobs):
    """A job that asks for more CPUs than any node has is accepted by sbatch and pends
    with PartitionConfig: the watcher zerotune submit runs after sbatch names it."""
    from launcher.partition import pending_problem, read_partitions

    cpus = max(g.cpus for g in read_partitions()[""].groups)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsleep 1\n")
    proc = subprocess.run(
        ["sbatch", "--parsable", "-N1", "-n", str(2 * cpus), "-o", "/dev/null", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    check_ok(proc)
    job = proc.stdout.strip().split(";")[0]
    jobs.append(job)
    t0 = time.perf_counter()
    found = pending_problem(job, wait_s=20)
    print(f"pending reason named {time.perf_counter() - t0:.1f} s after sbatch")
    assert found is not None, job_info(job)
    never, message = found
    assert never and f"job {job} is pending with reason PartitionConfig" in message
    assert f"scancel {job}" in message


def test_submit_default_cpus_fit_the_partition_so_the_job_starts(tmp_path, cache_dir, jobs):
    """4 tasks and no --cpus-per-task: the template's 4 CPUs per task would ask 16 CPUs of
    a node; derived from the partition, the job fits and leaves PENDING."""
    from launcher.partition import read_partitions

    cpus = min(g.cpus for g in read_partitions()[""].groups)
    if cpus < 4:
        pytest.skip(f"nodes with {cpus} CPUs cannot take 4 tasks")
    run_dir = tmp_path / "run"
    args = ["submit", str(TINY), "--nodes", "1", "--nproc-per-node", "4", "--time", "10"]
    proc = zerotune(
        [*args, "--run-dir", str(run_dir), "--job-name", "zt-test-cpus"],
        cache_dir,
    )
    check_ok(proc)
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    jobs.append(job)
    assert f"#SBATCH --cpus-per-task={cpus // 4}\n" in (run_dir / "submit.sbatch").read_text()
    assert f"--cpus-per-task {cpus // 4} (not given)" in proc.stderr
    reasons = set()

    def started() -> bool:
        info = job_info(job)
        reasons.add(info.get("Reason"))
        return info.get("JobState") not in ("PENDING", None)

    wait_for(f"job {job} to start", started, 120, diagnose(run_dir, job))
    assert not reasons & {"PartitionConfig", "PartitionNodeLimit"}, reasons
    subprocess.run(["scancel", job], timeout=30)


def test_hostile_names_are_quoted_and_nothing_is_executed(tmp_path, cache_dir, jobs):
    """A config path, run directory and --set value with spaces, quotes, $(...), backticks
    and ';': the job trains, every path is used as given, and no command in them runs."""
    base = tmp_path / 'it\'s "q" $(touch HIT1); `touch HIT2` & y'
    base.mkdir()
    config = base / "my cfg $(touch HIT3);.yaml"
    config.write_text(TINY.read_text())
    run_dir = base / "run $(touch HIT4); 'x'"
    cache = tmp_path / 'cache "c" $(touch HIT5); z'
    proc = zerotune(
        ["submit", str(config), *CPU_JOB, "--run-dir", str(run_dir)]
        + ["--set", "train.max_steps=4", "--set", "eval.every_steps=2"]
        + ["--set", f"data.cache_dir={cache}"],
        cache_dir,
        cwd=tmp_path,  # anything that ran by mistake would land here
    )
    check_ok(proc)
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    jobs.append(job)
    wait_for(
        f"job {job} to finish", lambda: job_state(job) in TERMINAL, 240, diagnose(run_dir, job)
    )
    assert job_state(job) == "COMPLETED", diagnose(run_dir, job)()
    assert results(run_dir)["steps"] == 4
    assert f"config {run_dir / 'config.yaml'}, run dir {run_dir}" in log_text(run_dir, job)
    assert cache.is_dir() and any(cache.iterdir())  # the --set value, used as one path
    assert not [p for p in tmp_path.rglob("HIT*")], "a command in a name was executed"
