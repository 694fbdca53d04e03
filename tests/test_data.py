"""Data: the step → samples plan, eval sharding, padding, and input checks."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, load_config
from trainer.data import (
    GlobalBatchPlan,
    check_splits,
    eval_shards,
    load_raw_splits,
    tokenize_splits,
)
from trainer.tasks import Collator

from conftest import ROOT, read_jsonl


@pytest.mark.parametrize("world, micro", [(1, 32), (2, 16), (2, 4), (4, 2), (8, 4)])
def test_samples_of_a_step_do_not_depend_on_world_or_accumulation(world, micro):
    plan = GlobalBatchPlan(1000, 32, seed=3)
    for step in (0, 1, 30, 31, 62):  # 31 steps per epoch: crosses into epochs 1 and 2
        got = sorted(
            i for r in range(world) for mb in plan.micro_batches(step, r, world, micro) for i in mb
        )
        assert got == sorted(plan.step_indices(step))
        assert len(got) == 32 and len(set(got)) == 32


def test_an_epoch_sees_every_kept_sample_once_and_epochs_reshuffle():
    plan = GlobalBatchPlan(100, 8, seed=0)
    assert plan.steps_per_epoch == 12  # 4 samples dropped per epoch
    e0 = [i for s in range(12) for i in plan.step_indices(s)]
    e1 = [i for s in range(12, 24) for i in plan.step_indices(s)]
    assert len(set(e0)) == 96 and len(set(e1)) == 96
    assert e0 != e1
    assert plan.position(25) == (2, 1)


def test_plan_rejects_batch_larger_than_data():
    with pytest.raises(ConfigError, match="larger than the training set"):
        GlobalBatchPlan(10, 16, 0)


@pytest.mark.parametrize(
    "n, world, micro", [(10, 3, 2), (7, 2, 4), (1, 4, 8), (872, 2, 64), (5, 5, 1)]
)
def test_eval_shards_count_every_sample_once_and_keep_ranks_in_step(n, world, micro):
    seen, batches = [], set()
    for r in range(world):
        shards = list(eval_shards(n, r, world, micro))
        batches.add(len(shards))
        for idx, valid in shards:
            assert len(idx) == len(valid) and len(idx) >= 1
            seen += [i for i, v in zip(idx, valid) if v]
    assert sorted(seen) == list(range(n))
    assert len(batches) == 1  # same number of forward calls on every rank (ZeRO-3)


def test_collator_pads_dynamically():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [5], "attention_mask": [1], "labels": 0},
    ]
    b = Collator(pad_id=0, pad_labels=False)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]] and b["attention_mask"].sum() == 4
    lm = Collator(pad_id=0, pad_labels=True)([{**r, "labels": r["input_ids"]} for r in rows])
    assert lm["labels"].tolist() == [[5, 6, 7], [5, -100, -100]]


def write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def test_validation_carved_from_train_with_fixed_seed(tmp_path):
    f = write_tsv(tmp_path / "t.tsv", [(f"text {i}", i % 2) for i in range(50)])
    c = load_config(None, [f"data.train={f}", "data.text_column=sentence"])
    a, b = load_raw_splits(c), load_raw_splits(c)
    assert len(a["validation"]) == 5 and a["validation"]["sentence"] == b["validation"]["sentence"]
    assert not set(a["validation"]["sentence"]) & set(a["train"]["sentence"])


def test_missing_column_lists_existing_columns(tmp_path):
    f = write_tsv(tmp_path / "t.tsv", [("a", 0), ("b", 1)] * 10)
    c = load_config(None, [f"data.train={f}", "data.text_column=review"])
    with pytest.raises(
        ConfigError, match=r"data.text_column 'review' not in train columns \['sentence', 'label'\]"
    ):
        check_splits(c, load_raw_splits(c))


def test_labels_out_of_range_named(tmp_path):
    f = write_tsv(tmp_path / "t.tsv", [("a", 0), ("b", 1), ("c", 7)] * 10)
    c = load_config(None, [f"data.train={f}", "data.text_column=sentence", "model.num_labels=2"])
    with pytest.raises(
        ConfigError, match=r"10 out-of-range \(0..1\) labels \(e.g. 7\) at lines 4, 7,"
    ):
        check_splits(c, load_raw_splits(c))


def test_string_labels_are_mapped(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    c = load_config(None, [f"data.train={p}"])
    info = check_splits(c, load_raw_splits(c))
    assert info.names == ["neg", "pos"] and info.num_labels == 2


def test_missing_file_is_named(tmp_path):
    c = load_config(None, [f"data.train={tmp_path / 'nope.csv'}"])
    with pytest.raises(ConfigError, match="nope.csv'.*file not found"):
        load_raw_splits(c)


def test_causal_lm_loss_only_on_the_response():
    from trainer.models import build_tokenizer
    from trainer.tasks import build_task

    c = load_config(ROOT / "configs" / "sft-tiny.yaml")
    tok = build_tokenizer(c, build_task(c))
    import datasets

    raw = {
        "train": datasets.Dataset.from_dict(
            {"prompt": ["count from 3 :"], "response": ["4 5 ."], "text": ["x"]}
        )
    }
    out = tokenize_splits(c, raw, tok, None)["train"][0]
    prompt_len = len(tok("count from 3 :", add_special_tokens=False)["input_ids"])
    assert prompt_len == 4
    assert out["labels"][:prompt_len] == [-100] * prompt_len
    assert out["labels"][prompt_len:] == out["input_ids"][prompt_len:]
    assert out["input_ids"][-1] == tok.eos_token_id


class _HookIn:
    """A dataset whose every item says whether the worker reading it has the quiet hook."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> bool:
        import sys

        from trainer.data import quiet_lost_rank

        return sys.excepthook is quiet_lost_rank


