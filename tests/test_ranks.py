"""Rank-level checks on in-process gloo ranks (``tests/multirank.py``): collectives, eval
sharding, the engines at every ZeRO stage, checkpoint save / verify / load and the universal
conversion — the same code the CLI runs, without launcher, torchrun or data preparation, so
each check takes a second or two instead of ~20 s of start-up.

The model is a tiny BERT built from a config (hidden 32, 2 layers, no dropout) and the data
a fixed synthetic set whose label is which half of the vocabulary a sentence uses; the
micro-batches of a step come from ``GlobalBatchPlan``, as in the training loop, so a step sees
the same 16 samples at any world size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import pytest
import torch
from multirank import RankFailure, run_distributed

from trainer import checkpoint as ckpt_mod
from trainer.batch import resolve_batch
from trainer.config import load_config
from trainer.data import GlobalBatchPlan, eval_shards
from trainer.distributed import (
    all_gather_object,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
)
from trainer.engine import build_engine

from conftest import TINY

CPU = torch.device("cpu")
ROWS, LENGTH, VOCAB = 64, 12, 100
STEPS = 16  # of 16 samples: 4 epochs of the synthetic set; the loss falls from 0.69 to ~0.12


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """Import what the ranks use here, before they fork, so no rank imports it again (~10 s
    each). DeepSpeed only without CUDA: a rank must pick its CPU accelerator on import."""
    import transformers.models.bert.modeling_bert  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.checkpoint.ds_to_universal  # noqa: F401
        import deepspeed.runtime.zero.stage3  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
        import deepspeed.utils.zero_to_fp32  # noqa: F401

        # ZeRO's optimizer check imports DeepSpeed's Muon, which imports torch's compiler (~5 s)
        with contextlib.suppress(ImportError):
            import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401

        import trainer.export  # noqa: F401
        import trainer.universal  # noqa: F401


# --------------------------------------------------------------------------------------
# The harness itself
# --------------------------------------------------------------------------------------


def _rank_1_raises_then_rank_0_hangs(mode: str) -> int:
    if mode == "raise" and get_rank() == 1:
        raise ValueError("boom on rank 1")
    if mode == "hang" and get_rank() == 0:
        time.sleep(600)
    barrier()
    return get_rank()


def test_harness_names_the_failing_rank_and_times_out_a_hung_one():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 of 2.*ValueError: boom on rank 1"):
        run_distributed(_rank_1_raises_then_rank_0_hangs, 2, "raise", timeout=60)
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 0 of 2.*\n.*hung: no result after 3 s"):
        run_distributed(_rank_1_raises_then_rank_0_hangs, 2, "hang", timeout=3)
    assert time.monotonic() - t0 < 30  # killed, not waited for
    assert run_distributed(_rank_1_raises_then_rank_0_hangs, 2, "ok") == [0, 1]


# --------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------


def _collectives() -> dict:
    rank = get_rank()
    barrier()
    return {
        "rank": rank,
        "world": get_world_size(),
        "any_last": any_rank(rank == get_world_size() - 1, CPU),
        "any_none": any_rank(False, CPU),
        "any_all": any_rank(True, CPU),
        "sum": all_reduce_sum([rank + 1.0, 0.25 * rank, 1e-12], CPU),
        "gather": all_gather_object({"rank": rank, "name": "r" * (rank + 1)}),
        "from_0": broadcast_object({"sent_by": rank} if rank == 0 else None),
        "from_1": broadcast_object(f"rank {rank}", src=1),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_agree_on_every_rank(world):
    out = run_distributed(_collectives, world)
    assert [r["rank"] for r in out] == list(range(world))
    total = world * (world + 1) / 2
    for r in out:
        assert r["world"] == world
        # one rank's flag reaches every rank; no flag stays False everywhere
        assert (r["any_last"], r["any_none"], r["any_all"]) == (True, False, True)
        assert r["sum"] == pytest.approx([total, 0.25 * total - 0.25 * world, world * 1e-12])
        assert r["gather"] == [{"rank": i, "name": "r" * (i + 1)} for i in range(world)]
        assert r["from_0"] == {"sent_by": 0} and r["from_1"] == "rank 1"


def test_collectives_without_a_process_group_are_rank_0_of_1():
    assert (get_rank(), get_world_size()) == (0, 1)
    assert any_rank(True, CPU) and not any_rank(False, CPU)
    assert all_reduce_sum([1.5, 2.0], CPU) == [1.5, 2.0]
    assert all_gather_object("x") == ["x"] and broadcast_object({"a": 1}) == {"a": 1}
    barrier()


# --------------------------------------------------------------------------------------
# Evaluation sharding
# --------------------------------------------------------------------------------------

EVAL_CASES = [(200, 32), (64, 16), (7, 4), (101, 5), (1, 8), (2, 1)]


def _evaluate_shards(cases) -> list[dict]:
    rank, world = get_rank(), get_world_size()
    out = []
    for n, micro in cases:
        mine, batches, counted = [], 0, 0.0
        for indices, valid in eval_shards(n, rank, world, micro):
            assert len(indices) == len(valid) and 1 <= len(indices) <= micro
            # one collective per batch, as ZeRO-3's forward needs: ranks out of step hang here
            counted += all_reduce_sum([float(sum(valid))], CPU)[0]
            mine += [i for i, v in zip(indices, valid) if v]
            batches += 1
        out.append({"batches": batches, "counted": counted, "all": all_gather_object(mine)})
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_eval_shards_count_every_sample_once_across_ranks(world):
    per_rank = run_distributed(_evaluate_shards, world, EVAL_CASES)
    for i, (n, micro) in enumerate(EVAL_CASES):
        results = [r[i] for r in per_rank]
        assert len({r["batches"] for r in results}) == 1, (n, micro, results)
        assert results[0]["batches"] == math.ceil(math.ceil(n / world) / micro)
        assert all(r["counted"] == n for r in results), (n, micro)
        gathered = results[0]["all"]
        assert all(r["all"] == gathered for r in results)
        assert sorted(i for shard in gathered for i in shard) == list(range(n)), (n, micro)


# --------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """Label 0 sentences use tokens 3..52, label 1 sentences tokens 53..102 (mod VOCAB)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (ROWS,), generator=g)
    ids = torch.randint(3, 50, (ROWS, LENGTH), generator=g) + 50 * labels[:, None]
    ids[:, 0] = 1
    return ids % VOCAB, labels


