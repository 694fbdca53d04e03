"""Engine step rules on a toy model: skipped updates leave the schedule alone and are
counted (DDP and DeepSpeed), the step loss is the exact mean, bf16 accumulates in fp32.

fp16 cannot run on CPU, so the skips are made the way fp16 makes them — a gradient that is
inf — on paths that CPU runs: the DDP engine with a CPU ``GradScaler`` put in place of the
CUDA one it builds for fp16, and DeepSpeed bf16, which checks gradients for overflow and
skips the same way as its fp16 (``check_grad_overflow``, on by default in 0.19).
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
from multirank import run_distributed

from trainer.batch import BatchPlan
from trainer.config import load_config
from trainer.engine import DDPEngine, DeepSpeedEngine, _add_loss

CPU = torch.device("cpu")
LR = 0.2
WARMUP = 4  # the lr changes at every step of the warm-up, so a step the schedule missed shows


class Toy(torch.nn.Module):
    """Linear regression; ``scale`` multiplies the loss (inf: every gradient overflows)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y, scale):
        pred = self.lin(x.to(self.lin.weight.dtype)).squeeze(-1).float()
        return types.SimpleNamespace(loss=((pred - y) ** 2).mean() * scale.mean())


def batches(n: int, poison: bool = False, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        scale = torch.full((8,), float("inf") if poison else 1.0)
        out.append({"x": x, "y": y, "scale": scale})
    return out


def config(*overrides: str):
    return load_config(
        None,
        [
            f"train.lr={LR}",
            f"train.warmup_steps={WARMUP}",
            "train.scheduler=linear",
            "train.max_grad_norm=1.0",
            "train.micro_batch_size=8",
            "train.global_batch_size=16",
            *overrides,
        ],
    )


def params(module) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in module.parameters()]


def test_step_loss_is_the_exact_mean_without_a_sync_per_micro_batch():
    losses = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 1e-8, 3.3, 0.7, 2.0**-20)]
    total = None
    for loss in losses:
        total = _add_loss(total, loss)
    assert torch.is_tensor(total) and total.dtype == torch.float64
    # bit for bit what summing the Python floats gave before (the resume tests compare logs)
    assert total.item() / len(losses) == sum(float(x) for x in losses) / len(losses)


# --------------------------------------------------------------------------------------
# DDP baseline (one process: no process group, no DDP wrapper)
# --------------------------------------------------------------------------------------


def test_ddp_overflow_skip_leaves_schedule_and_weights_and_is_counted(tmp_path):
    engine = DDPEngine(config("engine=ddp", "zero.stage=0"), Toy(), BatchPlan(8, 2, 1), 20, CPU)
    # fp16 is refused on CPU; its GradScaler is not: the same skip logic, on CPU tensors
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    first = engine.train_step(batches(2))
    assert not first.skipped and engine.skipped_steps == 0
    lr, weights, scale = engine.lr(), params(engine.module), engine.scaler.get_scale()
    assert lr == pytest.approx(LR * 2 / WARMUP)  # one real update: the schedule moved once

    skipped = engine.train_step(batches(2, poison=True))
    assert skipped.skipped and engine.skipped_steps == 1
    assert engine.lr() == lr  # GradScaler skipped optimizer.step: the schedule waits too
    assert engine.scheduler.last_epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, params(engine.module)))
    assert engine.scaler.get_scale() == scale / 2 == skipped.loss_scale

    after = engine.train_step(batches(2, seed=2))
    assert not after.skipped and engine.skipped_steps == 1
    assert engine.lr() == pytest.approx(LR * 3 / WARMUP)  # resumes where it stopped
    assert not all(torch.equal(a, b) for a, b in zip(weights, params(engine.module)))

    engine.save(tmp_path)  # the count is part of the checkpoint
    fresh = DDPEngine(config("engine=ddp", "zero.stage=0"), Toy(), BatchPlan(8, 2, 1), 20, CPU)
    fresh.load(tmp_path)
    assert fresh.skipped_steps == 1 and fresh.lr() == engine.lr()


def test_ddp_without_scaler_steps_the_schedule_every_step():
    engine = DDPEngine(config("engine=ddp", "zero.stage=0"), Toy(), BatchPlan(8, 2, 1), 20, CPU)
    results = [engine.train_step(batches(2, seed=s)) for s in range(3)]
    assert [r.skipped for r in results] == [False] * 3 and engine.skipped_steps == 0
    assert engine.lr() == pytest.approx(LR * 4 / WARMUP)
    assert results[-1].loss < results[0].loss


# --------------------------------------------------------------------------------------
# DeepSpeed, one gloo rank
# --------------------------------------------------------------------------------------


