"""Token-balanced micro-batches (``data.batch_by_tokens``) and length-sorted evaluation
(issue 9, line 3).

The step-keyed plan still picks a step's samples; token balancing cuts them, sorted by
length, into ``accum × world`` contiguous micro-batches of variable size whose largest padded
size (samples × longest) is the smallest possible, and the engines weigh each micro-batch's
mean loss by its size. Lengths are the real tokenised lengths of the tiny config's training
split; the loop parts run the real loop (real DeepSpeed engines, DDP) on in-process gloo
ranks (tests/multirank.py); evaluation runs a real ZeRO-3 engine on two ranks.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from multirank import run_distributed

from conftest import ROOT, TINY, read_jsonl, train_tiny

SETS = ["eval.every_steps=6", "checkpoint.every_steps=6"]


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
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def lengths(cache) -> list[int]:
    from trainer.config import load_config
    from trainer.data import prepare, sample_lengths

    cfg = load_config(TINY, [f"data.cache_dir={cache}"])
    return sample_lengths(prepare(cfg, True).splits["train"])


def _cost(lengths, bounds) -> int:
    """Padded token slots of a chunk of lengths sorted longest first."""
    start, stop = bounds
    return (stop - start) * lengths[start]


def _padded(lengths: list[int], batch: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


def _brute_force(lengths: list[int], k: int) -> int:
    """The smallest largest chunk over every cut of ``lengths`` into ``k`` contiguous chunks."""
    n = len(lengths)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        worst = max(_cost(lengths, (a, b)) for a, b in itertools.pairwise(edges))
        best = worst if best is None else min(best, worst)
    return best


def test_chunks_are_k_contiguous_nonempty_and_as_small_as_brute_force():
    from trainer.data import balanced_chunks

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 11)
        k = rng.randint(1, min(n, 4))
        lengths = sorted((rng.randint(1, 64) for _ in range(n)), reverse=True)
        chunks = balanced_chunks(lengths, k)
        assert len(chunks) == k
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(a < b for a, b in chunks)  # non-empty
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(chunks))  # contiguous
        worst = max(_cost(lengths, c) for c in chunks)
        assert worst == _brute_force(lengths, k), (lengths, k, chunks)
        if n % k == 0:  # never above the equal split's worst chunk
            size = n // k
            assert worst <= max(_cost(lengths, (i, i + size)) for i in range(0, n, size))


def _split(plan, step: int, world: int, micro: int) -> list[list[list[int]]]:
    """[rank][micro-step] → sample indices."""
    return [plan.micro_batches(step, r, world, micro) for r in range(world)]


@pytest.mark.parametrize(("world", "micro"), [(1, 16), (2, 16), (2, 32), (4, 8)])
def test_same_samples_per_step_and_never_a_larger_micro_batch(lengths, world, micro):
    """At 1, 2 and 4 ranks each step holds the plan's samples, each once, in exactly accum
    micro-batches per rank; no micro-batch pads to more token slots (the memory it needs)
    than the largest of an equal split sorted by length (group_by_length), and the slowest
    micro-batch of each micro-step — what the step waits for — sums to less."""
    from trainer.data import GlobalBatchPlan

    plain = GlobalBatchPlan(len(lengths), 64, 7)
    grouped = GlobalBatchPlan(len(lengths), 64, 7, lengths)
    tokens = GlobalBatchPlan(len(lengths), 64, 7, lengths, by_tokens=True)
    accum = 64 // (micro * world)
    wait = {"plain": 0, "grouped": 0, "tokens": 0}
    for step in range(plain.steps_per_epoch + 3):  # into the second epoch too
        split = {
            name: _split(p, step, world, micro)
            for name, p in (("plain", plain), ("grouped", grouped), ("tokens", tokens))
        }
        b = split["tokens"]
        assert all(len(rank) == accum and all(rank) for rank in b)
        flat = sorted(i for rank in b for mb in rank for i in mb)
        assert flat == sorted(plain.step_indices(step))
        largest = max(_padded(lengths, mb) for rank in b for mb in rank)
        assert largest <= max(_padded(lengths, mb) for rank in split["grouped"] for mb in rank)
        for name, s in split.items():
            wait[name] += sum(
                max(_padded(lengths, s[r][m]) for r in range(world)) for m in range(accum)
            )
    print(f"world {world} micro {micro}: slowest-rank token slots per step {wait}")
    assert wait["tokens"] < wait["grouped"] <= wait["plain"]  # 1 micro-step: grouped = plain


def test_deterministic_world_size_free_and_balanced_over_steps(lengths):
    from trainer.data import GlobalBatchPlan

    tokens = GlobalBatchPlan(len(lengths), 64, 7, lengths, by_tokens=True)
    again = GlobalBatchPlan(len(lengths), 64, 7, list(lengths), by_tokens=True)
    for step in (0, 5, 31, 40):
        assert _split(tokens, step, 2, 16) == _split(again, step, 2, 16)
        one = sorted(i for mb in tokens.micro_batches(step, 0, 1, 16) for i in mb)
        four = sorted(i for rank in _split(tokens, step, 4, 16) for mb in rank for i in mb)
        assert one == four == sorted(tokens.step_indices(step))
    # sizes vary (what the engines weigh), and over steps no rank always pads more
    sizes = {len(mb) for step in range(10) for rank in _split(tokens, step, 2, 16) for mb in rank}
    assert len(sizes) > 3
    per_rank = [0, 0]
    for step in range(50):
        for r, rank in enumerate(_split(tokens, step, 2, 16)):
            per_rank[r] += sum(_padded(lengths, mb) for mb in rank)
    assert max(per_rank) <= 1.03 * min(per_rank)


def test_weighted_loss_is_the_mean_over_samples():
    """Micro-batches of 3 and 5 samples at nominal 4: weighed by n / 4 and averaged over the
    two, their mean losses give the mean over all 8 samples (equal weights would not)."""
    from trainer.engine import _weighted

    per_sample = torch.arange(8, dtype=torch.float64)
    a, b = per_sample[:3], per_sample[3:]
    batches = [{"input_ids": torch.zeros(len(x), 5)} for x in (a, b)]
    got = sum(_weighted(x.mean(), batch, 4) for x, batch in zip((a, b), batches)) / 2
    assert got == pytest.approx(per_sample.mean(), abs=1e-12)
    assert (a.mean() + b.mean()) / 2 != pytest.approx(per_sample.mean())
    assert _weighted(a.mean(), batches[0], None) is not None  # off: the loss unchanged
    assert torch.equal(_weighted(a.mean(), batches[0], None), a.mean())


@pytest.mark.parametrize(
    ("config", "task"),
    [("sft-tiny.yaml", "causal_lm"), ("ner-tiny.yaml", "token_classification")],
)
def test_token_level_task_is_refused_before_any_rank(config, task, capsys, tmp_path):
    from launcher.cli import main

    run_dir = tmp_path / "run"
    rc = main(
        [
            "train",
            str(ROOT / "configs" / config),
            "--run-dir",
            str(run_dir),
            "--set",
            "data.batch_by_tokens=true",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("zerotune: config error") == 1
    assert f"data.batch_by_tokens=true: task {task!r} averages its loss over tokens" in err
    assert "data.group_by_length=true" in err
    assert not run_dir.exists()


# ---- the real loop ------------------------------------------------------------------------


def _run(tmp_path, cache, name: str, *overrides: str, world: int = 2) -> tuple[Path, dict]:
    d = tmp_path / name
    codes = run_distributed(train_tiny, world, str(d), str(cache), [*SETS, *overrides], timeout=300)
    assert codes == [0] * world
    return d, json.loads((d / "results.json").read_text())


def _losses(d: Path) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "train"}


def test_token_balanced_steps_equal_the_plain_ones(tmp_path, cache):
    """Without dropout the logged losses of 3 steps (the mean over each step's samples, then
    the weights that the step's gradients gave) equal the plain run's at ZeRO-2 on 2 ranks,
    with 1 rank (accumulation 4) and with the DDP engine; the samples and tokens counted are
    the same."""
    sets = ("train.max_steps=3", "model.dropout=0")
    plain, p = _run(tmp_path, cache, "plain", *sets)
    by_tokens = ("data.batch_by_tokens=true", *sets)
    runs = {
        "two": _run(tmp_path, cache, "two", *by_tokens),
        "one": _run(tmp_path, cache, "one", *by_tokens, world=1),
        "ddp": _run(tmp_path, cache, "ddp", *by_tokens, "engine=ddp", "zero.stage=0"),
    }
    ref = _losses(plain)
    for name, (d, r) in runs.items():
        got = _losses(d)
        gaps = [abs(got[s] - ref[s]) for s in (1, 2, 3)]
        print(f"{name}: |Δ loss| {gaps}")
        assert max(gaps) < 1e-5, name
        assert r["tokens_seen"] == p["tokens_seen"]
        # throughput counts what the ranks ran, however the step's samples were split
        timed, ref_timed = r["throughput"], p["throughput"]
        assert timed["samples_per_step"] == ref_timed["samples_per_step"] == 64
        assert timed["tokens_per_step"] == ref_timed["tokens_per_step"]


@pytest.mark.slow  # three in-process runs of 6-12 steps: kept out of the fast tier
def test_token_balanced_run_resumes_bitwise(tmp_path, cache):
    sets = ("data.batch_by_tokens=true",)
    ref, r = _run(tmp_path, cache, "ref", *sets, "train.max_steps=12")
    d, _ = _run(tmp_path, cache, "resumed", *sets, "train.max_steps=6")
    d, again = _run(tmp_path, cache, "resumed", *sets, "train.max_steps=12")  # from step 6
    assert again["param_digests"] == r["param_digests"]
    assert _losses(d) == _losses(ref)  # every step, exact float equality


# ---- length-sorted evaluation -------------------------------------------------------------

EVAL_CONFIGS = {
    "classification": TINY,
    "token_classification": ROOT / "configs" / "ner-tiny.yaml",
    "causal_lm": ROOT / "configs" / "sft-tiny.yaml",
}


def _evaluate_both_ways(cache: str) -> dict:
    """Each task's validation split evaluated by a real ZeRO-3 engine (collective forwards:
    the ranks must run as many batches) with length-sorted and with unsorted batches."""
    from trainer.batch import resolve_batch
    from trainer.config import load_config
    from trainer.data import eval_loader, prepare
    from trainer.distributed import get_rank, get_world_size
    from trainer.engine import build_engine
    from trainer.evaluate import Evaluator
    from trainer.models import build_model
    from trainer.tasks import build_task

    rank, world, cpu = get_rank(), get_world_size(), torch.device("cpu")
    out = {}
    for name, path in EVAL_CONFIGS.items():
        cfg = load_config(
            path, [f"data.cache_dir={cache}", "zero.stage=3", "eval.micro_batch_size=16"]
        )
        task = build_task(cfg)
        data = prepare(cfg, rank == 0)
        model = build_model(cfg, task, data.tokenizer, task.head_config(data.labels))
        engine = build_engine(cfg, model, resolve_batch(cfg, world), 10, cpu)
        splits = {"validation": data.splits["validation"]}
        collate = task.collate(data.tokenizer.pad_token_id)
        options = {}  # collation in this process
        ev = Evaluator(cfg, task, engine, splits, data.labels, rank, world, collate, options)
        sorted_metrics = ev.evaluate("validation").metrics
        loader = eval_loader(splits["validation"], rank, world, 16, collate, options, False)
        ev.loaders["validation"] = loader
        out[name] = (sorted_metrics, ev.evaluate("validation").metrics)
    return out


def test_length_sorted_evaluation_gives_the_unsorted_metrics(cache):
    # tokenised once here, before the ranks fork
    from trainer.config import load_config
    from trainer.data import prepare

    for path in EVAL_CONFIGS.values():
        prepare(load_config(path, [f"data.cache_dir={cache}"]), True)
    ranks = run_distributed(_evaluate_both_ways, 2, str(cache), timeout=300)
    assert ranks[0] == ranks[1]  # the metrics are reduced over ranks
    for name, (by_length, unsorted) in ranks[0].items():
        print(name, by_length)
        assert by_length.keys() == unsorted.keys()
        for key, value in unsorted.items():
            if key == "loss" or key == "perplexity":
                assert by_length[key] == pytest.approx(value, rel=1e-6), (name, key)
            else:  # counts: accuracy, F1, samples — exactly
                assert by_length[key] == value, (name, key)
