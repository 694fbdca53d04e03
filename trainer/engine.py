"""Engines: DeepSpeed ZeRO 0-3 (the product) and plain torch DDP (the baseline).

Both take a whole optimizer step's micro-batches in ``train_step`` and hide how they
accumulate, clip, scale and shard. Optimizer: torch AdamW by default, fused on GPU
(nothing JIT-built; see trainer/ops.py); schedule: warm-up then linear / cosine / constant.

The schedule advances with real optimizer updates only: a step skipped on an overflow
(fp16, or inf/nan gradients under DeepSpeed's bf16 check) leaves it where it was —
DeepSpeed's own rule, kept by the DDP baseline too — and is counted in ``skipped_steps``.
The loss stays on the device until the step ends: one host sync per step, not one per
micro-batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from . import faults
from .adapters import build_step_hook, is_peft_model
from .batch import BatchPlan
from .checkpoint import ZERO_TAG
from .config import ConfigError, RunConfig
from .deepspeed_config import build_deepspeed_config
from .devices import fp16_problem
from .export import MASTER_NAMES
from .files import guarded
from .ops import OptimizerPlan, optimizer_plan


@dataclass
class StepResult:
    # this rank's share of the step's mean loss: the mean over its micro-batches of each one's
    # mean, weighed by its samples / micro (data.batch_by_tokens; else all weigh 1), so the
    # mean over ranks is the step's mean over its samples
    loss: float
    grad_norm: float | None
    loss_scale: float | None
    skipped: bool = False  # fp16 overflow: the optimizer step was skipped
    # this rank's loss, or the reduced gradients (fp32 / bf16), were NaN / inf: the update
    # was skipped (trainer/nonfinite.py; the loop agrees on it over ranks)
    nonfinite: bool = False


def lr_lambda(cfg: RunConfig, total_steps: int):
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total_steps)
    floor = t.min_lr_ratio

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if t.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if t.scheduler == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return fn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 built partitioned: a 1-D placeholder
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # no empty group: ZeRO-3 drops them, leaving the scheduler one learning rate too many
    # (LoRA without biases on a causal LM trains matrices only)
    return [g for g in groups if g["params"]]


def build_optimizer(
    cfg: RunConfig, model: torch.nn.Module, opt: OptimizerPlan
) -> torch.optim.Optimizer:
    """torch AdamW as ``opt`` (``trainer.ops.optimizer_plan``, the one rule) says:
    ``fused=True`` (a torch kernel, nothing to build, for CPU and CUDA tensors) without
    optimizer offload, the plain (foreach) one for offloaded CPU shards."""
    t = cfg.train
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay),
        lr=t.lr,
        betas=t.betas,
        eps=t.eps,
        **({"fused": True} if opt.fused else {}),
    )


class Engine(Protocol):
    module: torch.nn.Module
    device: torch.device
    skipped_steps: int  # optimizer steps skipped on fp16 overflow so far (restored on resume)

    def train_step(
        self, micro_batches: list[dict[str, torch.Tensor]], step: int | None = None
    ) -> StepResult: ...
    def forward(self, batch: dict[str, torch.Tensor]) -> Any: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def lr(self) -> float: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


# Under PEFT an engine saves the trainable parameters and their optimizer state only; the
# frozen base is rebuilt from the model and verified against the manifest (trainer/adapters.py).
# ``step_hook``: AdaLoRA's rank allocator, called after the last backward of a step (whole
# gradients) and after the update (whole fp32 weights); its state travels with the checkpoint.


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _add_loss(total: torch.Tensor | None, loss: torch.Tensor) -> torch.Tensor:
    """Running sum of micro-batch losses on the device, in float64 (the same sums, in the same
    order, as adding the Python floats would give — without a host sync per micro-batch)."""
    loss = loss.detach().double()
    return loss if total is None else total + loss


def _untimed(phase: str) -> contextlib.AbstractContextManager:
    """The engines' phase timer when the loop set none (``trainer.throughput.PhaseTimer``)."""
    return contextlib.nullcontext()


