"""benchmarks/: the comparison harness (zerotune, the hand-written floor loop, transformers'
Trainer) and the GPU MFU script's CPU dry run. The harness's own judgement (sameness) is
checked on made-up records in the fast tier; the real launches are slow."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, base_env


def _compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tokens: list[int], losses: list[float]) -> dict:
    steps = [
        {"step": i + 1, "t_end": 100.0 + i, "seconds": 0.9, "loss": x, "tokens": t}
        for i, (t, x) in enumerate(zip(tokens, losses))
    ]
    return {"steps": [steps, steps], "events": [], "launched": 90.0, "ended": 120.0}


def test_sameness_names_the_step_whose_tokens_differ_and_a_first_loss_beyond_tolerance():
    compare = _compare()
    floor = _run([300, 310, 305], [0.70, 0.69, 0.68])
    assert compare.sameness(floor, _run([300, 310, 305], [0.70 + 5e-5, 0.5, 0.1]), "z", 1e-4) == []
    problems = compare.sameness(floor, _run([300, 311, 305], [0.70, 0.69, 0.68]), "z", 1e-4)
    assert problems == [
        "z rank 0: step 2 has [311] tokens, floor [310]",
        "z rank 1: step 2 has [311] tokens, floor [310]",
    ]
    (problem, _) = compare.sameness(floor, _run([300, 310, 305], [0.7003, 0.69, 0.68]), "t", 1e-4)
    assert "t rank 0: first loss 0.700300, floor 0.700000" in problem


def test_sameness_over_ranks_for_a_lever_that_splits_a_step_otherwise():
    """data.group_by_length: the same samples per step, split otherwise over the ranks."""
    compare = _compare()
    floor = _run([300, 310], [0.70, 0.69])
    grouped = _run([300, 310], [0.70, 0.69])
    grouped["steps"] = [
        [{**s, "tokens": s["tokens"] + d, "loss": s["loss"] + d / 1e3} for s in rank]
        for rank, d in zip(grouped["steps"], (40, -40))
    ]
    assert compare.sameness(floor, grouped, "z", 1e-4, per_rank=False) == []
    assert compare.sameness(floor, grouped, "z", 1e-4)  # per rank they differ
    grouped["steps"][1][1] = {**grouped["steps"][1][1], "tokens": 271}  # a sample lost
    assert compare.sameness(floor, grouped, "z", 1e-4, per_rank=False) == [
        "z rank 0: step 2 has [621] tokens, floor [620]"
    ]


def test_figures_are_read_from_the_step_records():
    compare = _compare()
    r = _run([300, 310, 305, 320], [0.7] * 4)
    r["events"] = [{"end": {"peak_rss_gb": 1.5}}, {"end": {"peak_rss_gb": 1.25}}]
    f = compare.figures(r, warmup=1)
    assert f["interval_s"] == pytest.approx(1.0) and f["step_s"] == pytest.approx(0.9)
    assert f["first_step_s"] == pytest.approx(10.0) and f["total_s"] == pytest.approx(30.0)
    assert f["peak_rss_gb_per_rank"] == [1.5, 1.25]
    # steps 2-4 on both ranks over the intervals that ended them (3 s)
    assert f["tokens_per_s"] == pytest.approx(2 * (310 + 305 + 320) / 3.0)


def test_compare_skips_cleanly_without_the_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert f"skipped: {tmp_path / 'train.tsv'} not found" in proc.stdout


@pytest.mark.slow
def test_compare_demo_runs_every_contender_on_the_same_work(tmp_path, cache_dir):
    contenders = ["zerotune", "floor"]
    if importlib.util.find_spec("accelerate") is not None:
        contenders.append("trainer")
    args = ["--model", "demo", "--repeats", "1", "--steps", "6", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), *args]
        + ["--contenders", ",".join(contenders)],
        env=base_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "same work: equal tokens at every step on every rank" in proc.stdout
    for label in ("per step", "step-end interval", "launch → first step", "total wall-clock"):
        assert label in proc.stdout
    s = json.loads((tmp_path / "summary.json").read_text())
    firsts = list(s["first_losses"].values())
    assert len(firsts) == len(contenders) and all(f == firsts[0] for f in firsts)
    assert all(gap < 1e-4 for gap in s["max_loss_gap"].values()), s["max_loss_gap"]
    for name in contenders:
        (f,) = s["figures"][name]
        assert 0 < f["step_s"] < f["total_s"] and f["first_step_s"] < f["total_s"]
        assert len(f["peak_rss_gb_per_rank"]) == 2 and f["tokens_per_s"] > 0
    # each run's figures are kept and its checkpoint dropped (--keep-checkpoints keeps it)
    runs = {p.parent for p in tmp_path.rglob("steps")}
    assert len(runs) == len(contenders), runs
    for run in runs:
        assert not [p for p in run.rglob("checkpoint*") if p.is_dir()], sorted(run.rglob("*"))


@pytest.mark.slow
def test_gpu_mfu_dry_run_trains_the_llama_path_and_prints_mfu(tmp_path, cache_dir):
    env = base_env(cache_dir, MFU_DIR=str(tmp_path), MFU_PEAK_TFLOPS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_mfu.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    m = re.search(r"([\d,]+) tokens/s; ([\d.e+-]+) TFLOP/s per device .*MFU ([\d.]+) %", line)
    assert m, line
    tokens_s, tflops, mfu = float(m[1].replace(",", "")), float(m[2]), float(m[3])
    assert tokens_s > 0 and mfu == pytest.approx(100 * tflops, rel=0.05, abs=0.06)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    env_json = json.loads((tmp_path / "run" / "env.json").read_text())
    assert results["steps"] == 6 and env_json["batch"]["global"] == 8
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "builtin:tiny-llama" in config and "precision: bf16" in config


def _to_target(evals: list[tuple[int, float, float]], hit: int | None) -> dict:
    """Rank-0 records of a run to a target: steps 1-6 end at t = 99 + step; ``evals`` are
    (step, end time, accuracy); ``hit`` the step of the target event."""
    r = _run([300] * 6, [0.7] * 6)
    r["evals"] = [{"event": "eval", "step": s, "t": t, "value": v} for s, t, v in evals]
    values = {s: v for s, _, v in evals}
    r["events"] = [{"target": {"step": hit, "value": values[hit]}} if hit else {}]
    return r


def test_target_figures_time_the_evaluation_that_reached_it():
    """Launch (90) → the end of the evaluation at the target step; the seconds in evaluations
    up to it, each from its step's end; a later evaluation (Trainer's final evaluate) left out."""
    compare = _compare()
    evals = [(2, 101.5, 0.6), (4, 103.75, 0.85), (6, 106.0, 0.86)]
    f = compare.target_figures(_to_target(evals, hit=4), warmup=1)
    assert f["to_target_s"] == pytest.approx(13.75) and f["steps"] == 4 and f["value"] == 0.85
    assert f["eval_s"] == pytest.approx(0.5 + 0.75) and f["evaluations"] == 2
    assert f["step_s"] == pytest.approx(0.9) and f["total_s"] == pytest.approx(30.0)
    missed = compare.target_figures(_to_target(evals[:1], hit=None), warmup=1)
    assert missed["steps"] is None and missed["to_target_s"] is None and missed["value"] == 0.6
    assert "target NOT reached (best 0.6)" in compare.shown(missed)


def test_sameness_to_a_target_compares_the_steps_both_ran():
    compare = _compare()
    z, t = _run([300, 310, 305], [0.7] * 3), _run([300, 310], [0.7] * 2)
    assert compare.sameness(z, t, "trainer", 1e-4, ref_name="zerotune", prefix=True) == []
    t = _run([300, 312], [0.7] * 2)
    assert compare.sameness(z, t, "trainer", 1e-4, ref_name="zerotune", prefix=True)[0] == (
        "trainer rank 0: step 2 has [312] tokens, zerotune [310]"
    )


def test_sameness_to_a_target_with_a_lever_compares_every_contender_over_ranks():
    """zerotune with data.batch_by_tokens splits a step's samples otherwise over the ranks:
    Trainer's plain split is the same work when summed over ranks, not rank by rank."""
    import argparse

    compare = _compare()
    z = {"steps": [[{"tokens": 162, "loss": 0.9}], [{"tokens": 240, "loss": 0.5}]]}
    t = {"steps": [[{"tokens": 194, "loss": 0.69}], [{"tokens": 208, "loss": 0.71}]]}
    runs = {"zerotune": [z], "trainer": [t]}
    a = argparse.Namespace(loss_tolerance=1e-4, zerotune_set=["data.batch_by_tokens=true"])
    assert compare.target_problems(a, ["zerotune", "trainer"], runs) == []
    a.zerotune_set = []  # no lever: rank by rank, and these differ
    assert len(compare.target_problems(a, ["zerotune", "trainer"], runs)) == 4


