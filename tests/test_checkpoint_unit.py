"""Checkpoint mechanics without training: manifest verification, fallback, retention, RNG."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

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
    assert ck.verify(d, level="size") == []  # same size: only the checksum catches it


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
