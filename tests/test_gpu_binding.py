"""Device binding and the GPU refusals on a real GPU (marked ``gpu``; skipped without CUDA).

What the CPU tables in tests/test_devices.py and tests/test_ops.py cannot show: DeepSpeed
really binding the device zerotune chose (ZeRO-3's ``zero.Init`` and the engine call
``set_device(int(LOCAL_RANK))``), the in-rank refusal of two ranks on one GPU (compared by
UUID before the process group exists), the batch job's device line, and the default optimizer being torch's fused AdamW.
One GPU is enough; every run is the tiny config for a few steps.

    python -m pytest -q -m gpu tests/test_gpu_binding.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, base_env, zerotune

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device"),
]
SHORT = ["--set", "train.max_steps=3", "--set", "checkpoint.every_steps=null"]


def run(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_one_gpu_per_task_binds_cuda0_for_local_rank_1(tmp_path):
    """Local rank 1 of 2 that sees one GPU (srun --gpus-per-task=1): cuda:0, and DeepSpeed's
    ZeRO-3 (zero.Init + engine) binds the same — before, "invalid device ordinal" (cuda:1)."""
    run_dir = tmp_path / "run"
    env = base_env(
        tmp_path,
        CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="1",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29731",
    )
    proc = run(
        [
            sys.executable,
            "-m",
            "trainer",
            str(TINY),
            "--run-dir",
            str(run_dir),
            *SHORT,
            "--set",
            "zero.stage=3",
            "--set",
            "train.global_batch_size=16",
        ],
        env,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    info = json.loads((run_dir / "env.json").read_text())
    assert info["device"] == "cuda:0", info
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert "optimizer" not in ds  # torch's fused AdamW, nothing JIT-built


def test_two_ranks_on_one_gpu_refused_inside_the_rank(tmp_path):
    """torchrun by hand with 2 ranks and one visible GPU: each rank would take cuda:0 (the
    one-GPU-per-task rule); the UUID check through the rendezvous store, before any process
    group exists, refuses it on both ranks, exit 2."""
    run_dir = tmp_path / "run"
    env = base_env(tmp_path, CUDA_VISIBLE_DEVICES="0")
    proc = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "trainer",
            str(TINY),
            "--run-dir",
            str(run_dir),
            *SHORT,
        ],
        env,
    )
    assert proc.returncode != 0
    assert "share one GPU" in proc.stderr, proc.stderr[-6000:]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_gloo_on_gpu_refused_before_spawn(tmp_path):
    proc = zerotune(
        [
            "train",
            str(TINY),
            "--nproc-per-node",
            "1",
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            "launch.backend=gloo",
        ],
        tmp_path,
    )
    assert proc.returncode == 2 and "launch.backend='gloo' on GPU" in proc.stderr


def test_batch_job_names_its_gpus(tmp_path):
    env = base_env(tmp_path, SLURM_GPUS_PER_NODE="1", ZEROTUNE_REQUIRE_GPU="1")
    proc = run([sys.executable, "-m", "trainer.jobcheck", str(TINY)], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"device: {GPUS} GPU(s) on this node")


def test_doctor_reports_optimizer_ops(tmp_path):
    proc = zerotune(["doctor", "--nproc-per-node", "1"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "op fused_adam: pre-built" in proc.stdout and "cuda:0" in proc.stdout
