"""Non-finite losses (issue 10, line 7): a NaN injected into one rank's loss
(``ZEROTUNE_FAULT=nan@N:R``) is skipped on every rank alike at ZeRO 0 and 2 and with DDP —
weights, learning rate and ranks untouched, counted in ``skipped_steps`` and
``nonfinite_steps`` — a resume after it is still bit for bit, ``train.on_nonfinite=abort`` (or
too many in a row) stops every rank with exit 1 and one message; the fp16 loss-scale watch on
its own (fp16 does not run on CPU). Real engines on in-process gloo ranks."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
from multirank import run_distributed
from test_ranks import VARIANTS, Job, digest, make_batch

from trainer.distributed import get_rank, get_world_size
from trainer.nonfinite import LossScaleWatch

from conftest import TINY, read_jsonl


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What the ranks import, imported before they fork (as in test_loop.py)."""
    import datasets  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import trainer.export  # noqa: F401
    import trainer.loop  # noqa: F401


# --------------------------------------------------------------------------------------
# The engines: one rank's NaN, no update anywhere
# --------------------------------------------------------------------------------------


def _nan_on_rank1(variant: str) -> dict:
    job = Job(*VARIANTS[variant])
    job.run(0, 2)
    before, lr, skipped = (
        digest(job.engine.full_state_dict()),
        job.engine.lr(),
        job.engine.skipped_steps,
    )
    idx = job.sampler.micro_batches(2, get_rank(), get_world_size(), job.plan.micro)
    os.environ["ZEROTUNE_FAULT"] = "nan@3:1"
    try:
        result = job.engine.train_step([make_batch(i) for i in idx], step=3)
    finally:
        del os.environ["ZEROTUNE_FAULT"]
    out = {
        "loss": result.loss,
        "skipped": result.skipped,
        "nonfinite": result.nonfinite,
        "weights_kept": digest(job.engine.full_state_dict()) == before,
        "lr_kept": job.engine.lr() == lr,
        "skipped_steps": job.engine.skipped_steps - skipped,
    }
    later = job.run(3, 6)
    out.update(
        later_finite=all(math.isfinite(x) for x in later),
        after=digest(job.engine.full_state_dict()),
    )
    return out


@pytest.mark.parametrize("variant", ["zero0", "zero2", "ddp"])
def test_a_nan_on_one_rank_skips_the_update_on_every_rank(variant):
    r0, r1 = run_distributed(_nan_on_rank1, 2, variant, timeout=180)
    assert math.isnan(r1["loss"]) and math.isfinite(r0["loss"])
    for r in (r0, r1):
        assert r["skipped"] and r["nonfinite"], r  # rank 0 too: its reduced gradients are NaN
        assert r["weights_kept"] and r["lr_kept"] and r["skipped_steps"] == 1, r
        assert r["later_finite"]
    assert r0["after"] == r1["after"]  # still in step: the same weights on both ranks


# --------------------------------------------------------------------------------------
# The loop: agreement, telemetry, exact resume, abort
# --------------------------------------------------------------------------------------


def _train(run_dir: str, cache: str, overrides: list[str], resume: str) -> tuple[int, str]:
    from trainer.config import load_config
    from trainer.env import detect_env
    from trainer.loop import Trainer
    from trainer.process import quiet_libraries

    quiet_libraries()
    sets = [
        f"data.cache_dir={cache}",
        "train.max_steps=12",
        "eval.every_steps=12",
        "checkpoint.every_steps=4",
        "logging.tensorboard=false",
        *overrides,
    ]
    cfg = load_config(TINY, sets)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = Trainer(
            cfg, detect_env(os.environ), torch.device("cpu"), Path(run_dir), resume
        ).run()
    return int(code), err.getvalue()


def _run(tmp_path, name, *sets, resume="auto"):
    d = tmp_path / name
    out = run_distributed(
        _train, 2, str(d), str(tmp_path / "cache"), list(sets), resume, timeout=300
    )
    return d, out


