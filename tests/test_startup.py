"""The start-up breakdown (issue 9, line 4): ``env.json``'s ``startup_s`` — the clock
(trainer/startup.py) on its own, and the phases a real loop marks (two in-process gloo ranks,
real DeepSpeed engines, tests/multirank.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from multirank import run_distributed

from conftest import TINY


def test_clock_counts_from_the_launch_and_phases_add_up(monkeypatch):
    from trainer.startup import LAUNCHED_AT, StartupClock, process_created

    created = process_created()
    assert time.time() - 3600 * 24 * 365 < created <= time.time()
    clock = StartupClock({LAUNCHED_AT: repr(created - 2.5)})  # a launcher 2.5 s before us
    assert clock.phases["launcher"] == pytest.approx(2.5, abs=0.05)
    clock.mark("imports")
    time.sleep(0.05)
    clock.mark("data")
    clock.mark("imports")  # a phase marked twice adds up
    s = clock.summary()
    assert list(s) == ["launcher", "imports", "data", "total"]
    assert s["data"] >= 0.05
    phases = sum(v for k, v in s.items() if k != "total")
    assert s["total"] == pytest.approx(phases, abs=0.005)
    assert "launcher" not in StartupClock({}).phases  # a bare torchrun: its own start


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What the ranks import, imported before they fork (as in test_loop.py)."""
    import datasets  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401

    import trainer.loop  # noqa: F401


def _train(run_dir: str, cache: str) -> int:
    from trainer.config import load_config
    from trainer.env import detect_env
    from trainer.loop import Trainer
    from trainer.process import quiet_libraries

    quiet_libraries()
    sets = [f"data.cache_dir={cache}", "train.max_steps=2", "logging.tensorboard=false"]
    cfg = load_config(TINY, sets)
    env = detect_env(os.environ)
    return int(Trainer(cfg, env, torch.device("cpu"), Path(run_dir), "auto").run())


def test_env_json_holds_the_startup_breakdown(tmp_path):
    d = tmp_path / "run"
    assert run_distributed(_train, 2, str(d), str(tmp_path / "cache"), timeout=300) == [0, 0]
    s = json.loads((d / "env.json").read_text())["startup_s"]
    phases = ["run_dir", "data", "model", "engine", "resume", "loaders", "first_step"]
    assert [k for k in s if k in phases] == phases  # in the order they happen
    assert all(v >= 0 for v in s.values())
    assert s["first_step"] > 0 and s["engine"] > 0
    assert s["total"] >= sum(s[k] for k in phases) - 0.01


@pytest.mark.slow
def test_a_real_launch_counts_the_launcher_and_logs_the_breakdown(runs):
    """``zerotune train`` (the shared ZeRO-2 reference run: no launch of its own): launcher
    start → rank created is a phase; rank 0's data check for the pre-flight another, right
    after its imports; its wait for the pre-flight's verdict at its gate (launcher/overlap.py)
    another, after the rendezvous and before the run directory; the phases add up to launch →
    first step."""
    d = runs.stage(2)
    s = json.loads((d / "env.json").read_text())["startup_s"]
    assert s["launcher"] > 0.5  # at least its Python start and the settings checks
    assert s["interpreter"] > 0 and s["imports"] > 0 and s["process_group"] > 0
    phases = list(s)
    # rank 0's data check for the launcher: after its imports, before the process group
    assert phases.index("imports") < phases.index("data_check") < phases.index("process_group")
    assert phases.index("process_group") < phases.index("preflight_wait") < phases.index("run_dir")
    assert s["data_check"] > 0 and s["preflight_wait"] >= 0
    assert s["total"] == pytest.approx(sum(v for k, v in s.items() if k != "total"), abs=0.02)
    print(f"launch → first step {s['total']:.1f} s: {s}")
