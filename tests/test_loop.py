"""The training loop in-process: two forked gloo ranks run ``Trainer.run`` on the tiny
config (no launcher, no torchrun), so the loop, the evaluator, the finish and the reports are
in the fast tier; the CLI tests keep what only a real launch shows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from multirank import run_distributed

from conftest import TINY, read_jsonl


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What the ranks import, imported before they fork (as in test_ranks.py)."""
    import datasets  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
        import deepspeed.utils.zero_to_fp32  # noqa: F401

    import trainer.export  # noqa: F401
    import trainer.loop  # noqa: F401


def _train(run_dir: str, cache: str, overrides: list[str], resume: str = "auto") -> int:
    from trainer.config import load_config
    from trainer.env import detect_env
    from trainer.loop import Trainer
    from trainer.process import quiet_libraries

    quiet_libraries()
    sets = [
        f"data.cache_dir={cache}",
        "train.max_steps=12",
        "eval.every_steps=6",
        "checkpoint.every_steps=6",
        "logging.tensorboard=false",
        *overrides,
    ]
    cfg = load_config(TINY, sets)
    env = detect_env(os.environ)
    return int(Trainer(cfg, env, torch.device("cpu"), Path(run_dir), resume).run())


def _run(tmp_path, name: str, *overrides: str, resume: str = "auto"):
    d = tmp_path / name
    cache = str(tmp_path / "cache")
    codes = run_distributed(_train, 2, str(d), cache, list(overrides), resume, timeout=300)
    assert codes == [0, 0]
    return d, json.loads((d / "results.json").read_text())


