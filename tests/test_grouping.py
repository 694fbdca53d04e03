"""Length-grouped batching (``data.group_by_length``, issue 9): the step-keyed plan still
decides which samples form a step; grouping only decides how they are split into
micro-batches over ranks and accumulation steps.

The lengths are the real tokenised lengths of the tiny config's training split (the demo's
generated sentences, 4–24 tokens); the loop parts run the real loop on two in-process gloo
ranks with real DeepSpeed engines (tests/multirank.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multirank import run_distributed

from conftest import TINY, read_jsonl, train_tiny

SETS = ["data.group_by_length=true", "eval.every_steps=6", "checkpoint.every_steps=6"]


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What the ranks import, imported before they fork (as in test_loop.py)."""
    import datasets  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401

    import trainer.loop  # noqa: F401


@pytest.fixture(scope="module")
def lengths(tmp_path_factory) -> list[int]:
    from trainer.config import load_config
    from trainer.data import prepare, sample_lengths

    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config(TINY, [f"data.cache_dir={cache}"])
    train = prepare(cfg, True).splits["train"]
    out = sample_lengths(train)
    assert out == [len(x) for x in train["input_ids"]]  # the Arrow read is the row lengths
    return out


def _plans(lengths: list[int]):
    from trainer.data import GlobalBatchPlan

    return GlobalBatchPlan(len(lengths), 64, 7), GlobalBatchPlan(len(lengths), 64, 7, lengths)


def _split(plan, step: int, world: int, micro: int) -> list[list[list[int]]]:
    """[rank][micro-step] → sample indices."""
    return [plan.micro_batches(step, r, world, micro) for r in range(world)]


def _padded(lengths: list[int], batches) -> int:
    """Tokens computed for a list of micro-batches padded to their longest sample."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


# the fewer micro-batches a step has, the less there is to group: 2 of 32 still halve it
@pytest.mark.parametrize(
    ("world", "micro", "most"), [(1, 16, 0.4), (2, 16, 0.4), (2, 32, 0.6), (4, 8, 0.4)]
)
def test_same_samples_per_step_less_padding_balanced(lengths, world, micro, most):
    plain, grouped = _plans(lengths)
    plain_pad = grouped_pad = real = 0
    for step in range(plain.steps_per_epoch + 3):  # into the second epoch too
        a, b = _split(plain, step, world, micro), _split(grouped, step, world, micro)
        flat = sorted(i for rank in b for mb in rank for i in mb)
        assert flat == sorted(plain.step_indices(step))  # the step's samples, each once
        assert all(len(mb) == micro for rank in b for mb in rank)
        plain_pad += _padded(lengths, [mb for rank in a for mb in rank])
        grouped_pad += _padded(lengths, [mb for rank in b for mb in rank])
        real += sum(lengths[i] for i in flat)
    waste_plain, waste_grouped = plain_pad - real, grouped_pad - real
    print(f"world {world} micro {micro}: padding {waste_plain} → {waste_grouped} tokens")
    assert waste_grouped < most * waste_plain
    # over steps the ranks carry the same number of tokens within 2 % (no rank always longer)
    per_rank = [0] * world
    for step in range(50):
        for r, rank in enumerate(_split(grouped, step, world, micro)):
            per_rank[r] += sum(lengths[i] for mb in rank for i in mb)
    assert max(per_rank) <= 1.02 * min(per_rank)


def test_deterministic_and_world_size_free(lengths):
    from trainer.data import GlobalBatchPlan

    _, grouped = _plans(lengths)
    again = GlobalBatchPlan(len(lengths), 64, 7, list(lengths))  # another process, same plan
    for step in (0, 5, 31, 40):
        assert _split(grouped, step, 2, 16) == _split(again, step, 2, 16)
        one = sorted(i for mb in grouped.micro_batches(step, 0, 1, 16) for i in mb)
        two = sorted(i for rank in _split(grouped, step, 2, 16) for mb in rank for i in mb)
        assert one == two
    # a step's micro-batches run longest first and each is a run of neighbouring lengths
    mbs = grouped.micro_batches(3, 0, 1, 16)
    assert [max(lengths[i] for i in mb) for mb in mbs] == sorted(
        (max(lengths[i] for i in mb) for mb in mbs), reverse=True
    )


# ---- the real loop ------------------------------------------------------------------------


def _run(tmp_path, name: str, *overrides: str, world: int = 2) -> tuple[Path, dict]:
    d = tmp_path / name
    codes = run_distributed(
        train_tiny, world, str(d), str(tmp_path / "cache"), [*SETS, *overrides], timeout=300
    )
    assert codes == [0] * world
    return d, json.loads((d / "results.json").read_text())


def _losses(d: Path) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "train"}


@pytest.mark.slow  # the longest in-process runs: kept out of the fast tier
def test_grouped_run_resumes_bitwise_at_two_ranks_and_trains_at_one(tmp_path):
    ref, r = _run(tmp_path, "ref", "train.max_steps=12")
    d, _ = _run(tmp_path, "resumed", "train.max_steps=6")
    d, again = _run(tmp_path, "resumed", "train.max_steps=12")  # resumes from step 6
    assert again["param_digests"] == r["param_digests"]
    assert _losses(d) == _losses(ref)  # every step, exact float equality
    # the tokens a grouped run counts are the step's real tokens: the same as ungrouped
    plain, _ = _run(tmp_path, "plain", "train.max_steps=12", "data.group_by_length=false")
    assert r["tokens_seen"] == json.loads((plain / "results.json").read_text())["tokens_seen"]
    # without dropout, one rank (accumulation 4) and two, grouped or not: the same samples
    # per step, so the same losses (up to the order of float sums)
    sets = ("train.max_steps=2", "model.dropout=0")
    two, _ = _run(tmp_path, "two", *sets)
    one, _ = _run(tmp_path, "one", *sets, world=1)
    ungrouped, _ = _run(tmp_path, "ungrouped", *sets, "data.group_by_length=false", world=1)
    for step in (1, 2):
        first = _losses(two)[step]
        assert abs(_losses(one)[step] - first) < 1e-5
        assert abs(_losses(ungrouped)[step] - first) < 1e-5