def _loss(out, step: int | None, first: bool) -> torch.Tensor:
    """The micro-batch's loss; NaN where a test injects it (``ZEROTUNE_FAULT=nan@N``)."""
    if first and step is not None and faults.nan_loss(step):
        return out.loss * float("nan")
    return out.loss


def _weighted(loss: torch.Tensor, batch: dict[str, torch.Tensor], micro: int | None):
    """``data.batch_by_tokens``: a micro-batch of ``n`` samples (not ``micro``) weighs its mean
    loss by ``n / micro``. The engines divide by the accumulation and average over ranks, as
    for equal micro-batches, so the step's loss and gradients are the mean over all its
    samples — the plain run's up to float rounding. ``micro`` None: equal micro-batches."""
    if micro is None:
        return loss
    n = batch["input_ids"].shape[0]
    return loss if n == micro else loss * (n / micro)


@contextlib.contextmanager
def _no_update(optimizer):
    """One boundary without an update. DeepSpeed skips an update (no scheduler step, counted
    in ``skipped_steps``) when its optimizer reports ``overflow``; the plain torch optimizer
    of ZeRO-0 fp32 has no such check, so for this step it reports one instead of stepping."""
    optimizer.overflow = True
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step, optimizer.overflow


def _grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm(2) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms), 2)) if norms else 0.0


# --------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------


