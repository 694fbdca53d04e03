"""``logging.profile_steps``: torch.profiler over chosen optimizer steps of a real 2-rank run
(trainer/profiling.py)."""

from __future__ import annotations

import json

import pytest
from multirank import run_distributed

from conftest import TINY, train_tiny

SETS = ["train.max_steps=7", "eval.every_steps=100", "checkpoint.every_steps=100"]


def test_profile_steps_record_exactly_those_steps_on_every_rank(tmp_path):
    d = tmp_path / "run"
    codes = run_distributed(
        train_tiny,
        2,
        str(d),
        str(tmp_path / "cache"),
        [*SETS, "logging.profile_steps=4-5"],
        timeout=300,
    )
    assert codes == [0, 0]
    for rank in (0, 1):
        table = (d / "profile" / f"rank{rank}.txt").read_text()
        assert table.startswith("optimizer steps 4-5 (2 recorded")
        assert "aten::addmm" in table or "aten::linear" in table  # the model's own operators
        traces = list((d / "profile").glob(f"rank{rank}.*.pt.trace.json"))
        assert len(traces) == 1
        events = json.loads(traces[0].read_text())["traceEvents"]
        marks = {e["name"] for e in events if str(e.get("name", "")).startswith("zerotune.step#")}
        assert marks == {"zerotune.step#4", "zerotune.step#5"}  # not the warm-up step 3
        # the flags' all-reduce after each step is inside the recorded window
        assert any("all_reduce" in str(e.get("name", "")) for e in events)


@pytest.mark.parametrize("spec", ["1-3", "5-4", "five"])
def test_a_bad_profile_window_is_a_config_error_naming_it(spec):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="logging.profile_steps"):
        load_config(TINY, [f"logging.profile_steps={spec}"])
