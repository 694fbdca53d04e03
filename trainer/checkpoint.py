"""Checkpoints as atomically committed directories with a verified manifest.

Layout of ``RUN_DIR/checkpoints/``::

    step_00000040/            committed: renamed from step_00000040.tmp/ after a full write
        zero/ ...             DeepSpeed's sharded engine state (or ddp/state.pt)
        trainer_state.json    step, epoch, samples/tokens seen, best metric, accumulators
        rng/rank_00000.json   python / numpy / torch RNG of every rank (JSON, no pickle)
        manifest.json         written last: versions, world size, stage, every file's size + sha256
        hf/                   model config.json + tokenizer, so export needs nothing else
        universal/            DeepSpeed universal checkpoint, made on demand for a new world size
    latest                    text file naming the newest committed step directory

A crash at any point leaves the previous checkpoint valid: ``.tmp`` folders are never
loaded, and ``latest`` moves only after the rename.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import faults
from .config import RunConfig
from .distributed import (
    all_gather_object,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    run_on_rank0,
)
from .files import (
    WriteFailure,
    free_bytes,
    fsync_dir,
    guarded_writes,
    sha256_file,
    write_json_atomic,
)
from .process import versions

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
ZERO_TAG = "zero"  # the DeepSpeed tag: step_N/zero/ holds the engine's sharded state
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); every rank raises it, with
    the same message, after the partial checkpoint was removed."""


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def expected_checkpoint_bytes(parameters: int, trainable: int, precision: str) -> int:
    """What one checkpoint takes: the weights in their training dtype, plus fp32 master
    copies (mixed precision) and AdamW's two moments for the trainable ones."""
    weight = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" else 4
    return parameters * weight + trainable * (master + 8)


def space_warning(run_dir: Path, need: int | None) -> str | None:
    """Pre-flight: the run directory's file system cannot hold one more checkpoint."""
    free = free_bytes(run_dir)
    if need is None or free is None or free >= need:
        return None
    return (
        f"warning: {run_dir} has {_mb(free)} free, one checkpoint needs about {_mb(need)}: "
        "the next checkpoint will fail for lack of space (ENOSPC); free space or use another --run-dir"
    )


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------
# RNG state as JSON
# --------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [version, list(state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        # the current device's only: a rank draws on its own GPU, and a resume that sees
        # fewer GPUs (one bound per task) must not need the others'
        out["cuda"] = _b64(torch.cuda.get_rng_state())
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(s["torch"]))
    cuda = s.get("cuda")
    if isinstance(cuda, list):
        # older checkpoints hold every visible GPU's state; this rank drew on its current one
        i = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(cuda))


def list_files(root: Path, exclude: tuple[str, ...] = (MANIFEST, "universal")) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in exclude:
            out.append(p)
    return out


_WRITER = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"^rank_(\d+)\.json$"))


def file_owners(names: list[str], world: int) -> list[int]:
    """The rank that fsyncs and hashes each file of a checkpoint: the one that wrote it.

    DeepSpeed names a rank's shards ``[bf16_]zero_pp_rank_R_…`` and zerotune its RNG files
    ``rng/rank_R.json``; everything else (the ZeRO-0/1/2 model states, trainer state, ``hf/``,
    ``ddp/``) is written by rank 0. The rule only spreads the work: every file is described
    exactly once whatever its name, so a new layout can make rank 0 slower, never wrong.
    """
    out = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        owner = 0
        for pattern in _WRITER:
            m = pattern.search(base)
            if m and int(m.group(1)) < world:
                owner = int(m.group(1))
                break
        out.append(owner)
    return out


