"""Checkpoint mechanics without training: manifest verification, fallback, retention, RNG."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from multirank import run_distributed

from trainer import checkpoint as ck
from trainer.config import load_config
from trainer.files import sha256_file, write_json_atomic


def fake_ckpt(root, step, metric=None, payload=b"x" * 100):
    """A committed checkpoint with one data file and a correct manifest."""
    d = root / ck.step_dir_name(step)
    (d / "zero").mkdir(parents=True)
    (d / "zero" / "state.pt").write_bytes(payload + str(step).encode())
    files = {}
    for p in ck.list_files(d):
        files[str(p.relative_to(d))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    write_json_atomic(
        d / ck.MANIFEST,
        {
            "step": step,
            "world_size": 2,
            "metric": {"name": "accuracy", "value": metric},
            "files": files,
        },
    )
    (root / ck.LATEST).write_text(d.name)
    return d


def test_valid_checkpoint_verifies(tmp_path):
    assert ck.verify(fake_ckpt(tmp_path, 10)) == []


def test_truncated_and_corrupted_files_are_named(tmp_path):
    d = fake_ckpt(tmp_path, 10)
    f = d / "zero" / "state.pt"
    data = f.read_bytes()
    f.write_bytes(data[:-5])
    assert "zero/state.pt: size" in ck.verify(d)[0] and "truncated" in ck.verify(d)[0]
    f.write_bytes(b"y" + data[1:])
    assert ck.verify(d) == [f"{d.name}/zero/state.pt: checksum mismatch (corrupted)"]
    # same size: only the checksum catches it, which a file DeepSpeed unpickles gets at every
    # level (tests/test_checkpoint_safety.py)
    assert ck.verify(d, level="size") == ck.verify(d)


def test_missing_manifest_means_incomplete(tmp_path):
    d = fake_ckpt(tmp_path, 10)
    (d / ck.MANIFEST).unlink()
    assert "no manifest.json" in ck.verify(d)[0]


def test_resume_falls_back_to_newest_valid_with_a_warning(tmp_path):
    root = tmp_path / "checkpoints"
    fake_ckpt(root, 10)
    fake_ckpt(root, 20)
    bad = fake_ckpt(root, 30)
    (bad / "zero" / "state.pt").write_bytes(b"garbage!")
    (root / "step_00000040.tmp").mkdir()  # a crash in the middle of a save: never loaded
    warnings = []
    assert ck.resolve_resume(tmp_path, "auto", warn=warnings.append) == root / "step_00000020"
    assert len(warnings) == 1 and "step_00000030" in warnings[0] and "falling back" in warnings[0]


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    root = tmp_path / "checkpoints"
    d = fake_ckpt(root, 10)
    (d / "zero" / "state.pt").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="no valid checkpoint"):
        ck.resolve_resume(tmp_path, "auto", warn=lambda m: None)
    assert ck.resolve_resume(tmp_path, "never") is None
    assert ck.resolve_resume(tmp_path / "fresh", "auto") is None  # nothing yet: start fresh
    with pytest.raises(ck.CheckpointError, match="not a valid checkpoint"):
        ck.resolve_resume(tmp_path, str(d))


@pytest.mark.parametrize(
    "keep, expect",
    [
        (dict(keep_last=2, keep_best=1), [60, 50, 20]),  # best accuracy (0.9) was at step 20
        (dict(keep_last=1, keep_best=2), [60, 30, 20]),
        (dict(keep_last=1, keep_best=1, keep_every=40), [60, 40, 20]),
        (dict(keep_last=None, keep_best=1), [60, 50, 40, 30, 20, 10]),
    ],
)
def test_retention(tmp_path, keep, expect):
    root = tmp_path / "checkpoints"
    metrics = {10: 0.5, 20: 0.9, 30: 0.8, 40: 0.6, 50: 0.7, 60: 0.65}
    for s, m in metrics.items():
        fake_ckpt(root, s, m)
    cfg = load_config(
        None, [f"checkpoint.{k}={'null' if v is None else v}" for k, v in keep.items()]
    )
    mgr = ck.CheckpointManager(tmp_path, cfg, {})
    mgr.apply_retention(protect=root / "step_00000060")
    assert [int(p.name.split("_")[1]) for p in ck.committed(root)] == expect


def test_rng_state_round_trips_through_json(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(ck.rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    ck.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class FakeCuda:
    """Stands in for ``torch.cuda`` on a CPU machine: ``devices`` visible GPUs, the current
    one ``current``, each with its own generator state (bytes), and a log of what was set."""

    def __init__(self, devices: int, current: int):
        self.devices, self.current, self.set = devices, current, []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.devices)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(
            torch.cuda, "get_rng_state", lambda device="cuda": self.state(self.current)
        )
        monkeypatch.setattr(
            torch.cuda, "get_rng_state_all", lambda: [self.state(i) for i in range(self.devices)]
        )
        monkeypatch.setattr(
            torch.cuda, "set_rng_state", lambda s, device="cuda": self.set.append(s)
        )

    @staticmethod
    def state(i: int) -> torch.Tensor:
        return torch.full((16,), i + 1, dtype=torch.uint8)


def test_cuda_rng_is_the_current_devices_only(monkeypatch):
    """CUDA is faked: 4 visible GPUs, this rank on GPU 2. The saved state holds GPU 2's
    generator alone, and a resume where one GPU is visible (index 0) restores it."""
    FakeCuda(devices=4, current=2).install(monkeypatch)
    state = json.loads(json.dumps(ck.rng_state()))
    assert isinstance(state["cuda"], str)
    one_gpu = FakeCuda(devices=1, current=0)
    one_gpu.install(monkeypatch)
    ck.set_rng_state(state)
    assert len(one_gpu.set) == 1 and torch.equal(one_gpu.set[0], FakeCuda.state(2))


@pytest.mark.parametrize("current, restored", [(1, 1), (3, None)])
def test_old_checkpoints_cuda_list_is_read_without_index_error(monkeypatch, current, restored):
    """CUDA is faked. Checkpoints before this change saved every visible GPU's state (here 2);
    a rank takes its current device's entry, and one beyond the list is left alone instead of
    raising IndexError (the old ``set_rng_state_all`` on fewer or more GPUs)."""
    FakeCuda(devices=2, current=0).install(monkeypatch)
    state = json.loads(json.dumps(ck.rng_state()))
    state["cuda"] = [ck._b64(FakeCuda.state(i)) for i in range(2)]
    fake = FakeCuda(devices=4, current=current)
    fake.install(monkeypatch)
    ck.set_rng_state(state)
    if restored is None:
        assert fake.set == []
    else:
        assert len(fake.set) == 1 and torch.equal(fake.set[0], FakeCuda.state(restored))


def test_file_owners_are_the_writers():
    names = [
        "hf/config.json",
        "rng/rank_00000.json",
        "rng/rank_00001.json",
        "rng/rank_00002.json",
        "trainer_state.json",
        "zero/bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
        "zero/mp_rank_00_model_states.pt",
        "zero/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero/zero_pp_rank_7_mp_rank_00_optim_states.pt",  # a rank this world lacks: rank 0
    ]
    assert ck.file_owners(names, 3) == [0, 0, 1, 2, 0, 2, 0, 1, 1, 0]
    assert ck.file_owners(names, 1) == [0] * len(names)


def test_describe_file_matches_sha256(tmp_path):
    f = tmp_path / "shard.pt"
    f.write_bytes(bytes(range(256)) * 5000)
    assert ck.describe_file(f, chunk=1000) == {"size": 256 * 5000, "sha256": sha256_file(f)}


# --------------------------------------------------------------------------------------
# Saving on several ranks (in-process gloo ranks, tests/multirank.py)
# --------------------------------------------------------------------------------------


class ShardWriter:
    """Writes what DeepSpeed's ZeRO-2 save writes: each rank its optimizer shard (rank r:
    r+1 KB), rank 0 also the model states."""

    def save(self, directory):
        from trainer.distributed import get_rank

        rank = get_rank()
        zero = Path(directory) / "zero"
        zero.mkdir(exist_ok=True)
        shard = zero / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shard.write_bytes(bytes([rank]) * 1024 * (rank + 1))
        if rank == 0:
            (zero / "mp_rank_00_model_states.pt").write_bytes(b"m" * 500)


def _save_on_ranks(run_dir: str) -> dict:
    from trainer.distributed import get_rank

    described = []
    original = ck.describe_file

    def spy(path, *args, **kwargs):
        described.append(str(path))
        return original(path, *args, **kwargs)

    ck.describe_file = spy
    mgr = ck.CheckpointManager(Path(run_dir), load_config(None, []), {})
    stats = mgr.save(5, ShardWriter(), {"epoch": 0, "samples_seen": 10}, metric=None)
    final = Path(run_dir) / "checkpoints" / "step_00000005"
    tmp_name = "step_00000005.tmp"
    return {
        "described": sorted(str(p).split(tmp_name + "/", 1)[1] for p in described),
        "size_mb": stats["size_mb"],
        "problems": ck.verify(final) if get_rank() == 0 else None,
        "files": ck.read_manifest(final)["files"] if get_rank() == 0 else None,
    }


def test_each_rank_hashes_the_files_it_wrote_and_rank_0_writes_the_manifest(tmp_path):
    out = run_distributed(_save_on_ranks, 3, str(tmp_path), timeout=60)
    files = out[0]["files"]
    assert out[0]["problems"] == []  # sizes and sha256 of every file check out
    assert out[1]["described"] == [
        "rng/rank_00001.json",
        "zero/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert out[2]["described"] == [
        "rng/rank_00002.json",
        "zero/zero_pp_rank_2_mp_rank_00_optim_states.pt",
    ]
    assert out[0]["described"] == [
        "rng/rank_00000.json",
        "trainer_state.json",
        "zero/mp_rank_00_model_states.pt",
        "zero/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    # every file described once, by one rank; the manifest lists them all in path order
    assert sorted(sum((r["described"] for r in out), [])) == list(files) == sorted(files)
    assert files["zero/zero_pp_rank_2_mp_rank_00_optim_states.pt"]["size"] == 3 * 1024
    total = sum(m["size"] for m in files.values()) / 2**20
    assert [r["size_mb"] for r in out] == [total] * 3  # no broadcast needed: all ranks know it


def _rank0_work(fail: bool):
    from trainer.distributed import get_rank, run_on_rank0

    ran = []

    def work(x):
        ran.append(get_rank())
        if fail:
            raise ck.CheckpointError(f"step_{x}: checksum mismatch")
        return {"converted": x}

    try:
        return {"result": run_on_rank0(work, 7), "ran": ran}
    except ck.CheckpointError as e:
        return {"error": str(e), "ran": ran}


def test_run_on_rank0_returns_its_result_everywhere_and_its_error_on_every_rank():
    ok = run_distributed(_rank0_work, 2, False, timeout=60)
    assert ok == [{"result": {"converted": 7}, "ran": [0]}, {"result": {"converted": 7}, "ran": []}]
    failed = run_distributed(_rank0_work, 2, True, timeout=60)
    # rank 1 raises rank 0's CheckpointError instead of waiting in a collective for a timeout
    assert [r.get("error") for r in failed] == ["step_7: checksum mismatch"] * 2


def _long_waits_on_a_side_group(fake_nccl: bool) -> dict:
    import torch.distributed as dist

    from trainer import distributed as d

    real = dist.get_backend
    if fake_nccl:
        dist.get_backend = lambda group=None: "nccl" if group is None else real(group)
    d.init_long_group()
    group = d.long_group()
    d.barrier(long=True)
    got = d.broadcast_object("from 0" if d.get_rank() == 0 else None, long=True)
    gathered = d.all_gather_object(d.get_rank(), long=True)
    return {
        "side": group is not None and group is not dist.group.WORLD,
        "backend": real(group) if group is not None else None,
        "cached": d.long_group() is group,
        "got": got,
        "gathered": gathered,
    }


@pytest.mark.parametrize("fake_nccl", [True, False])
def test_long_waits_use_a_gloo_side_group_whatever_the_main_backend(fake_nccl):
    """A separate gloo group is made once and the long barrier / broadcast / gather run on it:
    with the main backend faked as NCCL (CPU has none) and on gloo alike — the rule must not
    depend on anything that could differ between ranks (new_group is a collective)."""
    out = run_distributed(_long_waits_on_a_side_group, 2, fake_nccl, timeout=60)
    for r in out:
        assert r["side"] and r["backend"] == "gloo" and r["cached"]
        assert r["got"] == "from 0" and r["gathered"] == [0, 1]


@pytest.mark.parametrize(
    "step, last, preempted, every, expect",
    [
        (10, False, False, 10, True),  # periodic
        (11, False, False, 10, False),
        (20, True, False, 10, False),  # the last step is saved by the finish, with its metric
        (20, True, True, 10, True),  # a preemption at the last step still saves
        (7, False, True, None, True),  # a preemption saves without a cadence
        (7, False, False, None, False),
    ],
)
def test_when_to_save(tmp_path, step, last, preempted, every, expect):
    cfg = load_config(None, [f"checkpoint.every_steps={'null' if every is None else every}"])
    m = ck.CheckpointManager(tmp_path, cfg, {})
    assert m.should_save(step, last, preempted) is expect
    assert m.needs_final_save(step)
    m.mark_loaded(step, tmp_path / "checkpoints" / ck.step_dir_name(step))
    assert not m.needs_final_save(step) and m.needs_final_save(step + 1)


def test_failed_conversion_and_foreign_folders_say_what_to_do(tmp_path, monkeypatch):
    import trainer.universal
    from trainer.export import export_checkpoint

    ckpt = tmp_path / "step_00000004"
    ckpt.mkdir()
    monkeypatch.setattr(trainer.universal, "convert_to_universal", lambda ckpt, out: None)
    with pytest.raises(ck.CheckpointError) as e:  # a conversion that left no DONE
        ck.ensure_universal(ckpt)
    assert f"delete the folder {ckpt / 'universal'}" in str(e.value)
    assert "run the same command again" in str(e.value)
    (ckpt / "manifest.json").write_text(json.dumps({"engine": "deepspeed", "zero_stage": 2}))
    with pytest.raises(FileNotFoundError) as e:  # copied without its hf/ folder
        export_checkpoint(ckpt, tmp_path / "out")
    assert "RUN_DIR/checkpoints/step_N" in str(e.value) and "export a run directory" in str(e.value)