class DeepSpeedEngine:
    def __init__(
        self,
        cfg: RunConfig,
        model: torch.nn.Module,
        plan: BatchPlan,
        total_steps: int,
        device: torch.device,
        load_universal: bool = False,
    ):
        from .distributed import configure_cpu_deepspeed

        configure_cpu_deepspeed(device)
        import deepspeed

        problem = fp16_problem(cfg.precision, device.type == "cuda", device.type)
        if problem:
            raise ConfigError(problem)
        self.cfg = cfg
        self.device = device
        self.optimizer_plan = optimizer_plan(cfg, device.type == "cuda")
        self.ds_config = build_deepspeed_config(
            cfg, plan, device.type == "cuda", load_universal, opt=self.optimizer_plan
        )
        # a user JSON's "optimizer" section, too, makes DeepSpeed build its own
        optimizer = (
            None
            if "optimizer" in self.ds_config
            else build_optimizer(cfg, model, self.optimizer_plan)
        )
        fn = lr_lambda(cfg, total_steps)
        scheduler = (
            (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn))
            if optimizer is None
            else torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
        )
        try:
            self.engine, _, _, _ = deepspeed.initialize(
                model=model,
                model_parameters=param_groups(model, cfg.train.weight_decay)
                if optimizer is None
                else None,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=self.ds_config,
                dist_init_required=False,
            )
        except ValueError as e:
            if "fp16" in str(e).lower() and "not supported" in str(e).lower():
                raise ConfigError(fp16_problem("fp16", False, device.type)) from None
            raise
        self.module = self.engine.module
        self.stage = cfg.zero.stage
        self.peft = is_peft_model(model)
        self.step_hook = build_step_hook(model)
        if self.step_hook is not None and self.stage == 3:
            self.step_hook.on_zero3(self.module)
        self.universal = load_universal
        self.timer = self.probe = None  # set by the loop: phase timing, model-state snapshots
        self.weigh_by = plan.micro if cfg.data.batch_by_tokens else None  # see _weighted

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def forward(self, batch):
        return self.engine(**_to(batch, self.device))

    @property
    def skipped_steps(self) -> int:
        """DeepSpeed's own count: it skips the update and the scheduler on an fp16 overflow,
        and saves / restores the count with the checkpoint."""
        return int(self.engine.skipped_steps)

    def train_step(self, micro_batches, step: int | None = None):
        total = None
        manual_norm = None
        timer = self.timer or _untimed
        # DeepSpeed's optimizers skip an update whose gradient norm is NaN / inf; the plain
        # torch optimizer (ZeRO-0 fp32) does not: zerotune skips it (the same on every rank:
        # the gradients are all-reduced in the backward at ZeRO-0)
        unchecked = not hasattr(self.engine.optimizer, "overflow")
        for i, batch in enumerate(micro_batches):
            with timer("forward"):
                out = self.engine(**_to(batch, self.device))
            loss = _weighted(_loss(out, step, i == 0), batch, self.weigh_by)
            with timer("backward"):
                self.engine.backward(loss)
            if self.probe is not None:
                self.probe()  # gradients of this micro-step held, before step() frees them
            last = i == len(micro_batches) - 1
            if last and self.stage == 0 and self.engine.bfloat16_enabled() is False:
                manual_norm = _grad_norm(self.engine.module.parameters())  # grads already averaged
            if last and self.step_hook is not None:
                self.step_hook.before_step()  # the boundary's whole gradients, before step()
            nan_norm = manual_norm is not None and not math.isfinite(manual_norm)
            with timer("optimizer"):
                if last and unchecked and nan_norm:
                    with _no_update(self.engine.optimizer):
                        self.engine.step()
                else:
                    self.engine.step()
            total = _add_loss(total, loss)
        if self.probe is not None:
            self.probe()
        # the last step() was the accumulation boundary: did it update the weights?
        skipped = not self.engine.was_step_applied()
        if self.step_hook is not None:
            self.step_hook.after_step(applied=not skipped)
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = manual_norm
        elif torch.is_tensor(norm):
            norm = float(norm)
        scale = None
        if self.cfg.precision == "fp16":
            opt = self.engine.optimizer
            scale = float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 0.0)) or 0.0)
        mean = total.item() / len(micro_batches)
        return StepResult(
            loss=mean,
            grad_norm=norm,
            loss_scale=scale,
            skipped=skipped,
            # outside fp16 DeepSpeed skips only for a NaN / inf gradient norm
            nonfinite=not math.isfinite(mean) or (skipped and self.cfg.precision != "fp16"),
        )

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, directory: Path) -> None:
        from .distributed import get_rank

        # DeepSpeed's file writes go through ``guarded``: inside ``guarded_writes()`` a full
        # disk is recorded, not raised, so this rank still reaches save_checkpoint's closing
        # barrier and the ranks agree on the failure afterwards (trainer/checkpoint.py)
        ce = self.engine.checkpoint_engine
        write = ce.save
        copy_script = self.engine._copy_recovery_script
        ce.save = lambda state_dict, path: guarded(path, write, state_dict, path)
        self.engine._copy_recovery_script = lambda save_path: guarded(
            Path(save_path) / "zero_to_fp32.py", copy_script, save_path
        )
        try:
            self.engine.save_checkpoint(
                str(directory),
                tag=ZERO_TAG,
                save_latest=False,
                exclude_frozen_parameters=self.peft,
                client_state=self._master_names(),
            )
        finally:
            del ce.save, self.engine._copy_recovery_script  # the class's own methods again
        if self.step_hook is not None and get_rank() == 0:
            guarded(Path(directory), self.step_hook.save, directory)

    def _master_names(self) -> dict[str, Any]:
        """ZeRO-0 at bf16 / fp16: DeepSpeed saves its FP16 optimizer's fp32 master copies
        (``fp32_groups`` / ``fp32_groups_flat``) without names; the export reads them by these
        (``trainer.export.MASTER_NAMES``), so ``final/`` holds fp32 master weights here too."""
        groups = getattr(self.engine.optimizer, "fp16_groups", None)
        if self.stage != 0 or self.cfg.precision == "fp32" or groups is None:
            return {}
        names = self.engine.param_names
        return {MASTER_NAMES: [[names[p] for p in group] for group in groups]}

    def load(self, directory: Path) -> None:
        if not any((Path(directory) / ZERO_TAG).glob("*model_states.pt")):
            # DeepSpeed itself fails here with a bare AssertionError
            raise _unloadable(directory, f"no {ZERO_TAG}/*model_states.pt in it")
        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=ZERO_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not self.peft,  # PEFT: the frozen base is not in the checkpoint
        )
        if path is None:
            raise _unloadable(directory, "DeepSpeed found no model states it could read")
        if self.step_hook is not None:
            # a universal conversion lives in step_N/universal/; the allocator's file in step_N/
            self.step_hook.load(Path(directory).parent if self.universal else directory)
        if self.ds_config.get("checkpoint", {}).get("load_universal"):
            self._fix_universal_load(Path(directory) / ZERO_TAG / "zero" / "optimizer_state.pt")

    def _fix_universal_load(self, optim_state: Path) -> None:
        """Undo slips of DeepSpeed's universal loader (0.19), at every stage:

        * it sets ``state["step"]`` straight from ``torch.load`` without ``map_location``
          (``base_optimizer.load_hp_checkpoint_state_from_checkpoint_dir``, ZeRO-3's
          ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), bypassing
          ``Optimizer.load_state_dict``, which puts the step of a fused (or capturable)
          optimizer on its parameter's device: fused AdamW on GPU would then fail at its
          first step after a world-size resume. Every step goes where torch's own loader
          would put it;
        * at ZeRO-3 it puts ONE ``step`` tensor object into the state of every sub-group;
          ZeRO-3 steps the torch optimizer once per sub-group and AdamW increments ``step``
          in place, so the shared counter would advance by the number of sub-groups per
          update (the bias correction wrong from the first step after the resume): each
          gets its own;
        * at ZeRO-3 it copies the hyperparameters of the checkpoint's first param group onto
          every group, so the no-decay group would come back with weight_decay > 0 (stages
          1-2 load them per group).
        """
        opt = self.engine.optimizer
        base = getattr(opt, "optimizer", opt)
        settle_steps(base)
        if self.stage != 3:
            return
        saved = torch.load(optim_state, map_location="cpu", weights_only=False)[
            "optimizer_state_dict"
        ]["param_groups"]
        if len(saved) != len(base.param_groups):
            raise RuntimeError(
                f"universal checkpoint {optim_state.parent.parent.parent} has {len(saved)} optimizer param "
                f"groups, this run {len(base.param_groups)}: the trainable parameters changed since it was "
                "written (another model.name_or_path, or another peft section: peft.method, "
                "peft.target_modules, peft.modules_to_save decide which parameters train and whether any "
                "of them is a bias or norm weight, the second group); resume with the config the "
                "checkpoint was written with (config.yaml in its run directory), or start afresh with "
                "--resume never"
            )
        for group, saved_group in zip(base.param_groups, saved):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model on every rank (gathered from shards at ZeRO-3)."""
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(
                list(self.module.parameters()), modifier_rank=None
            ):
                return {
                    k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()
                }
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}


def _unloadable(directory: Path, why: str) -> RuntimeError:
    return RuntimeError(
        f"DeepSpeed could not load the checkpoint in {directory} ({why}): check that the folder "
        "holds the files its checkpoint's manifest.json lists (a copy cut short, or files moved out "
        "of it), or pick another checkpoint (--resume RUN_DIR/checkpoints/step_N), or start afresh "
        "with --resume never"
    )


def settle_steps(optimizer: torch.optim.Optimizer) -> None:
    """Each ``state["step"]`` tensor where ``Optimizer.load_state_dict`` would put it (on the
    parameter's device as float32 for a fused or capturable group, else left on the host),
    and one tensor object per parameter."""
    flags = [bool(g.get("fused") or g.get("capturable")) for g in optimizer.param_groups]
    on_device = {p: flag for g, flag in zip(optimizer.param_groups, flags) for p in g["params"]}
    for p, state in optimizer.state.items():
        step = state.get("step")
        if not torch.is_tensor(step):
            continue
        # ZeRO-3 lists a sub-group's partition in its group only while stepping it
        if on_device.get(p, any(flags)):
            state["step"] = step.detach().to(dtype=torch.float32, device=p.device, copy=True)
        else:
            state["step"] = step.detach().to("cpu", copy=True)


# --------------------------------------------------------------------------------------
# DDP baseline
# --------------------------------------------------------------------------------------


class DDPEngine:
    def __init__(
        self,
        cfg: RunConfig,
        model: torch.nn.Module,
        plan: BatchPlan,
        total_steps: int,
        device: torch.device,
    ):
        from torch.nn.parallel import DistributedDataParallel

        from .distributed import get_world_size

        problem = fp16_problem(cfg.precision, device.type == "cuda", device.type)
        if problem:
            raise ConfigError(problem)
        self.cfg = cfg
        self.device = device
        self.module = model.to(device)
        self.model = (
            DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None
            )
            if get_world_size() > 1
            else self.module
        )
        self.optimizer_plan = optimizer_plan(cfg, device.type == "cuda")
        self.optimizer = build_optimizer(cfg, self.module, self.optimizer_plan)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, total_steps)
        )
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.skipped_steps = 0
        self.ds_config = None
        self.peft = is_peft_model(model)
        self.step_hook = build_step_hook(model)
        self.timer = self.probe = None  # set by the loop: phase timing, model-state snapshots
        self.weigh_by = plan.micro if cfg.data.batch_by_tokens else None  # see _weighted

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    def forward(self, batch):
        with self._autocast():
            return self.model(**_to(batch, self.device))

    def train_step(self, micro_batches, step: int | None = None):
        total = None
        n = len(micro_batches)
        timer = self.timer or _untimed
        for i, batch in enumerate(micro_batches):
            sync = i == n - 1 or not hasattr(self.model, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                with timer("forward"), self._autocast():
                    out = self.model(**_to(batch, self.device))
                full = _weighted(_loss(out, step, i == 0), batch, self.weigh_by)
                loss = full / n
                with timer("backward"):
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
            total = _add_loss(total, full)
            if self.probe is not None:
                self.probe()
        optimizer_phase = timer("optimizer")
        optimizer_phase.__enter__()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.step_hook is not None:
            self.step_hook.before_step()  # averaged, unclipped: what DeepSpeed's hook sees
        clip = self.cfg.train.max_grad_norm
        norm = float(
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip else float("inf"))
        )
        skipped = False
        if self.scaler:
            # GradScaler.step skips optimizer.step when it found inf/nan gradients, and update()
            # then lowers the scale — the one public sign of a skip
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
        elif not math.isfinite(norm):
            # the all-reduced gradients hold NaN / inf on every rank alike: no update anywhere
            skipped = True
        else:
            self.optimizer.step()
        if skipped:
            self.skipped_steps += 1
        else:
            self.scheduler.step()  # the schedule counts updates, as DeepSpeed's does
        if self.step_hook is not None:
            self.step_hook.after_step(applied=not skipped)
        self.optimizer.zero_grad(set_to_none=True)
        optimizer_phase.__exit__(None, None, None)
        if self.probe is not None:
            self.probe()
        scale = float(self.scaler.get_scale()) if self.scaler else None
        mean = total.item() / n
        return StepResult(
            loss=mean,
            grad_norm=norm,
            loss_scale=scale,
            skipped=skipped,
            nonfinite=not math.isfinite(mean) or (skipped and self.scaler is None),
        )

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: Path) -> None:
        from .distributed import get_rank

        if get_rank() == 0:
            d = Path(directory) / "ddp"
            d.mkdir(parents=True, exist_ok=True)
            state = {
                "model": self.module_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "skipped_steps": self.skipped_steps,
            }
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            guarded(d / "state.pt", torch.save, state, d / "state.pt")
            if self.step_hook is not None:
                guarded(Path(directory), self.step_hook.save, directory)

    def module_state(self) -> dict[str, torch.Tensor]:
        """The module's state; under PEFT its trainable parameters only."""
        state = self.module.state_dict()
        if not self.peft:
            return state
        trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in trainable}

    def load(self, directory: Path) -> None:
        state = torch.load(
            Path(directory) / "ddp" / "state.pt", map_location=self.device, weights_only=True
        )
        if self.peft:
            missing, unexpected = self.module.load_state_dict(state["model"], strict=False)
            trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
            if unexpected or trainable & set(missing):
                raise RuntimeError(
                    f"PEFT checkpoint {directory} does not match the adapters: missing "
                    f"{sorted(trainable & set(missing))[:5]}, unexpected {unexpected[:5]}"
                )
        else:
            self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.step_hook is not None:
            self.step_hook.load(directory)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}


def build_engine(
    cfg: RunConfig,
    model,
    plan: BatchPlan,
    total_steps: int,
    device: torch.device,
    load_universal: bool = False,
) -> Engine:
    if cfg.engine == "ddp":
        return DDPEngine(cfg, model, plan, total_steps, device)
    return DeepSpeedEngine(cfg, model, plan, total_steps, device, load_universal)