def make_batch(indices: list[int]) -> dict[str, torch.Tensor]:
    ids, labels = dataset()
    i = torch.tensor(indices)
    return {
        "input_ids": ids[i],
        "attention_mask": torch.ones(len(indices), LENGTH, dtype=torch.long),
        "labels": labels[i],
    }


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def run_config(engine: str = "deepspeed", stage: int = 2, precision: str = "fp32"):
    return load_config(
        TINY,
        [
            f"engine={engine}",
            f"zero.stage={stage}",
            f"precision={precision}",
            "train.micro_batch_size=4",
            "train.global_batch_size=16",
            f"train.max_steps={STEPS}",
            "train.warmup_steps=1",
            "train.lr=1e-2",
        ],
    )


class Job:
    """One engine on this rank and the micro-batches of any step, as the loop takes them."""

    def __init__(self, engine="deepspeed", stage=2, precision="fp32", load_universal=False):
        self.cfg = run_config(engine, stage, precision)
        self.rank, self.world = get_rank(), get_world_size()
        self.plan = resolve_batch(self.cfg, self.world)
        self.sampler = GlobalBatchPlan(ROWS, self.plan.global_batch, 0)
        self.engine = build_engine(
            self.cfg, tiny_bert(), self.plan, STEPS, CPU, load_universal=load_universal
        )
        self.engine.train()

    def step(self, step: int) -> float:
        idx = self.sampler.micro_batches(step, self.rank, self.world, self.plan.micro)
        return self.engine.train_step([make_batch(i) for i in idx]).loss

    def run(self, start: int, stop: int) -> list[float]:
        return [self.step(s) for s in range(start, stop)]


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def optimizer_numel(engine) -> int:
    """Adam moments held by this rank (ZeRO 1-3 shard them)."""
    opt = engine.engine.optimizer if hasattr(engine, "engine") else engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return sum(s["exp_avg"].numel() for s in base.state.values() if "exp_avg" in s)


