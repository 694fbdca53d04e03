"""``zerotune submit`` without a cluster: argument errors, pre-flight before any file is
written, the rendered script against a golden file, and shell quoting of user values.

Regenerate the golden file after an intended change of the template or the renderer:
    ZEROTUNE_UPDATE_GOLDEN=1 python -m pytest tests/test_submit.py
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from launcher.cli import main
from launcher.submit import JobSpec, render, template_path, time_limit_seconds

from conftest import ROOT, TINY, base_env, zerotune

GOLDEN = ROOT / "tests" / "golden" / "submit.sbatch"


def normalize(text: str, run_dir, python: str = sys.executable) -> str:
    for value, placeholder in (
        (str(run_dir), "@RUN_DIR@"),
        (str(ROOT), "@SUBMIT_DIR@"),
        (python, "@PYTHON@"),
    ):
        text = text.replace(shlex.quote(value), placeholder).replace(value, placeholder)
    return text


@pytest.fixture
def submit(monkeypatch, capsys, cache_dir):
    """``zerotune submit ARGS`` in this process (no torch start-up per call): (code, stdout, stderr)."""
    for k, v in base_env(cache_dir).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)

    def call(*args: str, **env: str):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        code = main(["submit", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.mark.slow
def test_rendered_script_matches_golden(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = zerotune(
        [
            "submit",
            "tests/configs/tiny.yaml",
            "--nodes",
            "2",
            "--gpus-per-node",
            "4",
            "--cpus-per-task",
            "8",
            "--time",
            "12:00:00",
            "--partition",
            "gpu",
            "--account",
            "proj42",
            "--job-name",
            "tiny-sft",
            "--signal-lead",
            "300",
            "--run-dir",
            str(run_dir),
            "--set",
            "train.lr=1e-3",
            "--set",
            "train.micro_batch_size=8",
            "--sbatch-arg=--mem=64G",
            "--sbatch-arg=--exclusive",
            "--dry-run",
        ],
        cache_dir,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"sbatch {run_dir / 'submit.sbatch'}" in proc.stdout
    assert "world 8" in proc.stdout
    got = normalize((run_dir / "submit.sbatch").read_text(), run_dir)
    if os.environ.get("ZEROTUNE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text(), (
        "rendered script changed; if intended, regenerate with ZEROTUNE_UPDATE_GOLDEN=1"
    )
    # the resolved config sits beside it, overrides applied, and the script points at it
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()
    assert "ZEROTUNE_DEFAULT_ARGS=(@RUN_DIR@/config.yaml @RUN_DIR@)" in got
    # a fresh dry run renders the same script: resubmitting is idempotent
    assert (
        zerotune(
            [
                "submit",
                "tests/configs/tiny.yaml",
                "--nodes",
                "1",
                "--nproc-per-node",
                "2",
                "--run-dir",
                str(run_dir),
                "--dry-run",
            ],
            cache_dir,
        ).returncode
        == 0
    )


def test_gpu_job_checks_nothing_about_this_machines_gpus(tmp_path, submit):
    """fp16 needs a GPU; the login node may have none, the compute nodes do."""
    code, _, err = submit(
        str(TINY),
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--run-dir",
        str(tmp_path / "r"),
        "--set",
        "precision=fp16",
        "--dry-run",
    )
    assert code == 0, err
    code, _, err = submit(
        str(TINY),
        "--nodes",
        "1",
        "--nproc-per-node",
        "2",
        "--run-dir",
        str(tmp_path / "c"),
        "--set",
        "precision=fp16",
        "--dry-run",
    )
    assert code == 2 and "precision='fp16'" in err
    assert not (tmp_path / "c").exists()


def test_nproc_required_without_gpus(tmp_path, submit):
    code, _, err = submit(str(TINY), "--nodes", "2", "--run-dir", str(tmp_path / "r"), "--dry-run")
    assert code == 2
    assert "--nproc-per-node" in err and "--gpus-per-node" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "train.micro_batch_size=0"], "train.micro_batch_size"),
        (
            ["--set", "train.global_batch_size=63"],
            "global_batch_size",
        ),  # 63 not divisible by 2 ranks × 16
        (["--set", "no_such.key=1"], "unknown key"),
        (["--time", "tomorrow"], "--time='tomorrow'"),
        (["--sbatch-arg=-N 2"], "long option"),
        (["--job-name", "a\nb"], "newlines"),
        (["--signal-lead", "0"], "--signal-lead=0: expected 1..65535 seconds"),
        (["--signal-lead", "70000"], "--signal-lead=70000"),
        (["--signal-lead", "600", "--time", "10"], "not shorter than --time=10 (600 s)"),
    ],
    ids=[
        "bad-value",
        "batch-arithmetic",
        "unknown-key",
        "bad-time",
        "short-sbatch-arg",
        "newline",
        "lead-zero",
        "lead-too-long",
        "lead-beyond-time",
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, submit, extra, message):
    run_dir = tmp_path / "run"
    code, out, err = submit(
        str(TINY),
        "--nodes",
        "1",
        "--nproc-per-node",
        "2",
        "--run-dir",
        str(run_dir),
        "--dry-run",
        *extra,
    )
    assert code == 2, out + err
    assert message in err
    assert not run_dir.exists()


def test_missing_config_file_exits_2(tmp_path, submit):
    code, _, err = submit(
        str(tmp_path / "nope.yaml"),
        "--nodes",
        "1",
        "--nproc-per-node",
        "1",
        "--run-dir",
        str(tmp_path / "r"),
        "--dry-run",
    )
    assert code == 2 and "config error" in err and "not found" in err
    assert not (tmp_path / "r").exists()


def test_no_sbatch_on_path_is_a_clear_error(tmp_path, submit):
    code, _, err = submit(
        str(TINY),
        "--nodes",
        "1",
        "--nproc-per-node",
        "2",
        "--run-dir",
        str(tmp_path / "r"),
        PATH=str(tmp_path),
    )
    assert code == 2 and "sbatch not found" in err and "--dry-run" in err
    assert not (tmp_path / "r").exists()


def test_values_are_shell_quoted(tmp_path):
    """Spaces, $, quotes and % survive both bash (the arguments) and sbatch (#SBATCH lines)."""
    run_dir = tmp_path / "it's a $HOME `x` %j run"
    job = JobSpec(
        run_dir,
        tmp_path,
        "/opt/py 3/bin/python",
        {"job-name": "x; rm -rf ~", "output": str(run_dir).replace("%", "%%") + "/slurm-%j.out"},
        "c.yaml",
    )
    script = render(template_path().read_text(), job)
    assert "#SBATCH --job-name='x; rm -rf ~'" in script
    # run the rendered prologue in bash: the defaults come back byte for byte
    start = script.index("ZEROTUNE_DEFAULT_ARGS=(")
    prologue = script[start : script.index("\n", script.index("then set --", start))]
    out = subprocess.run(
        ["bash", "-c", f'set -euo pipefail\n{prologue}\nprintf "%s\\n" "$@" "$PYTHON"', "bash"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        check=True,
    ).stdout
    assert out.splitlines() == [str(run_dir / "config.yaml"), str(run_dir), "/opt/py 3/bin/python"]
    with pytest.raises(ValueError, match="newlines"):
        render(
            template_path().read_text(),
            JobSpec(tmp_path / "a\nb", tmp_path, sys.executable, {}, "c.yaml"),
        )


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("10", 600),
        ("10:30", 630),
        ("1:00:00", 3600),
        ("2-0", 172800),
        ("1-2:03", 93780),
        ("1-02:03:04", 93784),
        ("unlimited", None),
    ],
)
def test_time_limit_seconds(value, seconds):
    """Slurm's --time formats, for the check that the USR1 lead fits inside the time limit."""
    assert time_limit_seconds(value) == seconds


def test_signal_lead_is_rendered(tmp_path, submit):
    run_dir = tmp_path / "r"
    code, _, err = submit(
        str(TINY),
        "--nodes",
        "1",
        "--nproc-per-node",
        "2",
        "--run-dir",
        str(run_dir),
        "--time",
        "1-00:00:00",
        "--signal-lead",
        "900",
        "--dry-run",
    )
    assert code == 0, err
    script = (run_dir / "submit.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@900\n" in script and "USR1@120" not in script
    # the template's own default is the documented 120 s
    assert "#SBATCH --signal=B:USR1@120\n" in template_path().read_text()