def test_a_lever_that_changes_the_steps_compares_each_contender_with_its_own_repeats():
    """data.length_grouped_steps gives zerotune other samples per step than Trainer: no
    problem for that, but one where a contender's repeats differ from its first."""
    import argparse

    compare = _compare()
    z = [_run([120, 90], [0.9, 0.8]), _run([120, 90], [0.9, 0.8])]
    t = [_run([300, 310], [0.7, 0.7]), _run([300, 311], [0.7, 0.7])]
    a = argparse.Namespace(loss_tolerance=1e-4, zerotune_set=["data.length_grouped_steps=10"])
    assert compare.plan_lever(a)
    assert compare.target_problems(a, ["zerotune", "trainer"], {"zerotune": z, "trainer": t}) == [
        f"trainer rank {r}: step 2 has [311] tokens, trainer repeat 0 [310]" for r in (0, 1)
    ]
    a.zerotune_set = ["data.batch_by_tokens=true"]  # splits a step otherwise: not a plan lever
    assert not compare.plan_lever(a)
    assert compare.target_problems(a, ["zerotune"], {"zerotune": z[:1]}) == []
    assert compare.main(["--seeds", "1,2"]) == 2  # only to a target


@pytest.mark.slow
def test_compare_to_a_target_stops_both_at_the_same_evaluation(tmp_path, cache_dir):
    """The demo to accuracy 0.9, evaluated every 10 steps: zerotune (eval.stop_at) and Trainer
    (its callback) stop at the same first evaluation ≥ 0.9, with the same value, long before
    --max-steps; the zerotune run's results.json says when."""
    contenders = ["zerotune"]
    if importlib.util.find_spec("accelerate") is not None:
        contenders.append("trainer")
    args = ["--model", "demo", "--repeats", "1", "--target-accuracy", "0.9", "--eval-every"]
    args += ["10", "--max-steps", "80", "--micro", "32", "--global-batch", "64"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), *args]
        + ["--out", str(tmp_path), "--contenders", ",".join(contenders)],
        env=base_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "same work: equal tokens at every step both ran" in proc.stdout
    s = json.loads((tmp_path / "summary.json").read_text())
    figs = {n: s["figures"][n][0] for n in contenders}
    steps = {f["steps"] for f in figs.values()}
    (step,) = steps  # the same for both
    assert step % 10 == 0 and 10 < step < 80
    assert len({f["value"] for f in figs.values()}) == 1 and figs["zerotune"]["value"] >= 0.9
    for f in figs.values():
        assert f["evaluations"] == step // 10 and 0 < f["eval_s"] < f["to_target_s"] < f["total_s"]
    r = json.loads((tmp_path / "repeat0" / "zerotune" / "results.json").read_text())
    assert r["steps"] == step and r["stop_at"]["reached"]["step"] == step
    if "trainer" in contenders:
        assert s["trainer_over_zerotune"] == pytest.approx(
            figs["trainer"]["to_target_s"] / figs["zerotune"]["to_target_s"]
        )
        assert "launch → target, Trainer / zerotune" in proc.stdout