def describe_file(path: Path, chunk: int = 1 << 22) -> dict[str, Any]:
    """fsync a file and return its manifest entry (size, sha256), reading it once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
        os.fsync(f.fileno())
        size = os.fstat(f.fileno()).st_size
    return {"size": size, "sha256": h.hexdigest()}


def needs_pickle(rel: str) -> bool:
    """A file only ``pickle`` can read: DeepSpeed's ``*.pt`` (``torch.load(weights_only=False)``).
    Everything else zerotune reads as JSON, safetensors or ``torch.load(weights_only=True)``."""
    return rel.startswith(f"{ZERO_TAG}/") and rel.endswith(".pt")


def verify(ckpt: Path, level: str = "checksum") -> list[str]:
    """Problems with a committed checkpoint (empty list: valid). At ``level="size"`` the
    files that need pickle are still checksummed: no unverified file is ever unpickled.
    ``level="quick"`` (sizes only) is for messages that name a checkpoint, never before a load."""
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        return [f"{ckpt.name}: no {MANIFEST} (incomplete write?)"]
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        return [f"{ckpt.name}/{MANIFEST}: unreadable ({e})"]
    problems = []
    for rel, meta in manifest.get("files", {}).items():
        p = ckpt / rel
        if not p.is_file():
            problems.append(f"{ckpt.name}/{rel}: missing")
        elif p.stat().st_size != meta["size"]:
            problems.append(
                f"{ckpt.name}/{rel}: size {p.stat().st_size} != {meta['size']} in the manifest (truncated?)"
            )
        elif level == "quick":
            continue
        elif (level == "checksum" or needs_pickle(rel)) and sha256_file(p) != meta["sha256"]:
            problems.append(f"{ckpt.name}/{rel}: checksum mismatch (corrupted)")
    return problems


def read_manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MANIFEST).read_text())


def committed(ckpt_root: Path) -> list[Path]:
    """Committed checkpoint directories, newest first."""
    if not ckpt_root.is_dir():
        return []
    dirs = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
    ]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1].split(".")[0]), reverse=True)


def find_valid(ckpt_root: Path, level: str = "checksum", warn=print) -> Path | None:
    """The newest checkpoint that verifies; a warning names each one skipped."""
    for ckpt in committed(ckpt_root):
        problems = verify(ckpt, level)
        if not problems:
            return ckpt
        warn(
            f"warning: skipping checkpoint {ckpt} — "
            + "; ".join(problems[:3])
            + " — falling back to an older one"
        )
    return None


def resolve_resume(run_dir: Path, resume: str, level: str = "checksum", warn=print) -> Path | None:
    """``auto``: newest valid in the run dir; ``never``: none; else that path (must be valid).
    ``force``: as ``auto``, although the config changes the run (trainer/rundir.py)."""
    if resume == "never":
        return None
    if resume == "force":
        resume = "auto"
    if resume == "auto":
        root = run_dir / "checkpoints"
        found = find_valid(root, level, warn)
        if found is None and committed(root):
            raise CheckpointError(
                f"no valid checkpoint in {root}: every one failed verification; "
                "start fresh with --resume never (in a new --run-dir) or restore the files"
            )
        return found
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory
        return resolve_resume(path, "auto", level, warn)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume!r}: no such checkpoint directory")
    problems = verify(path, level)
    if problems:
        raise CheckpointError(
            f"--resume {resume!r} is not a valid checkpoint: " + "; ".join(problems)
        )
    return path


# --------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------


class CheckpointManager:
    def __init__(
        self,
        run_dir: Path,
        cfg: RunConfig,
        extra_manifest: dict[str, Any],
        hf_writer: Callable[[Path], None] | None = None,
    ):
        self.root = run_dir / "checkpoints"
        self.cfg = cfg
        self.extra = extra_manifest
        self.rank = get_rank()
        self.world = get_world_size()
        self.hf_writer = hf_writer  # writes model config + tokenizer into a checkpoint (rank 0)
        # (step, directory) of the newest checkpoint this run has: saved, or resumed from
        self.newest: tuple[int, Path] | None = None
        self.last_size: int | None = None  # bytes of the last checkpoint this run committed
        self.estimate: int | None = None  # bytes one checkpoint should take (parameter count)

    def mark_loaded(self, step: int, ckpt: Path) -> None:
        """The run resumed from ``ckpt``: it is not saved again, and the finish exports it."""
        self.newest = (step, ckpt)

    def should_save(self, step: int, last: bool, preempted: bool = False) -> bool:
        """A periodic save during training (the last step's is made by the finish after its
        final evaluation, so it carries the metric), or a preemption save at any step."""
        every = self.cfg.checkpoint.every_steps
        return (bool(every) and step % every == 0 and not last) or preempted

    def needs_final_save(self, step: int) -> bool:
        """False when ``step`` is already on disk (a finished run resumed: nothing to re-save)."""
        return self.newest is None or self.newest[0] != step

    def clean_stale(self) -> None:
        """Leftover ``.tmp`` folders from a crash are never loaded; remove them at start."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        barrier(long=True)

    def save(
        self, step: int, engine, trainer_state: dict[str, Any], metric: float | None
    ) -> dict[str, float]:
        t0 = time.perf_counter()
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        with guarded_writes(self.rank) as guard:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                guard.call(tmp, (tmp / "rng").mkdir, parents=True)
            barrier(long=True)
            try:
                engine.save(tmp)
            except (OSError, RuntimeError) as e:  # an engine writing outside ``guarded``
                guard.record(tmp, e)
            guard.call(
                tmp / "rng" / f"rank_{self.rank:05d}.json",
                write_json_atomic,
                tmp / "rng" / f"rank_{self.rank:05d}.json",
                rng_state(),
            )
            if self.rank == 0:
                guard.call(
                    tmp / TRAINER_STATE, write_json_atomic, tmp / TRAINER_STATE, trainer_state
                )
                if self.hf_writer is not None:
                    guard.call(tmp / "hf", self.hf_writer, tmp / "hf")
        faults.maybe_fail("save", step)
        # the gather is also the barrier: every rank's files are written before anyone lists
        # them. Every rank makes the files it wrote durable and hashes them, in parallel; rank
        # 0 only assembles the manifest. The waits use the long (gloo) group: they last as
        # long as the largest shard takes to hash, whatever the NCCL timeout.
        self._agree(step, tmp, all_gather_object(guard.failure, long=True))
        names = broadcast_object(
            [str(p.relative_to(tmp)) for p in list_files(tmp)] if self.rank == 0 else None,
            long=True,
        )
        owners = file_owners(names, self.world)
        mine = {n: describe_file(tmp / n) for n, o in zip(names, owners) if o == self.rank}
        described: dict[str, Any] = {}
        for part in all_gather_object(mine, long=True):
            described.update(part)
        files = {n: described[n] for n in names}  # the manifest lists them in path order
        size = sum(m["size"] for m in files.values())
        manifest = None
        if self.rank == 0:
            for dirpath, _, _ in os.walk(tmp):  # the entries every rank created
                fsync_dir(Path(dirpath))
            name, _ = self.cfg.eval_metric()
            manifest = {
                "format": FORMAT_VERSION,
                "step": step,
                "epoch": trainer_state.get("epoch"),
                "samples_seen": trainer_state.get("samples_seen"),
                "tokens_seen": trainer_state.get("tokens_seen"),
                "world_size": self.world,
                "zero_stage": self.cfg.zero.stage if self.cfg.engine == "deepspeed" else None,
                "engine": self.cfg.engine,
                "precision": self.cfg.precision,
                "config_hash": self.cfg.config_hash(),
                "metric": {"name": name, "value": metric},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": versions(),
                **self.extra,
                "files": files,
            }
        failure = None
        if self.rank == 0:
            with guarded_writes(self.rank) as guard:
                guard.call(tmp / MANIFEST, self._commit, step, tmp, final, manifest)
            failure = guard.failure
        # rank 0's commit and retention (deleting old checkpoints) are done, or failed
        self._agree(step, tmp, [broadcast_object(failure, long=True)])
        self.newest = (step, final)
        return {
            "save_seconds": time.perf_counter() - t0,
            "size_mb": size / 2**20,
            "step": step,
        }

    def _commit(self, step: int, tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
        """Rank 0: the manifest, the rename that commits, ``latest``, then retention."""
        write_json_atomic(tmp / MANIFEST, manifest)
        faults.maybe_fail("commit", step)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        self.last_size = sum(m["size"] for m in manifest["files"].values())
        # committed now: ``latest`` is for people and scripts (loading scans the folders), so
        # a full disk here costs nothing and retention below frees space
        with contextlib.suppress(OSError):
            (self.root / (LATEST + ".tmp")).write_text(final.name + "\n")
            os.replace(self.root / (LATEST + ".tmp"), self.root / LATEST)
            fsync_dir(self.root)
        self.apply_retention(protect=final)

    def _agree(self, step: int, tmp: Path, failures: list[WriteFailure | None]) -> None:
        """Every rank learns whether any rank failed to write its part; then the partial
        checkpoint is removed and every rank raises the same ``CheckpointWriteError``."""
        failed = [f for f in failures if f is not None]
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(long=True)
        raise CheckpointWriteError(self._write_message(step, tmp, failed))

    def _write_message(self, step: int, tmp: Path, failed: list[WriteFailure]) -> str:
        first = failed[0]
        where = f"rank {first.rank} on {first.host}" + (
            f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        )
        free = free_bytes(tmp)  # after the partial checkpoint was removed
        need = self.expected_bytes()
        space = f"{_mb(free)} free on its file system now" if free is not None else ""
        if need:
            space += f", one checkpoint needs about {_mb(need)}"
        good = committed(self.root)
        resume = (
            f"the last committed checkpoint {good[0]} is intact: free space (or lower "
            "checkpoint.keep_last, or use another --run-dir) and run the same command to resume from it"
            if good
            else "no checkpoint was committed yet: free space and run the same command to start again"
        )
        return (
            f"checkpoint of step {step} not saved: writing {first.path} failed on {where}: "
            f"{first.error}; {space}; the partial checkpoint {tmp.name} was removed; {resume}"
        )

    def expected_bytes(self) -> int | None:
        """One checkpoint's size: the last one written, else the newest on disk, else the
        estimate from the parameter count."""
        if self.last_size:
            return self.last_size
        for ckpt in committed(self.root)[:1]:
            try:
                return sum(m["size"] for m in read_manifest(ckpt)["files"].values())
            except (OSError, ValueError, KeyError):
                pass
        return self.estimate

    def apply_retention(self, protect: Path) -> list[Path]:
        """Delete what keep_last / keep_best / keep_every do not keep (rank 0, after commit)."""
        c = self.cfg.checkpoint
        all_ckpts = committed(self.root)
        keep = {protect, *all_ckpts[: c.keep_last or len(all_ckpts)]}
        if c.keep_every:
            keep |= {p for p in all_ckpts if int(p.name.split("_")[1]) % c.keep_every == 0}
        _, mode = self.cfg.eval_metric()
        scored = []
        for p in all_ckpts:
            try:
                v = read_manifest(p)["metric"]["value"]
            except Exception:
                continue
            if v is not None:
                scored.append((v if mode == "max" else -v, int(p.name.split("_")[1]), p))
        scored.sort(reverse=True)
        keep |= {p for _, _, p in scored[: c.keep_best]}
        deleted = []
        for p in all_ckpts:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
                deleted.append(p)
        return deleted


def load_trainer_state(
    ckpt: Path, rank: int, world: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Trainer state and this rank's RNG (None when the world size changed)."""
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    rng_file = ckpt / "rng" / f"rank_{rank:05d}.json"
    saved_world = read_manifest(ckpt)["world_size"]
    rng = json.loads(rng_file.read_text()) if saved_world == world and rng_file.is_file() else None
    return state, rng


def check_compatible(ckpt: Path, cfg: RunConfig) -> list[str]:
    """Hard mismatches that make a checkpoint unusable for this config."""
    m = read_manifest(ckpt)
    problems = []
    if m.get("engine") != cfg.engine:
        problems.append(
            f"checkpoint {ckpt} was written by engine={m.get('engine')!r}, this run uses engine={cfg.engine!r}"
        )
    if cfg.engine == "deepspeed" and m.get("zero_stage") != cfg.zero.stage:
        problems.append(
            f"checkpoint {ckpt} has zero.stage={m.get('zero_stage')}, this run zero.stage={cfg.zero.stage}; keep the stage or export and start anew"
        )
    saved_peft = m.get("peft") or {}
    if saved_peft.get("method") != cfg.peft.method:
        problems.append(
            f"checkpoint {ckpt} was trained with peft.method={saved_peft.get('method')!r}, this run uses "
            f"peft.method={cfg.peft.method!r}; keep the method or start anew in another run directory"
        )
    elif saved_peft:
        from .adapters import shape_problems

        problems += [f"checkpoint {ckpt}: {p}" for p in shape_problems(saved_peft, cfg)]
    return problems


def _describe_universal(out: Path) -> None:
    """The conversion's own manifest: its files are unpickled by DeepSpeed's universal loader,
    so a cached conversion is loaded only while every checksum matches."""
    files = {str(p.relative_to(out)): describe_file(p) for p in list_files(out)}
    write_json_atomic(out / MANIFEST, {"format": FORMAT_VERSION, "universal": True, "files": files})


def base_model_problem(ckpt: Path, digest: str) -> str | None:
    """A PEFT checkpoint holds no frozen weights: the base this run built must be the one it
    was trained on (the manifest's digest of the frozen parameters)."""
    from .adapters import base_mismatch

    problem = base_mismatch(read_manifest(ckpt).get("base_model"), digest)
    return f"checkpoint {ckpt}: {problem}" if problem else None


def ensure_universal(ckpt: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format once (cached beside it)."""
    from .universal import convert_to_universal

    out = ckpt / "universal"

    def convert() -> None:
        problems = verify(out) if (out / "DONE").exists() else ["not converted yet"]
        if problems and (out / "DONE").exists():
            print(f"zerotune: warning: converting {ckpt.name} again: {'; '.join(problems[:3])}")
        if problems:
            convert_to_universal(ckpt, out)
            if (out / "DONE").exists():  # else the error below says what to do
                _describe_universal(out)

    run_on_rank0(convert)  # the others wait on the long group: conversion takes minutes at scale
    if not (out / "DONE").exists():
        raise CheckpointError(
            f"universal conversion of {ckpt} did not complete ({out}/DONE is missing): delete the "
            f"folder {out} and run the same command again to convert anew, or resume at the world "
            "size the checkpoint was written with (its manifest.json's world_size)"
        )
    return out
