"""The training loop, top to bottom: build → resume → step / log / eval / checkpoint → finish.

python -m trainer configs/demo.yaml --run-dir runs/demo          # one process
torchrun --nproc-per-node 2 -m trainer configs/demo.yaml          # by hand
zerotune train configs/demo.yaml --nproc-per-node 2               # the launcher
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt_mod
from . import faults
from .config import RunConfig, dump_config
from .data import Collator, GlobalBatchPlan, count_tokens, eval_shards, prepare
from .deepspeed_config import resolve_batch
from .distributed import all_gather_object, all_reduce_sum, any_rank, barrier, broadcast_object
from .engine import build_engine
from .env import DistEnv
from .export import save_hf_metadata
from .metrics import build_sinks, memory_stats
from .preemption import PREEMPTED_EXIT_CODE, PreemptionFlag, requeue_slurm_job
from .tasks import (
    build_model,
    classification_metrics,
    classification_report,
    lm_metrics,
    token_loss_sum,
)


@dataclass
class TrainerState:
    """Everything besides the engine that an exact resume needs (saved as JSON)."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    # running sums since the last log step, so a resume logs the same averages
    acc_loss: float = 0.0
    acc_steps: int = 0
    acc_tokens: int = 0
    acc_samples: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # checkpoint figures

    def as_dict(self, epoch: int, world: int, global_batch: int) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(epoch=epoch, world_size=world, global_batch=global_batch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def track_best(
    state: TrainerState,
    value: float,
    step: int,
    mode: str,
    patience: int | None,
    final: bool = False,
) -> None:
    """Record the best evaluation; after ``patience`` evaluations without improvement set
    ``stopped_early`` (the final evaluation updates the best but never counts against it)."""
    better = state.best_metric is None or (
        value > state.best_metric if mode == "max" else value < state.best_metric
    )
    if better:
        state.best_metric, state.best_step, state.bad_evals = value, step, 0
    elif not final:
        state.bad_evals += 1
        if patience and state.bad_evals >= patience:
            state.stopped_early = True


def _rows(ds, indices: list[int]) -> list[dict[str, Any]]:
    cols = ds[indices]
    keys = list(cols)
    return [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]


def _digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        env: DistEnv,
        device: torch.device,
        run_dir: Path,
        resume: str = "auto",
    ):
        self.cfg, self.env, self.device, self.run_dir, self.resume = (
            cfg,
            env,
            device,
            run_dir,
            resume,
        )
        self.rank, self.world = env.rank, env.world_size

    # ----------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0:
            from tqdm.auto import tqdm

            tqdm.write(f"[zerotune] {msg}", file=sys.stderr)

    def run(self) -> int:
        cfg = self.cfg
        t_start = time.time()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        barrier()

        data = prepare(cfg, self.env.local_rank == 0, barrier)
        self.tokenizer, self.labels = data.tokenizer, data.labels
        train, self.eval_splits = (
            data.splits["train"],
            {k: v for k, v in data.splits.items() if k != "train"},
        )
        plan = resolve_batch(cfg, self.world)
        self.plan = plan
        sampler = GlobalBatchPlan(len(train), plan.global_batch, cfg.train.seed)
        total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * sampler.steps_per_epoch))
        self.total = total

        # Resume point is decided before the engine exists: a new world size needs DeepSpeed's
        # universal loader switched on in its config.
        ckpts = ckpt_mod.CheckpointManager(self.run_dir, cfg, {"hostname": socket.gethostname()})
        resume_from = broadcast_object(
            ckpt_mod.resolve_resume(self.run_dir, self.resume, cfg.checkpoint.verify, warn=self.log)
            if self.rank == 0
            else None
        )
        ckpts.clean_stale()
        saved_world, load_dir, universal = None, None, False
        if resume_from is not None:
            problems = ckpt_mod.check_compatible(resume_from, cfg)
            if problems:
                raise ckpt_mod.CheckpointError("; ".join(problems))
            saved_world = ckpt_mod.read_manifest(resume_from)["world_size"]
            load_dir = resume_from
            if saved_world != self.world and cfg.engine == "deepspeed" and cfg.zero.stage >= 1:
                t0 = time.perf_counter()
                load_dir = ckpt_mod.ensure_universal(resume_from)
                universal = True
                self.log(
                    f"converted {resume_from.name} ({saved_world} ranks) to a universal checkpoint in {time.perf_counter() - t0:.1f}s"
                )

        seed_everything(cfg.train.seed)
        model = build_model(
            cfg,
            self.tokenizer,
            self.labels.num_labels if self.labels else None,
            self.labels.names if self.labels else None,
        )
        self.param_count = sum(p.numel() for p in model.parameters())
        ckpts.hf_writer = lambda d: save_hf_metadata(model.config, self.tokenizer, d)
        engine = build_engine(cfg, model, plan, total, self.device, load_universal=universal)
        self.engine = engine
        seed_everything(cfg.train.seed + 1000 * self.rank)

        state = TrainerState()
        load_seconds = None
        if resume_from is not None:
            t0 = time.perf_counter()
            engine.load(load_dir)
            saved, rng = ckpt_mod.load_trainer_state(resume_from, self.rank, self.world)
            state = TrainerState.from_dict(saved)
            if rng is not None:
                ckpt_mod.set_rng_state(rng)
            load_seconds = time.perf_counter() - t0
            self.log(
                f"resumed from {resume_from} at step {state.step} ({state.samples_seen} samples seen; "
                f"saved with {saved_world} ranks, now {self.world}; grad accumulation {plan.accum}) in {load_seconds:.1f}s"
            )
        hosts = all_gather_object(socket.gethostname())
        if self.rank == 0:
            self._write_env(engine, resume_from, hosts)

        sinks = build_sinks(
            self.rank,
            self.run_dir,
            cfg.logging.tensorboard,
            cfg.logging.progress_bar,
            total,
            state.step,
        )
        if load_seconds is not None:
            sinks.log(
                state.step,
                {"load_seconds": load_seconds, "restart_count": self.env.restart_count},
                "checkpoint",
            )
        flag = PreemptionFlag(cfg.launch.preemption_signals)
        collate = Collator(self.tokenizer.pad_token_id, cfg.task)
        metric_name, mode = cfg.eval_metric()
        step_times: list[float] = []
        last_eval: dict[str, Any] | None = None
        last_saved = state.step if resume_from is not None else -1  # no re-save of what was loaded
        exit_code = 0
        try:
            engine.train()
            while state.step < total:
                t0 = time.perf_counter()
                idx = sampler.micro_batches(state.step, self.rank, self.world, plan.micro)
                batches = [collate(_rows(train, i)) for i in idx]
                result = engine.train_step(batches)
                state.step += 1
                dt = time.perf_counter() - t0
                state.samples_seen += plan.global_batch
                local_tokens = sum(count_tokens(b) for b in batches)
                state.acc_loss += result.loss
                state.acc_steps += 1
                state.acc_tokens += local_tokens
                state.acc_samples += plan.global_batch
                if state.step > cfg.logging.warmup_steps_excluded:
                    step_times.append(dt)
                faults.maybe_fail("step", state.step)

                if state.step % cfg.logging.every_steps == 0 or state.step == total:
                    loss_sum, tokens, tsum = all_reduce_sum(
                        [state.acc_loss, state.acc_tokens, dt], self.device
                    )
                    state.tokens_seen += int(tokens)
                    values = {
                        "loss": loss_sum / (state.acc_steps * self.world),
                        "lr": engine.lr(),
                        "grad_norm": result.grad_norm,
                        "loss_scale": result.loss_scale,
                        "epoch": state.samples_seen / sampler.num_samples,
                        "samples_per_s": plan.global_batch / (tsum / self.world),
                        "tokens_per_s": tokens / state.acc_steps / (tsum / self.world),
                        "step_time_s": tsum / self.world,
                        **memory_stats(self.device),
                    }
                    sinks.log(
                        state.step, {k: v for k, v in values.items() if v is not None}, "train"
                    )
                    state.acc_loss, state.acc_steps, state.acc_tokens, state.acc_samples = (
                        0.0,
                        0,
                        0,
                        0,
                    )
                else:
                    sinks.progress(state.step)

                preempted = any_rank(flag.set, self.device)
                last = state.step == total
                if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and not last:
                    last_eval = self.evaluate("validation")
                    sinks.log(state.step, last_eval, "eval")
                    self._track_best(state, last_eval, metric_name, mode)
                    engine.train()
                due = cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0
                if (due or preempted) and not last:
                    self._save(ckpts, state, sampler, sinks, last_eval, metric_name)
                    last_saved = state.step
                if preempted:
                    self.log(
                        f"preemption signal ({flag.received or 'on another rank'}): saved step {state.step}, exiting {PREEMPTED_EXIT_CODE}"
                    )
                    exit_code = PREEMPTED_EXIT_CODE
                    break
                if state.stopped_early:
                    self.log(
                        f"early stop at step {state.step}: {metric_name} has not improved for {state.bad_evals} evaluations"
                    )
                    break

            if exit_code == PREEMPTED_EXIT_CODE:
                barrier()  # every rank has its shard on disk before anyone requeues or exits
                # slurm/train.sbatch requeues after the step exits 75 (ZEROTUNE_SBATCH_REQUEUE=1);
                # a user's own batch script gets the requeue from rank 0 here.
                sbatch_requeues = os.environ.get("ZEROTUNE_SBATCH_REQUEUE") == "1"
                if (
                    self.rank == 0
                    and cfg.launch.requeue_on_preemption
                    and os.environ.get("SLURM_JOB_ID")
                    and not sbatch_requeues
                ):
                    requeue_slurm_job()
                return exit_code

            # ---- finish: final eval, test, checkpoint, export, results ------------------
            final_eval = self.evaluate("validation")
            sinks.log(state.step, final_eval, "eval")
            self._track_best(state, final_eval, metric_name, mode, final=True)
            test_eval = None
            if "test" in self.eval_splits:
                test_eval = self.evaluate("test")
                sinks.log(state.step, test_eval, "test")
            if last_saved != state.step:
                self._save(ckpts, state, sampler, sinks, final_eval, metric_name)
            full = engine.full_state_dict()
            digests = all_gather_object(_digest(full))
            if self.rank == 0 and cfg.checkpoint.export_final:
                self._export(engine.module, full)
            del full
            results = self._results(
                state, final_eval, test_eval, step_times, digests, time.time() - t_start
            )
            if self.rank == 0:
                ckpt_mod.write_json_atomic(self.run_dir / "results.json", results)
                if "classification_report" in results:
                    (self.run_dir / "classification_report.txt").write_text(
                        results["classification_report"] + "\n"
                    )
                sinks.log_hparams(
                    self._hparams(), {f"validation_{k}": v for k, v in final_eval.items()}
                )
                self._summary(results)
            barrier()
            return 0
        finally:
            if exit_code == PREEMPTED_EXIT_CODE:
                # after a preemption save, a late SIGTERM (srun's --kill-on-bad-exit once another
                # rank exited 75) must not turn exit code 75 into 143; Python resets its own
                # handlers during shutdown but leaves "ignore" alone
                flag.ignore()
            else:
                flag.restore()
            sinks.close()

    # ----------------------------------------------------------------------------------
    def _track_best(
        self, state: TrainerState, ev: dict[str, Any], name: str, mode: str, final: bool = False
    ) -> None:
        if name not in ev:
            raise KeyError(f"eval.metric {name!r} is not among the evaluation metrics {sorted(ev)}")
        track_best(state, ev[name], state.step, mode, self.cfg.eval.early_stopping_patience, final)

    def _save(
        self, ckpts, state: TrainerState, sampler: GlobalBatchPlan, sinks, ev, metric_name
    ) -> None:
        epoch, _ = sampler.position(state.step)
        metric = ev.get(metric_name) if ev else None
        fig = ckpts.save(
            state.step,
            self.engine,
            state.as_dict(epoch, self.world, self.plan.global_batch),
            metric,
        )
        fig = {k: v for k, v in fig.items() if k != "step"}
        sinks.log(state.step, fig, "checkpoint")

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """Metrics over exactly the whole split across ranks (placeholders never counted)."""
        ds = self.eval_splits[split]
        self.engine.eval()
        micro = self.cfg.eval.micro_batch_size or 2 * self.cfg.train.micro_batch_size
        collate = Collator(self.tokenizer.pad_token_id, self.cfg.task)
        preds, labels, loss_sum, count = [], [], 0.0, 0
        tok_loss, tok_count = 0.0, 0
        for indices, valid in eval_shards(len(ds), self.rank, self.world, micro):
            batch = collate(_rows(ds, indices))
            out = self.engine.forward(batch)
            keep = torch.tensor(valid)
            if self.cfg.task == "classification":
                logits = out.logits.float().cpu()
                y = batch["labels"]
                per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                loss_sum += float(per[keep].sum())
                count += int(keep.sum())
                preds += logits.argmax(dim=-1)[keep].tolist()  # argmax over the class dimension
                labels += y[keep].tolist()
            else:
                s, n = token_loss_sum(out.logits.cpu(), batch["labels"])
                tok_loss += float(s[keep].sum())
                tok_count += int(n[keep].sum())
        if self.cfg.task == "classification":
            gathered = all_gather_object((preds, labels))
            all_p = [p for g in gathered for p in g[0]]
            all_y = [y for g in gathered for y in g[1]]
            total_loss, total_n = all_reduce_sum([loss_sum, count], self.device)
            m = classification_metrics(all_p, all_y, self.labels.num_labels, self.labels.names)
            self.last_report = m
            flat = {k: v for k, v in m.items() if k != "per_class"}
            return {"loss": total_loss / max(total_n, 1), **flat}
        total_loss, total_n = all_reduce_sum([tok_loss, tok_count], self.device)
        return lm_metrics(total_loss, int(total_n))

    def _export(self, module, full: dict[str, torch.Tensor]) -> None:
        from .export import save_pretrained

        save_pretrained(full, module.config, self.run_dir / "final", tokenizer=self.tokenizer)

    def _write_env(self, engine, resume_from, hosts: list[str]) -> None:
        import platform

        from .checkpoint import versions

        info = {
            "launcher": self.env.launcher,
            "env": self.env.as_dict(),
            "world_size": self.world,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "hostname": socket.gethostname(),
            "hosts": hosts,
            "versions": versions(),
            "batch": {
                "micro": self.plan.micro,
                "grad_accum": self.plan.accum,
                "global": self.plan.global_batch,
            },
            "total_steps": self.total,
            "parameters": self.param_count,
            "resumed_from": str(resume_from) if resume_from else None,
        }
        ckpt_mod.write_json_atomic(self.run_dir / "env.json", info)
        if getattr(engine, "ds_config", None) is not None:
            ckpt_mod.write_json_atomic(self.run_dir / "deepspeed.json", engine.ds_config)

    def _results(self, state, final_eval, test_eval, step_times, digests, wall) -> dict[str, Any]:
        mean_step = sum(step_times) / len(step_times) if step_times else None
        results = {
            "steps": state.step,
            "total_steps": self.total,
            "stopped_early": state.stopped_early,
            "samples_seen": state.samples_seen,
            "tokens_seen": state.tokens_seen,
            "validation": final_eval,
            "test": test_eval,
            "best": {
                "metric": self.cfg.eval_metric()[0],
                "value": state.best_metric,
                "step": state.best_step,
            },
            "throughput": {
                "mean_step_time_s": mean_step,
                "samples_per_s": self.plan.global_batch / mean_step if mean_step else None,
                "steps_timed": len(step_times),
                "warmup_steps_excluded": self.cfg.logging.warmup_steps_excluded,
            },
            "world_size": self.world,
            "parameters": self.param_count,
            "param_digests": digests,
            "params_in_sync": len(set(digests)) == 1,
            "wall_time_s": wall,
        }
        if self.cfg.task == "classification":
            results["classification_report"] = classification_report(self.last_report)
            results["validation_per_class"] = self.last_report["per_class"]
        return results

    def _hparams(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "model": c.model.name_or_path,
            "task": c.task,
            "engine": c.engine,
            "zero_stage": c.zero.stage,
            "precision": c.precision,
            "lr": c.train.lr,
            "global_batch": self.plan.global_batch,
            "micro_batch": self.plan.micro,
            "grad_accum": self.plan.accum,
            "world_size": self.world,
            "scheduler": c.train.scheduler,
            "seed": c.train.seed,
        }

    def _summary(self, r: dict[str, Any]) -> None:
        v = r["validation"]
        shown = ", ".join(
            f"{k} {v[k]:.4f}" for k in ("accuracy", "macro_f1", "loss", "perplexity") if k in v
        )
        tp = r["throughput"]
        speed = f"{tp['samples_per_s']:.1f} samples/s" if tp["samples_per_s"] else "n/a"
        self.log(
            f"done: {r['steps']} steps in {r['wall_time_s']:.1f}s on {r['world_size']} rank(s); validation {shown}; "
            f"best {r['best']['metric']} {r['best']['value']:.4f} at step {r['best']['step']}; {speed}; "
            f"ranks in sync: {r['params_in_sync']}; results in {self.run_dir / 'results.json'}"
        )