def test_loop_trains_evaluates_checkpoints_and_reports_every_split(tmp_path):
    d, r = _run(tmp_path, "zero2", "data.test=builtin:sentiment")
    recs = read_jsonl(d / "metrics.jsonl")
    assert [x["step"] for x in recs if x["kind"] == "train"] == list(range(1, 13))
    assert [x["step"] for x in recs if x["kind"] == "eval"] == [6, 12]  # periodic, then final
    assert [x["step"] for x in recs if x["kind"] == "checkpoint"] == [6, 12]
    assert r["steps"] == 12 and r["world_size"] == 2 and r["params_in_sync"]
    assert len(set(r["param_digests"])) == 1  # ZeRO-2: every rank holds the whole model
    # each split's report is its own (200 carved validation rows, 500 builtin test rows)
    assert sum(c["support"] for c in r["validation_per_class"].values()) == 200
    assert sum(c["support"] for c in r["test_per_class"].values()) == 500
    assert (d / "classification_report.txt").is_file()
    assert (d / "classification_report_test.txt").is_file()
    assert r["best"]["metric"] == "accuracy" and r["best"]["step"] in (6, 12)
    # each checkpoint carries the score of the evaluation at its step (keep_best ranks them)
    for step, ev in ((x["step"], x) for x in recs if x["kind"] == "eval"):
        manifest = json.loads(
            (d / "checkpoints" / f"step_{step:08d}" / "manifest.json").read_text()
        )
        assert manifest["metric"] == {"name": "accuracy", "value": ev["accuracy"]}
    # final/ is the export of the last checkpoint: fp32, and it reproduces the evaluation
    from safetensors import safe_open

    with safe_open(str(d / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    env = json.loads((d / "env.json").read_text())
    assert env["param_dtype"] == "float32" and env["world_size"] == 2


def test_ddp_and_bf16_go_through_the_same_loop(tmp_path):
    _, ddp = _run(tmp_path, "ddp", "engine=ddp", "zero.stage=0")
    d, bf16 = _run(tmp_path, "bf16", "precision=bf16")
    for r in (ddp, bf16):
        assert r["params_in_sync"] and r["validation"]["num_samples"] == 200
    assert json.loads((d / "env.json").read_text())["param_dtype"] == "bfloat16"
    train = [x for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "train"]
    assert all(x["skipped_steps"] == 0 for x in train)  # counted under bf16


def test_resumed_finished_run_only_reevaluates(tmp_path):
    """Running a finished run again loads its last checkpoint, saves nothing new and
    reports the same validation figures."""
    d, first = _run(tmp_path, "again")
    before = sorted(p.name for p in (d / "checkpoints").iterdir())
    _, second = _run(tmp_path, "again")
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == before
    assert second["validation"] == first["validation"]
    assert second["param_digests"] == first["param_digests"]


def test_early_stopped_run_started_again_trains_no_further(tmp_path):
    """Patience 1 on evaluations every 2 steps stops the run early (the tiny model's loss
    wobbles on its plateau); running it again trains no further step and saves nothing."""
    sets = ("eval.every_steps=2", "eval.metric=loss", "eval.early_stopping_patience=1")
    d, first = _run(tmp_path, "early", *sets, "checkpoint.every_steps=2")
    assert first["stopped_early"] and first["steps"] < 12
    recs = [x for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "eval"]
    # the evaluation that stopped it is the final one (not run and logged twice)
    assert [x["step"] for x in recs] == list(range(2, first["steps"] + 1, 2))
    assert first["validation"]["loss"] == pytest.approx(recs[-1]["loss"], abs=1e-9)
    before = sorted(p.name for p in (d / "checkpoints").iterdir())
    _, again = _run(tmp_path, "early", *sets, "checkpoint.every_steps=2")
    assert again["stopped_early"] and again["steps"] == first["steps"]
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == before


def test_resume_from_another_runs_checkpoint_finishes_and_exports_it(tmp_path):
    src, first = _run(tmp_path, "source")
    ckpt = src / "checkpoints" / "step_00000012"
    d, r = _run(tmp_path, "copy", resume=str(ckpt))
    assert r["steps"] == 12 and r["param_digests"] == first["param_digests"]
    assert (d / "final" / "model.safetensors").read_bytes() == (
        src / "final" / "model.safetensors"
    ).read_bytes()


def test_stop_at_ends_the_run_at_the_first_evaluation_that_reaches_it(tmp_path):
    """eval.stop_at on the eval loss every 2 steps: a target never reached (loss ≤ 0) runs to
    the end and gives the curve; the target set to one point of that curve stops the same
    trajectory at the first evaluation at or below it, which finishes as a normal run (final
    evaluation, checkpoint, export) and records the step, time and value; run again, it trains
    no further."""
    sets = ("eval.every_steps=2", "eval.metric=loss", "checkpoint.every_steps=null")
    d, full = _run(tmp_path, "never", *sets, "eval.stop_at=0")
    assert full["steps"] == 12 and full["stop_at"] == {"target": 0.0, "reached": None}
    curve = {x["step"]: x["loss"] for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "eval"}
    assert sorted(curve) == [2, 4, 6, 8, 10, 12]
    target = curve[8]
    expected = min(s for s in (2, 4, 6, 8) if curve[s] <= target)
    d, r = _run(tmp_path, "target", *sets, f"eval.stop_at={target!r}")
    hit = r["stop_at"]["reached"]
    assert r["steps"] == expected and hit["step"] == expected and not r["stopped_early"]
    assert hit["value"] == pytest.approx(curve[expected], abs=1e-6)
    assert hit["seconds_since_launch"] > 0
    evals = [x["step"] for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "eval"]
    # the periodic ones; the one that reached the target is the final one, not run again
    assert evals == list(range(2, expected + 1, 2))
    assert r["validation"]["loss"] == pytest.approx(curve[expected], abs=1e-6)
    assert (d / "checkpoints" / f"step_{expected:08d}").is_dir() and (d / "final").is_dir()
    _, again = _run(tmp_path, "target", *sets, f"eval.stop_at={target!r}")
    assert again["steps"] == expected and again["stop_at"]["reached"] == hit
