"""Storage faults during a checkpoint (issue 10, line 5): a write that fails on one rank —
injected (``ZEROTUNE_FAULT=enospc@N:R``) or a real full tmpfs — is agreed by every rank, the
partial checkpoint is removed, the committed ones stay valid, the run exits 1 with one
message naming ENOSPC, the file, the rank and the space needed, and the same command then
resumes from the last good checkpoint. In-process ranks (tests/multirank.py) run the real
loop, DeepSpeed engines and torch.save."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from multirank import run_distributed

from trainer import checkpoint as ck

from conftest import TINY


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What the ranks import, imported before they fork (as in test_loop.py)."""
    import datasets  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import trainer.export  # noqa: F401
    import trainer.loop  # noqa: F401


def _train(run_dir: str, cache: str, overrides: list[str]) -> tuple[int, str, float]:
    """Trainer.run on this rank: (exit code, what it printed, seconds)."""
    from trainer.config import load_config
    from trainer.env import detect_env
    from trainer.loop import Trainer
    from trainer.process import quiet_libraries

    quiet_libraries()
    sets = [
        f"data.cache_dir={cache}",
        "train.max_steps=12",
        "eval.every_steps=12",
        "checkpoint.every_steps=4",
        "logging.tensorboard=false",
        *overrides,
    ]
    cfg = load_config(TINY, sets)
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        code = Trainer(cfg, detect_env(os.environ), torch.device("cpu"), Path(run_dir)).run()
    return int(code), err.getvalue(), time.perf_counter() - t0


def _run(run_dir: Path, cache: Path, *overrides: str) -> list[tuple[int, str, float]]:
    return run_distributed(_train, 2, str(run_dir), str(cache), list(overrides), timeout=300)


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name != ck.LATEST)


def test_injected_enospc_on_one_rank_fails_cleanly_and_resumes(tmp_path, monkeypatch):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("ZEROTUNE_FAULT", "enospc@8:1")  # rank 1's first shard of step 8
    out = _run(run_dir, cache)
    assert [code for code, _, _ in out] == [1, 1]  # both ranks know; nobody hangs
    message = [line for line in out[0][1].splitlines() if "error:" in line]
    assert len(message) == 1, out[0][1]
    msg = message[0]
    assert "checkpoint of step 8 not saved" in msg and "ENOSPC (No space left on device)" in msg
    assert "rank 1 on " in msg and "zero_pp_rank_1" in msg  # which rank, which file
    assert "one checkpoint needs about" in msg and "MiB" in msg  # the space needed
    assert "step_00000004 is intact" in msg and "run the same command" in msg
    assert _steps(run_dir) == ["step_00000004"]  # the partial step_00000008.tmp is gone
    assert ck.verify(run_dir / "checkpoints" / "step_00000004") == []
    print(f"\ninjected ENOSPC: failed cleanly {out[0][2]:.1f}s after the run started")

    monkeypatch.delenv("ZEROTUNE_FAULT")
    again = _run(run_dir, cache)
    assert [code for code, _, _ in again] == [0, 0]
    assert "resumed from" in again[0][1] and "step_00000004 at step 4" in again[0][1]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 12


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return r.returncode == 0


@pytest.mark.slow  # the longest in-process runs: kept out of the fast tier
def test_full_tmpfs_is_named_enospc_and_keeps_the_committed_checkpoint(tmp_path):
    """A real full disk: torch.save's own error (``basic_ios::clear`` / ``file write
    failed``) becomes ENOSPC. The tmpfs holds one checkpoint and a half, so step 4 commits
    and step 8 runs out of space; after it is enlarged the same command resumes from 4."""
    cache = tmp_path / "cache"
    probe = tmp_path / "probe"
    _run(probe, cache, "train.max_steps=4")  # one checkpoint's real size, on the normal disk
    one = sum(
        m["size"]
        for m in ck.read_manifest(probe / "checkpoints" / "step_00000004")["files"].values()
    )
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(mnt, int(one * 1.5) + (256 << 10)):
        pytest.skip("mounting a tmpfs needs root and a mount namespace that allows it")
    try:
        run_dir = mnt / "run"
        out = _run(run_dir, cache)
        assert [code for code, _, _ in out] == [1, 1]
        msg = next(line for line in out[0][1].splitlines() if "error:" in line)
        assert "checkpoint of step 8 not saved" in msg and "ENOSPC" in msg, msg
        assert "iostream error" not in msg.split("writer said")[0]
        assert _steps(run_dir) == ["step_00000004"]
        assert ck.verify(run_dir / "checkpoints" / "step_00000004") == []
        print(f"\nfull tmpfs: failed cleanly {out[0][2]:.1f}s after the run started: {msg}")

        # started again on the still-full disk: warned before training, then the same failure
        warned = _run(run_dir, cache)
        assert [code for code, _, _ in warned] == [1, 1]
        warning = [
            line for line in warned[0][1].splitlines() if "warning:" in line and "free" in line
        ]
        assert len(warning) == 1 and "one checkpoint needs about" in warning[0], warned[0][1]
        assert warned[0][1].index(warning[0]) < warned[0][1].index("error:")

        subprocess.run(["mount", "-o", f"remount,size={one * 4}", str(mnt)], check=True)
        again = _run(run_dir, cache)
        assert [code for code, _, _ in again] == [0, 0]
        assert "step_00000004 at step 4" in again[0][1]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_space_warning_compares_free_space_with_one_checkpoint(tmp_path):
    assert ck.space_warning(tmp_path, 1024) is None
    huge = 1 << 60
    warning = ck.space_warning(tmp_path, huge)
    assert warning and str(tmp_path) in warning and "ENOSPC" in warning
    # the estimate: fp32 weights + AdamW moments; mixed precision adds fp32 masters
    assert ck.expected_checkpoint_bytes(1000, 1000, "fp32") == 12_000
    assert ck.expected_checkpoint_bytes(1000, 10, "bf16") == 2000 + 120