def _deepspeed_bf16(stage: int) -> dict:
    cfg = config("precision=bf16", f"zero.stage={stage}")
    engine = DeepSpeedEngine(cfg, Toy(), BatchPlan(8, 2, 1), 40, CPU)
    out = {
        "data_types": engine.ds_config.get("data_types"),
        "grad_accum_dtype": str(engine.engine.get_data_types()[1]),
        "param_dtype": str(next(engine.module.parameters()).dtype),
        "optimizer": type(engine.engine.optimizer).__name__,
    }
    losses = [engine.train_step(batches(2)).loss for _ in range(6)]
    lr, weights = engine.lr(), engine.full_state_dict()  # gathered at ZeRO-3
    skipped = engine.train_step(batches(2, poison=True))
    kept = engine.full_state_dict()
    out.update(
        losses=losses,
        skipped=skipped.skipped,
        skipped_steps_after_poison=engine.skipped_steps,
        lr_kept=engine.lr() == lr,
        weights_kept=all(torch.equal(weights[k], kept[k]) for k in weights),
    )
    after = engine.train_step(batches(2, seed=9))
    out.update(
        skipped_after=after.skipped,
        skipped_steps_final=engine.skipped_steps,
        lr_after=engine.lr(),
        lr_before=lr,
    )
    return out


def test_universal_load_puts_each_step_where_torch_would():
    """``settle_steps`` (run after every universal load): DeepSpeed's loader leaves ``step``
    wherever torch.load put it — the host, beside fused AdamW's CUDA parameters. Faked:
    parameters on the ``meta`` device stand for CUDA ones (no step is taken)."""
    from trainer.engine import settle_steps

    fused, plain = torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(
        [{"params": list(fused.parameters()), "fused": True}, {"params": list(plain.parameters())}]
    )
    shared = torch.tensor(7.0, dtype=torch.float64)  # one object for all, as ZeRO-3's loader does
    for p in [*fused.parameters(), *plain.parameters()]:
        opt.state[p]["step"] = shared
    settle_steps(opt)
    steps = [opt.state[p]["step"] for p in [*fused.parameters(), *plain.parameters()]]
    assert len({id(t) for t in steps}) == 4  # one tensor per parameter
    for p in fused.parameters():  # fused: the parameter's device, float32 (torch's rule)
        assert opt.state[p]["step"].device == p.device == torch.device("meta")
        assert opt.state[p]["step"].dtype == torch.float32
    for p in plain.parameters():  # not fused: the host, dtype kept
        assert opt.state[p]["step"].device.type == "cpu"
        assert opt.state[p]["step"].dtype == torch.float64


def _zero1_bf16(accum: int, missing: str) -> dict:
    cfg = config("precision=bf16", "zero.stage=1", f"train.global_batch_size={8 * accum}")
    engine = DeepSpeedEngine(cfg, Toy(), BatchPlan(8, accum, 1), 40, CPU)
    out = {
        "data_types": engine.ds_config.get("data_types"),
        "optimizer": type(engine.engine.optimizer).__name__,
        "loss": engine.train_step(batches(accum)).loss,
    }
    try:
        engine.load(Path(missing))
    except RuntimeError as e:
        out["load_error"] = str(e)
    return out


def test_zero1_bf16_pays_for_fp32_accumulation_only_when_it_accumulates(tmp_path):
    """ZeRO-1 with fp32 accumulation is DeepSpeed's BF16_Optimizer (fp32 gradients of the
    whole model on every rank): only with accumulation > 1; at 1 the ZeRO-1 optimizer as before.
    And a folder DeepSpeed finds nothing in says what to do."""
    (one,) = run_distributed(_zero1_bf16, 1, 1, str(tmp_path / "empty"), timeout=240)
    (four,) = run_distributed(_zero1_bf16, 1, 4, str(tmp_path / "empty"), timeout=240)
    assert one["data_types"] is None and one["optimizer"] == "DeepSpeedZeroOptimizer"
    assert four["data_types"] == {"grad_accum_dtype": "fp32"}
    assert four["optimizer"] == "BF16_Optimizer"
    assert math.isfinite(one["loss"]) and math.isfinite(four["loss"])
    message = one["load_error"]
    assert "could not load the checkpoint" in message and str(tmp_path / "empty") in message
    assert "--resume never" in message and "manifest.json" in message


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_bf16_accumulates_in_fp32_trains_and_counts_skips(stage):
    (out,) = run_distributed(_deepspeed_bf16, 1, stage, timeout=240)
    # DeepSpeed took the generated fp32 accumulation (ZeRO-1 through its BF16_Optimizer)
    assert out["data_types"] == {"grad_accum_dtype": "fp32"}
    assert out["grad_accum_dtype"] == "torch.float32" and out["param_dtype"] == "torch.bfloat16"
    if stage == 1:
        assert out["optimizer"] == "BF16_Optimizer"
    losses = out["losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    # an inf gradient: DeepSpeed skipped the update and its scheduler; we report and count it
    assert out["skipped"] and out["skipped_steps_after_poison"] == 1
    assert out["lr_kept"] and out["weights_kept"]
    assert not out["skipped_after"] and out["skipped_steps_final"] == 1
    # 6 real updates before the skip, 7 after it: warm-up over, linear decay over 40 steps
    assert out["lr_before"] == pytest.approx(LR * (1 - (6 - WARMUP) / (40 - WARMUP)))
    assert out["lr_after"] == pytest.approx(LR * (1 - (7 - WARMUP) / (40 - WARMUP)))
