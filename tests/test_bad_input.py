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
    assert "labels [5] outside 0..1" in err


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