VARIANTS = {
    "zero0": ("deepspeed", 0, "fp32"),
    "zero1": ("deepspeed", 1, "fp32"),
    "zero2": ("deepspeed", 2, "fp32"),
    "zero3": ("deepspeed", 3, "fp32"),
    "ddp": ("ddp", 0, "fp32"),
    "zero2-bf16": ("deepspeed", 2, "bf16"),
}


def _train_variants(variants: dict) -> dict:
    out = {}
    for name, (engine, stage, precision) in variants.items():
        job = Job(engine, stage, precision)
        losses, lrs = [], [job.engine.lr()]
        for step in range(STEPS):
            losses.append(job.step(step))
            lrs.append(job.engine.lr())
        full = job.engine.full_state_dict()
        out[name] = {
            "losses": losses,
            "digest": digest(full),
            "dtype": str(full["classifier.weight"].dtype),
            "weights": {k: v.float() for k, v in full.items()} if job.rank == 0 else None,
            "adam_numel": optimizer_numel(job.engine),
            "local_param_numel": sum(p.numel() for p in job.engine.module.parameters()),
            "lrs": lrs,
        }
    return out


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    """Every variant trained STEPS steps on 2 ranks, in one pair of processes."""
    return run_distributed(_train_variants, 2, VARIANTS, timeout=300)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_zero_stages_and_ddp_take_the_same_steps(trained):
    """ZeRO partitions state; it must not change the arithmetic beyond float noise."""
    for rank in (0, 1):
        ref = trained[rank]["zero0"]["losses"]
        for name in ("zero1", "zero2", "zero3", "ddp"):
            got = trained[rank][name]["losses"]
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-6), (name, rank)
    # Adam divides by sqrt(v): gradient noise of 1e-8 moves near-zero-gradient weights ~1e-4
    weights = trained[0]["zero0"]["weights"]
    for name in ("zero1", "zero2", "zero3", "ddp"):
        assert max_diff(trained[0][name]["weights"], weights) < 5e-4, name


def test_loss_falls_at_every_stage_and_in_bf16(trained):
    for name in VARIANTS:
        for rank in (0, 1):
            losses = trained[rank][name]["losses"]
            assert losses[0] == pytest.approx(0.693, abs=0.01)  # log 2: untrained
            assert sum(losses[-3:]) / 3 < 0.4 * sum(losses[:3]) / 3, (name, rank, losses)


def test_ranks_hold_identical_parameters(trained):
    for name in VARIANTS:
        assert trained[0][name]["digest"] == trained[1][name]["digest"], name


def test_schedule_advances_once_per_optimizer_step(trained):
    # warm-up of 1 step, then linear decay to 0 over the remaining 15 (2 micro-batches a step)
    expected = [1e-2] + [1e-2 * (1 - (k - 1) / (STEPS - 1)) for k in range(1, STEPS + 1)]
    for name in VARIANTS:
        for rank in (0, 1):
            assert trained[rank][name]["lrs"] == pytest.approx(expected, abs=1e-12), name


def test_bf16_follows_fp32_within_bf16_rounding(trained):
    fp32, bf16 = trained[0]["zero2"], trained[0]["zero2-bf16"]
    assert (fp32["dtype"], bf16["dtype"]) == ("torch.float32", "torch.bfloat16")
    assert bf16["losses"] != fp32["losses"]
    assert bf16["losses"] == pytest.approx(fp32["losses"], abs=0.03)


