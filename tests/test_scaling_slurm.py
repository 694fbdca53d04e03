"""``zerotune sweep --slurm`` on a real Slurm (CI: one node on localhost): one ``zerotune
submit`` job per point, all queued at once, waited for, gathered into results.csv; a
re-run submits nothing for finished points. Skipped where Slurm is not running.

    python -m pytest -m slurm tests/test_scaling_slurm.py
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from test_slurm import _skip_reason

from scaling.collect import read_results_csv

from conftest import TINY, check_ok, zerotune

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


def test_slurm_sweep_one_job_per_point(tmp_path, cache_dir):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(TINY),
                "set": {
                    "train.max_steps": 4,
                    "eval.every_steps": 100,
                    "checkpoint.export_final": False,
                },
                "grid": {"launch.nproc_per_node": [1, 2], "zero.stage": [2]},
                "slurm": {"time": "10", "cpus_per_task": 1},
            }
        )
    )
    out = tmp_path / "out"
    proc = zerotune(["sweep", str(path), "--out", str(out), "--slurm"], cache_dir, timeout=900)
    check_ok(proc)
    jobs = re.findall(r"^sweep \[\d/2\] (\S+): submitted job (\d+)$", proc.stdout, re.M)
    assert [name for name, _ in jobs] == ["nproc1-zero2", "nproc2-zero2"], proc.stdout
    rows = {r["name"]: r for r in read_results_csv(out / "results.csv")}
    for name, job in jobs:
        status = json.loads((out / name / "sweep_status.json").read_text())
        assert status["status"] == "done" and status["job_id"] == job
        assert status["slurm_state"] in ("COMPLETED", None)
        assert (out / name / f"slurm-{job}.out").is_file() and (
            out / name / "submit.sbatch"
        ).is_file()
        assert rows[name]["status"] == "done" and rows[name]["steps"] == 4
        assert rows[name]["world_size"] == int(name[5]) and rows[name]["step_time_s"] > 0
    again = zerotune(["sweep", str(path), "--out", str(out), "--slurm"], cache_dir, timeout=300)
    check_ok(again)
    assert again.stdout.count("done earlier, skipped") == 2 and "submitted job" not in again.stdout
