"""``zerotune submit`` without a cluster: argument errors, pre-flight before any file is
written, the rendered script against a golden file, and shell quoting of user values.

Regenerate the golden file after an intended change of the template or the renderer:
    ZEROTUNE_UPDATE_GOLDEN=1 python -m pytest tests/test_submit.py
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

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


def test_a_run_directory_in_use_is_refused_and_left_as_it_is(tmp_path, submit):
    """A live run holds the run directory's lock: submit says who, exit 2, and neither its
    config.yaml nor a submit.sbatch is written there."""
    from trainer.rundir import lock_for_launcher

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the live run's config\n")
    args = (str(TINY), "--nodes", "1", "--nproc-per-node", "2", "--run-dir", str(run_dir))
    lock = lock_for_launcher(run_dir)  # another open file: flock refuses this process too
    try:
        code, _, err = submit(*args, "--dry-run")
    finally:
        lock.release()
    assert code == 2 and err.count("config error") == 1, err
    assert f"run directory {run_dir} is in use by" in err and "zerotune train" in err
    assert (run_dir / "config.yaml").read_text() == "the live run's config\n"
    assert not (run_dir / "submit.sbatch").exists()
    code, _, err = submit(*args, "--dry-run")
    assert code == 0 and (run_dir / "submit.sbatch").is_file(), err  # released: accepted


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


# --------------------------------------------------------------------------------------
# The request against the partition (launcher/partition.py). The tables below are sinfo
# lines as Slurm prints them for partitions this machine does not have (GPU nodes, time
# limits, mixed node types); the real partition is used where one answers (sinfo).
# --------------------------------------------------------------------------------------

SINFO = """\
debug*|up|2|7900|(null)|1|infinite
gpu|up|64|515000|gpu:a100:8(S:0-1)|4|2-00:00:00
gpu|up|32|257000|gpu:a100:4(S:0-1)|2|2-00:00:00
short|up|8|16000|(null)|10|30:00
maint|down|8|16000|(null)|2|infinite
"""


def _request(nodes=1, tasks=2, cpus=None, gpus=0, mem=None, time=None):
    from launcher.partition import Request
    from launcher.submit import time_limit_seconds

    return Request(nodes, tasks, cpus, gpus, mem, time and time_limit_seconds(time), time)


def test_sinfo_lines_parsed_with_gres_and_defaults():
    from launcher.partition import gres_gpus, memory_mb, parse_sinfo

    parts = parse_sinfo(SINFO)
    assert parts[""] is parts["debug"] and parts["debug"].time_limit_s is None
    assert [(g.cpus, g.gpus, g.nodes) for g in parts["gpu"].groups] == [(64, 8, 4), (32, 4, 2)]
    assert parts["gpu"].time_limit_s == 172800 and parts["short"].time_limit_s == 1800
    assert gres_gpus("gpu:2,gpu:v100:1(S:0),mps:100") == 3 and gres_gpus("(null)") == 0
    assert (memory_mb("64G"), memory_mb("1000"), memory_mb("2T"), memory_mb("x")) == (
        65536,
        1000,
        2097152,
        None,
    )


@pytest.mark.parametrize(
    "partition, request_kw, expected",
    [
        (
            "debug",
            dict(tasks=2, cpus=4),
            "--cpus-per-task 4 × --nproc-per-node 2 = 8 CPUs per node, but partition debug's nodes have 2: lower --cpus-per-task to 1",
        ),
        (
            "debug",
            dict(tasks=4, cpus=1),
            "= 4 CPUs per node, but partition debug's nodes have 2: lower --nproc-per-node to 2",
        ),
        (
            "debug",
            dict(nodes=2, cpus=1),
            "--nodes 2, but partition debug has 1 node(s): lower --nodes to 1",
        ),
        (
            "debug",
            dict(gpus=2, cpus=1),
            "--gpus-per-node 2, but partition debug's nodes have no GPUs (no gpu gres): choose a GPU partition",
        ),
        (
            "debug",
            dict(cpus=1, mem=65536),
            "--mem=64G = 65536 MB per node, but partition debug's nodes have 7900 MB",
        ),
        (
            "gpu",
            dict(tasks=8, gpus=8, cpus=8, nodes=5),
            "--nodes 5, but partition gpu has 4 node(s) that fit this request: lower --nodes to 4",
        ),
        (
            "gpu",
            dict(tasks=8, gpus=16, cpus=1),
            "--gpus-per-node 16, but partition gpu's nodes have 8 GPU(s) per node: lower --gpus-per-node to 8",
        ),
        (
            "short",
            dict(cpus=1, time="1:00:00"),
            "--time 1:00:00 is beyond partition short's time limit 30:00: ask for --time 30:00 or less",
        ),
        ("maint", dict(cpus=1), "partition maint is down"),
    ],
    ids=["cpus", "tasks", "nodes", "no-gpus", "memory", "nodes-that-fit", "gpus", "time", "down"],
)
def test_requests_that_can_never_run_name_the_limit(partition, request_kw, expected):
    from launcher.partition import parse_sinfo, request_problems

    part = parse_sinfo(SINFO)[partition]
    req = _request(**request_kw)
    flags = {
        "cpus": f"--cpus-per-task {req.cpus_per_task}",
        "mem": "--mem=64G",
        "time": f"--time {req.time}",
    }
    problems = request_problems(part, req, flags)
    assert any(expected in p for p in problems), problems


def test_requests_that_fit_pass_and_defaults_are_derived():
    from launcher.partition import check_request, parse_sinfo

    parts = parse_sinfo(SINFO)
    defaults = {"cpus-per-task": "4", "time": "24:00:00"}
    # the case: 2 CPUs per node, 2 tasks, no --cpus-per-task: 1, not the template's 4
    opts = {"nodes": "1", "ntasks-per-node": "2"}
    problems, notes = check_request(opts, defaults, parts)
    assert problems == [] and opts["cpus-per-task"] == "1", (problems, opts)
    assert (
        "--cpus-per-task 1 (not given): partition debug's nodes have 2 CPUs for 2 task(s)"
        in notes[0]
    )
    # a GPU job: CPUs of the smallest node with the GPUs, shared by its tasks; the
    # template's 24 h fits the partition's 2 days and is left alone
    opts = {"nodes": "6", "ntasks-per-node": "4", "gpus-per-node": "4", "partition": "gpu"}
    assert check_request(opts, defaults, parts)[0] == [] and opts["cpus-per-task"] == "8"
    assert "time" not in opts
    # the template's 24 h beyond a 30-minute partition: the partition's limit instead
    opts = {"nodes": "1", "ntasks-per-node": "2", "partition": "short"}
    problems, notes = check_request(opts, defaults, parts)
    assert problems == [] and opts["time"] == "30:00" and opts["cpus-per-task"] == "4"
    # a partition that does not exist
    opts = {"nodes": "1", "ntasks-per-node": "2", "partition": "nope"}
    assert check_request(opts, defaults, parts)[0] == [
        "--partition nope: no such partition here (sinfo lists ['debug', 'gpu', 'maint', 'short'])"
    ]


needs_sinfo = pytest.mark.skipif(
    shutil.which("sinfo") is None, reason="no Slurm here (sinfo not on PATH)"
)


@needs_sinfo
def test_real_partition_refuses_before_sbatch_and_writes_nothing(tmp_path, submit):
    """This machine's Slurm: more CPUs per node than its nodes have, and more nodes than the
    partition has, are refused with the limit named; no job is queued, nothing written."""
    from launcher.partition import read_partitions

    part = read_partitions()[""]
    cpus = max(g.cpus for g in part.groups)
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    for extra, text in (
        (["--cpus-per-task", str(cpus)], f"= {2 * cpus} CPUs per node, but partition {part.name}'s nodes have {cpus}: lower --cpus-per-task to {cpus // 2}"),
        (["--nodes", str(part.nodes + 1)], f"--nodes {part.nodes + 1}, but partition {part.name} has {part.nodes} node(s)"),
    ):  # fmt: skip
        args = ["--nodes", "1", "--nproc-per-node", "2", "--run-dir", str(tmp_path / "r")]
        t0 = time.perf_counter()
        code, _, err = submit(str(TINY), *args, *extra)
        print(f"refused in {time.perf_counter() - t0:.2f} s: {err.strip()}")
        assert code == 2 and text in err, err
        assert not (tmp_path / "r").exists()
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert set(after.split()) <= set(before.split())  # nothing submitted


@needs_sinfo
def test_default_cpus_per_task_is_derived_from_the_partition(tmp_path, submit):
    from launcher.partition import read_partitions

    part = read_partitions()[""]
    cpus = min(g.cpus for g in part.groups)
    code, _, err = submit(
        str(TINY),
        "--nodes",
        "1",
        "--nproc-per-node",
        "2",
        "--run-dir",
        str(tmp_path / "r"),
        "--dry-run",
    )
    assert code == 0, err
    assert (
        f"#SBATCH --cpus-per-task={cpus // 2}\n" in (tmp_path / "r" / "submit.sbatch").read_text()
    )


def test_a_newline_in_the_config_path_cannot_add_a_line_to_the_script(tmp_path):
    """The header comment names the config: a newline there would start a shell line."""
    job = JobSpec(tmp_path / "r", tmp_path, sys.executable, {}, "c.yaml\ntouch HIT #")
    with pytest.raises(
        ValueError, match="config='c.yaml\\\\ntouch HIT #': newlines are not allowed"
    ):
        render(template_path().read_text(), job)


def test_no_user_input_goes_through_a_shell():
    """Every process zerotune starts gets an argument list: no shell=True, os.system or
    os.popen anywhere in the code that ships (launcher/, trainer/, scaling/)."""
    offenders = []
    for package in ("launcher", "trainer", "scaling"):
        for path in (ROOT / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(
                    r"shell\s*=\s*True|os\.system\(|os\.popen\(|commands\.getoutput", line
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_run_dir_under_a_file_is_refused_before_anything_is_written(tmp_path, submit):
    a_file = tmp_path / "f"
    a_file.write_text("")
    args = ["--nodes", "1", "--nproc-per-node", "2", "--run-dir", str(a_file / "run")]
    code, _, err = submit(str(TINY), *args, "--dry-run")
    assert code == 2 and "which is a file: choose another --run-dir" in err, err
    assert a_file.read_text() == ""
