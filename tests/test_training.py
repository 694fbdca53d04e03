"""Two-process CPU/gloo runs through the real CLI: torch.distributed.run + DeepSpeed.

One uninterrupted run per ZeRO stage is shared by the assertions below (loss falls, ranks
stay identical, TensorBoard tags, export) and serves as the reference for the resume tests.
The engine arithmetic itself (same steps at every ZeRO stage and under DDP, bf16, sharding)
is checked on in-process ranks in test_ranks.py, in seconds.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import TINY, check_ok, mean_loss, read_jsonl, results, train_losses, zerotune

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains_and_ranks_agree(stage, runs):
    d = runs.stage(stage)
    losses = train_losses(d)
    assert sorted(losses) == list(range(1, 61))
    assert mean_loss(losses, 56, 60) < 0.8 * mean_loss(losses, 1, 5), losses
    r = results(d)
    assert r["world_size"] == 2 and r["steps"] == 60
    assert len(r["param_digests"]) == 2 and r["params_in_sync"], r["param_digests"]
    ds = json.loads((d / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_accumulation_steps"] == 2
    env = json.loads((d / "env.json").read_text())
    assert env["launcher"] == "torchrun" and env["world_size"] == 2
    assert (d / "checkpoints" / "step_00000060" / "manifest.json").is_file()


def test_tensorboard_tags_read_back(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = runs.stage(2)
    acc = EventAccumulator(str(d / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "train/tokens_per_s",
        "train/step_time_s",
        "train/host_rss_gb",
        "eval/accuracy",
        "eval/macro_f1",
        "eval/loss",
        "checkpoint/save_seconds",
        "checkpoint/size_mb",
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    loss_events = acc.Scalars("train/loss")
    assert [e.step for e in loss_events] == list(range(1, 61))
    jsonl = train_losses(d)
    assert all(math.isclose(e.value, jsonl[e.step], rel_tol=1e-6) for e in loss_events)
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert lr[0] < lr[1] and lr[-1] < lr[2]  # warm-up, then linear decay


def test_metrics_jsonl_has_train_eval_and_checkpoint_records(runs):
    recs = read_jsonl(runs.stage(1) / "metrics.jsonl")
    kinds = {r["kind"] for r in recs}
    assert {"train", "eval", "checkpoint"} <= kinds
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [30, 60]
    assert all(e["num_samples"] == 200 for e in evals)  # 10 % of 2000, each counted once


@pytest.mark.parametrize("stage", [0, 3])
def test_exported_model_reloads_and_reproduces_validation_accuracy(stage, runs):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.config import load_config
    from trainer.data import load_raw_splits

    d = runs.stage(stage)
    model = AutoModelForSequenceClassification.from_pretrained(d / "final").eval()
    tok = AutoTokenizer.from_pretrained(d / "final")
    assert (d / "final" / "model.safetensors").is_file()
    cfg = load_config(d / "config.yaml")
    val = load_raw_splits(cfg)["validation"]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(val), 64):
            rows = val[i : i + 64]
            enc = tok(
                rows["text"],
                truncation=True,
                max_length=cfg.data.max_length,
                padding=True,
                return_tensors="pt",
            )
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(rows["label"])).sum())
    assert correct / len(val) == pytest.approx(results(d)["validation"]["accuracy"], abs=1e-9)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_after_crash_is_bitwise_identical(stage, runs, tmp_path_factory, cache_dir):
    """Die after step 26 (last checkpoint: step 20, mid-epoch), resume with the same command:
    every logged loss and the final parameters equal the uninterrupted run's, bit for bit."""
    ref = runs.stage(stage)
    d = tmp_path_factory.mktemp(f"crash{stage}") / "run"
    args = ["train", str(TINY), "--run-dir", str(d), "--set", f"zero.stage={stage}"]
    crashed = zerotune(args, cache_dir, ZEROTUNE_FAULT="step@26")
    assert crashed.returncode != 0
    assert sorted(p.name for p in (d / "checkpoints").glob("step_*")) == [
        "step_00000010",
        "step_00000020",
    ]
    resumed = zerotune(args, cache_dir)
    check_ok(resumed)
    assert "resumed from" in resumed.stderr and "at step 20" in resumed.stderr
    assert train_losses(d) == train_losses(ref)  # exact float equality, steps 1..60
    assert results(d)["param_digests"] == results(ref)["param_digests"]
    assert results(d)["validation"] == results(ref)["validation"]


def test_causal_lm_sft_on_responses(runs, tmp_path, cache_dir):
    from conftest import ROOT

    d = tmp_path / "sft"
    proc = zerotune(
        [
            "train",
            str(ROOT / "configs" / "sft-tiny.yaml"),
            "--run-dir",
            str(d),
            "--set",
            "train.max_steps=40",
            "--set",
            "eval.every_steps=10",
            "--set",
            "logging.progress_bar=false",
        ],
        cache_dir,
    )
    check_ok(proc)
    evals = [r for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    assert evals[-1]["perplexity"] < 0.5 * evals[0]["perplexity"]
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["loss"]))
    r = results(d)
    assert r["params_in_sync"] and "perplexity" in r["validation"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(d / "final").config.model_type == "gpt2"


def test_torchrun_by_hand_is_the_same_run(runs, tmp_path, cache_dir):
    """`torchrun -m trainer CONFIG` (no zerotune launcher) trains the identical run, and
    `zerotune train` started under torchrun runs in place instead of spawning again."""
    import subprocess
    import sys

    from conftest import ROOT, base_env

    for entry in (["-m", "trainer"], ["-m", "launcher", "train"]):
        d = tmp_path / entry[-1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                *entry,
                str(TINY),
                "--run-dir",
                str(d),
                "--set",
                "train.max_steps=20",
                "--set",
                "checkpoint.every_steps=null",
            ],
            cwd=ROOT,
            env=base_env(cache_dir),
            capture_output=True,
            text=True,
            timeout=600,
        )
        check_ok(proc)
        ref = train_losses(runs.stage(2))
        got = train_losses(d)
        # same data order, init and dropout streams; the schedule differs (20 vs 60 steps) only
        # after warm-up, so the first 10 losses are bitwise those of the reference run
        assert [got[s] for s in range(1, 11)] == [ref[s] for s in range(1, 11)]
        assert json.loads((d / "env.json").read_text())["launcher"] == "torchrun"
        assert results(d)["world_size"] == 2


def test_validation_and_test_reports_come_from_their_own_splits(runs):
    """With data.test set, the test evaluation runs after the final validation: each split's
    per-class figures and report must be its own (the validation ones were overwritten once)."""
    d = runs.get(
        "with_test",
        "data.test=builtin:sentiment",
        "train.max_steps=20",
        "checkpoint.every_steps=null",
    )
    r = results(d)
    n_val, n_test = r["validation"]["num_samples"], r["test"]["num_samples"]
    assert (n_val, n_test) == (200, 500)  # carved 10 % of 2000; builtin test split of 500
    assert sum(c["support"] for c in r["validation_per_class"].values()) == n_val
    assert sum(c["support"] for c in r["test_per_class"].values()) == n_test
    val_txt = (d / "classification_report.txt").read_text()
    test_txt = (d / "classification_report_test.txt").read_text()
    assert f"{n_val:8d}" in val_txt.splitlines()[-1] and f"{n_test:8d}" in test_txt.splitlines()[-1]
    assert f"{r['validation']['accuracy']:9.4f}" in val_txt
    assert f"{r['test']['accuracy']:9.4f}" in test_txt
    env = json.loads((d / "env.json").read_text())
    assert env["param_dtype"] == "float32"
