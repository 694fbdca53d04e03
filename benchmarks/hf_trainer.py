"""transformers' ``Trainer`` with zerotune's DeepSpeed JSON, for benchmarks/compare.py.

    torchrun --nproc-per-node 2 benchmarks/hf_trainer.py --config RUN/config.yaml \
        --data-dir CACHE --ds-config RUN/deepspeed.json --out DIR

Needs ``accelerate`` (``pip install -e '.[bench]'``). The same work as the floor loop
(benchmarks/floor_loop.py): the resolved zerotune config, its tokenised data and model
builder, the DeepSpeed JSON of the zerotune run (given to ``TrainingArguments(deepspeed=)``),
torch AdamW with the same parameter groups, the same warm-up + linear schedule
(``create_optimizer`` / ``create_scheduler`` overridden: Trainer's own linear schedule starts
at lr 0, zerotune's at lr / warmup), the same samples per step in the same order (the
training ``DataLoader`` is zerotune's step-keyed plan), per-micro-batch mean losses (not the
token-count normalisation Trainer applies to models that take loss kwargs), then
``evaluate()`` on the validation split and one DeepSpeed checkpoint. Everything else is
Trainer's own: its loop, accelerate's DeepSpeed wrapping, its callbacks.

To a target (the config's ``eval.stop_at``, set by ``compare.py --target-accuracy``): Trainer
at its defaults but for the hyper-parameters — its own optimizer (``adamw_torch_fused``,
same lr / betas / eps / weight decay), its ``DataLoader`` settings (no workers), its
checkpoint cadence (``save_steps`` 500), its evaluation loop every ``eval.every_steps``
(``eval_strategy="steps"``, accuracy from ``compute_metrics``, zerotune's eval batch size);
still the same schedule and samples per step, so both trajectories match. A callback
records each evaluation (``eval`` events of the step log) and stops training at the first
that reaches the target (a ``target`` event), as ``eval.stop_at`` stops zerotune.

On a CPU host accelerate's state is built on gloo first (``PartialState(backend="gloo")``
with ``ACCELERATE_USE_DEEPSPEED=true``, used through ``accelerator_config=
{"use_configured_state": True}``); without it Trainer sees one process and rejects the batch
sizes of the JSON.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from floor_loop import adamw, lr_factor, parse_args


def main() -> None:
    args = parse_args()
    started = time.time()
    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import accelerate
    import datasets
    import deepspeed
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from trainer.config import load_config
    from trainer.data import GlobalBatchPlan, StepBatchSampler
    from trainer.evaluate import reaches
    from trainer.models import build_model
    from trainer.steplog import StepLog
    from trainer.tasks import Collator, LabelInfo, build_task

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as zerotune: no JIT build
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # the state must be a DeepSpeed one
    state = accelerate.PartialState(backend="nccl" if on_gpu else "gloo")
    rank, world = state.process_index, state.num_processes
    cfg = load_config(args.config)
    t = cfg.train
    total = t.max_steps
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total)
    log = StepLog(rank, str(Path(args.out) / "steps"))
    log.event("start", t_process=started)

    data = Path(args.data_dir)
    splits = datasets.load_from_disk(str(data))
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    labels = LabelInfo(**json.loads((data / "labels.json").read_text()))
    task = build_task(cfg)
    torch.manual_seed(t.seed)
    model = build_model(cfg, task, tokenizer, task.head_config(labels))
    ds_config = json.loads(Path(args.ds_config).read_text())
    accum = ds_config["gradient_accumulation_steps"]
    collate = Collator(tokenizer.pad_token_id, pad_labels=False)
    target = cfg.eval.stop_at  # compare.py --target-accuracy: Trainer's defaults, to a target
    workers = {} if target is not None else {"num_workers": 1, "prefetch_factor": 2}

    class SameWorkTrainer(Trainer):
        step_loss = None
        step_tokens = 0

        def create_optimizer(self, model=None):
            if target is not None:
                return super().create_optimizer(model)  # its default: adamw_torch_fused
            if self.optimizer is None:
                self.optimizer = adamw(self.model, t)
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda s: lr_factor(s, warmup, total)
                )
            return self.lr_scheduler

        def get_train_dataloader(self):
            from torch.utils.data import DataLoader

            plan = GlobalBatchPlan(len(splits["train"]), ds_config["train_batch_size"], t.seed)
            sampler = StepBatchSampler(plan, rank, world, t.micro_batch_size, 0, total)
            return DataLoader(
                splits["train"],
                batch_sampler=sampler,
                collate_fn=collate,
                multiprocessing_context="fork" if workers else None,
                pin_memory=on_gpu,
                **workers,
            )

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.step_tokens += int(inputs["attention_mask"].sum())
            loss = super().training_step(model, inputs, num_items_in_batch)  # already / accum
            self.step_loss = loss.double() if self.step_loss is None else self.step_loss + loss
            return loss

    class StepTimes(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.t0
            log.record(state.global_step, seconds, float(hf.step_loss), hf.step_tokens)
            hf.step_loss, hf.step_tokens = None, 0

    metric, mode = cfg.eval_metric()

    class StopAtTarget(TrainerCallback):
        """Each evaluation into the step log; training stops at the first that reaches the
        target (``trainer.evaluate.reaches``: ≥, or ≤ for a loss)."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = metrics[f"eval_{metric}"]
            log.event("eval", step=state.global_step, value=value)
            if target is not None and reaches(value, target, mode):
                log.event("target", step=state.global_step, value=value)
                control.should_training_stop = True

    to_target = (
        {"eval_strategy": "steps", "eval_steps": cfg.eval.every_steps}
        if target is not None
        else {
            "eval_strategy": "no",
            "save_strategy": "no",
            "logging_strategy": "no",
            "disable_tqdm": True,
            "dataloader_num_workers": 1,
        }
    )
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "hf"),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=cfg.eval.micro_batch_size or t.micro_batch_size,
        gradient_accumulation_steps=accum,
        max_steps=total,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        adam_epsilon=t.eps,
        max_grad_norm=t.max_grad_norm or 0.0,
        warmup_steps=warmup,
        seed=t.seed,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        deepspeed=ds_config,
        report_to="none",
        accelerator_config={"use_configured_state": True},
        **to_target,
    )
    hf = SameWorkTrainer(
        model=model,
        args=targs,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=collate,
        callbacks=[StepTimes(), StopAtTarget()],
        compute_metrics=lambda p: {
            "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())
        },
    )
    hf.model_accepts_loss_kwargs = False  # a mean loss per micro-batch, as DeepSpeed's own loop
    torch.manual_seed(t.seed + 1000 * rank)  # dropout, as zerotune seeds it
    hf.train()
    metrics = hf.evaluate()
    hf.model_wrapped.save_checkpoint(str(Path(args.out) / "checkpoint"), tag="final")
    log.event("end", validation_accuracy=metrics.get("eval_accuracy"))
    log.close()


if __name__ == "__main__":
    main()
