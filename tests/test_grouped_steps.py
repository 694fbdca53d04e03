"""Steps of similar length (``data.length_grouped_steps``, issue 9 line 3).

Every K consecutive steps of an epoch's shuffle are pooled, sorted by length and cut into K
steps again, taken in a seeded random order (transformers' ``group_by_length`` mega-batches,
but step-keyed). The plan tests use lengths drawn like SST-2's (most sentences short, a long
tail) and the real plan class; the run tests run the real loop on in-process gloo ranks
(tests/multirank.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from multirank import run_distributed

from conftest import TINY, read_jsonl, train_tiny

G = 32


def _lengths(n: int = 2000, seed: int = 0) -> list[int]:
    """Token counts like SST-2's training sentences: mostly 4-20, a tail to 64."""
    rng = random.Random(seed)
    return [min(64, 3 + int(rng.expovariate(1 / 10))) for _ in range(n)]


def _plans(lengths, k, seed=7, **kw):
    from trainer.data import GlobalBatchPlan

    n = len(lengths)
    return GlobalBatchPlan(n, G, seed), GlobalBatchPlan(n, G, seed, lengths, grouped_steps=k, **kw)


@pytest.mark.parametrize("k", [2, 5, 50])
def test_each_epoch_regroups_only_its_windows_and_takes_every_sample_once(k):
    lengths = _lengths(2000)  # 62 steps an epoch: the last window of K=5 holds 2, of K=50 12
    plain, grouped = _plans(lengths, k)
    per_epoch = plain.steps_per_epoch
    for epoch in (0, 1):
        first = epoch * per_epoch
        steps = [grouped.step_indices(first + s) for s in range(per_epoch)]
        assert all(len(s) == G for s in steps)
        # the epoch's samples exactly once: the plain epoch's (the same dropped remainder)
        flat = [i for s in steps for i in s]
        assert sorted(flat) == sorted(
            i for s in range(per_epoch) for i in plain.step_indices(first + s)
        )
        for w in range(0, per_epoch, k):  # a window holds its own plain steps' samples
            window = range(first + w, first + min(w + k, per_epoch))
            assert {i for s in window for i in grouped.step_indices(s)} == {
                i for s in window for i in plain.step_indices(s)
            }


def test_steps_pad_far_less_and_their_order_in_a_window_is_shuffled():
    lengths = _lengths(4000)
    plain, grouped = _plans(lengths, 50)
    steps = range(plain.steps_per_epoch)

    def padded(plan) -> int:  # a step's samples padded to its longest
        return sum(G * max(lengths[i] for i in plan.step_indices(s)) for s in steps)

    real = sum(lengths[i] for s in steps for i in plain.step_indices(s))
    print(
        f"padded / real tokens: plain {padded(plain) / real:.2f}, grouped {padded(grouped) / real:.2f}"
    )
    assert padded(grouped) < 0.5 * padded(plain)
    assert padded(grouped) < 1.3 * real
    # the window's steps are not visited longest first: their order is drawn from the seed
    longest = [max(lengths[i] for i in grouped.step_indices(s)) for s in range(50)]
    assert longest != sorted(longest, reverse=True)
    _, other_seed = _plans(lengths, 50, seed=8)
    assert [grouped.step_indices(s) for s in steps] != [other_seed.step_indices(s) for s in steps]


@pytest.mark.parametrize("split", ["plain", "group_by_length", "batch_by_tokens"])
def test_step_keyed_and_world_size_free(split):
    """A step is a function of the step alone (a resume computes it cold, in any order), and
    its micro-batches over the ranks are its samples at 1, 2 and 4 ranks."""
    lengths = _lengths(3000)
    kw = {
        "plain": {"split_by_length": False},
        "group_by_length": {},
        "batch_by_tokens": {"by_tokens": True},
    }[split]
    _, grouped = _plans(lengths, 10, **kw)
    steps = list(range(0, 3 * grouped.steps_per_epoch, 7))
    forward = [grouped.step_indices(s) for s in steps]
    _, cold = _plans(list(lengths), 10, **kw)  # another process resuming
    assert [cold.step_indices(s) for s in reversed(steps)] == forward[::-1]
    for s, idx in zip(steps, forward):
        for world in (1, 2, 4):
            micro = G // world if split == "plain" else G // (2 * world)
            got = [
                i
                for rank in range(world)
                for mb in grouped.micro_batches(s, rank, world, micro)
                for i in mb
            ]
            assert sorted(got) == sorted(idx), (s, world)
    if split == "plain":  # not split by length: the step's own order, cut in turn
        assert grouped.micro_batches(steps[1], 1, 2, 16) == [forward[1][16:32]]


def test_a_window_of_one_step_or_less_is_refused():
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="length_grouped_steps"):
        load_config(TINY, ["data.length_grouped_steps=1"])


# ---- the real loop ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _run(tmp_path: Path, cache: Path, name: str, *sets: str, world: int = 2) -> Path:
    d = tmp_path / name
    codes = run_distributed(train_tiny, world, str(d), str(cache), list(sets))
    assert codes == [0] * world
    return d


def _train(d: Path) -> dict[int, dict]:
    return {x["step"]: x for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "train"}


@pytest.mark.slow  # three in-process runs of 6-12 steps: kept out of the fast tier
def test_grouped_run_resumes_bitwise_and_steps_hold_other_samples(tmp_path, cache):
    sets = ("data.length_grouped_steps=4", "data.batch_by_tokens=true", "model.dropout=0")
    ref = _run(tmp_path, cache, "ref", *sets, "train.max_steps=12")
    _run(tmp_path, cache, "resumed", *sets, "train.max_steps=6")
    d = _run(tmp_path, cache, "resumed", *sets, "train.max_steps=12")  # from step 6
    got, want = _train(d), _train(ref)
    assert {s: x["loss"] for s, x in got.items()} == {s: x["loss"] for s, x in want.items()}
    plain = _train(_run(tmp_path, cache, "plain", "model.dropout=0", "train.max_steps=4"))
    assert [plain[s]["loss"] for s in (1, 2, 3, 4)] != [want[s]["loss"] for s in (1, 2, 3, 4)]
    digests = [json.loads((x / "results.json").read_text())["param_digests"] for x in (d, ref)]
    assert digests[0] == digests[1]
