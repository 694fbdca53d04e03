"""``zerotune sweep --slurm``: one ``zerotune submit`` job per point, then wait for them all.

Each point is submitted with its own run directory (``OUT/<name>/submit.sbatch`` can be
resubmitted by hand) and all jobs queue at once, so the cluster runs them side by side.
The sweep then polls ``scontrol`` until every job has ended, and maps Slurm's end state to
the point's status: COMPLETED → done, OUT_OF_MEMORY → oom, TIMEOUT / DEADLINE → timeout,
anything else → failed, with the job's own ``slurm-<id>.out`` tail as the reason.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

from .collect import point_row, read_status, write_status
from .sweep import Point, Sweep, _tail, classify, launcher_cmd, progress

POLL_S = 5.0
STATE = {
    "COMPLETED": "done",
    "OUT_OF_MEMORY": "oom",
    "TIMEOUT": "timeout",
    "DEADLINE": "timeout",
}
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def submit_cmd(sweep: Sweep, p: Point, run_dir: Path) -> list[str]:
    s = sweep.slurm
    args = [
        "submit", str(run_dir / "config.yaml"), "--run-dir", str(run_dir),
        "--nodes", str(p.nodes), "--nproc-per-node", str(p.nproc), "--job-name", f"sweep-{p.name}",
    ]  # fmt: skip
    for key in ("gpus_per_node", "cpus_per_task", "time", "partition", "account"):
        if s.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(s[key])]
    for extra in s.get("sbatch_args") or []:
        args.append(f"--sbatch-arg={extra}")
    return launcher_cmd(*args)


def job_state(job: str) -> tuple[str | None, str]:
    """(state, exit code) from scontrol; (None, '') once Slurm has forgotten the job."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        return None, ""
    info = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
    return info.get("JobState"), info.get("ExitCode", "")


def run_slurm(sweep: Sweep, out: Path) -> None:
    """Submit every point not yet done, wait for all of them, record each status."""
    n = len(sweep.points)
    jobs: dict[str, tuple[int, Point, str, float]] = {}
    for i, p in enumerate(sweep.points, 1):
        run_dir = out / p.name
        old = read_status(run_dir)
        if old.get("status") == "done" and (run_dir / "results.json").is_file():
            progress(i, n, p.name, "done earlier, skipped", "", None, point_row(run_dir, p.values))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(p.config_text)
        cmd = submit_cmd(sweep, p, run_dir)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        attempts = old.get("attempts", 0) + 1
        m = re.search(r"submitted job (\d+)", proc.stdout)
        if proc.returncode != 0 or not m:
            reason = (proc.stderr.strip().splitlines() or ["zerotune submit failed"])[-1][:300]
            write_status(
                run_dir,
                "failed",
                reason,
                attempts=attempts,
                nodes=p.nodes,
                exit_code=proc.returncode,
            )
            progress(i, n, p.name, "failed", reason, None, {})
            continue
        job = m.group(1)
        write_status(
            run_dir,
            "submitted",
            "",
            attempts=attempts,
            nodes=p.nodes,
            job_id=job,
            command=shlex.join(cmd),
        )
        print(f"sweep [{i}/{n}] {p.name}: submitted job {job}", flush=True)
        jobs[job] = (i, p, run_dir, time.perf_counter())
    while jobs:
        time.sleep(POLL_S)
        for job in list(jobs):
            state, exit_code = job_state(job)
            if state is not None and state not in TERMINAL:
                continue
            i, p, run_dir, t0 = jobs.pop(job)
            status, reason = _end_status(state, exit_code, run_dir, job)
            write_status(
                run_dir, status, reason, wall_s=time.perf_counter() - t0, slurm_state=state
            )
            progress(
                i, n, p.name, status, reason, time.perf_counter() - t0, point_row(run_dir, p.values)
            )


def _end_status(state: str | None, exit_code: str, run_dir: Path, job: str) -> tuple[str, str]:
    log = _tail(run_dir / f"slurm-{job}.out")
    if state is None:  # forgotten by scontrol (MinJobAge): the run's own files decide
        return ("done", "") if (run_dir / "results.json").is_file() else classify(1, log, False)
    if state in STATE and STATE[state] != "done":
        return STATE[state], f"Slurm job {job} ended {state}"
    if state == "COMPLETED":
        return "done", ""
    code = int(exit_code.split(":")[0]) if exit_code[:1].isdigit() else 1
    status, reason = classify(code or 1, log, False)
    return status, f"Slurm job {job} {state}; {reason}"
