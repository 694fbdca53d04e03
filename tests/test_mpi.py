"""MPI launches and ``zerotune doctor``.

``mpirun -np 2`` (OpenMPI) trains the tiny config and runs the doctor: ranks from
``OMPI_COMM_WORLD_*``, a master address and free port agreed over mpi4py (not 29500).
Those tests are marked ``mpi`` and skip where OpenMPI's mpirun or mpi4py is absent. The
doctor spawning its own ranks and its MASTER_ADDR rule need neither and always run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from launcher.doctor import master_problem

from conftest import ROOT, TINY, base_env, check_ok, results


def _mpi_skip_reason() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun not on PATH (CI installs OpenMPI with .ci/cluster-setup.sh)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py not installed (pip install 'zerotune[mpi]')"
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30)
    if "Open MPI" not in version.stdout + version.stderr:
        return "these tests use OpenMPI's mpirun options"
    return None


SKIP_MPI = _mpi_skip_reason()
requires_mpi = pytest.mark.skipif(SKIP_MPI is not None, reason=str(SKIP_MPI))


def mpirun(args: list[str], cache_dir, timeout: int = 300) -> subprocess.CompletedProcess:
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return subprocess.run(
        [
            "mpirun",
            "-np",
            "2",
            "--oversubscribe",
            *root,
            "-x",
            "OMP_NUM_THREADS=1",
            sys.executable,
            *args,
        ],
        cwd=ROOT,
        env=base_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.mpi
@pytest.mark.slow
@requires_mpi
def test_mpirun_trains(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    check_ok(mpirun(["-m", "trainer", str(TINY), "--run-dir", str(run_dir)], cache_dir))
    r = results(run_dir)
    assert r["world_size"] == 2 and r["steps"] == 60 and r["params_in_sync"], r
    env = json.loads((run_dir / "env.json").read_text())
    assert env["launcher"] == "mpi" and env["world_size"] == 2
    # agreed by the ranks (rank 0 picks a free port, mpi4py broadcasts it), not DeepSpeed's fixed 29500
    assert env["env"]["master_addr"] and env["env"]["master_port"] not in (None, 29500), env["env"]


@pytest.mark.mpi
@pytest.mark.slow
@requires_mpi
def test_doctor_under_mpirun(cache_dir):
    proc = mpirun(["-m", "launcher", "doctor", "--size-mb", "4"], cache_dir, timeout=180)
    check_ok(proc)
    assert "launcher mpi, world 2" in proc.stdout and "doctor: all checks passed" in proc.stdout, (
        proc.stdout
    )


@pytest.mark.slow
def test_doctor_spawns_its_own_ranks(cache_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "doctor", "--nproc-per-node", "2", "--size-mb", "1"],
        cwd=ROOT,
        env=base_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=180,
    )
    check_ok(proc)
    out = proc.stdout
    assert "launcher torchrun, world 2" in out and "backend gloo" in out, out
    assert re.search(r"^\s+0\s+0\s+\S+\s+cpu$", out, re.M) and re.search(
        r"^\s+1\s+1\s+\S+\s+cpu$", out, re.M
    ), out
    assert re.search(r"all-reduce 1\.0 MB: [\d.]+ ms, algbw [\d.]+ GB/s, busbw [\d.]+ GB/s", out), (
        out
    )
    assert out.strip().endswith("doctor: all checks passed"), out


def test_master_addr_rule():
    import socket

    host = socket.gethostname()
    assert master_problem("127.0.0.1", [host, host]) is None  # one node: loopback reaches rank 0
    assert master_problem(host, [host, "other"]) is None
    assert "loopback" in master_problem("localhost", [host, "node2"])
    assert "does not resolve" in master_problem("no-such-host.invalid", [host, "node2"])
    assert "must run rank 0" in master_problem(
        "192.0.2.1", [host, "node2"]
    )  # TEST-NET-1: never this machine