def test_zero_shards_optimizer_state_and_stage_3_parameters(trained):
    full = trained[0]["zero0"]["adam_numel"]
    assert (
        full
        == trained[0]["ddp"]["adam_numel"]
        == sum(
            v.numel() for k, v in trained[0]["zero0"]["weights"].items() if "position_ids" not in k
        )
    )
    for name in ("zero1", "zero2", "zero3"):
        shards = [trained[r][name]["adam_numel"] for r in (0, 1)]
        assert all(s < 0.6 * full for s in shards) and sum(shards) >= full, (name, shards)
    for rank in (0, 1):
        assert trained[rank]["zero3"]["local_param_numel"] == 0  # partitioned away
        assert (
            trained[rank]["zero2"]["local_param_numel"] == trained[rank]["ddp"]["local_param_numel"]
        )


# --------------------------------------------------------------------------------------
# Checkpoints: save / verify / resolve / load
# --------------------------------------------------------------------------------------


def _trainer_state(step: int) -> dict:
    return {"step": step, "epoch": step * 16 // ROWS, "samples_seen": step * 16, "tokens_seen": 0}


def _save_and_resume(run_dir: str, engine: str, stage: int) -> dict:
    """Train to 8 saving at 4 and 8, continue to STEPS; then resume fresh engines from 8 and
    (after corrupting 8) from 4, and continue the same steps."""
    run_dir = Path(run_dir)
    rank = get_rank()
    job = Job(engine, stage)
    manager = ckpt_mod.CheckpointManager(run_dir, job.cfg, {"hostname": "test"})
    losses = job.run(0, 4)
    saved = {4: job.engine.full_state_dict()}
    sizes = [manager.save(4, job.engine, _trainer_state(4), 0.5)["size_mb"]]
    losses += job.run(4, 8)
    saved[8] = job.engine.full_state_dict()
    sizes.append(manager.save(8, job.engine, _trainer_state(8), 0.75)["size_mb"])
    losses += job.run(8, STEPS)
    final = digest(job.engine.full_state_dict())

    ckpts = run_dir / "checkpoints"
    newest = ckpt_mod.resolve_resume(run_dir, "auto", warn=_fail_on_warning)
    problems = ckpt_mod.verify(newest)
    state, rng = ckpt_mod.load_trainer_state(newest, rank, get_world_size())
    exported = _export_weights(newest) if rank == 0 else None

    resumed = Job(engine, stage)
    resumed.engine.load(newest)
    after_8 = digest(resumed.engine.full_state_dict())
    losses_from_8 = resumed.run(8, STEPS)
    final_from_8 = digest(resumed.engine.full_state_dict())

    # a flipped byte in 8's largest file: resume warns, names it and falls back to 4
    warnings = []
    if rank == 0:
        victim = max((p for p in newest.rglob("*") if p.is_file()), key=_size)  # engine state
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        warnings.append(victim.name)
    barrier()
    fallback = ckpt_mod.resolve_resume(run_dir, "auto", warn=warnings.append)
    older = Job(engine, stage)
    older.engine.load(fallback)
    losses_from_4 = older.run(4, STEPS)
    return {
        "losses": losses,
        "final": final,
        "saved_8": digest(saved[8]),
        "newest": newest.name,
        "latest": (ckpts / ckpt_mod.LATEST).read_text().strip(),
        "problems": problems,
        "manifest": ckpt_mod.read_manifest(newest),
        "state": state,
        "rng_restored": rng is not None,
        "sizes": sizes,
        "export_gap": max_diff(exported, {k: v.float() for k, v in saved[8].items()})
        if exported is not None
        else None,
        "after_8": after_8,
        "losses_from_8": losses_from_8,
        "final_from_8": final_from_8,
        "fallback": fallback.name,
        "warnings": warnings,
        "losses_from_4": losses_from_4,
        "final_from_4": digest(older.engine.full_state_dict()),
    }


def _size(p: Path) -> int:
    return p.stat().st_size


def _fail_on_warning(msg: str) -> None:
    raise AssertionError(f"unexpected warning: {msg}")


def _export_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from trainer.export import load_full_state_dict

    return {k: v.float() for k, v in load_full_state_dict(ckpt).items() if "position_ids" not in k}


@pytest.mark.parametrize(
    "engine, stage", [("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("ddp", 0)]
)
def test_checkpoint_round_trip_resumes_bitwise(engine, stage, tmp_path):
    out = run_distributed(_save_and_resume, 2, str(tmp_path), engine, stage, timeout=300)
    for r in out:
        assert r["newest"] == r["latest"] == "step_00000008" and r["problems"] == []
        assert r["state"] == _trainer_state(8) and r["rng_restored"]
        assert r["sizes"][0] > 0 and r["sizes"] == out[0]["sizes"]  # agreed by all ranks
        # the fresh engine holds the saved weights and continues bit for bit
        assert r["after_8"] == r["saved_8"]
        assert r["losses_from_8"] == r["losses"][8:]
        assert r["final_from_8"] == r["final"]
        # the corrupted newest is skipped with a warning naming the file; 4 resumes exactly
        assert r["fallback"] == "step_00000004"
        assert any("checksum mismatch" in w and "falling back" in w for w in r["warnings"])
        assert r["losses_from_4"] == r["losses"][4:]
        assert r["final_from_4"] == r["final"]
    assert out[0]["final"] == out[1]["final"]
    assert out[0]["export_gap"] == 0.0  # the export reads back exactly what was saved
    m = out[0]["manifest"]
    assert (m["step"], m["world_size"], m["engine"], m["samples_seen"]) == (8, 2, engine, 128)
    assert m["zero_stage"] == (stage if engine == "deepspeed" else None)
    assert m["metric"]["value"] == 0.75 and m["hostname"] == "test"
    assert {"trainer_state.json", "rng/rank_00000.json", "rng/rank_00001.json"} <= set(m["files"])
    if engine == "deepspeed":
        shards = [f for f in m["files"] if f.endswith("optim_states.pt")]
        assert len(shards) == 2, m["files"]  # one optimizer shard per rank


# --------------------------------------------------------------------------------------
# Universal conversion: another world size
# --------------------------------------------------------------------------------------


def _save_at_world_2(run_dir: str, stage: int) -> dict:
    job = Job("deepspeed", stage)
    job.run(0, 4)
    ckpt_mod.CheckpointManager(Path(run_dir), job.cfg, {}).save(
        4, job.engine, _trainer_state(4), None
    )
    saved = job.engine.full_state_dict()
    next_loss = job.step(4)
    return {"saved": saved, "next_loss": next_loss, "next": job.engine.full_state_dict()}


def _step_tensors(engine) -> list[tuple[str, str, int]]:
    """(step device, parameter device, id of the step tensor) of every optimizer state."""
    opt = engine.engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return [
        (str(s["step"].device), str(p.device), id(s["step"]))
        for p, s in base.state.items()
        if torch.is_tensor(s.get("step"))
    ]


def _load_at_world_1(ckpt: str, stage: int) -> dict:
    universal = ckpt_mod.ensure_universal(Path(ckpt))
    again = ckpt_mod.ensure_universal(Path(ckpt))  # cached: no second conversion
    job = Job("deepspeed", stage, load_universal=True)
    job.engine.load(universal)
    steps = _step_tensors(job.engine)
    loaded = job.engine.full_state_dict()
    next_loss = job.step(4)
    return {
        "universal": str(universal),
        "again": str(again),
        "accum": job.plan.accum,
        "steps": steps,
        "loaded": loaded,
        "next_loss": next_loss,
        "next": job.engine.full_state_dict(),
    }


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_universal_checkpoint_loads_at_another_world_size(stage, tmp_path):
    """Saved by 2 ranks, converted with ds_to_universal, loaded by 1: the same weights, and
    the next step (same 16 samples, accumulation 4 instead of 2) lands where the 2-rank run's
    did — which it would not with fresh optimizer moments or a restarted schedule."""
    two = run_distributed(_save_at_world_2, 2, str(tmp_path), stage, timeout=300)
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    (one,) = run_distributed(_load_at_world_1, 1, str(ckpt), stage, timeout=300)
    assert one["universal"] == one["again"] == str(ckpt / "universal")
    assert (ckpt / "universal" / "DONE").is_file() and one["accum"] == 4
    # DeepSpeed's loader sets each step straight from torch.load: the engine puts it where torch
    # would (the parameter's device for fused AdamW; here every device is the CPU), one tensor
    # object per state (ZeRO-3 had one shared by every sub-group)
    assert one["steps"] and all(step == param for step, param, _ in one["steps"]), one["steps"]
    assert len({i for _, _, i in one["steps"]}) == len(one["steps"])
    assert max_diff(one["loaded"], two[0]["saved"]) == 0.0
    mean_two = (two[0]["next_loss"] + two[1]["next_loss"]) / 2
    assert one["next_loss"] == pytest.approx(mean_two, rel=1e-6)
    moved = max_diff(two[0]["next"], two[0]["saved"])
    gap = max_diff(one["next"], two[0]["next"])
    assert moved > 1e-3 and gap < 1e-6, (moved, gap)  # gap: ~1e-8, summation order
    assert json.loads((ckpt / "manifest.json").read_text())["world_size"] == 2


# --------------------------------------------------------------------------------------
# ZeRO-0 at 16 bits: the export holds the fp32 master weights
# --------------------------------------------------------------------------------------


def _zero0_bf16_export(run_dir: str) -> dict:
    from trainer.export import load_full_state_dict

    job = Job("deepspeed", 0, "bf16")
    job.run(0, 4)
    ckpt_mod.CheckpointManager(Path(run_dir), job.cfg, {}).save(
        4, job.engine, _trainer_state(4), None
    )
    opt = job.engine.engine.optimizer  # DeepSpeed's FP16 optimizer around torch AdamW
    names = job.engine.engine.param_names
    masters = {
        names[p]: m.detach().clone()
        for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups)
        for p, m in zip(g16, g32)
    }
    working = job.engine.full_state_dict()
    ckpt = Path(run_dir) / "checkpoints" / "step_00000004"
    return {
        "optimizer": type(opt).__name__,
        "masters": masters if job.rank == 0 else None,
        "working": working if job.rank == 0 else None,
        "exported": load_full_state_dict(ckpt) if job.rank == 0 else None,
    }


def test_zero0_bf16_export_is_the_fp32_master_copy(tmp_path):
    """final/ is the export of the last checkpoint: at ZeRO-0 with bf16 the weights come from
    the optimizer's fp32 master copy (DeepSpeed's fp32_groups, named by zerotune), not the
    bf16 working weights upcast."""
    out = run_distributed(_zero0_bf16_export, 2, str(tmp_path), timeout=300)
    r = out[0]
    assert r["optimizer"] == "FP16_UnfusedOptimizer"
    masters, working, exported = r["masters"], r["working"], r["exported"]
    assert exported.keys() == working.keys()
    assert all(t.dtype == torch.float32 for t in exported.values() if t.is_floating_point())
    assert set(masters) <= set(exported) and len(masters) > 10
    for name, master in masters.items():
        assert torch.equal(exported[name], master), name
        assert torch.equal(master.to(torch.bfloat16), working[name]), name  # its rounding
    # after 4 steps the masters hold what bf16 cannot: exporting the working weights differs
    rounded = [n for n in masters if not torch.equal(masters[n], working[n].float())]
    assert len(rounded) > len(masters) // 2, rounded
    buffers = [k for k in exported if k not in masters]
    assert all(torch.equal(exported[k], working[k].float()) for k in buffers), buffers
