"""The training loop: ``setup`` builds everything once, ``train`` steps, ``finish`` reports.

    python -m trainer configs/demo.yaml --run-dir runs/demo          # one process
    torchrun --nproc-per-node 2 -m trainer configs/demo.yaml          # by hand
    zerotune train configs/demo.yaml --nproc-per-node 2               # the launcher

The loop itself only sequences: the evaluator decides when to evaluate, the checkpoint
manager when to save, the sinks who writes; the task decides what a batch means.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt_mod
from . import faults
from .adapters import manifest_entry, save_adapter_config
from .batch import resolve_batch
from .config import ConfigError, RunConfig, dump_config
from .data import (
    StepBatchSampler,
    build_plan,
    loader_options,
    prepare,
    train_loader,
)
from .distributed import all_gather_object, all_reduce_sum, any_rank, barrier, run_on_rank0
from .engine import build_engine
from .env import DistEnv
from .evaluate import Evaluator
from .export import export_checkpoint, save_hf_metadata
from .files import write_json_atomic
from .fingerprint import fingerprint
from .memory import MemoryWatch, predict_for_model
from .metrics import build_sinks, memory_stats
from .models import apply_peft, build_model, count_parameters
from .nonfinite import (
    LossScaleWatch,
    NonFiniteError,
    abort_message,
    skip_warning,
    too_many_message,
)
from .preemption import PreemptionFlag, requeue_slurm_job
from .process import ExitCode, versions
from .profiling import StepProfiler
from .rundir import check_resume_config, lock_for_rank0
from .startup import CLOCK
from .steplog import StepLog
from .tasks import EvalResult, build_task
from .throughput import build_throughput, cost_figures
from .watchdog import beat


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
    stopped_early: bool = False
    # eval.stop_at: the first evaluation that reached it {step, seconds_since_launch, value}
    target_reached: dict[str, float] | None = None
    # steps whose loss or gradients were NaN / inf on some rank, skipped (trainer/nonfinite.py)
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    acc_nonfinite: int = 0  # of them, since the last log step (left out of its mean loss)

    def as_dict(self, epoch: int, world: int, global_batch: int) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(epoch=epoch, world_size=world, global_batch=global_batch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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
        self.task = build_task(cfg)
        self.t_start = time.time()
        # built by setup()
        self.state = TrainerState()
        self.plan = self.sampler = self.total = None
        self.tokenizer = self.train_batches = self.engine = self.evaluator = None
        self.ckpts = self.sinks = self.flag = None
        self.last_eval: tuple[int, EvalResult] | None = None  # the loop's newest (step, result)
        self.locks: list = []  # rank 0: the run directory's locks (trainer/rundir.py)
        self.scale_watch = LossScaleWatch()  # fp16: a warning before the loss scale collapses
        self.num_parameters = 0
        self.num_trainable = 0
        self.throughput = self.memory = None  # built by setup(); trainer/throughput.py, memory.py
        self.figures: dict[str, Any] = {}  # the end's throughput and memory, for results.json
        self.step_log = StepLog(self.rank)  # per-step timestamps for benchmarks/ (off by default)
        self.profiler = StepProfiler(cfg.logging.profile_steps, run_dir, self.rank, device)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            from tqdm.auto import tqdm

            tqdm.write(f"[zerotune] {msg}", file=sys.stderr)

    def run(self) -> int:
        code = ExitCode.FAILED
        try:
            self.setup()
            code = self.train()
            if code == ExitCode.DONE:
                self.finish()
            return code
        except (ckpt_mod.CheckpointWriteError, NonFiniteError) as e:  # on every rank alike
            self.log(f"error: {e}")
            barrier(long=True)  # rank 0's line is out before any rank exits (and is torn down)
            return ExitCode.FAILED
        finally:
            self.close(preempted=code == ExitCode.PREEMPTED)

    # ---- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        run_on_rank0(self._own_run_dir)
        CLOCK.mark("run_dir")
        data = prepare(cfg, self.env.local_rank == 0, lambda: barrier(long=True))
        CLOCK.mark("data")
        self.tokenizer = data.tokenizer
        self.plan = resolve_batch(cfg, self.world)
        self.sampler = build_plan(cfg, data.splits["train"], self.plan.global_batch)
        self.total = cfg.train.max_steps or max(
            1, math.ceil(cfg.train.epochs * self.sampler.steps_per_epoch)
        )

        # The resume point is decided before the engine exists: a new world size needs
        # DeepSpeed's universal loader switched on in its config.
        resume_from = run_on_rank0(
            ckpt_mod.resolve_resume, self.run_dir, self.resume, cfg.checkpoint.verify, warn=self.log
        )
        load_dir, saved_world = self._resume_source(resume_from)
        if self.rank == 0:  # the resume is settled (--resume force too): the run's config now
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))

        seed_everything(cfg.train.seed)
        model = build_model(cfg, self.task, self.tokenizer, self.task.head_config(data.labels))
        model = apply_peft(cfg, self.task, model, self.total)
        CLOCK.mark("model")
        self.num_parameters = count_parameters(model)  # also when ZeRO-3 built it partitioned
        self.num_trainable = count_parameters(model, trainable=True)
        peft_entry = manifest_entry(cfg, model)  # PEFT: the frozen base's reference and digest
        if resume_from is not None and peft_entry:
            self._check_base_model(resume_from, peft_entry["base_model"]["digest"])

        def write_hf(d: Path) -> None:
            save_hf_metadata(model.config, self.tokenizer, d)
            if cfg.peft.method is not None:
                save_adapter_config(model, d)

        self.ckpts = ckpt_mod.CheckpointManager(
            self.run_dir,
            cfg,
            {"hostname": socket.gethostname(), **peft_entry},
            hf_writer=write_hf,
        )
        self.ckpts.clean_stale()
        self.ckpts.estimate = ckpt_mod.expected_checkpoint_bytes(
            self.num_parameters, self.num_trainable, cfg.precision
        )
        if self.rank == 0:
            warning = ckpt_mod.space_warning(self.run_dir, self.ckpts.expected_bytes())
            if warning:
                self.log(warning)
        universal = load_dir is not None and load_dir != resume_from
        self.engine = build_engine(
            cfg, model, self.plan, self.total, self.device, load_universal=universal
        )
        self._measure_setup()
        CLOCK.mark("engine")
        seed_everything(cfg.train.seed + 1000 * self.rank)
        loaded = self._load(resume_from, load_dir, saved_world) if resume_from else None
        CLOCK.mark("resume")

        options = loader_options(cfg, self.device)
        collate = self.task.collate(self.tokenizer.pad_token_id)
        rank_batches = StepBatchSampler(
            self.sampler, self.rank, self.world, self.plan.micro, self.state.step, self.total
        )
        train_collate = self.task.train_collate(self.tokenizer.pad_token_id)  # data.packing
        self.train_batches = train_loader(
            data.splits["train"], rank_batches, train_collate, options
        )
        evals = {k: v for k, v in data.splits.items() if k != "train"}
        # evaluation collates in this process: a worker would be forked at every evaluation
        # from a rank whose threads (watchdog, TensorBoard writer, progress, the training
        # loader's feeders) run, and CPython 3.11 can deadlock such a child in its after-fork
        # thread clean-up (seen here: rank 0 stuck for good at its 2nd evaluation). Padding a
        # sorted eval batch costs ~1 ms against its forward's ~100 ms
        eval_options = {"pin_memory": options["pin_memory"]}
        self.evaluator = Evaluator(
            cfg,
            self.task,
            self.engine,
            evals,
            data.labels,
            self.rank,
            self.world,
            collate,
            eval_options,
        )
        hosts = all_gather_object(socket.gethostname())
        CLOCK.mark("loaders")
        if self.rank == 0:
            self._write_env(resume_from, hosts)
        self.sinks = build_sinks(
            self.rank,
            self.run_dir,
            cfg.logging.tensorboard,
            cfg.logging.progress_bar,
            self.total,
            self.state.step,
        )
        if loaded is not None:
            self.sinks.log(self.state.step, loaded, "checkpoint")
        self.flag = PreemptionFlag(cfg.launch.preemption_signals)

    def _own_run_dir(self) -> None:
        """Rank 0, before anything is written: the run directory's lock (one owner), and a
        refusal to resume it with a config that changes the run."""
        locks = lock_for_rank0(self.run_dir, os.environ)
        try:
            global_batch = resolve_batch(self.cfg, self.world).global_batch
            check_resume_config(self.run_dir, self.cfg, self.resume, global_batch)
        except ConfigError:
            for lock in locks:
                lock.release(refused=True)
            raise
        self.locks = locks
        for note in filter(None, (lock.takeover_note() for lock in locks)):
            self.log(note)

    def _measure_setup(self) -> None:
        """Throughput accounting with its FLOPs and peak, and the model-state prediction; the
        engine reports its phases to the accounting's timer."""
        module = self.engine.module
        self.throughput = build_throughput(self.cfg, module, self.device, self.world)
        self.engine.timer = self.throughput.timer
        predicted = predict_for_model(
            module, self.cfg, self.world, self.plan.accum, getattr(self.engine, "ds_config", None)
        )
        self.memory = MemoryWatch(self.engine, predicted, self.device)

    def _resume_source(self, resume_from: Path | None) -> tuple[Path | None, int | None]:
        """(what the engine loads, the world size it was saved at): the checkpoint itself, or
        its universal conversion when the world size changed under ZeRO 1-3."""
        if resume_from is None:
            return None, None
        problems = ckpt_mod.check_compatible(resume_from, self.cfg)
        if problems:
            raise ckpt_mod.CheckpointError("; ".join(problems))
        saved_world = ckpt_mod.read_manifest(resume_from)["world_size"]
        if saved_world == self.world or self.cfg.engine != "deepspeed" or self.cfg.zero.stage == 0:
            return resume_from, saved_world
        t0 = time.perf_counter()
        universal = ckpt_mod.ensure_universal(resume_from)
        self.log(
            f"converted {resume_from.name} ({saved_world} ranks) to a universal checkpoint "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        return universal, saved_world

    def _check_base_model(self, resume_from: Path, digest: str) -> None:
        """Every rank built its own frozen base: each must match the checkpoint's."""
        problem = ckpt_mod.base_model_problem(resume_from, digest)
        if any_rank(problem is not None, self.device):
            raise ckpt_mod.CheckpointError(
                problem or f"checkpoint {resume_from}: another rank built a different base model"
            )

    def _load(self, resume_from: Path, load_dir: Path, saved_world: int) -> dict[str, float]:
        beat("checkpoint load")
        t0 = time.perf_counter()
        self.engine.load(load_dir)
        saved, rng = ckpt_mod.load_trainer_state(resume_from, self.rank, self.world)
        self.state = TrainerState.from_dict(saved)
        if rng is not None:
            ckpt_mod.set_rng_state(rng)
        self.ckpts.mark_loaded(self.state.step, resume_from)
        seconds = time.perf_counter() - t0
        self.log(
            f"resumed from {resume_from} at step {self.state.step} ({self.state.samples_seen} samples seen; "
            f"saved with {saved_world} ranks, now {self.world}; grad accumulation {self.plan.accum}) in {seconds:.1f}s"
        )
        return {"load_seconds": seconds, "restart_count": self.env.restart_count}

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> ExitCode:
        state, engine, cfg = self.state, self.engine, self.cfg
        batches = iter(self.train_batches)
        engine.train()
        self.profiler.start(state.step)
        metric = None  # of an evaluation at this step: the checkpoint's score for keep_best
        while state.step < self.total and not (state.stopped_early or state.target_reached):
            beat("step", state.step + 1)  # the watchdog's phase marker: one attribute write
            # model states are measured in one step: the second of this process (optimizer
            # state exists by then), or the only one
            watch = self.memory.step is None and (
                self.throughput.steps_run == 1 or state.step + 1 == self.total
            )
            if watch:
                self.memory.arm()
            t0 = time.perf_counter()
            with self.throughput.timer("data"):
                micro_batches = [next(batches) for _ in range(self.plan.accum)]
            result = engine.train_step(micro_batches, step=state.step + 1)
            state.step += 1
            dt = time.perf_counter() - t0
            state.samples_seen += self.plan.global_batch
            # one all-reduce per step agrees on both flags: a NaN / inf anywhere, a signal
            nonfinite, preempted = (
                v > 0
                for v in all_reduce_sum(
                    [float(result.nonfinite), float(self.flag.set)], self.device
                )
            )
            state.acc_loss += 0.0 if self._nonfinite(result, nonfinite) else result.loss
            state.acc_steps += 1
            last = state.step == self.total
            log = state.step % cfg.logging.every_steps == 0 or last
            tokens = self.throughput.step(dt, micro_batches, log)
            state.acc_tokens += tokens
            self.step_log.record(state.step, dt, result.loss, tokens)
            self.profiler.step(state.step)
            faults.maybe_fail("step", state.step)
            if self.throughput.steps_run == 1:
                self._first_step_done()

            if watch:
                self.sinks.log(state.step, self.memory.collect(state.step), "memory")
            if log:
                self._log_train(result)
            else:
                self.sinks.progress(state.step)

            metric = None
            if self.evaluator.should_evaluate(state.step, last, preempted):
                beat("evaluation", state.step)
                ev = self.evaluator.evaluate("validation")
                self.last_eval = (state.step, ev)
                self.sinks.log(state.step, ev.metrics, "eval")
                self.evaluator.track(state, ev, state.step)
                metric = ev.metrics[self.evaluator.metric]
                self.step_log.event("eval", step=state.step, value=metric)
            if self.ckpts.should_save(state.step, last, preempted):
                self._save(metric)
            if preempted:
                self.log(
                    f"preemption signal ({self.flag.received or 'on another rank'}): "
                    f"saved step {state.step}, exiting {ExitCode.PREEMPTED}"
                )
                self._after_preemption()
                return ExitCode.PREEMPTED
            if state.stopped_early:
                self.log(
                    f"early stop at step {state.step}: {self.evaluator.metric} has not improved "
                    f"for {state.bad_evals} evaluations"
                )
                break
            if state.target_reached:
                self._target_reached()
                break
        return ExitCode.DONE

    def _target_reached(self) -> None:
        hit = self.state.target_reached
        self.step_log.event("target", **hit)
        sign = ">=" if self.evaluator.mode == "max" else "<="
        self.log(
            f"target reached at step {hit['step']}: {self.evaluator.metric} {hit['value']:.4f} "
            f"{sign} eval.stop_at={self.cfg.eval.stop_at}, {hit['seconds_since_launch']:.1f} s "
            "after launch; finishing"
        )

    def _first_step_done(self) -> None:
        """The start-up breakdown, complete with this process's first optimizer step: into
        ``env.json`` (rank 0) and one line of the log."""
        CLOCK.mark("first_step")
        if self.rank != 0:
            return
        path = self.run_dir / "env.json"
        info = json.loads(path.read_text())
        info["startup_s"] = CLOCK.summary()
        write_json_atomic(path, info)
        shown = ", ".join(f"{k} {v:.1f}" for k, v in info["startup_s"].items() if k != "total")
        self.log(f"launch → first step {info['startup_s']['total']:.1f} s ({shown})")

    def _log_train(self, result) -> None:
        state = self.state
        loss_sum, tokens = all_reduce_sum([state.acc_loss, state.acc_tokens], self.device)
        state.tokens_seen += int(tokens)
        finite = state.acc_steps - state.acc_nonfinite  # the same on every rank (agreed)
        values = {
            "loss": loss_sum / (finite * self.world) if finite else None,
            "lr": self.engine.lr(),
            "grad_norm": result.grad_norm,
            "loss_scale": result.loss_scale,
            # fp16 overflows, and NaN / inf gradients: the update and schedule skip
            "skipped_steps": self.engine.skipped_steps,
            "nonfinite_steps": state.nonfinite_steps,
            "epoch": state.samples_seen / self.sampler.num_samples,
            # the whole window since the last log step, the slowest rank's time: step_time_s,
            # samples_per_s, tokens_per_s, tflops_per_device, mfu, the phase split
            **self.throughput.window(self.device),
            **memory_stats(self.device),
        }
        self.sinks.log(state.step, {k: v for k, v in values.items() if v is not None}, "train")
        state.acc_loss, state.acc_steps, state.acc_tokens = 0.0, 0, 0
        state.acc_nonfinite = 0

    def _nonfinite(self, result, anywhere: bool) -> bool:
        """Whether this step's loss or gradients were NaN / inf on any rank (``anywhere``:
        agreed by the step's all-reduce, so every rank counts, warns and stops at the same
        step; its update was skipped). Raises ``NonFiniteError`` where
        ``train.on_nonfinite`` says to stop."""
        state, t = self.state, self.cfg.train
        warning = self.scale_watch.update(
            state.step, result.loss_scale, result.skipped, self.engine.skipped_steps
        )
        if warning:
            self.log(warning)
        if not anywhere:
            state.nonfinite_in_a_row = 0
            return False
        losses = all_gather_object(result.loss)
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        state.acc_nonfinite += 1
        newest = self.ckpts.newest[1] if self.ckpts.newest else None
        if t.on_nonfinite == "abort":
            raise NonFiniteError(abort_message(state.step, losses, newest))
        if state.nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
            raise NonFiniteError(
                too_many_message(state.step, state.nonfinite_in_a_row, losses, newest)
            )
        self.log(skip_warning(state.step, losses, state.nonfinite_in_a_row, state.nonfinite_steps))
        return True

    def _save(self, metric: float | None = None) -> None:
        beat("checkpoint save", self.state.step)
        epoch, _ = self.sampler.position(self.state.step)
        figures = self.ckpts.save(
            self.state.step,
            self.engine,
            self.state.as_dict(epoch, self.world, self.plan.global_batch),
            metric,
        )
        self.sinks.log(
            self.state.step, {k: v for k, v in figures.items() if k != "step"}, "checkpoint"
        )

    def _after_preemption(self) -> None:
        barrier()  # every rank has its shard on disk before anyone requeues or exits
        # slurm/train.sbatch requeues after the step exits 75 (ZEROTUNE_SBATCH_REQUEUE=1);
        # a user's own batch script gets the requeue from rank 0 here.
        sbatch_requeues = os.environ.get("ZEROTUNE_SBATCH_REQUEUE") == "1"
        if (
            self.rank == 0
            and self.cfg.launch.requeue_on_preemption
            and os.environ.get("SLURM_JOB_ID")
            and not sbatch_requeues
        ):
            requeue_slurm_job()

    # ---- finish: final evaluation, test, checkpoint, export, results ---------------------
    def finish(self) -> None:
        state, ev = self.state, self.evaluator
        rss_train = peak_rss_gb()  # the peak so far: set-up and training
        if self.last_eval is not None and self.last_eval[0] == state.step:
            # the loop stopped right after evaluating this very model (a target reached, an
            # early stop): that evaluation is the final one, not run and logged twice
            final = self.last_eval[1]
        else:
            beat("final evaluation", state.step)
            final = ev.evaluate("validation")
            self.sinks.log(state.step, final.metrics, "eval")
            ev.track(state, final, state.step, final=True)
        test = None
        if ev.has_split("test"):
            test = ev.evaluate("test")
            self.sinks.log(state.step, test.metrics, "test")
        if self.ckpts.needs_final_save(state.step):
            self._save(final.metrics.get(ev.metric))
        prints = all_gather_object(fingerprint(self.engine.module))
        rss = all_gather_object([rss_train, peak_rss_gb()])
        # rank 0 writes final/ and the reports while the others wait on the long group; an
        # error there is raised on every rank instead of leaving them waiting
        beat("export", state.step)
        self.figures = {  # collectives, so before rank 0 writes alone
            "throughput": self.throughput.summary(self.device),
            "memory": self.memory.results(),
        }
        run_on_rank0(self._write_outputs, final, test, prints, rss)

    def _write_outputs(self, final: EvalResult, test: EvalResult | None, prints, rss) -> None:
        if self.cfg.checkpoint.export_final:
            # final/ is `zerotune export` of the newest checkpoint, made from its files: fp32
            # master weights, one parameter at a time; no rank ever gathers the whole model
            export_checkpoint(self.ckpts.newest[1], self.run_dir / "final")
        results = self._results(final, test, prints, rss)
        write_json_atomic(self.run_dir / "results.json", results)
        for split, r in (("validation", final), ("test", test)):
            text = self.task.report_text(r.report) if r is not None and r.report else None
            if text:
                suffix = "" if split == "validation" else f"_{split}"
                (self.run_dir / f"{self.task.report_file}{suffix}.txt").write_text(text + "\n")
        self.sinks.log_hparams(
            self._hparams(), {f"validation_{k}": v for k, v in final.metrics.items()}
        )
        self._summary(results)

    def close(self, preempted: bool) -> None:
        if self.flag is not None:
            # after a preemption save, a late SIGTERM (srun's --kill-on-bad-exit once another
            # rank exited 75) must not turn exit code 75 into 143; Python resets its own
            # handlers during shutdown but leaves "ignore" alone
            self.flag.ignore() if preempted else self.flag.restore()
        if self.sinks is not None:
            self.sinks.close()
        for lock in self.locks:
            lock.release()
        self.step_log.event("end")
        self.step_log.close()
        self.profiler.stop()

    # ---- reports -------------------------------------------------------------------------
    def _write_env(self, resume_from: Path | None, hosts: list[str]) -> None:
        import platform

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
            "parameters": self.num_parameters,
            "trainable_parameters": self.num_trainable,
            "param_dtype": str(next(self.engine.module.parameters()).dtype).removeprefix("torch."),
            "resumed_from": str(resume_from) if resume_from else None,
            # seconds per start-up phase, rank 0; first_step and total added after step 1
            "startup_s": CLOCK.summary(),
        }
        write_json_atomic(self.run_dir / "env.json", info)
        if getattr(self.engine, "ds_config", None) is not None:
            write_json_atomic(self.run_dir / "deepspeed.json", self.engine.ds_config)

    def _results(
        self, final: EvalResult, test: EvalResult | None, prints: list[dict], rss: list
    ) -> dict[str, Any]:
        state = self.state
        results = {
            "steps": state.step,
            "total_steps": self.total,
            "stopped_early": state.stopped_early,
            "stop_at": None
            if self.cfg.eval.stop_at is None
            else {"target": self.cfg.eval.stop_at, "reached": state.target_reached},
            "samples_seen": state.samples_seen,
            "tokens_seen": state.tokens_seen,
            "validation": final.metrics,
            "test": test.metrics if test else None,
            "best": {
                "metric": self.evaluator.metric,
                "value": state.best_metric,
                "step": state.best_step,
            },
            "throughput": self.figures["throughput"],
            "memory": {
                "host_peak_rss_gb_train": [r[0] for r in rss],  # per rank, at the end of the loop
                "host_peak_rss_gb_end": [r[1] for r in rss],  # per rank, after the finish
                **self.figures["memory"],
            },
            "world_size": self.world,
            "parameters": self.num_parameters,
            "trainable_parameters": self.num_trainable,
            "param_digests": [f"{p['replicated']}:{p['shard']}" for p in prints],
            "params_in_sync": len({p["replicated"] for p in prints}) == 1,
            "wall_time_s": time.time() - self.t_start,
        }
        results["cost"] = cost_figures(
            self.cfg, self.throughput, results["throughput"], results["wall_time_s"], self.total
        )
        for split, r in (("validation", final), ("test", test)):
            if r is not None and r.report:
                results.update(self.task.report_results(split, r.report))
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
        shown = ", ".join(f"{k} {v[k]:.4f}" for k in self.task.metrics if k in v)
        tp = r["throughput"]
        speed = f"{tp['samples_per_s']:.1f} samples/s" if tp["samples_per_s"] else "n/a"
        if tp.get("mfu") is not None:
            speed += f", {tp['tflops_per_device']:.3g} TFLOP/s per device, MFU {tp['mfu']:.1%}"
        self.log(
            f"done: {r['steps']} steps in {r['wall_time_s']:.1f}s on {r['world_size']} rank(s); validation {shown}; "
            f"best {r['best']['metric']} {r['best']['value']:.4f} at step {r['best']['step']}; {speed}; "
            f"ranks in sync: {r['params_in_sync']}; results in {self.run_dir / 'results.json'}"
        )
