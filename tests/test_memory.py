"""Model-state memory: DeepSpeed's own tensors, measured on in-process gloo ranks at every
ZeRO stage (with and without optimizer offload, 1 and 2 ranks) and the DDP baseline, against
``trainer.memory.predict_model_states`` — within ±10 % in total and per category."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from multirank import run_distributed
from test_ranks import ROWS, make_batch, tiny_bert

from trainer.batch import resolve_batch
from trainer.config import load_config
from trainer.data import GlobalBatchPlan
from trainer.distributed import get_rank, get_world_size
from trainer.engine import build_engine
from trainer.memory import (
    ModelStates,
    PeakStates,
    partition_grad_numel,
    predict_for_model,
    predict_model_states,
)

from conftest import TINY

CPU = torch.device("cpu")
# (engine, stage, offload_optimizer, precision, global batch: 16 = accumulation 2 on 2 ranks)
CASES = [
    ("deepspeed", 0, False, "fp32", 16),
    ("deepspeed", 1, False, "fp32", 16),
    ("deepspeed", 1, False, "fp32", 8),
    ("deepspeed", 2, False, "fp32", 16),
    ("deepspeed", 2, False, "fp32", 8),
    ("deepspeed", 3, False, "fp32", 16),
    ("deepspeed", 1, True, "fp32", 16),
    ("deepspeed", 2, True, "fp32", 16),
    ("deepspeed", 2, True, "fp32", 8),
    ("deepspeed", 3, True, "fp32", 16),
    ("deepspeed", 0, False, "bf16", 16),
    ("deepspeed", 1, False, "bf16", 16),
    ("deepspeed", 1, False, "bf16", 8),
    ("deepspeed", 2, False, "bf16", 16),
    ("deepspeed", 3, False, "bf16", 16),
    ("ddp", 0, False, "fp32", 16),
]


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    import transformers.models.bert.modeling_bert  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage3  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401

        with contextlib.suppress(ImportError):
            import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401


def _measure(cases) -> list[dict]:
    out = []
    rank, world = get_rank(), get_world_size()
    for engine, stage, offload, precision, gbs in cases:
        sets = [
            f"engine={engine}",
            f"zero.stage={stage}",
            f"zero.offload_optimizer={str(offload).lower()}",
            f"precision={precision}",
            "train.micro_batch_size=4",
            f"train.global_batch_size={gbs // (2 // world)}",
            "train.max_steps=3",
        ]
        cfg = load_config(TINY, sets)
        plan = resolve_batch(cfg, world)
        sampler = GlobalBatchPlan(ROWS, plan.global_batch, 0)
        model = tiny_bert()
        e = build_engine(cfg, model, plan, 3, CPU)
        predicted = predict_for_model(e.module, cfg, world, plan.accum, e.ds_config)
        peak = PeakStates(e)
        e.train()
        for step in range(3):
            e.probe = peak if step == 1 else None  # the second step: optimizer state exists
            idx = sampler.micro_batches(step, rank, world, plan.micro)
            e.train_step([make_batch(i) for i in idx])
        out.append(
            {
                "case": (engine, stage, offload, precision, plan.accum),
                "measured": peak.peak.as_dict(),
                "predicted": predicted.as_dict(),
            }
        )
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_predicted_model_states_within_10_percent_of_measured(world):
    results = run_distributed(_measure, world, CASES, timeout=600)
    lines, bad = [], []
    for r in results[0]:
        m, p = r["measured"], r["predicted"]
        lines.append(
            f"{r['case']}: measured {m['total']} predicted {p['total']} "
            f"({(p['total'] / m['total'] - 1) * 100:+.1f} %) "
            + " ".join(f"{k} {m[k]}/{p[k]}" for k in ("params", "grads", "optimizer"))
        )
        if any(abs(p[k] - m[k]) > 0.10 * m[k] for k in ("total", "params", "grads", "optimizer")):
            bad.append(lines[-1])
    print("\n".join(lines))
    assert not bad, "\n".join(bad)


def test_partition_overlap_counts_whole_parameters_that_cross_a_boundary():
    # one group of 10 + 6 + 4 elements on 2 ranks: partitions [0, 10) and [10, 20); rank 0
    # holds the 10, rank 1 the 6 and the 4; with 7 + 6 + 7, [0, 10) overlaps 7 and 6 (13)
    assert partition_grad_numel([[10, 6, 4]], 2) == 10
    assert partition_grad_numel([[7, 6, 7]], 2) == 13
    assert partition_grad_numel([[7, 6, 7], [3]], 2) == 13 + 3  # [0, 2) of the second
    assert partition_grad_numel([[7, 6, 7]], 1) == 20


def test_prediction_follows_the_zero_split():
    """The plain arithmetic of the table (no layout corrections): 1 B parameters, fp32 /
    bf16 Adam on 8 ranks."""
    n = 10**9
    z0 = predict_model_states(n, n, zero_stage=0, world_size=8, precision="bf16")
    assert (z0.params, z0.grads, z0.optimizer) == (2 * n, 2 * n, 12 * n)
    z2 = predict_model_states(n, n, zero_stage=2, world_size=8, precision="bf16")
    assert (z2.params, z2.grads, z2.optimizer) == (2 * n, 4 * n // 8, 12 * n // 8)
    z3 = predict_model_states(n, n, zero_stage=3, world_size=8, precision="bf16")
    assert z3.total == (2 + 4 + 12) * n // 8
    off = predict_model_states(
        n, n, zero_stage=3, world_size=8, precision="bf16", offload_optimizer=True
    )
    assert off.host == 16 * n // 8  # master, moments and the fp32 gradient partition
    lora = predict_model_states(n, n // 100, zero_stage=2, world_size=8, precision="fp32")
    assert lora.optimizer == 12 * math.ceil(n / 100 / 8)
    assert isinstance(z0, ModelStates) and z0.total == z0.params + z0.grads + z0.optimizer
