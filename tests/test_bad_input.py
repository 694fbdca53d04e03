"""Bad input is caught before ranks spawn: one clear message, exit code 2, no run dir."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launcher.cli import main

from conftest import ROOT, TINY, base_env


@pytest.fixture
def tsv(tmp_path):
    def make(rows, header="sentence\tlabel"):
        p = tmp_path / "data.tsv"
        p.write_text(header + "\n" + "".join(f"{a}\t{b}\n" for a, b in rows))
        return str(p)

    return make


GOOD_ROWS = [(f"review number {i}", i % 2) for i in range(200)]


def run_cli(capsys, tmp_path, *sets: str, nproc: str = "2"):
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), "--run-dir", str(run_dir), "--nproc-per-node", nproc]
    for s in sets:
        args += ["--set", s]
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err, run_dir


@pytest.mark.parametrize(
    "case, sets, expected",
    [
        (
            "missing file",
            ["data.train=does/not/exist.tsv"],
            ["data.train='does/not/exist.tsv'", "file not found"],
        ),
        ("unknown key", ["train.lrr=0.1"], ["train.lrr: unknown key"]),
        ("wrong type", ["train.micro_batch_size=big"], ["train.micro_batch_size='big'"]),
        (
            "batch arithmetic",
            ["train.global_batch_size=100"],
            ["train.global_batch_size=100", "micro_batch_size=16 × world size 2 = 32", "96 or 128"],
        ),
        ("fp16 on cpu", ["precision=fp16"], ["precision='fp16' is not supported", "bf16"]),
    ],
)
def test_rejected_before_spawn(case, sets, expected, capsys, tmp_path):
    rc, err, run_dir = run_cli(capsys, tmp_path, *sets)
    assert rc == 2, err
    assert err.count("zerotune: config error") == 1
    for text in expected:
        assert text in err, f"{case}: {text!r} not in {err!r}"
    assert not run_dir.exists(), "a rejected run must not leave a run directory"


def test_missing_column_lists_existing_columns(capsys, tmp_path, tsv):
    path = tsv(GOOD_ROWS)
    rc, err, run_dir = run_cli(capsys, tmp_path, f"data.train={path}", "data.text_column=review")
    assert rc == 2 and not run_dir.exists()
    assert "data.text_column 'review' not in train columns ['sentence', 'label']" in err


def test_labels_out_of_range(capsys, tmp_path, tsv):
    path = tsv(GOOD_ROWS + [("odd one", 5)])
    rc, err, run_dir = run_cli(
        capsys,
        tmp_path,
        f"data.train={path}",
        "data.text_column=sentence",
        "model.num_labels=2",
        "data.validation_fraction=0.5",
    )
    assert rc == 2 and not run_dir.exists()
    assert "column 'label': 1 out-of-range (0..1) label (e.g. 5) at line 202" in err


def test_several_problems_reported_together(capsys, tmp_path):
    rc, err, _ = run_cli(capsys, tmp_path, "precision=fp16", "train.global_batch_size=100")
    assert rc == 2
    assert "2 problems" in err and "fp16" in err and "global_batch_size=100" in err


def test_existing_run_dir_is_left_untouched(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("precious: true\n")
    rc, _, _ = run_cli(capsys, tmp_path, "train.lrr=1")
    assert rc == 2 and (run_dir / "config.yaml").read_text() == "precious: true\n"


@pytest.mark.slow
def test_real_cli_process_exit_code_and_rank_entry_point(tmp_path):
    env = base_env(tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "launcher", "validate", str(TINY), "--set", "zero.stage=7"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "zero.stage=7" in p.stderr
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            str(TINY),
            "--set",
            "zero.stage=7",
            "--run-dir",
            str(tmp_path / "r"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "zero.stage=7" in p.stderr and not (tmp_path / "r").exists()
    p = subprocess.run(
        [sys.executable, "-m", "launcher", "validate", str(TINY)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "global batch 64" in p.stdout


# Pre-flight on a GPU machine, faked: ``visible_gpu_count`` (as pre-flight imports it) says how many GPUs
# this machine has (the only thing that cannot run here), and ``detect_build_env`` describes
# a DeepSpeed install / CUDA toolkit (trainer/ops.py). Nothing spawns: each case is refused.


@pytest.fixture
def fake_gpus(monkeypatch):
    import launcher.preflight as preflight

    def fake(n: int, build=None):
        monkeypatch.setattr(preflight, "visible_gpu_count", lambda: n)
        if build is not None:
            monkeypatch.setattr(preflight, "detect_build_env", lambda: build)

    return fake


def test_more_ranks_than_gpus_refused_before_spawn(capsys, tmp_path, fake_gpus):
    """Faked: 2 GPUs on this machine, 4 ranks asked for."""
    fake_gpus(2)
    rc, err, run_dir = run_cli(capsys, tmp_path, nproc="4")
    assert rc == 2 and not run_dir.exists()
    assert "--nproc-per-node=4 but this machine has 2 GPU(s): use at most 2" in err


def test_gloo_on_gpu_refused_before_spawn(capsys, tmp_path, fake_gpus):
    """Faked: 2 GPUs on this machine."""
    fake_gpus(2)
    rc, err, run_dir = run_cli(capsys, tmp_path, "launch.backend=gloo")
    assert rc == 2 and not run_dir.exists()
    assert "launch.backend='gloo' on GPU" in err and "nccl" in err


def test_nccl_on_cpu_refused_before_spawn(capsys, tmp_path):
    rc, err, run_dir = run_cli(capsys, tmp_path, "launch.backend=nccl")
    assert rc == 2 and not run_dir.exists()
    assert "launch.backend='nccl' without a GPU" in err


def test_jit_build_without_cuda_compiler_refused_with_the_fix(capsys, tmp_path, fake_gpus):
    """Faked: 2 GPUs and a pip-installed DeepSpeed without pre-built ops or CUDA toolkit."""
    from trainer.ops import BuildEnv

    fake_gpus(
        2,
        BuildEnv(
            deepspeed="0.19.8",
            install_accelerator="cuda",
            prebuilt={"fused_adam": False},
            torch_cuda="12.4",
            cxx="/usr/bin/c++",
            ninja=True,
        ),
    )
    rc, err, run_dir = run_cli(capsys, tmp_path, "train.optimizer_impl=deepspeed")
    assert rc == 2 and not run_dir.exists()
    assert err.count("DeepSpeed's FusedAdam") == 1  # once, though two checks find it
    assert "no nvcc on PATH" in err
    assert "set train.optimizer_impl=torch" in err and "DS_BUILD_FUSED_ADAM=1" in err


def test_slow_offload_optimizer_is_noted(capsys, fake_gpus):
    """Faked: 1 GPU, DeepSpeed without a pre-built cpu_adam. ``validate`` says why it is slow."""
    from trainer.ops import BuildEnv

    fake_gpus(1, BuildEnv(deepspeed="0.19.8", install_accelerator="cuda", ninja=True))
    rc = main(
        [
            "validate",
            str(TINY),
            "--no-data",
            "--nproc-per-node",
            "1",
            "--set",
            "zero.offload_optimizer=true",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "zerotune: note: zero.offload_optimizer: torch AdamW steps the CPU shards" in out.err
    assert "DS_BUILD_CPU_ADAM=1" in out.err
    assert out.out.rstrip().endswith("optimizer torch AdamW")  # not fused: CPU shards


def test_default_gpu_optimizer_is_named(capsys, fake_gpus):
    """Faked: 1 GPU. The default needs no build: torch's fused AdamW."""
    fake_gpus(1)
    assert main(["validate", str(TINY), "--no-data", "--nproc-per-node", "1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("optimizer torch AdamW (fused)")


def test_inherited_ds_accelerator_is_noted_before_spawn(capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert main(["validate", str(TINY), "--no-data"]) == 0
    assert "zerotune: note: DS_ACCELERATOR=cuda is set" in capsys.readouterr().err