ENGINES = {
    "zero0": ["zero.stage=0"],
    "zero2": ["zero.stage=2"],
    "ddp": ["engine=ddp", "zero.stage=0"],
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_skip_is_counted_logged_and_a_resume_after_it_is_exact(tmp_path, monkeypatch, engine):
    monkeypatch.setenv("ZEROTUNE_FAULT", "nan@3:1")
    d, out = _run(tmp_path, "skip", *ENGINES[engine])
    assert [code for code, _ in out] == [0, 0], out[0][1][-2000:]
    warning = [line for line in out[0][1].splitlines() if "warning: step 3" in line]
    assert (
        len(warning) == 1 and "rank 1: nan" in warning[0] and "skipped on every rank" in warning[0]
    )
    train = {x["step"]: x for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "train"}
    assert "loss" not in train[3]  # its only step was skipped: no mean to show
    assert [train[s]["nonfinite_steps"] for s in (2, 3, 12)] == [0, 1, 1]
    assert [train[s]["skipped_steps"] for s in (2, 3, 12)] == [0, 1, 1]
    assert all(math.isfinite(train[s]["loss"]) for s in train if s != 3)
    first = json.loads((d / "results.json").read_text())
    assert first["params_in_sync"]

    monkeypatch.delenv("ZEROTUNE_FAULT")  # step 3 lies before the checkpoint resumed from
    resumed, out = _run(
        tmp_path, "resumed", *ENGINES[engine], resume=str(d / "checkpoints" / "step_00000004")
    )
    assert [code for code, _ in out] == [0, 0]
    again = json.loads((resumed / "results.json").read_text())
    assert again["param_digests"] == first["param_digests"]  # bit for bit
    state = json.loads((d / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1


def test_abort_stops_every_rank_with_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROTUNE_FAULT", "nan@6:1")
    d, out = _run(tmp_path, "abort", "train.on_nonfinite=abort")
    assert [code for code, _ in out] == [1, 1]
    lines = [line for line in out[0][1].splitlines() if "error:" in line]
    assert len(lines) == 1 and out[1][1].count("error:") == 0  # rank 0 speaks for all
    msg = lines[0]
    assert "step 6: the loss was not finite (rank 1: nan)" in msg
    assert "train.on_nonfinite=abort" in msg and "step_00000004" in msg and "train.lr" in msg
    assert sorted(p.name for p in (d / "checkpoints").iterdir() if p.is_dir()) == ["step_00000004"]


def test_too_many_in_a_row_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROTUNE_FAULT", "nan@2")  # every rank
    _, out = _run(tmp_path, "many", "train.max_nonfinite_in_a_row=1")
    assert [code for code, _ in out] == [1, 1]
    msg = next(line for line in out[0][1].splitlines() if "error:" in line)
    assert (
        "step 2: 1 steps in a row had a non-finite loss" in msg
        and "rank 0: nan, rank 1: nan" in msg
    )
    assert "No checkpoint was committed yet" in msg


# --------------------------------------------------------------------------------------
# fp16 loss scale
# --------------------------------------------------------------------------------------


def test_loss_scale_watch_warns_once_before_the_collapse():
    watch = LossScaleWatch()
    # start-up calibration: DeepSpeed halves from 2^16 while every step overflows — no warning
    scales = [65536.0, 32768.0, 16384.0, 8192.0, 4096.0, 2048.0, 1024.0]
    assert [watch.update(i, s, True, i) for i, s in enumerate(scales)] == [None] * 7
    assert watch.update(7, 1024.0, False, 7) is None  # an applied update: calibrated
    warnings = [watch.update(8 + i, 512.0 / 2**i, True, 8 + i) for i in range(6)]
    assert warnings[:4] == [None] * 4 and warnings[5] is None  # one warning, at the 5th halving
    assert "halved 5 times in a row" in warnings[4] and "precision=bf16" in warnings[4]
    assert "loss scale is 32 " in warnings[4]
    # recovered, then down to the floor: warned again
    assert watch.update(20, 4096.0, False, 13) is None
    low = watch.update(21, 8.0, False, 13)
    assert low and "at or below 8" in low
    assert watch.update(22, None, False, 0) is None  # fp32 / bf16: no scale