def test_a_loader_worker_is_quiet_about_a_rank_gone_mid_transfer_only(capsys):
    """A worker's fd-passing thread reports through sys.excepthook: a connection its rank
    dropped (Ctrl-C while a batch was being handed over) prints nothing, other errors print;
    the hook is installed in real loader workers (CI caught the traceback after Ctrl-C)."""
    import torch
    from torch.utils.data import DataLoader

    from trainer.data import loader_options, quiet_lost_rank

    for kind in (ConnectionResetError, BrokenPipeError, EOFError):
        quiet_lost_rank(kind, kind("gone"), None)
    assert capsys.readouterr().err == ""
    quiet_lost_rank(ValueError, ValueError("a real error"), None)
    assert "a real error" in capsys.readouterr().err
    cfg = load_config(ROOT / "configs" / "demo.yaml", [])
    opts = loader_options(cfg, torch.device("cpu"))
    assert opts["num_workers"] >= 1
    assert list(DataLoader(_HookIn(), batch_size=None, **opts)) == [True, True]


def _forks_in_a_run(run_dir: str, cache: str, overrides: list[str]) -> int:
    """One rank of a tiny run (conftest.train_tiny) that counts the processes it forks."""
    import os

    from conftest import train_tiny

    forks = []
    os.register_at_fork(before=lambda: forks.append(1))
    assert train_tiny(run_dir, cache, overrides) == 0
    return len(forks)


def test_evaluations_fork_no_loader_worker(tmp_path):
    """Only the training loader forks a worker (once per rank); the 4 evaluations collate in
    the rank: a fork per evaluation, from a rank with threads running, once left rank 0 stuck
    for good in CPython's after-fork clean-up (a 2-rank SST-2 run at its 2nd evaluation)."""
    from multirank import run_distributed

    sets = ["train.max_steps=8", "eval.every_steps=2", "data.num_workers=1"]
    sets += ["checkpoint.every_steps=null"]
    forks = run_distributed(_forks_in_a_run, 2, str(tmp_path / "run"), str(tmp_path), sets)
    assert forks == [1, 1]
    evals = [x for x in read_jsonl(tmp_path / "run" / "metrics.jsonl") if x["kind"] == "eval"]
    assert len(evals) >= 4
