"""The floor: a minimal hand-written DeepSpeed loop, for benchmarks/compare.py.

    torchrun --nproc-per-node 2 benchmarks/floor_loop.py --config RUN/config.yaml \
        --data-dir CACHE --ds-config RUN/deepspeed.json --out DIR

It trains what a zerotune run trains, with zerotune taking no part in the step: the same
resolved config (hyper-parameters, seed), the same tokenised data (zerotune's cache folder),
the same model (``trainer.models.build_model``: same init), the same DeepSpeed JSON (read
from the zerotune run's ``deepspeed.json``), torch AdamW with the same parameter groups and
the same warm-up + linear schedule, and the same samples at every step in the same order
(zerotune's step-keyed ``GlobalBatchPlan`` and padding collator). What it writes by hand is
the loop: ``deepspeed.initialize``, forward / backward / ``step`` per micro-batch, one
``.item()`` per step, a final evaluation on the validation split and one DeepSpeed
checkpoint — the end work a zerotune run also does. Per-step timestamps go to
``DIR/steps/rank<R>.jsonl`` (``trainer.steplog`` format).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a resolved zerotune config (config.yaml)")
    p.add_argument("--data-dir", required=True, help="zerotune's tokenised-data cache folder")
    p.add_argument("--ds-config", required=True, help="the zerotune run's deepspeed.json")
    p.add_argument("--out", required=True, help="where steps/ and the checkpoint go")
    return p.parse_args()


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Warm-up then linear decay to 0 — zerotune's ``scheduler: linear`` with min_lr_ratio 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return 1 - min(1.0, (step - warmup) / max(1, total - warmup))


def adamw(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """torch AdamW, no weight decay on biases and norms (a ZeRO-3 parameter built partitioned
    is a 1-D placeholder: its shape is ``ds_shape``)."""

    def decays(n: str, p) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2 and "norm" not in n.lower()

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    rest = [p for n, p in model.named_parameters() if not decays(n, p)]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)


def main() -> None:
    args = parse_args()
    started = time.time()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import datasets
    import deepspeed
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from trainer.config import load_config
    from trainer.data import GlobalBatchPlan, StepBatchSampler
    from trainer.models import build_model
    from trainer.steplog import StepLog
    from trainer.tasks import Collator, LabelInfo, build_task

    cfg = load_config(args.config)
    t = cfg.train
    on_gpu = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if on_gpu else "cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as zerotune: no JIT build
    dist.init_process_group("nccl" if on_gpu else "gloo")
    log = StepLog(rank, str(Path(args.out) / "steps"))
    log.event("start", t_process=started)

    data = Path(args.data_dir)
    splits = datasets.load_from_disk(str(data))
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    labels = LabelInfo(**json.loads((data / "labels.json").read_text()))
    task = build_task(cfg)
    total = t.max_steps
    torch.manual_seed(t.seed)
    model = build_model(cfg, task, tokenizer, task.head_config(labels))
    optimizer = adamw(model, t)
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    ds_config = json.loads(Path(args.ds_config).read_text())
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    torch.manual_seed(t.seed + 1000 * rank)  # dropout, as zerotune seeds it

    accum = ds_config["gradient_accumulation_steps"]
    plan = GlobalBatchPlan(len(splits["train"]), ds_config["train_batch_size"], t.seed)
    sampler = StepBatchSampler(plan, rank, world, t.micro_batch_size, 0, total)
    collate = Collator(tokenizer.pad_token_id, pad_labels=False)
    loader = DataLoader(
        splits["train"],
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=1,
        prefetch_factor=2,
        multiprocessing_context="fork",
        pin_memory=on_gpu,
    )

    engine.train()
    batches = iter(loader)
    for step in range(1, total + 1):
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for _ in range(accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            loss_sum = out.loss.detach().double() + loss_sum
            tokens += int(batch["attention_mask"].sum())
        loss = float(loss_sum) / accum
        log.record(step, time.perf_counter() - t0, loss, tokens)

    accuracy = evaluate(engine, splits["validation"], collate, rank, world, cfg, device)
    engine.save_checkpoint(str(Path(args.out) / "checkpoint"), tag="final")
    log.event("end", validation_accuracy=accuracy)
    log.close()
    dist.destroy_process_group()


def evaluate(engine, dataset, collate, rank, world, cfg, device) -> float:
    """Accuracy over the whole validation split: a strided shard per rank, counts summed."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from trainer.data import eval_shards

    engine.eval()
    micro = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
    # every rank runs as many batches (a placeholder row where a shard ran out): ZeRO-3 gathers
    shards = list(eval_shards(len(dataset), rank, world, micro))
    loader = DataLoader(dataset, batch_sampler=[idx for idx, _ in shards], collate_fn=collate)
    counts = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for (_, valid), batch in zip(shards, loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = engine(**{k: v for k, v in batch.items() if k != "labels"}).logits
            hits = (logits.argmax(-1) == batch["labels"]).cpu()[torch.tensor(valid)]
            counts += torch.tensor([float(hits.sum()), float(len(hits))])
    dist.all_reduce(counts)
    return float(counts[0] / counts[1])


if __name__ == "__main__":
    main()
